"""Dropout and the point-wise feed-forward sublayer of SASRec: Dropout(W2 · Dropout(ReLU(W1 x))), inner width =
model width. The dropout is the reference; a cheaper CPU mask is a plug-in in seqrec.kernels.attention."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from seqrec import kernels


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    if (fast := kernels.find("dropout", x.device)) is not None:
        return fast(x, p, training)
    return F.dropout(x, p, training)


class Dropout(nn.Module):
    """nn.Dropout that lets a kernel plug-in draw the mask."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PointwiseFFN(nn.Module):
    """Two position-wise linear maps (the papers' kernel-size-1 Conv1d) with ReLU and two dropouts."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), Dropout(dropout), nn.Linear(dim, dim), Dropout(dropout)
        )

    def forward(self, x: Tensor, ctx=None) -> Tensor:
        return self.net(x)
