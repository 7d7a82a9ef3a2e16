"""Non-learned reference recommenders with the model interface, so the Evaluator scores them unchanged."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


class Popularity(nn.Module):
    """Scores every item by its training-interaction count (the same list for every user).

    Implemented as a 1-dimensional "embedding": h = 1 for every position, item_weight[i] = count(i).
    """

    def __init__(self, data):
        super().__init__()
        counts = np.bincount(data.train_items, minlength=data.num_items + 1).astype(np.float32)
        counts[0] = 0.0
        self.register_buffer("counts", torch.from_numpy(counts).unsqueeze(1))  # (I+1, 1)

    @property
    def item_weight(self) -> Tensor:
        return self.counts

    def forward(self, seq: Tensor, times=None, time_scale=None) -> Tensor:
        return torch.ones(seq.shape + (1,))  # (B, L, 1)
