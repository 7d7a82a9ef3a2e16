"""The record of a run directory, and the lock that makes one process its only writer.

- `run.json`: the authoritative record, written atomically once, at the run's first launch, after every check
  passed, and never rewritten: `{"format": 1, "config": <resolved config>, "overrides": [...], "choices": {...},
  "created": <ISO time>, "argv": [...]}`.
- `launches.jsonl`: one line per accepted resume (time, argv, overrides, the epoch it resumed at, and the settings
  the resume policy allowed to change, old -> new).
- `.lock`: held (fcntl.flock) for the whole run by the process that owns it: the lone process, the parent that
  starts the DDP workers, or rank 0 under torchrun / a multi-task SLURM job. While held it names its holder; a
  second command on the same directory is refused in one line naming it. It is emptied again on release.

`open_run(cfg)` locks and checks before anything is written: a refused command (config error, run busy, resume
refused by `seqrec.train.resume_policy`, `trainer.resume=never` on an existing run) leaves every file of the run as
it was. The trainer writes run.json once data, model and checkpoint are loaded, just before the first epoch, so a
launch that fails before training leaves no record of a run that never was.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from seqrec.errors import CheckpointError, SeqrecError
from seqrec.preflight import check_run
from seqrec.train.distributed import _process_start_time, detect, export_submitit_env
from seqrec.train.resume_policy import check_resume
from seqrec.utils.config import check_config

log = logging.getLogger(__name__)

RUN_RECORD = "run.json"
LAUNCHES = "launches.jsonl"
LOCK = ".lock"
RECORD_FORMAT = 1
NO_RESUME = ("never", "none", "None", "")


class RunBusyError(SeqrecError):
    """Another process holds the run directory's lock."""


class RunExistsError(CheckpointError):
    """`trainer.resume=never` (or a checkpoint from elsewhere) on a directory that already holds a run."""


# --- the launch id: part of the default run dir -----------------------------------------------------------
def _started_by_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


def launch_id() -> str:
    """A short id of this launch, the same on every rank of it and different for two launches in the same second.

    A multi-task SLURM step: the job (array job and task) and step ids, shared by its tasks on every node and kept
    by a requeued job. Otherwise the process that launched: the torchrun agent for its ranks (their parent), or
    this process; its host, pid and start time tell two launches apart. (The DDP workers `train.py` starts itself
    inherit the parent's resolved run dir and never ask.)
    """
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"j{job}" + (f"_{task}" if task else "") + f".{os.environ.get('SLURM_STEP_ID', '0')}"
    pid = os.getppid() if _started_by_launcher() else os.getpid()
    try:
        started = _process_start_time(pid)
    except (OSError, ValueError, IndexError, StopIteration):
        started = time.time()
    return hashlib.sha1(f"{socket.gethostname()}:{pid}:{started}".encode()).hexdigest()[:6]


# --- who launched: argv, overrides, choices -----------------------------------------------------------------
def _hydra_context() -> tuple[list[str], dict]:
    """(task overrides, {config group: option}) of the current Hydra job; empty outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return [], {}
    hydra = HydraConfig.get()
    choices = {k: v for k, v in OmegaConf.to_container(hydra.runtime.choices).items() if not k.startswith("hydra/")}
    return list(hydra.overrides.task), choices


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- run.json and launches.jsonl ----------------------------------------------------------------------------
def write_run_record(run_dir: Path, config: dict) -> None:
    """Write run.json atomically and only if absent (a hard link of a complete temporary file: never half, never
    twice)."""
    overrides, choices = _hydra_context()
    record = {
        "format": RECORD_FORMAT,
        "config": config,
        "overrides": overrides,
        "choices": choices,
        "created": _now(),
        "argv": list(sys.argv),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RUN_RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    try:
        with open(tmp) as f:
            os.fsync(f.fileno())
        os.link(tmp, run_dir / RUN_RECORD)
    except FileExistsError:
        pass  # written by this run's first launch; the record is never rewritten
    finally:
        tmp.unlink()


def append_launch(run_dir: Path, epoch: int, changed: dict, step: int | None = None) -> None:
    """One line in launches.jsonl for an accepted resume (a whole line per write: O_APPEND, one write call)."""
    overrides, _ = _hydra_context()
    line = {"time": _now(), "argv": list(sys.argv), "overrides": overrides, "resumed_at_epoch": epoch}
    if step is not None:
        line["resumed_at_step"] = step  # a resume inside an epoch continues after this optimizer step
    line["changed"] = changed
    fd = os.open(run_dir / LAUNCHES, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


def _set_dotted(config: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[leaf] = value


def recorded_config(run_dir: Path) -> dict | None:
    """The config the run was last launched under: run.json's with every accepted resume's changes applied; None
    without run.json (no run, or one made before run.json existed: the trainer then checks its checkpoint)."""
    record = run_dir / RUN_RECORD
    if not record.is_file():
        return None
    config = json.loads(record.read_text())["config"]
    launches = run_dir / LAUNCHES
    if launches.is_file():
        for line in launches.read_text().splitlines():
            if line.strip():
                for key, (_, new) in json.loads(line).get("changed", {}).items():
                    _set_dotted(config, key, new)
    return config


def holds_a_run(run_dir: Path) -> bool:
    return (run_dir / RUN_RECORD).is_file() or (run_dir / "checkpoints" / "last.pt").is_file()


# --- the lock -----------------------------------------------------------------------------------------------
class RunLock:
    """An exclusive flock on `<run dir>/.lock`, held until `release` (or until the process dies)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's line stays readable
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that is still starting"
            os.close(fd)
            raise RunBusyError(
                f"{self.path.parent} is in use by another run ({holder}); wait for it to end or pick another "
                "hydra.run.dir"
            ) from None
        self.fd = fd

    def announce(self) -> None:
        """Name this process as the holder (after the checks passed, so a refused command writes nothing)."""
        command = shlex.join(sys.argv)[:300]
        line = f"pid {os.getpid()} on {socket.gethostname()}, started {_now()}: {command}\n"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, line.encode(), 0)

    def release(self, announced: bool = True) -> None:
        if self.fd is None:
            return
        if announced:
            os.ftruncate(self.fd, 0)  # at rest the lock file is empty
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


# --- one launch ---------------------------------------------------------------------------------------------
def owns_the_run() -> bool:
    """The process that locks and records: rank 0 of a launcher's ranks, or the one process that launched."""
    export_submitit_env()
    return detect().rank == 0


def _own_checkpoint(run_dir: Path, resume: str) -> bool:
    path = Path(resume)
    return run_dir.resolve() in (path.resolve(), path.resolve().parent.parent)


def check_launch(run_dir: Path, config: dict) -> None:
    """Refuse a command that would overwrite or silently alter the run in `run_dir` (see resume_policy)."""
    resume = str(config["trainer"]["resume"])
    starts_afresh = resume in NO_RESUME
    if holds_a_run(run_dir) and (starts_afresh or not (resume == "auto" or _own_checkpoint(run_dir, resume))):
        raise RunExistsError(
            f"{run_dir} already holds a run; use trainer.resume=auto to continue it or another hydra.run.dir; "
            "refusing to overwrite it"
        )
    saved = recorded_config(run_dir) if resume == "auto" else None  # a checkpoint elsewhere: the trainer checks it
    if saved is not None:
        check_resume(saved, config, run_dir)


def _detach_file_logging(run_dir: Path) -> None:
    """Stop logging into the run's train.log: a refused command's message goes to the terminal, not into the
    record of the run it refused to touch."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir.resolve():
            root.removeHandler(handler)
            handler.close()


def _remove_if_untouched(run_dir: Path) -> None:
    """A refused first launch leaves no run behind: remove the directory when it holds nothing but the empty
    train.log Hydra opened for it (and our empty lock file)."""
    try:
        entries = list(run_dir.iterdir())
        if not entries or any(
            e.name not in ("train.log", LOCK) or not e.is_file() or e.stat().st_size for e in entries
        ):
            return
        for entry in entries:
            entry.unlink()
        run_dir.rmdir()
    except OSError:  # someone else is writing there: leave it
        pass


@contextmanager
def open_run(cfg: DictConfig):
    """Check the config, lock the run dir, check this launch against the run it would continue; hold the lock until
    the block ends. Other ranks of a launcher do nothing (their rank 0 does it)."""
    if not owns_the_run():
        yield
        return
    run_dir = Path(cfg.trainer.output_dir)
    lock = RunLock(run_dir)
    try:
        check_config(cfg)  # first: it names a missing or impossible value before anything resolves it
        check_run(cfg)  # GPUs, NCCL, architectures, bf16: before any data is loaded or any worker started
        lock.acquire()
        check_launch(run_dir, OmegaConf.to_container(cfg, resolve=True))
    except SeqrecError:
        lock.release(announced=False)
        _detach_file_logging(run_dir)
        _remove_if_untouched(run_dir)
        raise
    lock.announce()
    try:
        yield
    except BaseException:
        lock.release()
        _remove_if_untouched(run_dir)  # e.g. the data was refused: no run began here
        raise
    lock.release()
