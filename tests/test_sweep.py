"""Real `python train.py -m tuning=...` sweeps in a subprocess on the bundled data (tiny epochs): job folders named by
the overrides, a full run directory each, one W&B group per sweep (offline), and a comparison table + plots."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from seqrec.compare import compare
from tests.conftest import REPO, TINY, train_cli

JOB_OVERRIDES = ["hardware=cpu", *TINY]
# stage 3 sweeps optimizer.lr over 3 values; the command line narrows it to 2 jobs
SWEEP = ["tuning=stage3", "optimizer.lr=0.001,0.002"]
JOBS = ["optimizer.lr=0.001", "optimizer.lr=0.002"]


def run_sweep(sweep_dir: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    proc = train_cli("-m", *SWEEP, *JOB_OVERRIDES, f"hydra.sweep.dir={sweep_dir}", *extra, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def job_dir_name(job: str) -> str:
    """The folder Hydra names from the overrides (sorted, `logger`/`tuning`/`hardware`/`trainer.progress` excluded)."""
    overrides = [o for o in JOB_OVERRIDES if not o.startswith(("hardware", "trainer.progress"))] + [job]
    return ",".join(sorted(overrides))


def assert_run_dirs(sweep_dir: Path) -> list[Path]:
    jobs = [sweep_dir / job_dir_name(j) for j in JOBS]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) == sorted(
        p.name for p in jobs
    ), list(sweep_dir.iterdir())
    for job in jobs:
        for f in (
            "run.json",
            "train.log",
            "metrics.jsonl",
            "results.json",
            "checkpoints/last.pt",
            "checkpoints/best.pt",
        ):
            assert (job / f).is_file(), f"{job / f} missing"
        results = json.loads((job / "results.json").read_text())
        assert results["epochs_run"] == 2 and "val/ndcg@10" in results and "test/ndcg@10" in results
    return jobs


@pytest.fixture(scope="module")
def wandb_sweep(tmp_path_factory) -> Path:
    """One real 2-job sweep with logger=wandb (offline), shared by the tests below (~30 s on 2 cores)."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "stage3"
    run_sweep(sweep_dir, "logger=wandb", "sweep_name=stage3_test")
    return sweep_dir


def test_sweep_writes_one_run_directory_per_job_named_by_its_overrides(wandb_sweep):
    assert (wandb_sweep / "multirun.yaml").is_file()
    jobs = assert_run_dirs(wandb_sweep)
    lrs = [json.loads((j / "run.json").read_text())["config"]["optimizer"]["lr"] for j in jobs]
    assert lrs == [0.001, 0.002]


def test_sweep_jobs_are_one_wandb_group_with_readable_names(wandb_sweep):
    from test_wandb import offline_run

    runs = [offline_run(wandb_sweep / job_dir_name(j)) for j in JOBS]
    assert {r["run"].run_group for r in runs} == {"stage3_test"}
    assert [r["run"].display_name for r in runs] == [job_dir_name(j) for j in JOBS]
    assert len({r["run"].run_id for r in runs}) == 2
    for r, job in zip(runs, JOBS, strict=False):
        assert r["config"]["optimizer"]["lr"] == float(job.split("=")[1])  # the resolved config
        assert [h["epoch"] for h in r["history"]] == [1, 2]
        assert all("val/ndcg@10" in h and "train/loss" in h for h in r["history"])
        assert r["summary"]["best_checkpoint"].endswith("checkpoints/best.pt")
        assert "test/ndcg@10" in r["summary"] and r["exit"] == 0


def test_compare_builds_a_table_and_plots_from_the_sweep(wandb_sweep, tmp_path):
    text, best, written = compare([str(wandb_sweep)], "val/ndcg@10", "md", str(tmp_path / "cmp"))
    lines = text.strip().splitlines()
    header = next(ln for ln in lines if ln.startswith("| #"))
    assert "optimizer.lr" in header and "val/ndcg@10" in header and "test/ndcg@10" in header
    rows = [ln for ln in lines if ln.startswith("| 1 ") or ln.startswith("| 2 ")]
    assert len(rows) == 2
    values = [float(r.split("|")[header.split("|").index(" val/ndcg@10 ")]) for r in rows]
    assert values == sorted(values, reverse=True)
    assert best.startswith("best by val/ndcg@10: optimizer.lr=")
    names = {p.name for p in written}
    assert {"runs.md", "learning_curves.png", "val_ndcg@10_vs_optimizer.lr.png"} <= names
    for p in written:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_cli_on_the_sweep_prints_csv(wandb_sweep, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "seqrec.compare", str(wandb_sweep), "--format", "csv", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("#,optimizer.lr,") and len(lines) == 3
    assert (tmp_path / "runs.csv").read_text() == proc.stdout


@pytest.mark.slow
def test_stage_sweep_with_the_submitit_local_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    run_sweep(sweep_dir, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    assert_run_dirs(sweep_dir)


@pytest.mark.slurm
def test_stage_sweep_with_the_submitit_slurm_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    if not shutil.which("sbatch"):
        pytest.skip("no SLURM here (sbatch not found)")
    sweep_dir = tmp_path / "sweep"  # a one-machine cluster (.ci/run) shares the file system
    run_sweep(
        sweep_dir,
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.mem_gb=2",
        timeout=600,
    )
    assert_run_dirs(sweep_dir)
