"""Time-interval-aware causal self-attention (TiSASRec, Li, Wang & McAuley, WSDM 2020), without (B, L, L, D) tensors.

Query i attends to key j with logit q_i . (k_j + P^K_j + E^K[R_ij]) / sqrt(d_h) and reads v_j + P^V_j + E^V[R_ij],
where R_ij is the clipped time-interval bucket (seqrec.data.time) and E^K, E^V are (k+1, D) tables. The interval
terms depend on j only through the bucket, so they are computed per bucket (models.md 3.4):

    key side:   q_i . E^K[R_ij]          = gather(Q E^K^T, R)[i, j]          (B, H, L, k+1) -> (B, H, L, L)
    value side: sum_j a_ij E^V[R_ij]     = (scatter_add(A by bucket) E^V)_i  (B, H, L, L) -> (B, H, L, k+1)

Memory is O(B.H.L.(L + k)) instead of the naive O(B.L^2.D), and the two forms are equal up to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seqrec.nn.attention import AttentionContext


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(..., N, D) -> (..., H, N, D/H)."""
    *lead, n, d = x.shape
    return x.view(*lead, n, num_heads, d // num_heads).transpose(-3, -2)


class TimeIntervalAttention(nn.Module):
    """Multi-head causal attention with relative time-interval and absolute-position keys and values.

    Q, K and V all come from the sublayer input (as in our SASRec attention, so Pre-LN and Post-LN behave the same
    way for both models), followed by an output projection. The position and interval tables are shared by all
    blocks and arrive, already dropped out, through ctx.extras:

        buckets: (B, 1, L, L) int32 interval buckets in 0..k
        pos_k, pos_v: (B, L, D) absolute-position key/value embeddings of each slot
        time_k, time_v: (k+1, D) interval key/value tables

    Dropout is applied to the attention weights here; the tables are dropped out as a whole (one mask per bucket)
    because an elementwise mask per (i, j) pair, as in the TF code, has no bucketed form (models.md 3.4).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_units={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        B, L, D = x.shape
        H, ex = self.num_heads, ctx.extras
        q, k, v = self.qkv(x).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, L, Dh) each
        q = q * (D // H) ** -0.5  # scale once here rather than on the (B, H, L, L) logits
        k = k + split_heads(ex["pos_k"], H)
        v = v + split_heads(ex["pos_v"], H)
        time_k, time_v = split_heads(ex["time_k"], H), split_heads(ex["time_v"], H)  # (H, k+1, Dh)
        buckets = ex["buckets"].expand(B, H, L, L)  # a view: the heads share one index

        per_bucket = q @ time_k.transpose(-1, -2)  # (B, H, L, k+1): q_i . E^K[c] for every bucket c
        logits = torch.baddbmm(
            per_bucket.gather(-1, buckets).view(B * H, L, L), q.reshape(B * H, L, -1), k.reshape(B * H, L, -1).mT
        ).view(B, H, L, L)
        # a finite floor, not -inf: every row keeps at least its diagonal, and finite values stay NaN-free under AMP
        logits = logits.masked_fill(~ctx.attn_mask, torch.finfo(logits.dtype).min)
        attn = self.attn_dropout(logits.softmax(dim=-1))  # (B, H, L, L)

        weight_per_bucket = torch.zeros_like(per_bucket).scatter_add_(-1, buckets, attn)  # (B, H, L, k+1)
        y = attn @ v + weight_per_bucket @ time_v  # (B, H, L, Dh)
        return self.out(y.transpose(1, 2).reshape(B, L, D))
