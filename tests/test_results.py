"""`python -m seqrec.results` on hand-made run directories: seeds of one setting become one row, mean ± 95 % CI
(checked against closed forms of Student's t, no SciPy); the paired tests over seeds and over users (a planted
difference is found, identical runs differ by 0, mixed protocols and runs without per-user ranks are refused); rows
under different protocols are flagged; settings come from run.json before the legacy .hydra files."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from seqrec.results import main, results_table
from seqrec.stats import student_t_cdf, student_t_quantile, student_t_sf
from tests.test_compare import fake_run, recorded_run, write_hydra_folder


def test_seeds_of_one_setting_become_one_row_with_mean_and_std(tmp_path, capsys):
    scores = {"plain": [0.30, 0.32, 0.34], "mhc": [0.20, 0.26]}
    for row, values in scores.items():
        for seed, value in enumerate(values, 1):
            fake_run(tmp_path / row / f"seed{seed}", [f"residual={row}", f"seed={seed}"], [0.1, 0.2], test_ndcg=value)
    fake_run(tmp_path / "mhc" / "seed3", ["residual=mhc", "seed=3"], [0.1], test_ndcg=None)  # still running
    limited = tmp_path / "mhc" / "seed1" / "results.json"
    limited.write_text(json.dumps({**json.loads(limited.read_text()), "time_limited": True}))

    text, summary, frame = results_table([str(tmp_path)], ["test/ndcg@10"])
    assert (frame["status"] != "done").sum() == 1
    rows = summary.set_index("row")
    assert rows.loc["plain", "seeds"] == 3 and rows.loc["mhc", "seeds"] == 2
    assert abs(rows.loc["plain", "test/ndcg@10"] - 0.32) < 1e-12
    # 3 seeds: t(0.975, df=2) = (2p - 1) / sqrt(2p(1 - p)) in closed form
    half = rows.loc["plain", "test/ndcg@10 ci95"]
    assert abs(half - t2(0.975) * statistics.stdev([0.30, 0.32, 0.34]) / math.sqrt(3)) < 1e-9
    # 2 seeds: t(0.975, df=1) = tan(pi (p - 1/2)), the Cauchy quantile
    half2 = rows.loc["mhc", "test/ndcg@10 ci95"]
    assert abs(half2 - math.tan(math.pi * 0.475) * statistics.stdev([0.20, 0.26]) / math.sqrt(2)) < 1e-9
    assert rows.loc["mhc", "time_limited"] == 1
    assert f"0.3200 ± {t2(0.975) * 0.02 / math.sqrt(3):.4f}" in text and "1/2" in text
    assert "(mean ± 95% CI)" in text.splitlines()[0]

    assert main([str(tmp_path), "--format", "csv"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0].startswith("row,seeds,test/ndcg@10,test/ndcg@10 ci95,") and "1 unfinished" in out.err


def t2(p: float) -> float:
    """Student's t quantile with 2 degrees of freedom, closed form."""
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


@pytest.mark.parametrize("x", [0.3, 1.0, 2.5, 4.3, 12.7, 60.0, -2.0])
def test_student_t_matches_closed_forms(x):
    assert abs(student_t_cdf(x, 1) - (0.5 + math.atan(x) / math.pi)) < 1e-9
    assert abs(student_t_cdf(x, 2) - (0.5 + x / (2 * math.sqrt(2 + x * x)))) < 1e-9


@pytest.mark.parametrize("p", [0.9, 0.95, 0.975, 0.995])
def test_student_t_quantile_matches_closed_forms(p):
    assert abs(student_t_quantile(p, 1) - math.tan(math.pi * (p - 0.5))) < 1e-6
    assert abs(student_t_quantile(p, 2) - t2(p)) < 1e-6
    assert abs(student_t_quantile(0.975, 1000) - 1.962339) < 1e-4  # tends to the normal 1.959964


def test_one_seed_has_no_interval(tmp_path):
    fake_run(tmp_path / "row" / "seed1", ["seed=1"], [0.1], test_ndcg=0.25)
    text, summary, _ = results_table([str(tmp_path)], ["test/ndcg@10"])
    assert math.isnan(summary["test/ndcg@10 ci95"].iloc[0]) and "| 0.2500 " in text.splitlines()[2]
    assert "±" not in text.splitlines()[2]


def write_pair(tmp_path, a: list[float], b: list[float], protocols=("p1", "p1")) -> None:
    for row, values, protocol in (("A", a, protocols[0]), ("B", b, protocols[1])):
        for seed, value in enumerate(values, 1):
            run = fake_run(tmp_path / row / f"seed{seed}", [f"lr={row}", f"seed={seed}"], [0.1], test_ndcg=value)
            results = json.loads((run / "results.json").read_text())
            results["protocol"] = {"id": protocol, "dataset": {"name": "d", "users": 9, "items": 5}}
            (run / "results.json").write_text(json.dumps(results))


def test_paired_test_over_seeds(tmp_path, capsys):
    write_pair(tmp_path, [0.30, 0.31, 0.35], [0.31, 0.34, 0.37])  # differences 0.01, 0.03, 0.02
    assert main([str(tmp_path), "--metrics", "test/ndcg@10", "--paired", "A", "B"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    t = 0.02 / (0.01 / math.sqrt(3))
    p = 2 * (1 - (0.5 + t / (2 * math.sqrt(2 + t * t))))  # two-sided, df = 2, closed form
    half = t2(0.975) * 0.01 / math.sqrt(3)
    assert line.startswith(f"test/ndcg@10: B - A = +0.0200 ± {half:.4f} (95% CI), paired over 3 seeds (1, 2, 3)")
    assert f"t = {t:.3f}, p = {p:.4f}" in line


def test_rows_under_different_protocols_are_flagged_and_not_paired(tmp_path, capsys):
    write_pair(tmp_path, [0.30, 0.31], [0.31, 0.34], protocols=("p1", "p2"))
    text, summary, _ = results_table([str(tmp_path)], ["test/ndcg@10"])
    assert text.startswith("2 protocols: p1 (d 9u/5i") and "do not compare rows across them" in text.splitlines()[0]
    assert "| protocol |" in text and list(summary["protocol"]) == ["p1", "p2"] and list(summary["row"]) == ["A", "B"]
    assert main([str(tmp_path), "--paired", "A", "B"]) == 1
    assert "different protocols" in capsys.readouterr().err


def test_seeds_of_one_setting_under_two_protocols_are_two_rows(tmp_path):
    for seed, protocol in ((1, "p1"), (2, "p2")):
        run = fake_run(tmp_path / "r" / f"seed{seed}", [f"seed={seed}"], [0.1], test_ndcg=0.2)
        results = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps({**results, "protocol": {"id": protocol}}))
    _, summary, _ = results_table([str(tmp_path)], ["test/ndcg@10"])
    assert sorted(summary["protocol"]) == ["p1", "p2"]


def test_settings_sharing_a_folder_are_named_by_their_overrides(tmp_path):
    for seed in (1, 2):
        fake_run(tmp_path / f"ti{seed}", ["model=tisasrec", f"seed={seed}"], [0.1], test_ndcg=0.1 * seed)
    fake_run(tmp_path / "sas1", ["model=sasrec", "seed=1"], [0.1])
    _, summary, _ = results_table([str(tmp_path)], ["test/ndcg@10"])
    assert sorted(summary["row"]) == ["model=sasrec", "model=tisasrec"]
    assert abs(summary.set_index("row").loc["model=tisasrec", "test/ndcg@10"] - 0.15) < 1e-12


def test_seeds_with_different_time_limits_are_one_setting(tmp_path):
    for seed, limit in [(1, 120), (2, 85)]:
        fake_run(tmp_path / "row" / f"seed{seed}", [f"seed={seed}", f"trainer.time_limit_min={limit}"], [0.1])
    fake_run(tmp_path / "row" / "seed3", ["seed=3", "optimizer.lr=0.002"], [0.1])
    _, summary, _ = results_table([str(tmp_path)], ["test/ndcg@10"])
    assert sorted(summary["seeds"]) == [1, 2]


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
    _, summary, _ = results_table([str(tmp_path)], ["test/ndcg@10"])
    rows = summary.set_index("row")
    assert sorted(rows.index) == ["model=sasrec", "model=tisasrec"]
    assert rows.loc["model=tisasrec", "seeds"] == 2 and rows.loc["model=sasrec", "seeds"] == 1
    assert abs(rows.loc["model=tisasrec", "test/ndcg@10"] - 0.32) < 1e-12
