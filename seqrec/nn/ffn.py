"""Dropout and the position-wise feed-forward sublayers: SASRec's Dropout(W2 · Dropout(ReLU(W1 x))) (inner width =
model width in the paper) and the SwiGLU variant of LLaMA and LiGR. The dropout is the reference; a cheaper CPU mask
is a plug-in in seqrec.kernels.attention."""

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
    """Two position-wise linear maps (the papers' kernel-size-1 Conv1d) with ReLU and two dropouts:
    D -> inner -> D, inner = D in SASRec."""

    def __init__(self, dim: int, dropout: float, inner: int | None = None):
        super().__init__()
        inner = inner or dim
        self.net = nn.Sequential(
            nn.Linear(dim, inner), nn.ReLU(), Dropout(dropout), nn.Linear(inner, dim), Dropout(dropout)
        )

    def forward(self, x: Tensor, ctx=None) -> Tensor:
        return self.net(x)


class SwiGLUFFN(nn.Module):
    """Dropout(W_out · Dropout(SiLU(W_gate x) * W_up x)): a gated linear unit, D -> inner -> D, no biases (as LLaMA
    and LiGR). With inner = 4D it has 6x the parameters and FLOPs of SASRec's D -> D -> D FFN."""

    def __init__(self, dim: int, dropout: float, inner: int):
        super().__init__()
        self.gate, self.up = nn.Linear(dim, inner, bias=False), nn.Linear(dim, inner, bias=False)
        self.out = nn.Linear(inner, dim, bias=False)
        self.inner_dropout, self.out_dropout = Dropout(dropout), Dropout(dropout)

    def forward(self, x: Tensor, ctx=None) -> Tensor:
        hidden = F.silu(self.gate(x)) * self.up(x)  # (B, L, inner)
        return self.out_dropout(self.out(self.inner_dropout(hidden)))


FFNS = {"relu": PointwiseFFN, "swiglu": SwiGLUFFN}


def make_ffn(kind: str, dim: int, dropout: float, multiplier: int) -> nn.Module:
    """The FFN sublayer `kind` (FFNS) with inner width multiplier * dim."""
    return FFNS[kind](dim, dropout, multiplier * dim)
