"""Learning-rate schedules: a linear warm-up, a step decay per epoch and, optionally, a cosine anneal to 0.

Each schedule is a `torch.optim.lr_scheduler.LambdaLR` whose factor multiplies the optimizer's lr at every step:

    factor(step) = warm-up(step) * decay_rate ** (epoch // decay_step) * lr_scale() [* cosine(step)]

    warm-up(step) = min(1, (step + 1) / warmup_steps)          (1 when warmup_steps = 0)
    epoch         = step // steps_per_epoch
    cosine(step)  = (1 + cos(pi * min(1, step / (num_epochs * steps_per_epoch)))) / 2

`lr_scale` is the early stopper's plateau factor (`EarlyStopping.lr_scale`, 1 until a plateau decay): patience
decides when the lr drops, not the step count. The config node (`schedule=constant|cosine`) is a `_partial_` of
one of the two functions below; the Trainer completes it with the optimizer, the epoch length and the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from seqrec.utils.rules import NON_NEGATIVE, POSITIVE, config_rules, interval

# the rules of the keys both schedules take (`schedule.*`)
SHAPE_RULES = {"warmup_steps": NON_NEGATIVE, "decay_step": POSITIVE, "decay_rate": interval(0, 1, "(]")}


def lr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    num_epochs: int,
    warmup_steps: int,
    decay_step: int,
    decay_rate: float,
    cosine: bool,
    lr_scale: float = 1.0,
) -> float:
    """The lr multiplier after `step` optimizer steps (the formula in the module docstring)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    epoch = step // max(steps_per_epoch, 1)
    factor = warm * decay_rate ** (epoch // decay_step) * lr_scale
    if cosine:
        progress = min(1.0, step / max(num_epochs * steps_per_epoch, 1))
        factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def _scheduler(optimizer: Optimizer, cosine: bool, lr_scale: Callable[[], float], **shape) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, cosine=cosine, lr_scale=lr_scale(), **shape))


@config_rules(**SHAPE_RULES)
def constant(
    optimizer: Optimizer,
    *,
    steps_per_epoch: int,
    num_epochs: int,
    lr_scale: Callable[[], float] = lambda: 1.0,
    warmup_steps: int = 100,
    decay_step: int = 1000,
    decay_rate: float = 0.95,
) -> LambdaLR:
    """Warm-up, then the optimizer's lr times `decay_rate` every `decay_step` epochs (`schedule=constant`)."""
    shape = dict(warmup_steps=warmup_steps, decay_step=decay_step, decay_rate=decay_rate)
    return _scheduler(optimizer, False, lr_scale, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs, **shape)


@config_rules(**SHAPE_RULES)
def cosine(
    optimizer: Optimizer,
    *,
    steps_per_epoch: int,
    num_epochs: int,
    lr_scale: Callable[[], float] = lambda: 1.0,
    warmup_steps: int = 100,
    decay_step: int = 1000,
    decay_rate: float = 0.95,
) -> LambdaLR:
    """As `constant`, also annealed along half a cosine to 0 at the end of `num_epochs` (`schedule=cosine`).

    A constant Adam lr leaves the weights hopping around a plateau and the chosen epoch is partly luck; annealing
    settles them. The anneal ends at `trainer.num_epochs`, so set that to the budget."""
    shape = dict(warmup_steps=warmup_steps, decay_step=decay_step, decay_rate=decay_rate)
    return _scheduler(optimizer, True, lr_scale, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs, **shape)
