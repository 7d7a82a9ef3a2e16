"""When training ends: the best validation value so far, patience, and reduce-on-plateau decays before stopping.

Patience counts validations without improvement of the monitored metric (higher is better). The first
`plateau_decays` times it runs out, the lr is multiplied by `plateau_factor` (read by the schedule through
`lr_scale`) and training carries on; after that, it stops. A run that stopped early and is resumed with more
patience or decays left continues, exactly as an unbroken run under the new setting would have.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

# the checkpoint keys of this state (flat in the checkpoint, as they always were)
STATE_KEYS = ("best_value", "best_epoch", "best_metrics", "bad_evals", "lr_decays", "stopped_early")


class EarlyStopping:
    """Tracks the monitored metric across validations and decides: improve, decay the lr, or stop.

    Args:
        monitor: validation metric key, e.g. "val/ndcg@10".
        patience: validations without improvement before a decay or a stop (0 = never).
        plateau_decays, plateau_factor: the first `plateau_decays` times patience runs out, lr *= plateau_factor.
    """

    def __init__(self, monitor: str, patience: int, plateau_decays: int, plateau_factor: float):
        self.monitor, self.patience = monitor, patience
        self.plateau_decays, self.plateau_factor = plateau_decays, plateau_factor
        self.best_value = -math.inf
        self.best_epoch = 0
        self.best_metrics: dict = {}
        self.bad_evals = 0
        self.lr_decays = 0  # plateau decays so far
        self.stopped_early = False

    def lr_scale(self) -> float:
        """The schedule's plateau multiplier: plateau_factor ** decays so far."""
        return self.plateau_factor**self.lr_decays

    def observe(self, metrics: dict, epoch: int) -> str | None:
        """Record one validation: "best" (the caller saves best.pt), "decay" (the caller lowers the lr now) or None."""
        value = metrics[self.monitor]
        if value > self.best_value:
            self.best_value, self.best_epoch, self.best_metrics, self.bad_evals = value, epoch, metrics, 0
            return "best"
        self.bad_evals += 1
        return "decay" if self.on_patience(epoch) else None

    def on_patience(self, epoch: int) -> bool:
        """Once patience runs out: decay the lr while plateau decays are left, else stop. True on a decay."""
        if not self.patience or self.bad_evals < self.patience:
            return False
        if self.lr_decays < self.plateau_decays:
            self.lr_decays += 1
            self.bad_evals, self.stopped_early = 0, False
            log.info(
                "no %s improvement in %d evaluations at epoch %d: lr x %g (decay %d of %d)",
                self.monitor,
                self.patience,
                epoch,
                self.plateau_factor,
                self.lr_decays,
                self.plateau_decays,
            )
            return True
        self.stopped_early = True
        log.info("early stop at epoch %d: no %s improvement in %d evaluations", epoch, self.monitor, self.bad_evals)
        return False

    def reconsider(self, epoch: int) -> bool:
        """After a resume: a run that had stopped is decided again under this launch's patience and decays."""
        if not self.stopped_early:
            return False
        self.stopped_early = False
        return self.on_patience(epoch)

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in STATE_KEYS}

    def load_state_dict(self, state: dict) -> None:
        for key in STATE_KEYS:
            setattr(self, key, state.get(key, 0) if key == "lr_decays" else state[key])  # older ones had no decays
