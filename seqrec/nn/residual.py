"""Residual connections as pluggable factories (the hyper-connections API: expand, wrap each sublayer, reduce).

A factory provides `expand(x)` once after the embedding, `connection(dim, norm_first)` for each sublayer and
`reduce(state)` once before the final norm, so one code path in the blocks serves the plain residual and mHC.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

LN_EPS = 1e-8  # as the SASRec TF code and SASRec.pytorch


class PlainConnection(nn.Module):
    """x + F(LN(x)) when norm_first (Pre-LN), else LN(x + F(x)) (Post-LN)."""

    def __init__(self, dim: int, norm_first: bool):
        super().__init__()
        self.norm_first = norm_first
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        if self.norm_first:
            return x + sublayer(self.norm(x))
        return self.norm(x + sublayer(x))


class Plain:
    """The ordinary residual stream: one (B, L, D) state, nothing to expand or reduce."""

    def connection(self, dim: int, norm_first: bool) -> nn.Module:
        return PlainConnection(dim, norm_first)

    def expand(self, x: Tensor) -> Tensor:
        return x

    def reduce(self, state: Tensor) -> Tensor:
        return state

    def __repr__(self) -> str:
        return "Plain()"
