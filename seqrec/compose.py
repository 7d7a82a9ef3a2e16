"""The composition root: every object a run needs, built from the composed config in one place.

Each config node with a `_target_` becomes one component through `hydra.utils.instantiate`; the runtime objects a
constructor needs (the data for the sampler, the model for the trainer, ...) are passed alongside, never merged into
the config. `seqrec.run.run`, `seqrec.predict` (data and model only), the benchmarks and the tests all build here,
so there is one way to turn a config into a run.

    cfg.dataset   -> data        cfg.loss    -> loss       cfg.optimizer -> partial torch.optim class
    cfg.model     -> model       cfg.sampler -> sampler    cfg.schedule  -> partial LambdaLR factory
    cfg.eval      -> evaluator   cfg.logger  -> logger     cfg.trainer   -> Trainer (all of the above)

Process-wide settings (deterministic kernels, the allocator) are made here too, by `set_process_flags`, because
they hold for every object in the process, not for one trainer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from seqrec import kernels
from seqrec.errors import SeqrecError
from seqrec.models.tisasrec import check_time_available
from seqrec.train.placement import resolve_device
from seqrec.utils.memory import reuse_freed_memory
from seqrec.utils.seed import seed_everything

log = logging.getLogger(__name__)

# keys of the `trainer` node that the entry point reads, not the Trainer: how many processes, and the process-wide
# determinism flag (their rules are in seqrec/utils/config.py PLAIN_KEYS, as no constructor reads them)
ENTRY_POINT_KEYS = ("devices", "deterministic")


def build_node(node: DictConfig, **runtime):
    """Instantiate a `_target_` node, passing runtime objects (data, model, ...) through untouched.

    `instantiate(node, data=data)` would merge `data` into the config and turn a dataclass into a DictConfig;
    binding the YAML values first (`_partial_`) and calling with the objects avoids that. A node that is itself a
    `_partial_` (optimizer, schedule) is returned as the partial, for its user to complete."""
    try:
        if node.get("_partial_", False):
            return instantiate(node)
        return instantiate(node, _partial_=True)(**runtime)
    except InstantiationException as e:
        if isinstance(e.__cause__, SeqrecError):  # a user error inside the target: show it, not Hydra's wrapper
            raise e.__cause__ from None
        raise


# cuBLAS picks its reduction split per call from a shared workspace unless the workspace is fixed; the two values
# NVIDIA documents as deterministic. Read when the process creates its first cuBLAS handle (its first GPU matmul).
CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"
DETERMINISTIC_CUBLAS_WORKSPACES = (":4096:8", ":16:8")


def set_deterministic_environment(deterministic: bool) -> None:
    """The environment that must be in place before CUDA's libraries start: called by the entry point first thing
    (seqrec/run.py main, before it starts workers, which inherit it) and again by set_process_flags.

    Composing the config may already have asked torch whether there is a GPU and which (the hardware resolvers):
    that starts the driver, not cuBLAS, which reads the variable when its first handle is created."""
    if deterministic and os.environ.get(CUBLAS_WORKSPACE) not in DETERMINISTIC_CUBLAS_WORKSPACES:
        os.environ[CUBLAS_WORKSPACE] = DETERMINISTIC_CUBLAS_WORKSPACES[0]


def set_process_flags(cfg: DictConfig) -> None:
    """Settings of the whole process, made once by the entry point before anything is built.

    trainer.deterministic=true (docs/RELIABILITY.md, section 7): every operation runs its deterministic
    implementation, or the run stops at the first that has none (warn_only=False: no silent exception). On a CPU
    this fixes the order of the scatter-adds (embedding and indexing backward); on CUDA also cuBLAS's workspace,
    cuDNN's algorithm choice, the attention backward (SDPA's flash and memory-efficient kernels switch to their
    deterministic variants) and TiSASRec's bucket sums (seqrec/kernels/relation_attention.py)."""
    deterministic = bool(cfg.trainer.deterministic)
    set_deterministic_environment(deterministic)
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False  # autotuning may pick another algorithm per run
    torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling every torch.empty costs ~10 %
    kernels.use(cfg.get("kernels", "auto"))  # fast plug-ins or the reference layers only
    if resolve_device(cfg.trainer.device).type == "cpu":
        reuse_freed_memory()  # activations' pages are reused between steps instead of faulted in again


def build_data_and_model(cfg: DictConfig | dict):
    """The dataset and the model it sizes (what predict needs to rebuild a run)."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    data = build_node(cfg.dataset)
    model = build_node(cfg.model, num_items=data.num_items)
    if getattr(model, "requires_time", False):
        check_time_available(data.has_time, data.name)
    return data, model


@dataclass
class Components:
    data: object
    model: torch.nn.Module
    loss: object
    sampler: object
    evaluator: object
    logger: object
    trainer: object


def build(cfg: DictConfig, rank: int = 0, world_size: int = 1) -> Components:
    """Every component of one run, for this rank. Seeds as a run does: identical initial weights on every rank,
    then per-rank dropout streams. Sets the process-wide flags first, so whatever builds here trains as train.py."""
    set_process_flags(cfg)
    seed_everything(cfg.seed)
    data, model = build_data_and_model(cfg)
    log.info("data: %s", data.summary())
    residual = cfg.residual._target_.split(".")[-1]
    size = sum(p.numel() for p in model.parameters())
    log.info("model: %s with %s residual, %d parameters", type(model).__name__, residual, size)
    loss = build_node(cfg.loss)
    negatives = dict(num_negatives=loss.num_negatives, shared_negatives=loss.shared_negatives)
    sampler = build_node(cfg.sampler, data=data, rank=rank, world_size=world_size, **negatives)
    evaluator = build_node(cfg.eval, data=data, rank=rank, world_size=world_size)
    logger = build_node(cfg.logger, rank=rank)
    seed_everything(cfg.seed, rank)  # per-rank dropout streams
    trainer = build_trainer(cfg, model=model, sampler=sampler, evaluator=evaluator, loss=loss, logger=logger)
    return Components(data, model, loss, sampler, evaluator, logger, trainer)


def build_trainer(cfg: DictConfig, **components):
    """The Trainer of `cfg.trainer` over built components (model, sampler, evaluator, loss, logger), with the
    optimizer and schedule partials of `cfg` (the benchmarks time its training step on a model of their own)."""
    settings = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_node = OmegaConf.create({k: v for k, v in settings.items() if k not in ENTRY_POINT_KEYS})
    return build_node(
        trainer_node,
        **components,
        optimizer=build_node(cfg.optimizer),
        schedule=build_node(cfg.schedule),
        run_config=OmegaConf.to_container(cfg, resolve=True),  # plain dicts for checkpoints and W&B
    )
