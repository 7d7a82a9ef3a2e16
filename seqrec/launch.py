"""One command, any scale: start `trainer.devices` DDP workers with torch's elastic launcher (what torchrun uses).

`python train.py trainer.devices=2` (gloo on CPU) or `hardware=4xv100` (NCCL) starts the workers itself: one Hydra
process, hence one run directory, shared by every rank. Under torchrun or a multi-task SLURM job the processes
already exist and `run_distributed` only joins them to the process group. Also registers the config resolvers
(`${seqrec.amp_dtype:}`, `${seqrec.has_cuda:}`, `${seqrec.launch_time:FMT}`, `${seqrec.launch_id:}`) used by hardware
profiles and run dirs.

What a lost rank costs, by mode:
- workers started here: a rank that dies is seen within ~0.1 s (the agent's poll); a rank whose process stops running
  (SIGSTOP, a frozen host, a C call that holds the GIL) stops beating and is killed after
  `distributed.stall_timeout_s` (default 60 s). Either way every rank ends and one line names the rank.
- torchrun / SLURM tasks: no parent of ours; a rank that stops, dies or never reaches the next collective makes the
  others' collective fail after `distributed.timeout_s` (default 1800 s; lower it to fail sooner), and each rank that
  sees it says so in one line. The launcher (torchrun, srun) then ends the remaining ranks in its own way.
- in every mode, a rank that is alive and running Python but never reaches the next collective (an endless loop, a
  deadlock) keeps beating: only `distributed.timeout_s` bounds it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from seqrec.errors import SeqrecError, TrainingError
from seqrec.train.distributed import (
    StallWatcher,
    beat_interval,
    best_amp_dtype,
    describe_device,
    destroy_distributed,
    detect,
    export_submitit_env,
    in_distributed_env,
    init_distributed,
    launch_time,
    local_launch_config,
    rendezvous_port,
    resolve_backend,
    start_heartbeat,
    stop_heartbeat,
)
from seqrec.train.run_record import launch_id

log = logging.getLogger(__name__)

# not cached: the job's machine decides (a SLURM job is resolved on its node, not on the login node)
OmegaConf.register_new_resolver("seqrec.amp_dtype", best_amp_dtype, replace=True)
OmegaConf.register_new_resolver("seqrec.has_cuda", torch.cuda.is_available, replace=True)
# cached like Hydra's ${now:}, so a requeued job keeps its directory
OmegaConf.register_new_resolver(
    "seqrec.launch_time", lambda fmt: time.strftime(fmt, time.localtime(launch_time())), use_cache=True, replace=True
)

OmegaConf.register_new_resolver("seqrec.launch_id", launch_id, use_cache=True, replace=True)  # same-second launches

RunFn = Callable[[DictConfig, int, int], dict]
TORCH_LAUNCH_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing")
# a worker killed for a stall leaves a semaphore that multiprocessing's resource tracker frees, with a warning that
# would follow the one-line report; the filter reaches the tracker through its environment
QUIET_RESOURCE_TRACKER = {"PYTHONWARNINGS": "ignore:resource_tracker:UserWarning"}


def should_launch(cfg: DictConfig) -> bool:
    """Start workers here when more than one device is asked for and no launcher started us as one of several ranks."""
    return cfg.trainer.devices > 1 and not in_distributed_env()


def run_distributed(cfg: DictConfig, run_fn: RunFn) -> dict:
    """Join the process group the environment describes (none for one process), run, leave the group."""
    export_submitit_env()
    if detect().rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 alone reports
    env = init_distributed(cfg.distributed.backend, cfg.trainer.device, cfg.distributed.timeout_s)
    log.info(
        "hardware: %s; %d process%s (%s)",
        describe_device(cfg.trainer.device),
        env.world_size,
        "es" * (env.world_size > 1),
        env.source,
    )
    if env.world_size > 1 and cfg.trainer.devices not in (1, env.world_size):
        log.warning(
            "trainer.devices=%d but the launcher started %d ranks; using %d",
            cfg.trainer.devices,
            env.world_size,
            env.world_size,
        )
    finished = False
    try:
        results = run_fn(cfg, env.rank, env.world_size)
        finished = True
        return results
    except RuntimeError as e:
        if env.world_size > 1 and _lost_a_peer(e):
            raise WorkerLost(
                f"DDP rank {env.rank}: a collective failed ({_first_line(e)}): another rank stopped, died or is stuck "
                f"(collectives wait distributed.timeout_s={cfg.distributed.timeout_s} s); ended this rank"
            ) from None
        raise
    finally:
        destroy_distributed(all_ranks_finished=finished)


# what gloo/NCCL say when the other side of a collective is gone or silent
PEER_LOST = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer", "Watchdog caught")


def _lost_a_peer(error: RuntimeError) -> bool:
    return isinstance(error, torch.distributed.DistBackendError) or any(text in str(error) for text in PEER_LOST)


def _first_line(error: BaseException) -> str:
    return re.sub(r"^\[[^\]]*\] ", "", str(error).strip().splitlines()[0])[:200]  # drop gloo's [file:line] prefix


class WorkerLost(TrainingError):
    """A DDP rank stopped, got stuck or was killed by a signal: not the user's config, so worth resuming."""


def stall_timeout_s(cfg: DictConfig) -> float:
    """`distributed.stall_timeout_s` (0 = off); configs written before the key existed get the default."""
    return float(cfg.distributed.get("stall_timeout_s", 60))


def launch(cfg: DictConfig, run_fn: RunFn) -> dict:
    """Run `trainer.devices` local workers (one per GPU, or gloo processes on CPU); returns rank 0's results.

    Every worker beats (`start_heartbeat`); a rank silent for `distributed.stall_timeout_s` is killed and the launch
    ends with one line naming it. Ctrl-C reaches the workers too: each stops quietly, and a KeyboardInterrupt
    leaves here for `run.main` to report.
    """
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    nproc = cfg.trainer.devices
    backend = resolve_backend(cfg.distributed.backend, cfg.trainer.device)
    port = rendezvous_port(cfg.distributed.master_port)
    config = local_launch_config(nproc, f"seqrec-{uuid.uuid4().hex[:8]}", port, monitor_interval=0.1)
    log.info("starting %d %s workers (rendezvous 127.0.0.1:%d)", nproc, backend, port)
    hydra_root = HydraConfig.instance().cfg if HydraConfig.initialized() else None
    heartbeats = Path(tempfile.mkdtemp(prefix="seqrec-heartbeat-"))
    # as torchrun: do not oversubscribe the cores (the workers inherit this at spawn)
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    watcher = StallWatcher(heartbeats, stall_timeout_s(cfg))
    try:
        with watcher, _quiet_elastic_agent(), _environment_defaults({**threads, **QUIET_RESOURCE_TRACKER}):
            results = elastic_launch(config, _worker)(cfg, hydra_root, str(heartbeats), run_fn)
    except ChildFailedError as e:
        raise _launch_error(e, watcher) from None
    except SignalException as e:  # Ctrl-C (or SIGTERM) reached the agent: it has stopped the workers
        raise KeyboardInterrupt(signal.Signals(e.sigval).name) from None
    finally:
        shutil.rmtree(heartbeats, ignore_errors=True)
    return results[0]


@contextmanager
def _environment_defaults(defaults: dict[str, str]):
    """Set the variables the user has not set, for the processes started inside; restore them after."""
    added = [key for key in defaults if key not in os.environ]
    os.environ.update({key: defaults[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _launch_error(error, watcher: StallWatcher) -> BaseException:
    """One line for a failed launch: the stalled rank if the watcher killed one, else the first failure."""
    if watcher.stalled is not None and watcher.stalled.rank is None:
        return WorkerLost(
            f"no DDP rank made progress for {watcher.stalled.seconds:.0f} s (a rank stuck in a loop or a deadlock); "
            "ended all ranks"
        )
    if watcher.stalled is not None:
        return WorkerLost(
            f"DDP rank {watcher.stalled.rank} made no progress for {watcher.stalled.seconds:.0f} s (stopped or "
            "frozen); ended all ranks"
        )
    rank, failure = error.get_first_failure()
    if failure.exitcode - 128 in signal.valid_signals():  # the worker's own exit for Ctrl-C or a stop signal (_worker)
        return KeyboardInterrupt(signal.Signals(failure.exitcode - 128).name)
    if failure.exitcode < 0:  # killed by a signal: the OOM killer, a scancel, a kill
        name = signal.Signals(-failure.exitcode).name if -failure.exitcode in signal.valid_signals() else "a signal"
        return WorkerLost(f"DDP rank {rank} was killed by {name}; ended all ranks")
    return TrainingError(f"DDP worker rank {rank} failed: {_failure_message(failure)}")


@contextmanager
def _quiet_elastic_agent():
    """The agent and torch's spawn helper log a traceback-sized report when a worker fails or a signal arrives;
    `launch` says it in one line instead (a worker's own traceback still reaches stderr)."""
    names = [name for name in logging.root.manager.loggerDict if name.startswith(TORCH_LAUNCH_LOGGERS)]
    loggers = [logging.getLogger(name) for name in names]  # each has its own level (LOGLEVEL), so each is set
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _failure_message(failure) -> str:
    """The worker's exception text (`failure.message` holds its whole traceback), without the traceback."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", message)
    text = str(message).strip()
    found = re.search(r"^[\w.]*(?:Error|Exception|Interrupt)\w*: (.*)", text, flags=re.M | re.S)
    if found:
        return found.group(1).strip()
    return text.splitlines()[-1] if text else f"exit code {failure.exitcode} (see train.log)"


def _worker(cfg: DictConfig, hydra_root: DictConfig | None, heartbeats: str, run_fn: RunFn) -> dict:
    """One spawned rank: Hydra's config and logging as in the parent (same run dir, same train.log), then run."""
    beat = Path(heartbeats) / f"rank{os.environ.get('RANK', 0)}"
    start_heartbeat(beat, beat_interval(stall_timeout_s(cfg)))
    signal.signal(signal.SIGINT, _interrupt_once)
    logging.raiseExceptions = False  # as run.main: an unwritable train.log is reported once, not per record
    if hydra_root is not None:
        from hydra.core.utils import configure_log, setup_globals

        setup_globals()  # the ${hydra:...} and ${now:...} resolvers
        HydraConfig.instance().set_config(hydra_root)
        configure_log(hydra_root.hydra.job_logging, hydra_root.hydra.verbose)
    try:
        return run_distributed(cfg, run_fn)  # run_fn travels by reference (seqrec.run.run): no import cycle
    except SeqrecError as e:
        log.error("%s", e)
        raise
    except KeyboardInterrupt as e:  # Ctrl-C, or a stop signal after last.pt (seqrec/train/stop_signals.py)
        name = str(e) if str(e) in signal.Signals.__members__ else "SIGINT"
        raise SystemExit(128 + signal.Signals[name]) from None  # quietly: the parent says where the run is
    finally:
        stop_heartbeat(beat)


def _interrupt_once(signum, frame) -> None:
    """Ctrl-C reaches a worker twice (from the terminal, then from the agent): the second must not interrupt the
    clean-up the first started."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt
