"""`python -m seqrec.compare` on hand-made run directories (no training): discovery, table, sorting, CSV, plots,
unfinished runs, one-line errors for empty or non-run directories, and settings read from run.json before the
legacy .hydra files."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import seqrec.compare
from seqrec.compare import compare, line_styles, main
from seqrec.run_dirs import find_runs

REPO = Path(__file__).resolve().parents[1]


def fake_run(
    path: Path, overrides: list[str], ndcg: list[float], test_ndcg: float | None = 0.1, config: str = ""
) -> Path:
    """A run directory as train.py wrote it before run.json: .hydra/overrides.yaml and config.yaml, metrics.jsonl,
    results.json (if finished)."""
    write_hydra_folder(path, overrides, "seed: 42\n" + config)
    return write_metrics(path, ndcg, test_ndcg)


def write_hydra_folder(path: Path, overrides: list[str], config_yaml: str, choices: dict | None = None) -> None:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides) or "[]\n")
    (path / ".hydra" / "config.yaml").write_text(config_yaml)
    if choices is not None:
        lines = "".join(f"      {k}: {v}\n" for k, v in choices.items())
        (path / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n" + lines)


def recorded_run(
    path: Path, overrides: list[str], config: dict, choices: dict, ndcg: list[float], test_ndcg: float | None = 0.1
) -> Path:
    """A run directory as seqrec writes it now: run.json (the record of the first launch), metrics, results."""
    path.mkdir(parents=True, exist_ok=True)
    record = {
        "format": 1,
        "config": config,
        "overrides": overrides,
        "choices": choices,
        "created": "2026-01-01T10:00:00+00:00",
        "argv": ["train.py", *overrides],
    }
    (path / "run.json").write_text(json.dumps(record, indent=2))
    return write_metrics(path, ndcg, test_ndcg)


def write_metrics(path: Path, ndcg: list[float], test_ndcg: float | None) -> Path:
    """metrics.jsonl with one validation per epoch, and results.json if `test_ndcg` is given (a finished run)."""
    with open(path / "metrics.jsonl", "w") as f:
        for epoch, value in enumerate(ndcg, 1):
            f.write(
                json.dumps(
                    {
                        "epoch": epoch,
                        "step": 10 * epoch,
                        "train/loss": 1.0 / epoch,
                        "train/lr": 0.001,
                        "train/seconds": 2.0 * epoch,
                        "val/ndcg@10": value,
                        "val/hr@10": 2 * value,
                    }
                )
                + "\n"
            )
    if test_ndcg is not None:
        best = max(range(len(ndcg)), key=ndcg.__getitem__)
        (path / "results.json").write_text(
            json.dumps(
                {
                    "best_epoch": best + 1,
                    "epochs_run": len(ndcg),
                    "train_seconds": 60.0,
                    "eval_seconds": 6.0,
                    "val/ndcg@10": ndcg[best],
                    "val/hr@10": 2 * ndcg[best],
                    "test/ndcg@10": test_ndcg,
                    "test/hr@10": 0.3,
                }
            )
        )
    return path


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "stage2"
    for h, b, curve in [(50, 2, [0.1, 0.2]), (128, 2, [0.2, 0.4]), (50, 3, [0.15, 0.25]), (128, 3, [0.3, 0.35])]:
        fake_run(
            root / f"model.hidden_units={h},model.num_blocks={b}",
            ["tuning=stage2", f"model.hidden_units={h}", f"model.num_blocks={b}", "trainer.progress=false"],
            curve,
        )
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def table_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|") and not ln.startswith("|-")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_table_has_swept_overrides_as_columns_and_is_sorted_by_the_metric(sweep, tmp_path):
    text, best, written = compare([str(sweep)], out=str(tmp_path / "out"))
    header, *rows = table_rows(text)
    assert header[:3] == ["#", "model.hidden_units", "model.num_blocks"]
    assert {"val/ndcg@10", "val/hr@10", "test/ndcg@10", "test/hr@10", "best_epoch", "epochs", "minutes"} <= set(header)
    assert "trainer.progress" not in header and "tuning" not in header  # constant or not part of the experiment
    assert "common overrides: tuning=stage2" in text
    ndcg = [float(r[header.index("val/ndcg@10")]) for r in rows]
    assert ndcg == [0.4, 0.35, 0.25, 0.2]
    assert rows[0][1:3] == ["128", "2"] and rows[0][header.index("best_epoch")] == "2"
    assert rows[0][header.index("minutes")] == "1.1"  # (train + eval seconds) / 60
    assert best.startswith("best by val/ndcg@10: model.hidden_units=128 model.num_blocks=2")
    names = sorted(p.name for p in written)
    assert names == [
        "learning_curves.png",
        "runs.md",
        "val_ndcg@10_vs_model.hidden_units.png",
        "val_ndcg@10_vs_model.num_blocks.png",
    ]


def test_other_metric_and_csv(sweep, tmp_path):
    text, best, written = compare([str(sweep)], metric="test/ndcg@10", fmt="csv", out=str(tmp_path), plots=False)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 4 and rows[0]["tuning"] == "stage2"  # CSV keeps every override
    assert [p.name for p in written] == ["runs.csv"]
    assert best.endswith("(test/ndcg@10 is not a validation metric: select on validation)")  # a reading, not a pick


def test_unfinished_run_shows_its_best_epoch_so_far(sweep, tmp_path):
    fake_run(
        sweep / "model.hidden_units=256,model.num_blocks=2",
        ["tuning=stage2", "model.hidden_units=256", "model.num_blocks=2"],
        [0.5, 0.45],
        test_ndcg=None,
    )
    text, _, _ = compare([str(sweep)], out=str(tmp_path), plots=False)
    header, *rows = table_rows(text)
    assert rows[0][1] == "256" and rows[0][header.index("val/ndcg@10")] == "0.5000"
    assert rows[0][header.index("test/ndcg@10")] == "" and rows[0][header.index("status")] == "running/failed"


def test_run_dirs_and_several_sweeps_together(sweep, tmp_path):
    single = fake_run(tmp_path / "runs" / "10-00-00", ["model.hidden_units=256"], [0.05])
    text, _, _ = compare([str(sweep), str(single)], out=str(tmp_path / "o"), plots=False)
    assert len(table_rows(text)) == 1 + 5


def test_a_run_that_left_a_swept_key_at_its_default_shows_the_default_value(tmp_path):
    composed = "sampler:\n  history: last\n  maxlen: ${model.maxlen}\nmodel:\n  maxlen: 200\n"
    fake_run(tmp_path / "a", ["sampler.history=all"], [0.3], config=composed.replace("last", "all"))
    fake_run(tmp_path / "b", [], [0.2], config=composed)
    fake_run(tmp_path / "c", ["sampler.history=last", "sampler.maxlen=200"], [0.1], config=composed)
    text, best, _ = compare([str(tmp_path)], out=str(tmp_path / "o"), plots=False)
    rows = table_rows(text)
    # b and c ran the same setting (c spelled out the defaults), so sampler.maxlen is not a swept column
    assert rows[0][:2] == ["#", "sampler.history"]
    assert [row[1] for row in rows[1:]] == ["all", "last", "last"]
    assert "common overrides: sampler.maxlen=200" in text
    assert "best by val/ndcg@10: sampler.history=all" in best


def test_the_seeds_of_one_setting_are_drawn_as_one_bundle(tmp_path, monkeypatch):
    for model, seed, curve in [
        ("sasrec", 1, [0.1]),
        ("sasrec", 2, [0.2]),
        ("tisasrec", 1, [0.3]),
        ("tisasrec", 2, [0.4]),
    ]:
        fake_run(tmp_path / f"{model}_{seed}", [f"model={model}", f"seed={seed}"], curve)
    drawn = {}
    monkeypatch.setattr(
        seqrec.compare, "plot_learning_curves", lambda runs, m, labels, out, groups=None: drawn.update(locals())
    )
    compare([str(tmp_path)], out=str(tmp_path / "o"))
    styles = line_styles(drawn["runs"], drawn["labels"], drawn["groups"])
    by_name = {path.name: style for path, style in styles.items()}
    # one colour per model, another line style for the second seed, each model named once in the legend
    assert by_name["sasrec_1"]["color"] == by_name["sasrec_2"]["color"] != by_name["tisasrec_1"]["color"]
    assert by_name["tisasrec_1"]["linestyle"] != by_name["tisasrec_2"]["linestyle"]
    legend = sorted(s["label"] for s in styles.values() if s["label"] != "_nolegend_")
    assert legend == ["model=sasrec", "model=tisasrec"]
    # runs that are all different settings keep one line and one legend entry each
    assert line_styles(drawn["runs"], drawn["labels"], None)[drawn["runs"][0].path]["label"].endswith("seed=2")


def test_default_output_folder_is_inside_the_sweep(sweep):
    _, _, written = compare([str(sweep)])
    assert all(p.parent == sweep / "compare" for p in written)
    text, _, _ = compare([str(sweep)], plots=False)  # the compare/ folder is not mistaken for a run
    assert len(table_rows(text)) == 1 + 4


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such directory"),
        ("empty", "no run directories found"),
        ("not_a_run", "no run directories found"),
        ("file", "not a directory"),
    ],
)
def test_clear_one_line_errors(tmp_path, capsys, case, message):
    target = tmp_path / case
    if case in ("empty", "not_a_run"):
        target.mkdir()
    if case == "not_a_run":
        (target / "notes.txt").write_text("hello")
        (target / ".hydra").mkdir()  # half a run: no overrides, no metrics
    if case == "file":
        target.write_text("x")
    assert main([str(target)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_unknown_metric_lists_the_available_ones(sweep, capsys):
    assert main([str(sweep), "--metric", "val/ndcg@7", "--no-plots"]) == 1
    err = capsys.readouterr().err.strip()
    assert "val/ndcg@7" in err and "val/ndcg@10" in err and "\n" not in err


def test_cli_entry_point(sweep):
    proc = subprocess.run(
        [sys.executable, "-m", "seqrec.compare", str(sweep), "--no-plots"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| #" in proc.stdout and "best by val/ndcg@10" in proc.stderr


def test_job_that_failed_before_its_first_epoch_is_skipped_with_a_note(sweep, tmp_path, capsys):
    failed = sweep / "model.hidden_units=512,model.num_blocks=2"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text("- model.hidden_units=512\n- model.num_blocks=2\n")
    text, _, _ = compare([str(sweep)], out=str(tmp_path), plots=False)
    assert len(table_rows(text)) == 1 + 4
    assert "model.hidden_units=512" in capsys.readouterr().err


def test_settings_come_from_run_json_not_from_a_hydra_folder_a_later_command_rewrote(tmp_path, capsys):
    # run a: launched with optimizer.lr=0.002 and model=tisasrec (a group default in its config); a later command in
    # the same directory, refused, rewrote .hydra/ with other overrides, another config and other choices
    recorded_run(
        tmp_path / "a",
        ["optimizer.lr=0.002"],
        {"seed": 1, "optimizer": {"lr": 0.002}, "model": {"hidden_units": 64}},
        {"model": "tisasrec", "residual": "plain"},
        [0.3],
    )
    write_hydra_folder(
        tmp_path / "a",
        ["optimizer.lr=0.05", "model=sasrec", "model.hidden_units=256"],
        "seed: 1\noptimizer:\n  lr: 0.05\nmodel:\n  hidden_units: 256\n",
        choices={"model": "sasrec", "residual": "mhc"},
    )
    # run b: made with run.json only (seqrec no longer writes .hydra/)
    recorded_run(
        tmp_path / "b",
        ["optimizer.lr=0.001", "model=sasrec"],
        {"seed": 1, "optimizer": {"lr": 0.001}, "model": {"hidden_units": 64}},
        {"model": "sasrec", "residual": "plain"},
        [0.2],
    )
    text, best, _ = compare([str(tmp_path)], out=str(tmp_path / "o"), plots=False)
    header, *rows = table_rows(text)
    assert header[1:3] == ["model", "optimizer.lr"]  # not model.hidden_units: only the rewritten .hydra had it
    assert [row[1:3] for row in rows] == [["tisasrec", "0.002"], ["sasrec", "0.001"]]
    assert "0.05" not in text and "256" not in text and "mhc" not in text
    assert best.startswith("best by val/ndcg@10: model=tisasrec optimizer.lr=0.002")


def test_a_legacy_run_without_a_config_yaml_reads_results_json_config(tmp_path):
    fake_run(tmp_path / "a", ["sampler.history=all"], [0.3])
    legacy = fake_run(tmp_path / "b", [], [0.2])
    (legacy / ".hydra" / "config.yaml").unlink()
    results = json.loads((legacy / "results.json").read_text())
    (legacy / "results.json").write_text(json.dumps({**results, "config": {"sampler": {"history": "last"}}}))
    text, _, _ = compare([str(tmp_path)], out=str(tmp_path / "o"), plots=False)
    assert [row[1] for row in table_rows(text)[1:]] == ["all", "last"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not readable as JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"config": {}, "overrides": "seed=1", "choices": {}}', "expected 'overrides' to be a JSON list"),
        ('{"config": {}, "overrides": [1], "choices": {}}', "a list of strings"),
    ],
)
def test_a_malformed_run_json_is_a_one_line_error_naming_it(tmp_path, capsys, content, message):
    run = recorded_run(tmp_path / "run", [], {}, {}, [0.1])
    (run / "run.json").write_text(content)
    assert main([str(tmp_path), "--no-plots", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {run / 'run.json'}: ") and message in err and "\n" not in err


def test_the_legacy_run_directories_in_docs_still_compare():
    folder = REPO / "docs" / "results" / "ml1m_cpu_h256"
    if not folder.is_dir():
        pytest.skip("docs/results/ml1m_cpu_h256 is absent")
    runs = find_runs([str(folder)])
    assert len(runs) == 3 and all(not (r.path / "run.json").exists() for r in runs)
    assert {r.setting("seed") for r in runs} == {"1", "2", "3"}
    assert {r.setting("model.hidden_units") for r in runs} == {"256"}


def test_runs_under_different_protocols_are_flagged_on_the_table(sweep, tmp_path):
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    for run, protocol in zip(runs, ["p1", "p2", "p1", "p2"], strict=True):
        results = json.loads((run / "results.json").read_text())
        results["protocol"] = {
            "id": protocol,
            "dataset": {"name": "ml-1m", "users": 6040, "items": 3416},
            "evaluation": {"protocol": "full", "filter_seen": protocol == "p1"},
        }
        (run / "results.json").write_text(json.dumps(results))
    text, _, _ = compare([str(sweep)], out=str(tmp_path / "out"), plots=False)
    first = text.splitlines()[0]
    assert first.startswith("2 protocols: p1 (ml-1m 6040u/3416i") and first.endswith("do not compare rows across them")
    assert "they differ in evaluation.filter_seen:" in first
    header, *rows = table_rows(text)
    assert header[1] == "protocol" and [r[1] for r in rows] == ["p1", "p1", "p2", "p2"]
    # ranked within each protocol, never across
    assert [r[header.index("val/ndcg@10")] for r in rows] == ["0.4000", "0.2000", "0.3500", "0.2500"]
    assert "predate the protocol record" not in text


def test_runs_under_one_protocol_get_no_protocol_column(sweep, tmp_path):
    text, _, _ = compare([str(sweep)], out=str(tmp_path / "out"), plots=False)
    assert "protocols" not in text and "protocol" not in table_rows(text)[0]
    # these runs were made before results.json recorded the protocol: the table says nobody checked
    assert text.endswith("\n4 of 4 runs predate the protocol record: not checked to share data and evaluation\n")


def test_the_seeds_of_a_setting_get_their_mean_and_95_ci(tmp_path):
    for model, seed, value in [("sasrec", 1, 0.1), ("sasrec", 2, 0.2), ("tisasrec", 1, 0.3), ("tisasrec", 2, 0.4)]:
        fake_run(tmp_path / f"{model}_{seed}", [f"model={model}", f"seed={seed}"], [value])
    text, best, _ = compare([str(tmp_path)], out=str(tmp_path / "o"), plots=False)
    per_run, per_setting = text.split("per setting, over its seeds:")
    assert len(table_rows(per_run)) == 1 + 4
    header, *rows = table_rows(per_setting)
    assert header[:3] == ["row", "seeds", "val/ndcg@10 (mean ± 95% CI)"]
    half = math.tan(math.pi * 0.475) * statistics.stdev([0.3, 0.4]) / math.sqrt(2)  # t(0.975, df=1): Cauchy
    assert rows[0][:3] == ["model=tisasrec", "2", f"0.3500 ± {half:.4f}"] and rows[1][0] == "model=sasrec"
    assert best == f"best by val/ndcg@10 (mean over 2 seeds): model=tisasrec  (0.3500 ± {half:.4f})"
