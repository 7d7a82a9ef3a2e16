"""Non-learned reference recommenders with the model interface, so the Evaluator scores them unchanged."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from seqrec.models.head import ItemHead


class Popularity(nn.Module):
    """Scores every item by its training-interaction count (the same list for every user).

    Implemented as a 1-dimensional item table: h = 1 for every position, the head's row i = count(i).
    """

    def __init__(self, data):
        super().__init__()
        counts = np.bincount(data.train_items, minlength=data.num_items + 1).astype(np.float32)
        counts[0] = 0.0
        table = nn.Embedding.from_pretrained(torch.from_numpy(counts).unsqueeze(1), freeze=True)  # (I+1, 1)
        self.head = ItemHead(table, tied=False)

    def forward(self, seq: Tensor, times=None, time_scale=None) -> Tensor:
        return torch.ones(seq.shape + (1,))  # (B, L, 1)
