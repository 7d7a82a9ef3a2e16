"""Causal multi-head self-attention for left-padded sequences (SASRec, arXiv 1808.09781).

Padding never leaks: padded keys are masked for every query (the common PyTorch port attends to them).
A padded query may attend to itself only, so no softmax row is empty (no NaN); its output is zeroed later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqrec.nn.dropout import keep_mask


@dataclass
class AttentionContext:
    """Per-batch tensors every attention layer of one forward pass shares.

    Attributes:
        valid: (B, L) bool, True at real items.
        attn_mask: (B, 1, L, L) bool, True where query i may attend to key j.
        extras: model-specific tensors (e.g. TiSASRec's interval buckets), keyed by name.
    """

    valid: Tensor
    attn_mask: Tensor
    extras: dict
    _bias: Tensor | None = None

    @property
    def attn_bias(self) -> Tensor:
        """(B, 1, L, L) float32 additive form of `attn_mask` (0 or -inf), built once per forward pass.

        torch's CPU flash kernel converts a bool mask on every call (~40 % of its time); a float one it uses as is.
        """
        if self._bias is None:
            self._bias = torch.zeros(self.attn_mask.shape, device=self.attn_mask.device).masked_fill_(
                ~self.attn_mask, -torch.inf
            )
        return self._bias


def attention(q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, dropout: float, training: bool) -> Tensor:
    """softmax(q kᵀ / sqrt(d) masked) v with dropout on the weights; (B, H, L, Dh) in and out.

    Without dropout this is torch's fused SDPA (flash kernel on the CPU too). With dropout on the CPU, torch
    falls back to its unfused path and draws the (B, H, L, L) mask with the slow `bernoulli_` (~5x slower
    than below), so we write the unfused path ourselves with the cheap mask of `seqrec.nn.dropout`.
    """
    # every row keeps its diagonal, so -inf never fills a whole row
    mask = ctx.attn_bias if q.dtype == torch.float32 else ctx.attn_mask
    if not training or dropout == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout if training else 0.0)
    logits = torch.baddbmm(  # (B·H, L, L): q kᵀ / sqrt(Dh) + bias in one kernel
        mask.expand(-1, q.shape[1], -1, -1).reshape(-1, *mask.shape[-2:])
        if mask.dtype != torch.bool
        else torch.zeros((), dtype=q.dtype),
        q.flatten(0, 1),
        k.flatten(0, 1).transpose(-1, -2),
        alpha=1.0 / math.sqrt(q.shape[-1]),
    ).view(q.shape[:2] + mask.shape[-2:])
    if mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    weights = torch.softmax(logits, dim=-1)
    weights = torch.where(keep_mask(weights.shape, dropout, q.device), weights, 0.0)
    return (weights @ v).mul_(1.0 / (1.0 - dropout))  # rescaling the (B, H, L, Dh) output is cheaper


def causal_padding_mask(valid: Tensor) -> Tensor:
    """(B, L) bool validity -> (B, 1, L, L) bool: key j visible to query i iff j <= i and j is real (or j == i)."""
    L = valid.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()  # (L, L)
    eye = torch.eye(L, dtype=torch.bool, device=valid.device)
    return (causal & valid[:, None, None, :]) | eye  # (B, 1, L, L)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with input and output projections (as torch.nn.MultiheadAttention).

    Dropout is applied to the attention weights only, as in SASRec.pytorch; the sublayer's residual
    connection decides what happens around it.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, H, L, Dh)
        y = attention(q, k, v, ctx, self.dropout, self.training)  # (B, H, L, Dh)
        return self.out(y.transpose(1, 2).reshape(B, L, D))
