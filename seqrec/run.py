"""One run: check the config, set the process-wide flags, build every component (seqrec/compose.py), fit, test.

`run(cfg)` is plain Python (testable without Hydra's entry point); `main(cfg)` adds the user-facing error
handling that `train.py` needs: a SeqrecError becomes one clear line on stderr and exit status 1.
"""

from __future__ import annotations

import errno
import logging
import shlex
import signal
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from seqrec.compose import build, set_deterministic_environment
from seqrec.errors import SeqrecError
from seqrec.launch import WorkerLost, launch, run_distributed, should_launch
from seqrec.train.checkpoint import CheckpointWriteError
from seqrec.train.run_record import open_run
from seqrec.utils.config import check_config

log = logging.getLogger(__name__)


def run(cfg: DictConfig, rank: int = 0, world_size: int = 1) -> dict:
    """Train and test one configuration; returns results.json's content."""
    check_config(cfg)
    parts = build(cfg, rank, world_size)
    try:
        parts.trainer.fit()
        return parts.trainer.test()
    finally:
        parts.logger.close()


def main(cfg: DictConfig) -> float | None:
    """Hydra entry point body: run, report user errors in one line, return the optimised metric for sweepers.

    Nothing a user can cause ends in a traceback: a SeqrecError, Ctrl-C (status 130, with the command that resumes)
    and a run directory that cannot be written (full disk, read-only) are each one line on stderr.
    """
    # a train.log that can no longer be written (full disk, read-only) must not print logging's own traceback for
    # every record: the failed checkpoint or metrics write right after is reported in one line below
    logging.raiseExceptions = False
    set_deterministic_environment(bool(cfg.trainer.deterministic))  # before any worker or GPU library starts
    try:
        # trainer.devices > 1 and no launcher around: start the DDP workers here (one Hydra process, one run dir)
        with open_run(cfg):  # the run dir's lock, resume policy and run.json, before anything is written
            results = launch(cfg, run) if should_launch(cfg) else run_distributed(cfg, run)
    except SeqrecError as e:
        log.error("%s", e)
        if _in_multirun():
            raise  # let the sweep record this job as failed and go on
        resumable = isinstance(e, (WorkerLost, CheckpointWriteError))
        message = f"{e}; resume with: {resume_command()}" if resumable else str(e)
        _exit(f"error: {message}", 1)
    except KeyboardInterrupt as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not turn this line into a traceback
        name = str(e) if str(e) in signal.Signals.__members__ else "SIGINT"  # the launcher passes SIGTERM on
        _exit(interrupted_message(cfg, name), 128 + signal.Signals[name].value)  # the shell's status: 130 for SIGINT
    except OSError as e:
        if e.errno not in UNWRITABLE or _in_multirun():
            raise
        _exit(f"error: {unwritable_message(e, _run_dir(cfg))}; resume with: {resume_command()}", 1)
    except RuntimeError as e:
        if not is_nondeterministic_operation(e) or _in_multirun():
            raise
        _exit(f"error: {nondeterministic_message(e)}", 1)
    return results.get(cfg.optimized_metric)


def is_nondeterministic_operation(error: RuntimeError) -> bool:
    """torch's refusal, under trainer.deterministic=true, of an operation without a deterministic implementation."""
    return "does not have a deterministic implementation" in str(error)


def nondeterministic_message(error: RuntimeError) -> str:
    """One line naming the operation and the two ways on."""
    first = str(error).split(", but you set")[0].strip()
    return (
        f"trainer.deterministic=true: {first}, so this run cannot be bitwise reproducible; "
        "set trainer.deterministic=false to run it with nondeterministic kernels (or kernels=auto if a plug-in "
        "avoids the operation)"
    )


# a run directory that cannot take more bytes: reported in one line, as a user's problem
UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST}


def unwritable_message(e: OSError, run_dir: str) -> str:
    """`cannot write <path>: no space left on device`; a failed write() names no file, then the run dir stands in.
    Checkpoints are written to a temporary file and renamed, so the last complete one is still there."""
    reason = (e.strerror or errno.errorcode.get(e.errno, "error")).lower()
    where = e.filename or f"into {run_dir}"
    return f"cannot write {where}: {reason} (the last complete checkpoint is kept)"


def interrupted_message(cfg: DictConfig, signal_name: str) -> str:
    """One line: which run stopped, its last checkpoint, and the command that continues it."""
    run_dir = Path(_run_dir(cfg))
    return f"interrupted ({signal_name}): run {run_dir}, {_last_checkpoint(run_dir)}; resume with: {resume_command()}"


def _last_checkpoint(run_dir: Path) -> str:
    """Where training will continue from: `checkpoints/last.pt` and the epoch/step it holds."""
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return "no checkpoint yet (it restarts from epoch 1)"
    try:
        import torch

        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)  # mmap: no tensor is read
        epoch, batches = state["epoch"], state.get("epoch_batches", 0)
        inside = f", {batches} batches into epoch {epoch + 1}" if batches else ""
        return f"last checkpoint {last} (epoch {epoch}, step {state['step']}{inside})"
    except Exception:  # noqa: BLE001 - the line must come out even for an unreadable file
        return f"last checkpoint {last}"


def resume_command() -> str:
    """`python train.py <the same overrides> hydra.run.dir=<this run dir>`: trainer.resume=auto continues it."""
    script = Path(sys.argv[0])
    overrides = list(sys.argv[1:])
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        # trainer.resume=never would refuse the directory and a path would restart from an older checkpoint
        overrides = [o for o in hydra.overrides.task if not o.startswith(("trainer.resume=", "+trainer.resume="))]
        overrides.append(f"hydra.run.dir={hydra.runtime.output_dir}")
    return shlex.join(["python", str(script), *overrides])


def _run_dir(cfg: DictConfig) -> str:
    if HydraConfig.initialized():
        return HydraConfig.get().runtime.output_dir
    return str(cfg.trainer.output_dir)


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _exit(line: str, status: int) -> None:
    print(line, file=sys.stderr)
    sys.exit(status)
