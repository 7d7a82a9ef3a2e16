"""The one metrics sink: stdout/train.log, `metrics.jsonl` and optionally Weights & Biases (rank 0 only)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


class MetricLogger:
    """Writes one JSON object per call to `<output_dir>/metrics.jsonl`; W&B support plugs in here.

    Args:
        output_dir: the run directory.
        wandb: also log to Weights & Biases.
        rank: only rank 0 writes.
    """

    def __init__(self, *, output_dir: str, wandb: bool = False, rank: int = 0, **wandb_options):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.rank = rank
        self.use_wandb = wandb
        self.wandb_options = wandb_options
        self.wandb_run = None

    @property
    def active(self) -> bool:
        return self.rank == 0

    def start(self, config: dict | None = None, run_id: str | None = None) -> str | None:
        """Open the sinks; returns the W&B run id to store in checkpoints (None without W&B)."""
        return None

    def truncate_after(self, epoch: int) -> None:
        """Drop lines of epochs after `epoch` (written by a killed run after its last checkpoint)."""
        if not self.active or not self.path.exists():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("epoch", 0) <= epoch]
        if len(kept) != len(lines):
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, metrics: dict, epoch: int, step: int) -> None:
        if not self.active:
            return
        record = {"epoch": epoch, "step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def summary(self, results: dict) -> None:
        """Final results (best checkpoint's validation and test metrics)."""

    def close(self) -> None:
        """Flush and close every sink; safe to call more than once."""


def _clean(v):
    v = float(v) if hasattr(v, "__float__") and not isinstance(v, (int, str)) else v
    return None if isinstance(v, float) and not math.isfinite(v) else v
