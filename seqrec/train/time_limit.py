"""`trainer.time_limit_min`: a wall-clock budget for this process's training, for fixed compute budgets (a lent GPU,
a queue limit). Results then depend on the machine's speed, so results.json says `time_limited: true`. A resumed
run gets a fresh limit (it is not checkpointed)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class TimeLimit:
    def __init__(self, minutes: float, device: torch.device, world_size: int):
        self.minutes, self.device, self.world_size = minutes, device, world_size
        self.started_at = time.perf_counter()

    def passed(self) -> bool:
        """Whether the limit has passed (never when 0), decided by rank 0 so that every rank stops together."""
        if self.minutes <= 0:
            return False
        flag = torch.tensor([time.perf_counter() - self.started_at > 60.0 * self.minutes], dtype=torch.int32)
        if self.world_size > 1:
            flag = flag.to(self.device)
            dist.broadcast(flag, src=0)
        return bool(flag.item())
