"""Time-interval-aware causal self-attention (TiSASRec, Li, Wang & McAuley, WSDM 2020), without (B, L, L, D) tensors.

Query i attends to key j with logit q_i . (k_j + P^K_j + E^K[R_ij]) / sqrt(d_h) and reads v_j + P^V_j + E^V[R_ij],
where R_ij is the clipped time-interval bucket (seqrec.data.time) and E^K, E^V are (k+1, D) tables. The interval
terms depend on j only through the bucket, so they are computed per bucket (docs/MODELS.md (Eq. 11)):

    key side:   q_i . E^K[R_ij]          = gather(Q E^K^T, R)[i, j]          (L, k+1) -> (L, L) per head
    value side: sum_j a_ij E^V[R_ij]     = (scatter_add(A by bucket) E^V)_i  (L, L) -> (L, k+1) per head

Memory is O(B.H.L.(L + k)) instead of the naive O(B.L^2.D), and the two forms are equal up to rounding. This
reference sums per bucket with scatter_add (and the gather's backward is one too): on CUDA under deterministic
algorithms torch sorts the index for each call; the plug-in (seqrec/kernels/relation_attention.py) sorts it once
per batch instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seqrec import kernels
from seqrec.nn.attention import AttentionContext, CausalSelfAttention


def relation_index(buckets: Tensor, attn_mask: Tensor, span: int) -> Tensor:
    """The gather/scatter index that every TimeIntervalAttention of one forward pass shares.

    Args:
        buckets: (B, L, L) int64 interval buckets in 0..span; overwritten.
        attn_mask: (B, 1, L, L) bool, True where query i may attend to key j.
        span: the clip k.
    Returns:
        (B, L, L) int64: the bucket of each visible pair, and k+1 for masked pairs. The attention gives bucket
        k+1 the mask value as its score, so one gather applies the interval term and the mask together.
    """
    return buckets.masked_fill_(~attn_mask[:, 0], span + 1)


def relation_attention(q, k, v, time_k, time_v, index, p: float, cache: dict | None = None) -> Tensor:
    """softmax(q k^T + q E^K[R]) (v + E^V[R]) with dropout p on the weights, in the bucketed form.

    Args:
        q, k, v: (H, B, L, Dh), q already scaled by Dh^-1/2.
        time_k, time_v: (H, k+1, Dh) interval tables E^K, E^V per head.
        index: (B, L, L) int64 from relation_index(): the bucket of each visible pair, k+1 for masked pairs.
        cache: the forward pass's AttentionContext.cache, where a plug-in keeps what it derives from `index` once.
    Returns:
        (H, B, L, Dh).
    """
    if (fast := kernels.find("relation_attention", q.device, q)) is not None:
        return fast(q, k, v, time_k, time_v, index, p, cache)
    index = index.expand(q.shape[0], *index.shape)  # (H, B, L, L)
    per_bucket = q @ time_k[:, None].transpose(-1, -2)  # (H, B, L, k+1): q_i . E^K[c]
    # bucket k+1 = masked pair: a finite floor, not -inf, so no row can turn into NaN (each keeps its diagonal)
    per_bucket = F.pad(per_bucket, (0, 1), value=torch.finfo(q.dtype).min)  # (H, B, L, k+2)
    logits = q @ k.transpose(-1, -2) + per_bucket.gather(-1, index)  # (H, B, L, L)
    attn = F.dropout(torch.softmax(logits, dim=-1), p)  # (H, B, L, L)
    mass = attn.new_zeros(per_bucket.shape).scatter_add(-1, index, attn)[..., :-1]  # (H, B, L, k+1): per bucket
    return attn @ v + mass @ time_v[:, None]  # (H, B, L, Dh)


class TimeIntervalAttention(CausalSelfAttention):
    """Multi-head causal attention with relative time-interval and absolute-position keys and values.

    Q, K and V all come from the sublayer input (as in our SASRec attention, so Pre-LN and Post-LN behave the same
    way for both models), followed by an output projection. The position and interval tables are shared by all
    blocks and arrive, already dropped out, through ctx.extras:

        relation_index: (B, L, L) int64, from relation_index()
        pos_k, pos_v: (B, L, D) absolute-position key/value embeddings of each slot
        time_k, time_v: (k+1, D) interval key/value tables

    Dropout is applied to the attention weights here; the tables are dropped out as a whole (one mask per bucket)
    because an elementwise mask per (i, j) pair, as in the TF code, has no bucketed form (docs/MODELS.md, section 3).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float):
        if dim % num_heads:
            raise ValueError(f"hidden_units={dim} must be divisible by num_heads={num_heads}")
        super().__init__(dim, num_heads, dropout)  # the same qkv / out projections as SASRec's attention

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        B, L, D = x.shape
        H, Dh, ex = self.num_heads, D // self.num_heads, ctx.extras
        q, k, v = self.qkv(x).view(B, L, 3, H, Dh).permute(2, 3, 0, 1, 4)  # (H, B, L, Dh) each

        def heads(t: Tensor) -> Tensor:  # (..., D) -> (H, ..., Dh)
            return t.view(*t.shape[:-1], H, Dh).movedim(-2, 0)

        y = relation_attention(
            q * Dh**-0.5,  # scaled here, not on the (L, L) logits
            k + heads(ex["pos_k"]),
            v + heads(ex["pos_v"]),
            heads(ex["time_k"]),
            heads(ex["time_v"]),
            ex["relation_index"],
            self.dropout if self.training else 0.0,
            ctx.cache,
        )  # (H, B, L, Dh)
        return self.out(y.permute(1, 2, 0, 3).reshape(B, L, D))
