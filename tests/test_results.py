"""`python -m seqrec.results` on hand-made run directories: seeds of one setting become one row, mean ± sample std;
settings come from run.json before the legacy .hydra files."""

from __future__ import annotations

import json
import statistics

from seqrec.compare import find_runs
from seqrec.results import group_by_setting, main, results_table
from tests.test_compare import fake_run, recorded_run, write_hydra_folder


def test_seeds_of_one_setting_become_one_row_with_mean_and_std(tmp_path, capsys):
    scores = {"plain": [0.30, 0.32, 0.34], "mhc": [0.20, 0.26]}
    for row, values in scores.items():
        for seed, value in enumerate(values, 1):
            fake_run(tmp_path / row / f"seed{seed}", [f"residual={row}", f"seed={seed}"], [0.1, 0.2], test_ndcg=value)
    fake_run(tmp_path / "mhc" / "seed3", ["residual=mhc", "seed=3"], [0.1], test_ndcg=None)  # still running
    limited = tmp_path / "mhc" / "seed1" / "results.json"
    limited.write_text(json.dumps({**json.loads(limited.read_text()), "time_limited": True}))

    text, summaries, unfinished = results_table([str(tmp_path)], ["test/ndcg@10"])
    assert unfinished == 1
    assert summaries["plain"]["seeds"] == 3 and summaries["mhc"]["seeds"] == 2
    mean, std = summaries["plain"]["test/ndcg@10"]
    assert abs(mean - 0.32) < 1e-12 and abs(std - statistics.stdev([0.30, 0.32, 0.34])) < 1e-12
    assert summaries["mhc"]["time_limited"] == 1
    assert "0.3200 ± 0.0200" in text and "1/2" in text

    assert main([str(tmp_path), "--format", "csv"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0].startswith("row,seeds,test/ndcg@10") and "1 unfinished" in out.err


def test_settings_sharing_a_folder_are_named_by_their_overrides(tmp_path):
    for seed in (1, 2):
        fake_run(tmp_path / f"ti{seed}", ["model=tisasrec", f"seed={seed}"], [0.1], test_ndcg=0.1 * seed)
    fake_run(tmp_path / "sas1", ["model=sasrec", "seed=1"], [0.1])
    _, summaries, _ = results_table([str(tmp_path)], ["test/ndcg@10"])
    assert sorted(summaries) == ["model=sasrec", "model=tisasrec"]
    assert abs(summaries["model=tisasrec"]["test/ndcg@10"][0] - 0.15) < 1e-12


def test_seeds_with_different_time_limits_are_one_setting(tmp_path):
    for seed, limit in [(1, 120), (2, 85)]:
        fake_run(tmp_path / "row" / f"seed{seed}", [f"seed={seed}", f"trainer.time_limit_min={limit}"], [0.1])
    fake_run(tmp_path / "row" / "seed3", ["seed=3", "optimizer.lr=0.002"], [0.1])
    _, summaries, _ = results_table([str(tmp_path)], ["test/ndcg@10"])
    assert sorted(len(v) for v in group_by_setting(find_runs([str(tmp_path)])).values()) == [1, 2]
    assert len(summaries) == 2


def test_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_a_folder_whose_runs_are_all_still_going_gives_an_empty_table(tmp_path, capsys):
    fake_run(tmp_path / "row" / "seed1", ["seed=1"], [0.1], test_ndcg=None)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0].startswith("| row | seeds |") and len(out.out.splitlines()) == 2
    assert "1 unfinished" in out.err


def test_rows_follow_run_json_not_a_hydra_folder_rewritten_later(tmp_path):
    for seed, value in [(1, 0.30), (2, 0.34)]:
        run = recorded_run(
            tmp_path / "runs" / f"s{seed}",
            ["model=tisasrec", f"seed={seed}"],
            {"seed": seed},
            {"model": "tisasrec"},
            [0.1],
            test_ndcg=value,
        )
    # a later, refused command in the second seed's directory left other overrides in .hydra/
    write_hydra_folder(run, ["model=sasrec", "seed=2"], "seed: 2\n")
    fake_run(tmp_path / "runs" / "legacy", ["model=sasrec", "seed=1"], [0.1], test_ndcg=0.2)
    _, summaries, _ = results_table([str(tmp_path)], ["test/ndcg@10"])
    assert sorted(summaries) == ["model=sasrec", "model=tisasrec"]
    assert summaries["model=tisasrec"]["seeds"] == 2 and summaries["model=sasrec"]["seeds"] == 1
    assert abs(summaries["model=tisasrec"]["test/ndcg@10"][0] - 0.32) < 1e-12
