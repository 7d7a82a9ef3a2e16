"""Causal multi-head self-attention for left-padded sequences (SASRec, arXiv 1808.09781).

Padding never leaks: padded keys are masked for every query (the common PyTorch port attends to them).
A padded query may attend to itself only, so no softmax row is empty (no NaN); its output is zeroed later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqrec import kernels


@dataclass
class AttentionContext:
    """Per-batch tensors every attention layer of one forward pass shares.

    Attributes:
        valid: (B, L) bool, True at real items.
        attn_mask: (B, 1, L, L) bool, True where query i may attend to key j.
        extras: model-specific tensors (e.g. TiSASRec's interval buckets), keyed by name.
        cache: tensors a kernel plug-in derives once per forward pass (e.g. a float form of the mask).
    """

    valid: Tensor
    attn_mask: Tensor
    extras: dict
    cache: dict = field(default_factory=dict)


def attention(q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, dropout: float, training: bool) -> Tensor:
    """softmax(q kᵀ / sqrt(Dh), masked) v with dropout on the weights; (B, H, L, Dh) in and out."""
    if (fast := kernels.find("attention", q.device)) is not None:
        return fast(q, k, v, ctx, dropout, training)
    # every row keeps its diagonal, so no softmax row is empty
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask, dropout_p=dropout if training else 0.0)


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
