"""One run: check the config, build data, model, sampler, evaluator, logger and trainer, fit, test, close.

`run(cfg)` is plain Python (testable without Hydra's entry point); `main(cfg)` adds the user-facing error
handling that `train.py` needs: a SeqrecError becomes one clear line on stderr and exit status 1.
"""

from __future__ import annotations

import logging
import sys

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from seqrec.errors import ConfigError, SeqrecError
from seqrec.launch import launch, run_distributed, should_launch
from seqrec.train.checkpoint import load_checkpoint
from seqrec.utils.config import check_config
from seqrec.utils.seed import seed_everything

log = logging.getLogger(__name__)


def build(node: DictConfig, **runtime):
    """Instantiate a `_target_` node, passing runtime objects (data, model, ...) through untouched.

    `instantiate(node, data=data)` would merge `data` into the config and turn a dataclass into a DictConfig;
    binding the YAML values first (`_partial_`) and calling with the objects avoids that.
    """
    return instantiate(node, _partial_=True)(**runtime)


def run(cfg: DictConfig, rank: int = 0, world_size: int = 1) -> dict:
    """Train and test one configuration; returns results.json's content."""
    check_config(cfg)
    seed_everything(cfg.seed)  # identical initial weights on every rank
    data = instantiate(cfg.dataset)
    log.info("data: %s", data.summary())
    model = build(cfg.model, num_items=data.num_items)
    if getattr(model, "requires_time", False) and not data.has_time:
        raise ConfigError(f"model={model.__class__.__name__} needs timestamps, but dataset '{data.name}' has none: "
                          "use model=sasrec or a dataset with a timestamp column")
    log.info("model: %s with %s residual, %d parameters", type(model).__name__, cfg.residual._target_.split(".")[-1],
             sum(p.numel() for p in model.parameters()))
    loss = instantiate(cfg.loss)
    sampler = build(cfg.sampler, data=data, num_negatives=loss.num_negatives,
                    shared_negatives=loss.shared_negatives, rank=rank, world_size=world_size)
    evaluator = build(cfg.eval, data=data, rank=rank, world_size=world_size)
    logger = build(cfg.logger, rank=rank)
    seed_everything(cfg.seed, rank)  # per-rank dropout streams
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)  # plain dicts for checkpoints and W&B
        trainer = build(cfg.trainer, model=model, sampler=sampler, evaluator=evaluator, loss=loss, logger=logger,
                        run_config=resolved)
        trainer.wandb_id = logger.start(resolved, _saved_wandb_id(trainer) if logger.use_wandb else None)
        trainer.fit()
        return trainer.test()
    finally:
        logger.close()


def _saved_wandb_id(trainer) -> str | None:
    """The W&B run id stored in the checkpoint the trainer will resume from, so a requeue continues that W&B run."""
    path = trainer.resume_path()
    return load_checkpoint(path).get("wandb_id") if path is not None and path.exists() else None


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
