"""Where a run's checkpoints live, which one a launch continues from, and every rank's RNG state.

`last.pt` is written after every epoch and `best.pt` at each new best validation; both are written by rank 0
(seqrec/train/checkpoint.py: atomic, with a SHA-256 sidecar) after gathering every rank's RNG state, so a resume
continues each rank's dropout stream exactly.
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

    def rng_states(self) -> list[dict]:
        """Every rank's RNG state (dropout streams differ per rank), gathered so rank 0 can save them all."""
        mine = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        if self.world_size == 1:
            return [mine]
        states = [None] * self.world_size
        dist.all_gather_object(states, mine)
        return states

    def restore_rng(self, states: list[dict]) -> None:
        rng = states[self.rank] if self.rank < len(states) else states[0]
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def save(self, name: str, state: Callable[[list[dict]], dict]) -> None:
        """Write `name` from `state(rng_states)`; a collective: every rank takes part."""
        rng_states = self.rng_states()
        if self.rank == 0:
            save_checkpoint(state(rng_states), self.dir / name)
        if self.world_size > 1:
            dist.barrier()
