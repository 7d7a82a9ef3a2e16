"""One run: check the config, build data, model, sampler, evaluator, logger and trainer, fit, test, close.

`run(cfg)` is plain Python (testable without Hydra's entry point); `main(cfg)` adds the user-facing error
handling that `train.py` needs: a SeqrecError becomes one clear line on stderr and exit status 1.
"""

from __future__ import annotations

import logging
import sys

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from seqrec import kernels
from seqrec.errors import SeqrecError
from seqrec.launch import launch, run_distributed, should_launch
from seqrec.models.tisasrec import check_time_available
from seqrec.utils.config import check_config
from seqrec.utils.seed import seed_everything

log = logging.getLogger(__name__)


def build(node: DictConfig, **runtime):
    """Instantiate a `_target_` node, passing runtime objects (data, model, ...) through untouched.

    `instantiate(node, data=data)` would merge `data` into the config and turn a dataclass into a DictConfig;
    binding the YAML values first (`_partial_`) and calling with the objects avoids that.
    """
    try:
        return instantiate(node, _partial_=True)(**runtime)
    except InstantiationException as e:
        if isinstance(e.__cause__, SeqrecError):  # a user error inside the target: show it, not Hydra's wrapper
            raise e.__cause__ from None
        raise


def run(cfg: DictConfig, rank: int = 0, world_size: int = 1) -> dict:
    """Train and test one configuration; returns results.json's content."""
    check_config(cfg)
    kernels.use(cfg.get("kernels", "auto"))  # fast plug-ins or the reference layers, for this process
    seed_everything(cfg.seed)  # identical initial weights on every rank
    data = build(cfg.dataset)
    log.info("data: %s", data.summary())
    model = build(cfg.model, num_items=data.num_items)
    if getattr(model, "requires_time", False):
        check_time_available(data.has_time, data.name)
    log.info(
        "model: %s with %s residual, %d parameters",
        type(model).__name__,
        cfg.residual._target_.split(".")[-1],
        sum(p.numel() for p in model.parameters()),
    )
    loss = build(cfg.loss)
    sampler = build(
        cfg.sampler,
        data=data,
        num_negatives=loss.num_negatives,
        shared_negatives=loss.shared_negatives,
        rank=rank,
        world_size=world_size,
    )
    evaluator = build(cfg.eval, data=data, rank=rank, world_size=world_size)
    logger = build(cfg.logger, rank=rank)
    seed_everything(cfg.seed, rank)  # per-rank dropout streams
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)  # plain dicts for checkpoints and W&B
        trainer = build(
            cfg.trainer,
            model=model,
            sampler=sampler,
            evaluator=evaluator,
            loss=loss,
            logger=logger,
            run_config=resolved,
        )
        trainer.fit()
        return trainer.test()
    finally:
        logger.close()


def main(cfg: DictConfig) -> float | None:
    """Hydra entry point body: run, report user errors in one line, return the optimised metric for sweepers."""
    try:
        # trainer.devices > 1 and no launcher around: start the DDP workers here (one Hydra process, one run dir)
        results = launch(cfg) if should_launch(cfg) else run_distributed(cfg, run)
    except SeqrecError as e:
        log.error("%s", e)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # let the sweep record this job as failed and go on
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    return results.get(cfg.optimized_metric)
