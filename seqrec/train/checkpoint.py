"""Atomic checkpoint files: write `<name>.tmp`, fsync, `os.replace`; a reader gets a whole file or a clear error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from seqrec.errors import CheckpointError


def atomic_write_bytes(path: Path, write) -> None:
    """Call `write(file_object)` on a temporary sibling, then rename it over `path` (never a half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def write_json(obj: dict, path: Path) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by `save_checkpoint`, or raise CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated/corrupt zips and pickles
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "it is corrupt or truncated; delete it or point trainer.resume at another checkpoint"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(f"{path}: not a seqrec checkpoint (expected a dict with 'model' and 'epoch')")
    return state
