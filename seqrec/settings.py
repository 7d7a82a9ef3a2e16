"""Schemas of the config nodes that build no object: `distributed` (read by seqrec/launch.py) and `slurm` (read by
conf/hydra/launcher/slurm.yaml). The pre-flight checker (seqrec/utils/config.py) binds each node to its dataclass
as it binds a `_target_` node to its constructor: an unknown key, a missing one, a wrong type or a value that breaks
the class's `RULES` is reported with every other problem at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from seqrec.utils.rules import NON_NEGATIVE, POSITIVE, Rule, one_of


@dataclass
class DistributedSettings:
    """How the DDP ranks meet (conf/hardware/base.yaml)."""

    RULES: ClassVar[dict] = {
        "backend": one_of("auto", "nccl", "gloo"),
        "master_port": Rule(lambda v: 0 <= v <= 65535, "must be a port in [0, 65535]"),
        "timeout_s": POSITIVE,
        "stall_timeout_s": NON_NEGATIVE,
    }

    backend: str = "auto"  # nccl | gloo | auto (nccl for CUDA tensors, else gloo)
    master_port: int = 29500  # rendezvous port for the workers train.py starts
    timeout_s: int = 1800  # a collective waits this long for the other ranks, then fails
    stall_timeout_s: float = 60.0  # a worker silent this long ends the launch; 0 = off


@dataclass
class SlurmSettings:
    """What a SLURM job asks for (hydra/launcher=slurm)."""

    RULES: ClassVar[dict] = {
        "timeout_min": POSITIVE,
        "max_num_timeout": NON_NEGATIVE,
        "signal_delay_s": NON_NEGATIVE,
        "nodes": POSITIVE,
        "tasks_per_node": POSITIVE,
        "gpus_per_node": NON_NEGATIVE,
        "cpus_per_task": POSITIVE,
        "mem_gb": POSITIVE,
    }

    partition: str | None = None
    timeout_min: int = 240
    max_num_timeout: int = 3
    signal_delay_s: int = 120
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int | None = None
    cpus_per_task: int = 2
    mem_gb: int = 16


# config node -> its schema
SCHEMAS = {"distributed": DistributedSettings, "slurm": SlurmSettings}
