"""`python -m seqrec.results` on hand-made run directories: seeds of one setting become one row, mean ± 95 % CI
(checked against closed forms of Student's t, no SciPy); the paired tests over seeds and over users (a planted
difference is found, identical runs differ by 0, mixed protocols and runs without per-user ranks are refused); rows
under different protocols are flagged; settings come from run.json before the legacy .hydra files."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shlex
import statistics
from pathlib import Path

import numpy as np
import pytest

from seqrec.errors import SeqrecError
from seqrec.eval.user_ranks import read_test_ranks, write_test_ranks
from seqrec.results import main, results_table, stability_columns
from seqrec.stats import paired_t_test, student_t_cdf, student_t_quantile, student_t_sf, wilcoxon_signed_rank
from tests.test_compare import fake_run, recorded_run, write_hydra_folder

REPO = Path(__file__).resolve().parents[1]


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


# --------------------------------------------------------------------------------------------- paired over users
def ranked_run(path, seed: int, ranks, protocol="p1", users=None):
    """A finished run in the on-disk format with its per-user test ranks (test_ranks.npy) and the results.json
    metrics they give."""
    ranks = np.asarray(ranks)
    users = np.arange(len(ranks)) if users is None else np.asarray(users)
    setting = f"optimizer.lr={path.parent.name}"  # the row's folder names its setting
    run = fake_run(path, [setting, f"seed={seed}"], [0.1], test_ndcg=float(ndcg10(ranks).mean()))
    results = json.loads((run / "results.json").read_text())
    results["test/hr@10"] = float((ranks < 10).mean())
    results["protocol"] = {"id": protocol, "dataset": {"name": "d", "users": len(ranks), "items": 50}}
    (run / "results.json").write_text(json.dumps(results))
    write_test_ranks(run, users, ranks)
    return run


def ndcg10(ranks: np.ndarray) -> np.ndarray:
    return np.where(ranks < 10, 1 / np.log2(ranks + 2.0), 0.0)


def paired_line(tmp_path, capsys, *extra: str) -> str:
    assert main([str(tmp_path), "--metrics", "test/ndcg@10", "--paired", "A", "B", *extra]) == 0
    return capsys.readouterr().out.splitlines()[-1]


def test_paired_over_users_finds_a_planted_difference(tmp_path, capsys):
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 20, size=400) for _ in range(2)]  # two seeds of row A
    better = [np.where(np.arange(400) % 4 == 0, 0, r) for r in base]  # B: every 4th user's target ranked first
    for seed in (1, 2):
        ranked_run(tmp_path / "A" / f"seed{seed}", seed, base[seed - 1])
        ranked_run(tmp_path / "B" / f"seed{seed}", seed, better[seed - 1])
    line = paired_line(tmp_path, capsys, "--over", "users")
    diff = (ndcg10(better[0]) + ndcg10(better[1]) - ndcg10(base[0]) - ndcg10(base[1])) / 2  # seeds averaged per user
    half = student_t_quantile(0.975, 399) * diff.std(ddof=1) / math.sqrt(400)
    assert line.startswith(f"test/ndcg@10: B - A = +{diff.mean():.4f} ± {half:.4f} (95% CI), paired over 400 users")
    assert "averaged over seeds 1, 2 of both rows)" in line
    p_t, p_w = (float(x) for x in re.findall(r"p = ([0-9.e-]+)", line))
    assert diff.mean() - half > 0 and p_t < 1e-6 and p_w < 1e-6


def test_paired_over_users_pairs_only_the_seeds_both_rows_finished(tmp_path, capsys):
    """A seed only one row has is left out of that row's per-user mean, as over seeds, and the line names it: B's
    seed 1 equals A's seed 1, so the difference is 0 only if A's far better seed 2 is left out."""
    ranks = np.random.default_rng(4).integers(5, 20, size=60)
    ranked_run(tmp_path / "A" / "seed1", 1, ranks)
    ranked_run(tmp_path / "A" / "seed2", 2, np.zeros(60, dtype=np.int64))  # every target ranked first
    ranked_run(tmp_path / "B" / "seed1", 1, ranks)
    ranked_run(tmp_path / "B" / "seed3", 3, ranks // 2)
    line = paired_line(tmp_path, capsys, "--over", "users")
    assert line.startswith("test/ndcg@10: B - A = +0.0000 ± 0.0000 (95% CI), paired over 60 users")
    assert (
        "(each user's value averaged over seed 1 of both rows; left out, not finished in both rows: A seed 2; B seed 3)"
        in line
    )
    ranked_run(tmp_path / "C" / "seed4", 4, ranks)
    assert main([str(tmp_path), "--metrics", "test/ndcg@10", "--paired", "A", "C", "--over", "users"]) == 1
    assert "no seed finished in both rows" in capsys.readouterr().err


def test_paired_over_users_of_identical_runs_gives_zero(tmp_path, capsys):
    ranks = np.random.default_rng(1).integers(0, 20, size=50)
    for row in ("A", "B"):
        ranked_run(tmp_path / row / "seed1", 1, ranks)
    line = paired_line(tmp_path, capsys, "--over", "users")
    assert line.startswith("test/ndcg@10: B - A = +0.0000 ± 0.0000 (95% CI), paired over 50 users")


def test_users_are_matched_by_index_not_by_file_order(tmp_path, capsys):
    ranks = np.random.default_rng(2).integers(0, 20, size=30)
    ranked_run(tmp_path / "A" / "seed1", 1, ranks)
    order = np.random.default_rng(3).permutation(30)
    ranked_run(tmp_path / "B" / "seed1", 1, ranks[order], users=order)  # the same ranks, users listed shuffled
    assert "B - A = +0.0000 ± 0.0000" in paired_line(tmp_path, capsys, "--over", "users")


@pytest.mark.parametrize("case", ["protocols", "no_ranks", "stale_ranks", "unrecorded", "val_metric"])
def test_paired_over_users_refuses_with_one_line(tmp_path, capsys, case):
    ranks = np.arange(20) % 12
    ranked_run(tmp_path / "A" / "seed1", 1, ranks)
    b = ranked_run(tmp_path / "B" / "seed1", 1, ranks, protocol="p2" if case == "protocols" else "p1")
    if case == "no_ranks":
        (b / "test_ranks.npy").unlink()  # a run made before the evaluator wrote them
    if case == "stale_ranks":
        write_test_ranks(b, np.arange(20), ranks // 2)  # not the ranks its results.json came from
    if case == "unrecorded":
        for run in (tmp_path / "A" / "seed1", b):
            results = json.loads((run / "results.json").read_text())
            (run / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "protocol"}))
    metric = "val/ndcg@10" if case == "val_metric" else "test/ndcg@10"
    assert main([str(tmp_path), "--metrics", metric, "--paired", "A", "B", "--over", "users"]) == 1
    err = capsys.readouterr().err.strip()
    expected = {
        "protocols": "different protocols",
        "no_ranks": "test_ranks.npy: missing",
        "stale_ranks": "not the run's results.json value",
        "unrecorded": "predate the protocol record, so their test users cannot be matched",
        "val_metric": "expected test/ndcg@k",
    }[case]
    assert err.startswith("error: ") and expected in err and "\n" not in err


def test_a_ranks_file_of_another_format_is_refused_unread(tmp_path):
    run = ranked_run(tmp_path / "run", 1, np.arange(5))
    np.save(run / "test_ranks.npy", np.array([{"user": 1}], dtype=object), allow_pickle=True)  # pickled objects
    with pytest.raises(SeqrecError, match="not readable as per-user test ranks"):
        read_test_ranks(run)
    np.save(run / "test_ranks.npy", np.arange(5))
    with pytest.raises(SeqrecError, match=r"expected int32 records \(user, rank\)"):
        read_test_ranks(run)


def test_tests_agree_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=300), rng.normal(size=300) + 0.15
    b[:40] = a[:40]  # zero differences, dropped by Wilcoxon
    b[40:80] = a[40:80] + 0.5  # tied |differences|
    ours = paired_t_test(a, b)
    theirs = stats.ttest_rel(b, a)
    assert abs(ours["t"] - theirs.statistic) < 1e-9 and abs(ours["p"] - theirs.pvalue) < 1e-7
    expected = stats.wilcoxon(b - a, method="approx", correction=False, zero_method="wilcox").pvalue
    assert abs(wilcoxon_signed_rank(b - a) - expected) < 1e-9
    for x, df in [(40.0, 5), (6.0, 400), (2.0, 3)]:  # small tail probabilities stay accurate
        assert student_t_sf(x, df) == pytest.approx(stats.t.sf(x, df), rel=1e-6)


def test_clashing_folder_names_are_told_apart_by_their_parents(tmp_path):
    for parent, lr in (("cpu", "0.001"), ("gpu", "0.002")):
        for seed in (1, 2):
            fake_run(tmp_path / parent / "exp" / f"seed{seed}", [f"optimizer.lr={lr}", f"seed={seed}"], [0.1])
    _, summary, _ = results_table([str(tmp_path)], ["test/ndcg@10"])
    assert list(summary["row"]) == ["cpu/exp", "gpu/exp"]


def test_the_tables_in_docs_results_md_are_the_tools_output(capsys):
    """Every `python -m seqrec.results` command in docs/RESULTS.md, run on the committed run directories, prints
    only lines the document holds: its tables are the tool's output, unchanged (for --paired commands, which also
    print their table, the lines below the table)."""
    doc = REPO / "docs" / "RESULTS.md"
    if not (REPO / "docs" / "results").is_dir():
        pytest.skip("docs/results is absent")
    text = doc.read_text()
    lines = set(text.splitlines())
    commands = re.findall(r"^python -m seqrec\.results (.*?)(?<!\\)$", text.replace("\\\n", " "), flags=re.M)
    assert len(commands) >= 10
    for command in commands:
        args = shlex.split(command, comments=True)
        with contextlib.chdir(REPO):
            assert main(args) == 0, command
        printed = capsys.readouterr().out.splitlines()
        checked = [ln for ln in printed if ln and not ("--paired" in args and ln.startswith("|"))]
        missing = [ln for ln in checked if ln not in lines]
        assert not missing, f"docs/RESULTS.md lacks the output of `{command}`: {missing[:2]}"


def test_the_stability_table_reads_loss_rises_validation_drops_and_mhc_gains(tmp_path, capsys):
    """Per run: the last epoch's loss, the largest rise of the loss above its lowest value so far, the drop of
    validation from its best to its last, the largest mHC gains (blank for a plain run); mean ± CI per row."""
    histories = {
        "mhc/seed1": ([3.0, 2.0, 2.5, 1.5], [0.1, 0.3, 0.2, 0.25], [1.0, 1.2, 1.1, 1.0]),  # rise 0.5, drop 0.05
        "mhc/seed2": ([3.0, 2.0, 1.8, 1.7], [0.1, 0.2, 0.3, 0.3], [1.0, 1.0, 1.4, 1.3]),  # monotone: 0 and 0
        "plain/seed1": ([2.0, 1.0, 4.0, 0.5], [0.1, 0.2, 0.1, 0.2], None),  # rise 3.0, drop 0
    }
    for name, (loss, val, gains) in histories.items():
        path = tmp_path / name
        fake_run(path, [f"residual={name.split('/')[0]}", f"seed={name[-1]}"], val, test_ndcg=0.2)
        records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        for i, record in enumerate(records):
            record["train/loss"] = loss[i]
            if gains:
                record |= {"mhc/composite_fwd_gain": gains[i], "mhc/composite_bwd_gain": 2 * gains[i]}
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    _, _, frame = results_table([str(tmp_path)], ["test/ndcg@10"])
    columns = stability_columns(frame, "val/ndcg@10").set_axis(frame["dir"].map(lambda p: f"{p.parent.name}/{p.name}"))
    assert columns.loc["mhc/seed1"].tolist() == pytest.approx([1.5, 0.5, 0.05, 1.2, 2.4])
    assert columns.loc["mhc/seed2"].tolist() == pytest.approx([1.7, 0.0, 0.0, 1.4, 2.8])
    plain = columns.loc["plain/seed1"]
    assert plain[["final loss", "loss rise", "val drop"]].tolist() == pytest.approx([0.5, 3.0, 0.0])
    assert plain[["fwd gain", "bwd gain"]].isna().all()

    assert main([str(tmp_path), "--metrics", "test/ndcg@10,val/ndcg@10", "--stability"]) == 0
    lines = capsys.readouterr().out.splitlines()
    stability = lines[lines.index("training stability (val/ndcg@10):") + 1 :]
    mhc_row = next(line for line in stability if line.startswith("| mhc "))
    half = math.tan(math.pi * 0.475) * statistics.stdev([0.5, 0.0]) / math.sqrt(2)  # 2 seeds: t(0.975, df=1)
    assert f"| 0.2500 ± {half:.4f} " in mhc_row and "| 1.3000 ± " in mhc_row
    plain_row = next(line for line in stability if line.startswith("| plain "))
    assert "| 3.0000 " in plain_row and plain_row.rstrip(" |").endswith("0.0000")


def test_runs_older_than_the_protocol_record_pair_only_when_asked_and_are_counted(tmp_path, capsys):
    """A row whose runs predate the protocol record is refused beside a recorded one, unless
    --assume-same-protocol, and then the line says how many runs were not checked; two recorded protocols stay
    refused with the flag."""
    write_pair(tmp_path, [0.30, 0.31, 0.35], [0.31, 0.34, 0.37])
    for run in (tmp_path / "A").iterdir():  # A's runs as written before results.json recorded the protocol
        results = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "protocol"}))
    args = [str(tmp_path), "--metrics", "test/ndcg@10", "--paired", "A", "B"]
    assert main(args) == 1
    assert "--assume-same-protocol" in capsys.readouterr().err
    assert main([*args, "--assume-same-protocol"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("test/ndcg@10: B - A = +0.0200 ± ") and "paired over 3 seeds (1, 2, 3)" in line
    assert line.endswith("; protocol assumed equal for 3 of 6 runs (not recorded)")
    for flag in ([], ["--assume-same-protocol"]):  # users are matched under one record only, flag or not
        assert main([*args, *flag, "--over", "users"]) == 1
        assert "predate the protocol record, so their test users cannot be matched" in capsys.readouterr().err


def test_the_flag_does_not_pair_two_recorded_protocols(tmp_path, capsys):
    write_pair(tmp_path, [0.30, 0.31], [0.31, 0.34], protocols=("p1", "p2"))
    assert main([str(tmp_path), "--paired", "A", "B", "--assume-same-protocol"]) == 1
    err = capsys.readouterr().err
    assert "different protocols" in err and "--assume-same-protocol" not in err
