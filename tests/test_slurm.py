"""SLURM integration through the real hydra-submitit-launcher, against the cluster `bash .ci/slurm.sh start` brings up.

Skipped when `sinfo` is absent or the cluster does not answer. Every SLURM call has a timeout: a job that cannot
be scheduled would otherwise wait forever.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "hydra/launcher=slurm",
    "hardware=cpu",
    "dataset.num_users=300",
    "model.maxlen=20",
    "trainer.progress=false",
    "trainer.eval_every=1",
    "slurm.cpus_per_task=1",
    "slurm.mem_gb=1",
    "slurm.timeout_min=10",
]


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10).stdout
    except (subprocess.TimeoutExpired, OSError):
        return False
    return any(s.strip().rstrip("*") in ("idle", "mixed", "allocated", "completing") for s in out.splitlines())


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(not _cluster_up(), reason="no SLURM cluster (bash .ci/slurm.sh start)"),
]


def _sweep_cmd(sweep_dir: Path, args: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "-m", *TINY, *args, f"hydra.sweep.dir={sweep_dir}"]


def _env() -> dict:
    return {**os.environ, "WANDB_MODE": "disabled"}


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _epochs(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]


def _scancel_all(sweep_dir: Path) -> None:
    for d in (sweep_dir / ".submitit").glob("*"):
        subprocess.run(["scancel", d.name.split("_")[0]], capture_output=True, timeout=10)


def _run_sweep(sweep_dir: Path, args: list[str], timeout: float) -> None:
    """Run a SLURM sweep to the end (cancelling its jobs whatever happens) and require success."""
    try:
        proc = subprocess.run(_sweep_cmd(sweep_dir, args), capture_output=True, text=True, timeout=timeout, env=_env())
    finally:
        _scancel_all(sweep_dir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _release_when_requeued(job_id: str, timeout: float = 30) -> None:
    """SLURM holds a requeued job back for a while (BeginTime); start it now so the test does not wait minutes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if state == "PENDING":
            # let the interrupted attempt's srun step finish tearing down (srun waits up to 7 s for it): starting
            # the new attempt at once sometimes made it fail within a second, with no output
            time.sleep(10)
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, timeout=10)
            return
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} was not requeued within {timeout}s (state {state!r})")


def test_two_job_sweep_via_submitit_slurm(tmp_path):
    """`python train.py -m hydra/launcher=slurm ...`: one array job, two runs with results,
    resources from the hardware profile."""
    sweep = tmp_path / "sweep"
    _run_sweep(sweep, ["trainer.num_epochs=2", "seed=1,2"], timeout=150)
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split("seed=")[1].split(",")[0] for p in runs] == ["1", "2"]
    for run in runs:
        results = _results(run)
        assert results["epochs_run"] == 2 and 0 <= results["test/ndcg@10"] <= 1
    script = next((sweep / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-1" in script
    assert "#SBATCH --mem=1GB" in script and "#SBATCH --cpus-per-task=1" in script  # from slurm.* (hardware profile)
    assert "#SBATCH --ntasks-per-node=1" in script and "--signal=USR2@" in script


def test_preempted_job_is_requeued_and_resumes(tmp_path):
    """USR2 (what SLURM sends before a time limit or preemption) -> submitit requeues the job -> it resumes from
    last.pt in its own run dir: the epoch counter continues, and the results equal those of an uninterrupted twin
    job (same config and seed; only the unused logging interval differs so the two get separate folders)."""
    sweep = tmp_path / "sweep"
    cmd = _sweep_cmd(sweep, ["trainer.num_epochs=8", "seed=3", "trainer.log_every_steps=100,101"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        deadline = time.time() + 90
        run0 = None
        while time.time() < deadline:  # wait for task 0 to be mid-training
            runs = [p for p in sweep.glob("*log_every_steps=100*") if p.is_dir()]
            if runs and 2 <= len(_epochs(runs[0])) < 7:
                run0 = runs[0]
                break
            time.sleep(0.3)
        assert run0 is not None, "task 0 never reached epoch 2"
        job_dirs = sorted((sweep / ".submitit").glob("*_0"))
        assert job_dirs, "no submitit folder for array task 0"
        job_id = job_dirs[0].name
        interrupted_at = len(_epochs(run0))
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, capture_output=True, timeout=10)
        _release_when_requeued(job_id)
        out, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=20)
        _scancel_all(sweep)
    assert proc.returncode == 0, out[-4000:]
    run1 = next(p for p in sweep.glob("*log_every_steps=101*") if p.is_dir())
    log = (run0 / "train.log").read_text()
    assert "resumed from" in log, log[-2000:]
    resumed_epoch = int(log.split("resumed from")[1].split(" at epoch ")[1].split()[0])
    # epochs go on until USR2 is handled, and metrics.jsonl gets epoch k just before last.pt does: so the resume
    # point is near, not at, the count read before the signal (CI once saw 3 after reading 2); it must precede the end
    assert max(1, interrupted_at - 1) <= resumed_epoch < 8
    assert _epochs(run0) == list(range(1, 9))  # continued, no epoch lost or repeated
    logs = "".join(p.read_text() for p in job_dirs[0].parent.glob(f"{job_id}/*_log.*"))
    assert "requeue" in logs.lower()  # submitit's checkpoint hook requeued it
    r0, r1 = _results(run0), _results(run1)
    assert r0["epochs_run"] == r1["epochs_run"] == 8
    for key in [k for k in r1 if k.startswith(("val/", "test/"))] + ["best_epoch", "steps"]:
        assert r0[key] == r1[key], (key, r0[key], r1[key])


def test_ddp_job_with_one_slurm_task_per_rank(tmp_path):
    """`trainer.devices=2` under SLURM: 2 tasks of one job, ranks from submitit's environment, one run dir."""
    sweep = tmp_path / "sweep"
    _run_sweep(sweep, ["trainer.num_epochs=2", "trainer.devices=2"], timeout=120)
    script = next((sweep / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --ntasks-per-node=2" in script
    (run,) = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    log = (run / "train.log").read_text()
    assert "rank 0/2 joined the gloo process group (submitit" in log
    assert "parameters identical on all 2 ranks" in log
    assert _results(run)["epochs_run"] == 2
