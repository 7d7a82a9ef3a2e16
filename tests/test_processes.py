"""Processes fail fast and say one line: a stopped DDP rank, Ctrl-C, a full disk. Real processes and signals.

Each test starts `train.py` (or a heartbeat child) as its own process group with SIGINT at its default, as a
terminal would: a background shell ignores SIGINT and children inherit that.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seqrec.train.distributed import StallWatcher
from tests.conftest import CLI_ENV, REPO, TINY, compose_config, train_cli, train_popen

# the launches below are timed against stall and collective timeouts of a few seconds: no kernel build inside them
pytestmark = pytest.mark.usefixtures("built_kernels")
LONG = [*TINY, "trainer.num_epochs=12"]  # long enough to be interrupted mid-run, short enough to finish on resume


def _heartbeats_in(tmp_path: Path) -> dict:
    # TMPDIR: the launcher's heartbeat folder lands in tmp_path, where the test can read which pid is which rank
    return {"TMPDIR": str(tmp_path)}


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    return train_popen(*args, cwd=tmp_path, env=_heartbeats_in(tmp_path))


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"train.py ended (status {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.1)


def _epochs_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"train.py still running {timeout} s after the signal")
    return err


def _resume_command(stderr: str) -> list[str]:
    assert "resume with: python " in stderr, stderr
    command = shlex.split(stderr.split("resume with: ", 1)[1].splitlines()[0])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


# --- the stall watcher on its own: what a thread's beat tells and what it does not ------------------------------

BEATING_CHILD = """
import sys, time
from pathlib import Path
from seqrec.train.distributed import start_heartbeat
start_heartbeat(Path(sys.argv[1]), 0.2)
while True:  # a long, busy phase with no progress to report (a big file, a long evaluation): still beating
    sum(range(10000))
"""


def _wait_for_first_beat(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:  # the child imports torch first
        time.sleep(0.1)


def test_stall_watcher_spares_a_busy_rank_and_kills_a_stopped_one(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", BEATING_CHILD, str(tmp_path / "rank1")], cwd=REPO)
    try:
        with StallWatcher(tmp_path, stall_timeout_s=1.5) as watcher:
            _wait_for_first_beat(tmp_path / "rank1")
            time.sleep(4)  # busy for more than twice the threshold
            assert child.poll() is None and watcher.stalled is None
            os.kill(child.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            child.wait(timeout=30)
            took = time.monotonic() - stopped
        assert child.returncode == -signal.SIGKILL
        assert watcher.stalled is not None and watcher.stalled.rank == 1
        # the stall counts from the rank's last beat, which came up to one beat (0.2 s) before the stop
        assert 1.5 - 0.2 <= took < 1.5 + 5, took
    finally:
        if child.poll() is None:
            child.kill()


def test_stall_watcher_kills_a_rank_stopped_in_the_middle_of_writing_its_beat(tmp_path):
    """A rank stopped between a beat file's truncation and its write leaves it empty: no pid to read. The watcher
    must still kill it (by the pid it read before), not drop it from the watch and wait forever."""
    child = subprocess.Popen([sys.executable, "-c", BEATING_CHILD, str(tmp_path / "rank1")], cwd=REPO)
    try:
        with StallWatcher(tmp_path, stall_timeout_s=1.5) as watcher:
            _wait_for_first_beat(tmp_path / "rank1")
            time.sleep(1)  # a few beats, read by the watcher
            os.kill(child.pid, signal.SIGSTOP)
            (tmp_path / "rank1").write_text("")  # what the stop mid-write leaves behind
            child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        assert watcher.stalled is not None and watcher.stalled.rank == 1
        assert not list(tmp_path.glob("rank*.tmp"))  # the beat's temporary file is never among the ranks
    finally:
        if child.poll() is None:
            child.kill()


STUCK_CHILD = """
import sys, time
from pathlib import Path
import torch
from seqrec.train.distributed import start_heartbeat
start_heartbeat(Path(sys.argv[1]), 0.2)
layer = torch.nn.Linear(4, 4)
end = time.monotonic() + 3
while time.monotonic() < end:  # training: forward calls, the rank makes progress
    layer(torch.ones(1, 4))
    time.sleep(0.05)
while True:  # stuck in a loop: alive and beating, but no progress
    sum(range(10000))
"""


def test_stall_watcher_ends_a_launch_in_which_no_rank_makes_progress(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", STUCK_CHILD, str(tmp_path / "rank0")], cwd=REPO)
    try:
        with StallWatcher(tmp_path, stall_timeout_s=1.5) as watcher:
            child.wait(timeout=90)
        assert child.returncode == -signal.SIGKILL
        assert watcher.stalled is not None and watcher.stalled.rank is None  # alive, stuck: no single culprit
    finally:
        if child.poll() is None:
            child.kill()


# --- DDP: a stopped rank ends every rank within distributed.stall_timeout_s --------------------------------------


@pytest.mark.slow
def test_a_stopped_ddp_rank_ends_the_launch_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    stall = 3
    args = [*LONG, "trainer.num_epochs=200", "trainer.devices=2", f"distributed.stall_timeout_s={stall}"]
    proc = _start([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    _wait_for(lambda: _epochs_logged(run_dir) >= 1, proc, 120, "first epoch")
    (beat,) = tmp_path.glob("seqrec-heartbeat-*/rank1")
    rank1 = int(beat.read_text().split()[0])
    workers = [int(p.read_text().split()[0]) for p in beat.parent.glob("rank*")]
    os.kill(rank1, signal.SIGSTOP)
    stopped = time.monotonic()
    err = _finish(proc)
    took = time.monotonic() - stopped
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: DDP rank 1 made no progress for "), err
    assert "(stopped or frozen); ended all ranks; resume with: python " in lines[0]
    assert took < stall + 15, f"the launch ended {took:.1f} s after the rank stopped"
    for pid in workers:  # every rank is gone, the stopped one included
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.slow
def test_under_torchrun_a_stopped_rank_fails_rank_0s_collective_within_the_timeout(tmp_path):
    """No launcher of ours watches torchrun's workers: the collective timeout bounds the wait, and rank 0 says so in
    one line (torchrun then adds its own report and ends the stopped rank after its 30 s shutdown grace)."""
    run_dir = tmp_path / "run"
    timeout_s = 5
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = [*LONG, "trainer.num_epochs=200", f"distributed.timeout_s={timeout_s}", f"hydra.run.dir={run_dir}"]
    proc = train_popen(*args, cwd=tmp_path, launcher=torchrun, env=_heartbeats_in(tmp_path))
    _wait_for(lambda: _epochs_logged(run_dir) >= 1, proc, 120, "first epoch")
    rank1 = max(
        int(pid)
        for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    )
    os.kill(rank1, signal.SIGSTOP)
    stopped = time.monotonic()
    err = _finish(proc, timeout=timeout_s + 30 + 60)
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and ours[0].startswith("error: DDP rank 0: a collective failed ("), err[-3000:]
    assert f"distributed.timeout_s={timeout_s} s" in ours[0] and "resume with: python " in ours[0]
    logged = (run_dir / "train.log").read_text()
    assert "[ERROR] - DDP rank 0: a collective failed" in logged
    assert time.monotonic() - stopped < timeout_s + 30 + 20


# --- Ctrl-C --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_its_resume_command_continues_the_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start([*LONG, f"hydra.run.dir={run_dir}"], tmp_path)
    _wait_for(lambda: _epochs_logged(run_dir) >= 2, proc, 120, "second epoch")
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole foreground group
    err = _finish(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"interrupted (SIGINT): run {run_dir}, last checkpoint "), err
    assert not (run_dir / "results.json").exists()
    epoch_at_stop = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["epoch"]
    assert epoch_at_stop < 12, "the run finished before the signal: the test proves nothing"

    command = _resume_command(lines[0])
    assert f"hydra.run.dir={run_dir}" in command and "trainer.num_epochs=12" in command
    env = CLI_ENV | _heartbeats_in(tmp_path)  # the printed command, run as printed
    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from " in (run_dir / "train.log").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs_run"] == 12
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 13))  # each epoch once: nothing lost, nothing repeated


@pytest.mark.slow
def test_ctrl_c_under_ddp_stops_every_worker_without_a_traceback(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start([*LONG, "trainer.num_epochs=200", "trainer.devices=2", f"hydra.run.dir={run_dir}"], tmp_path)
    _wait_for(lambda: _epochs_logged(run_dir) >= 1, proc, 120, "first epoch")
    workers = [int(p.read_text().split()[0]) for p in tmp_path.glob("seqrec-heartbeat-*/rank*")]
    os.killpg(proc.pid, signal.SIGINT)
    err = _finish(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"interrupted (SIGINT): run {run_dir}, "), err
    assert "trainer.devices=2" in _resume_command(lines[0])
    assert len(workers) == 2
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


# --- preemption signals: last.pt at the next step boundary, then the run ends as interrupted ----------------------

# 125 steps per epoch, validation after the last: a signal sent once epoch 1 is logged lands between two steps
PREEMPTED = [*TINY, "dataset.num_users=2000", "sampler.batch_size=16", "trainer.num_epochs=2", "trainer.eval_every=100"]


def _interrupted_line(err: str, signal_name: str, run_dir: Path) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"interrupted ({signal_name}): run {run_dir}, last checkpoint "), err
    assert " batches into epoch 2)" in lines[0], lines[0]  # the checkpoint was written mid-epoch
    return lines[0]


def _run(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """A printed resume command, run as printed."""
    env = CLI_ENV | _heartbeats_in(tmp_path)
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)


def _comparable(run_dir: Path) -> tuple[dict, list[dict]]:
    """results.json's metrics and metrics.jsonl, wall-clock seconds left out."""
    timing = ("train_seconds", "eval_seconds", "train/seconds", "config")
    results = {k: v for k, v in json.loads((run_dir / "results.json").read_text()).items() if k not in timing}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return results, [{k: v for k, v in x.items() if k not in timing} for x in lines]


@pytest.mark.slow
def test_sigterm_mid_epoch_writes_last_pt_at_the_next_step_and_the_resume_command_finishes_the_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start([*PREEMPTED, f"hydra.run.dir={run_dir}"], tmp_path)
    _wait_for(lambda: _epochs_logged(run_dir) >= 1, proc, 120, "first epoch")
    os.kill(proc.pid, signal.SIGTERM)  # as SLURM before its SIGKILL (preemption, scancel)
    err = _finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, err
    line = _interrupted_line(err, "SIGTERM", run_dir)
    assert not (run_dir / "results.json").exists()
    resumed = _run(_resume_command(line), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_a_signal_to_one_ddp_rank_stops_every_rank_on_one_step_and_the_resume_equals_an_unbroken_run(tmp_path):
    import torch

    args = [*PREEMPTED, "trainer.devices=2"]
    run_dir = tmp_path / "run"
    # last.pt every 0.3 s, mid-epoch too; the clock's checks (a collective) come as often, so the signal soon after
    proc = _start([*args, "trainer.checkpoint_every_min=0.005", f"hydra.run.dir={run_dir}"], tmp_path)
    _wait_for(lambda: _epochs_logged(run_dir) >= 1, proc, 120, "first epoch")
    (beat,) = tmp_path.glob("seqrec-heartbeat-*/rank1")
    os.kill(int(beat.read_text().split()[0]), signal.SIGUSR1)  # rank 1 alone: rank 0 learns it at the next check
    err = _finish(proc)
    assert proc.returncode == 128 + signal.SIGUSR1, err
    line = _interrupted_line(err, "SIGUSR1", run_dir)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert len(state["rng"]) == 2 and all(rank["sampler_state"] is not None for rank in state["rng"])
    resumed = _run(_resume_command(line), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = tmp_path / "whole"
    unbroken = train_cli(*args, run_dir=whole, cwd=tmp_path, timeout=180, env=_heartbeats_in(tmp_path))
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    assert _comparable(run_dir) == _comparable(whole)
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True)["model"] for d in (run_dir, whole))
    assert all(torch.equal(a[k], b[k]) for k in b)


# --- a run directory that cannot be written ----------------------------------------------------------------------


def test_a_failed_write_is_one_line_with_the_resume_command(tmp_path, monkeypatch, capsys):
    """In-process stand-in for a full disk: every fsync fails with ENOSPC (the checkpoint writer fsyncs each file
    before its rename). This exercises the mapping in run.main, not the file system."""
    from seqrec.run import main

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    cfg = compose_config(TINY, tmp_path)
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SystemExit) as stop:
        main(cfg)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: cannot write into {tmp_path}: no space left on device"), err
    assert "resume with: python " in lines[0]


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs: room for the run directory's first files, not for a checkpoint (needs mount rights)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root in a privileged container)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.slow
def test_a_full_disk_ends_the_run_in_one_line(tmp_path, full_disk):
    run_dir = full_disk / "run"
    proc = train_cli(*TINY, run_dir=run_dir, cwd=tmp_path, timeout=120, env=_heartbeats_in(tmp_path))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cannot write" in lines[0], proc.stderr
    assert "no space left on device" in lines[0] and "resume with: python " in lines[0]
