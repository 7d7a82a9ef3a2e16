"""When training pauses at a step boundary: `trainer.time_limit_min`, `trainer.checkpoint_every_min` and stop signals.

- `time_limit_min`: a wall-clock budget for this launch's training, for fixed compute budgets (a lent GPU, a queue
  limit). Training stops at the first step boundary past it, even mid-epoch; results then depend on the machine's
  speed, so results.json says `time_limited: true`. A resumed run gets a fresh limit (it is not checkpointed).
- `checkpoint_every_min`: write `last.pt` mid-epoch this often, so a kill (node failure, preemption without warning)
  loses at most that much training.
- signals: a preemption warning noted by seqrec/train/stop_signals.py.

All ranks must take the same decision at the same step, so rank 0 decides and one all-reduce carries its decision.
That collective is not paid every step: each check also fixes the step of the next one, as many steps ahead as fit
in CHECK_EVERY_S at rank 0's measured pace (fewer when the limit or the next checkpoint is nearer), and every rank
calls `check` at that step. A lone process has no collective to save and checks every step (a clock read).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqrec.train.stop_signals import StopSignals

CHECK_EVERY_S = 2.0  # the longest a signal or a passed limit waits for the next check, under DDP


@dataclass(frozen=True)
class Decision:
    """What every rank does at this step boundary."""

    checkpoint: bool = False  # checkpoint_every_min has passed since the last write of last.pt
    time_limit: bool = False  # stop, validate, test the best checkpoint
    ending_signal: int = 0  # a rank got a signal that ends the run: checkpoint, then every rank ends
    signalled: bool = False  # a rank got a signal: checkpoint, then hand the signal on
    received: tuple[int, ...] = ()  # the signals this rank got (for `StopSignals.forward`)

    @property
    def stop(self) -> bool:
        return self.time_limit or self.signalled


class StepClock:
    def __init__(self, time_limit_min: float, checkpoint_every_min: float, device: torch.device, rank: int,
                 world_size: int):  # fmt: skip
        self.minutes, self.limit_s = time_limit_min, 60.0 * time_limit_min
        self.checkpoint_s = 60.0 * checkpoint_every_min
        self.device, self.rank, self.world_size = device, rank, world_size
        self.signals = StopSignals(catch_sigterm=world_size == 1)
        self.started_at = self.checkpointed_at = self.checked_at = time.perf_counter()
        self.checked_step: int | None = None
        self.next_check = 0  # the global step of the next check, the same on every rank
        self.decision = Decision()  # the latest

    def due(self, step: int) -> bool:
        """Whether `step` (just finished) is a scheduled check: the same answer on every rank, no clock read."""
        return step >= self.next_check

    def checkpoint_written(self) -> None:
        self.checkpointed_at = time.perf_counter()

    def check(self, step: int) -> Decision:
        """Decide at this step boundary; a collective under DDP (every rank calls it at the same step)."""
        now = time.perf_counter()
        received = self.signals.take()
        # [time limit, checkpoint due, ending signal, any signal, next check]: rank 0's clock, every rank's signals
        mine = [0, 0, self.signals.ending(received), int(bool(received)), 0]
        if self.rank == 0:
            mine[0] = int(self.limit_s > 0 and now - self.started_at >= self.limit_s)
            mine[1] = int(self.checkpoint_s > 0 and now - self.checkpointed_at >= self.checkpoint_s)
            mine[4] = step + self._steps_to_next_check(step, now)
        if self.world_size > 1:
            agreed = torch.tensor(mine, dtype=torch.int64, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)  # the other ranks send 0 for rank 0's fields
            mine = agreed.tolist()
        self.next_check, self.checked_at, self.checked_step = mine[4], now, step
        self.decision = Decision(bool(mine[1]), bool(mine[0]), mine[2], bool(mine[3]), received)
        return self.decision

    def _steps_to_next_check(self, step: int, now: float) -> int:
        if self.world_size == 1 or self.checked_step is None or step <= self.checked_step:
            return 1
        seconds_per_step = (now - self.checked_at) / (step - self.checked_step)
        horizon = CHECK_EVERY_S
        if self.limit_s > 0:
            horizon = min(horizon, self.limit_s - (now - self.started_at))
        if self.checkpoint_s > 0:
            horizon = min(horizon, self.checkpoint_s - (now - self.checkpointed_at))
        return max(1, int(horizon / max(seconds_per_step, 1e-9)))
