"""Where a run's checkpoints live, which one a launch continues from, and every rank's own part of them.

`last.pt` is written after every epoch (and before its validation), and inside an epoch when the step clock says so
(seqrec/train/step_clock.py: `trainer.checkpoint_every_min`, the time limit, a stop signal); `best.pt` at each new
best validation. Both are written by rank 0 (seqrec/train/checkpoint.py: atomic, with a SHA-256 sidecar) after
gathering every rank's RNG streams and own progress (seqrec/train/training_state.py), so a resume continues each
rank exactly, from the batch where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from seqrec.errors import CheckpointError
from seqrec.train.checkpoint import save_checkpoint

NEVER = ("never", "none", "None", "")


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
