"""What a checkpoint holds, where a run's checkpoints live, which one a launch continues from.

`last.pt` is written after every epoch, and inside an epoch when the step clock says so (seqrec/train/step_clock.py:
`trainer.checkpoint_every_min`, the time limit, a stop signal); `best.pt` at each new best validation. Both are
written by rank 0 (seqrec/train/checkpoint.py: atomic, with a SHA-256 sidecar) after gathering every rank's RNG
streams (torch's for dropout, the sampler's negatives generator), so a resume continues each rank exactly, from the
batch where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from seqrec.errors import CheckpointError
from seqrec.train.checkpoint import load_checkpoint, save_checkpoint
from seqrec.train.resume_policy import check_resume, check_world_size

log = logging.getLogger(__name__)

NEVER = ("never", "none", "None", "")


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


class Checkpointing:
    """`resume`: "auto" (continue from <output_dir>/checkpoints/last.pt if present), "never", or a path."""

    def __init__(self, output_dir: Path, resume: str, rank: int, world_size: int):
        self.output_dir, self.resume = Path(output_dir), str(resume)
        self.dir = self.output_dir / "checkpoints"
        self.rank, self.world_size = rank, world_size

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    def resume_path(self) -> Path | None:
        """The checkpoint to continue from, per `resume`; refuses to silently overwrite an earlier run."""
        if self.resume == "auto":
            return self.last if self.last.exists() else None
        if self.resume in NEVER:
            if self.last.exists():
                raise CheckpointError(
                    f"{self.output_dir} already holds a run (checkpoints/last.pt); use trainer.resume=auto to continue "
                    "it or another hydra.run.dir; refusing to overwrite it"
                )
            return None
        path = Path(self.resume)
        return path / "checkpoints" / "last.pt" if path.is_dir() else path

    def continues_itself(self, source: Path | None) -> bool:
        """Whether `source` (the checkpoint resumed from) belongs to this run directory."""
        return source is not None and self.output_dir.resolve() in source.resolve().parents

    def rank_states(self, mine: dict) -> list[dict]:
        """Every rank's RNG streams (dropout and negatives differ per rank) with `mine` (this rank's own progress),
        gathered so rank 0 can save them all."""
        mine = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            **mine,
        }
        if self.world_size == 1:
            return [mine]
        states = [None] * self.world_size
        dist.all_gather_object(states, mine)
        return states

    def restore_rank_state(self, states: list[dict]) -> dict:
        """Set this rank's torch RNG streams; returns its saved entry."""
        rng = states[self.rank] if self.rank < len(states) else states[0]
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return rng

    def save(self, name: str, state: Callable[[list[dict]], dict], mine: dict | None = None) -> None:
        """Write `name` from `state(rank_states)`; a collective: every rank takes part."""
        rank_states = self.rank_states(mine or {})
        if self.rank == 0:
            save_checkpoint(state(rank_states), self.dir / name)
        if self.world_size > 1:
            dist.barrier()


class TrainingState:
    """Everything a resume restores: weights, optimizer, lr schedule, grad scaler, early stopping, progress and
    every rank's RNG streams (saved with the run's config), through `save` and `resume`."""

    def __init__(self, model, optimizer, scheduler, scaler, stopping, checkpoints: Checkpointing, run_config: dict):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.stopping, self.checkpoints, self.run_config = stopping, checkpoints, run_config
        self.progress = Progress()

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

    def resume(self, world_size: int) -> tuple[Path, dict] | None:
        """Load the checkpoint `trainer.resume` points at, if any, after checking that this launch may continue it
        (seqrec/train/resume_policy.py); returns (its path, the config it was trained under)."""
        path = self.checkpoints.resume_path()
        if path is None:
            return None
        state = load_checkpoint(path)
        saved_config = state.get("config") or {}
        check_resume(saved_config, self.run_config, path)
        check_world_size(len(state["rng"]), world_size, path)
        self.load_state_dict(state, path)
        return path, saved_config
