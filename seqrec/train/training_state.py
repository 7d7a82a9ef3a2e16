"""The state a run carries from step to step and across launches: what `last.pt` holds and a resume restores.

`Progress` says where training stands, down to the batch inside an epoch; `TrainingState` gathers it with the
weights, the optimizer, the lr schedule, the grad scaler and early stopping, writes it (seqrec/train/checkpointing.py
adds every rank's RNG streams) and restores it on resume, so the resumed run continues as an unbroken one would.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from seqrec.errors import CheckpointError
from seqrec.train.checkpoint import load_checkpoint
from seqrec.train.checkpointing import Checkpointing
from seqrec.train.resume_policy import allowed_changes, check_resume, check_world_size, schedule_moved
from seqrec.train.run_record import append_launch

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where training stands. Shared by all ranks (top-level checkpoint keys): epoch .. wandb_id; each rank's own
    (saved beside its RNG streams): epoch_loss and sampler_state."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps
    epoch_batches: int = 0  # batches of the epoch in progress already trained on (0 between epochs)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    wandb_id: str | None = None
    epoch_loss: torch.Tensor | None = None  # () float32 sum of those batches' losses: the epoch's mean as if unbroken
    sampler_state: dict | None = None  # the negatives generator after those batches (seqrec/train/sampler.py)

    def finish_epoch(self) -> None:
        self.epoch, self.epoch_batches, self.epoch_loss, self.sampler_state = self.epoch + 1, 0, None, None

    def where(self) -> str:
        """'epoch 3', or 'epoch 3 + 17 batches' inside epoch 4."""
        return f"epoch {self.epoch}" + (f" + {self.epoch_batches} batches" if self.epoch_batches else "")


SHARED_PROGRESS = ("epoch", "step", "epoch_batches", "train_seconds", "eval_seconds", "wandb_id")
RANK_PROGRESS = ("epoch_loss", "sampler_state")
# what a checkpoint written before mid-epoch checkpoints lacks meant then
PROGRESS_DEFAULTS = {"epoch_batches": 0, "epoch_loss": None, "sampler_state": None}


class TrainingState:
    """Everything a resume restores: weights, optimizer, lr schedule, grad scaler, early stopping, progress and
    every rank's RNG streams (saved with the run's config), through `save` and `resume`; and the lr they set."""

    def __init__(self, model, optimizer, scheduler, scaler, stopping, checkpoints: Checkpointing, run_config: dict,
                 num_epochs: int):  # fmt: skip
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.stopping, self.checkpoints, self.run_config = stopping, checkpoints, run_config
        self.num_epochs = num_epochs
        self.progress = Progress()
        self.last_saved = "no checkpoint"  # where last.pt stands
        self.resumed_from: Path | None = None
        self.already_done = False  # a finished run relaunched: its results.json stands, nothing is redone

    @property
    def finished(self) -> bool:
        return self.stopping.stopped_early or self.progress.epoch >= self.num_epochs

    def state_dict(self, rank_states: list[dict]) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **{key: getattr(self.progress, key) for key in SHARED_PROGRESS},
            **self.stopping.state_dict(),
            "rng": rank_states,  # one entry per rank: RNG streams and that rank's own progress
            "config": self.run_config,
        }

    def load_state_dict(self, state: dict, path: Path) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: does not fit this model/config ({str(e).splitlines()[0][:160]})") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.stopping.load_state_dict(state)
        mine = self.checkpoints.restore_rank_state(state["rng"])
        for key, source in [(key, state) for key in SHARED_PROGRESS] + [(key, mine) for key in RANK_PROGRESS]:
            setattr(self.progress, key, {**PROGRESS_DEFAULTS, **source}[key])

    def save(self, name: str) -> None:
        """Write checkpoint `name` (a collective: every rank calls it)."""
        p = self.progress
        loss = None if p.epoch_loss is None else p.epoch_loss.detach().cpu()  # gathered as plain CPU data
        self.checkpoints.save(name, self.state_dict, {"epoch_loss": loss, "sampler_state": p.sampler_state})
        if name == "last.pt":
            self.last_saved = p.where()

    def resume(self, world_size: int, logger) -> None:
        """Continue from the checkpoint `trainer.resume` points at, if any: check that this launch may
        (seqrec/train/resume_policy.py), restore everything, decide a run that had stopped early again under this
        launch's patience and decays, drop the metrics.jsonl lines written after the checkpoint and record the
        launch in launches.jsonl. Sets `resumed_from`, and `already_done` for a finished run relaunched."""
        path = self.checkpoints.resume_path()
        if path is None:
            return
        state = load_checkpoint(path)
        saved_config = state.get("config") or {}
        check_resume(saved_config, self.run_config, path)
        check_world_size(len(state["rng"]), world_size, path)
        self.load_state_dict(state, path)
        self.resumed_from, p, s = path, self.progress, self.stopping
        moved = schedule_moved(saved_config, self.run_config)
        if moved:
            log.warning("resuming a run trained with %s: the lr curve changes from here on", moved)
        if s.reconsider(p.epoch):  # more patience or a plateau decay continues a stopped run
            self.apply_lr_decay()
        self.already_done = self.finished and (self.checkpoints.output_dir / "results.json").is_file()
        if self.already_done:
            return
        logger.truncate_after(p.epoch)
        if self.checkpoints.rank == 0:
            changed = allowed_changes(saved_config, self.run_config)
            append_launch(self.checkpoints.output_dir, p.epoch, changed, p.step)
        self.last_saved = p.where()
        log.info("resumed from %s at epoch %d (step %d, %s) (best %s=%.4f at epoch %d)", path, p.epoch, p.step,
                 p.where(), s.monitor, s.best_value, s.best_epoch)  # fmt: skip

    def stored_results(self) -> dict:
        """A finished run relaunched is not tested again: its results.json, read and shown as it is."""
        results = json.loads((self.checkpoints.output_dir / "results.json").read_text())
        shown = "  ".join(f"{k}={v:.4f}" for k, v in results.items() if k.startswith("test/") and "@10" in k)
        log.info("stored results (best epoch %s): %s", results.get("best_epoch"), shown)
        return results

    def apply_lr_decay(self) -> None:
        """The scheduler already set the next step's lr before a plateau decay; set it again so it starts there."""
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * factor(self.progress.step)
