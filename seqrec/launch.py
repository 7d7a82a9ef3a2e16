"""One command, any scale: start `trainer.devices` DDP workers with torch's elastic launcher (what torchrun uses).

`python train.py trainer.devices=2` (gloo on CPU) or `hardware=4xv100` (NCCL) starts the workers itself: one Hydra
process, hence one run directory, shared by every rank. Under torchrun or a multi-task SLURM job the processes
already exist and `run_distributed` only joins them to the process group. Also registers the config resolvers
(`${seqrec.amp_dtype:}`, `${seqrec.has_cuda:}`, `${seqrec.launch_time:FMT}`, `${seqrec.launch_id:}`) used by hardware
profiles and run dirs.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from seqrec.errors import SeqrecError, TrainingError
from seqrec.train.distributed import (
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
    try:
        return run_fn(cfg, env.rank, env.world_size)
    finally:
        destroy_distributed()


def launch(cfg: DictConfig) -> dict:
    """Run `trainer.devices` local workers (one per GPU, or gloo processes on CPU); returns rank 0's results."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    nproc = cfg.trainer.devices
    backend = resolve_backend(cfg.distributed.backend, cfg.trainer.device)
    port = rendezvous_port(cfg.distributed.master_port)
    config = local_launch_config(nproc, f"seqrec-{uuid.uuid4().hex[:8]}", port, monitor_interval=0.1)
    log.info("starting %d %s workers (rendezvous 127.0.0.1:%d)", nproc, backend, port)
    hydra_root = HydraConfig.instance().cfg if HydraConfig.initialized() else None
    saved = os.environ.get("OMP_NUM_THREADS")
    if saved is None:  # as torchrun: do not oversubscribe the cores (the workers inherit this at spawn)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    try:
        results = elastic_launch(config, _worker)(cfg, hydra_root)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise TrainingError(f"DDP worker rank {rank} failed: {_failure_message(failure)}") from None
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return results[0]


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


def _worker(cfg: DictConfig, hydra_root: DictConfig | None) -> dict:
    """One spawned rank: Hydra's config and logging as in the parent (same run dir, same train.log), then run."""
    if hydra_root is not None:
        from hydra.core.utils import configure_log, setup_globals

        setup_globals()  # the ${hydra:...} and ${now:...} resolvers
        HydraConfig.instance().set_config(hydra_root)
        configure_log(hydra_root.hydra.job_logging, hydra_root.hydra.verbose)
    from seqrec.run import run

    try:
        return run_distributed(cfg, run)
    except SeqrecError as e:
        log.error("%s", e)
        raise
