"""Time-interval-aware causal self-attention (TiSASRec, Li, Wang & McAuley, WSDM 2020), without (B, L, L, D) tensors.

Query i attends to key j with logit q_i . (k_j + P^K_j + E^K[R_ij]) / sqrt(d_h) and reads v_j + P^V_j + E^V[R_ij],
where R_ij is the clipped time-interval bucket (seqrec.data.time) and E^K, E^V are (k+1, D) tables. The interval
terms depend on j only through the bucket, so they are computed per bucket (docs/MODELS.md (Eq. 11)):

    key side:   q_i . E^K[R_ij]          = gather(Q E^K^T, R)[i, j]          (L, k+1) -> (L, L) per head
    value side: sum_j a_ij E^V[R_ij]     = (scatter_add(A by bucket) E^V)_i  (L, L) -> (L, k+1) per head

Memory is O(B.H.L.(L + k)) instead of the naive O(B.L^2.D), and the two forms are equal up to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqrec.nn.attention import AttentionContext, CausalSelfAttention
from seqrec.nn.dropout import keep_mask


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


def _head_forward(q, k, v, time_k, time_v, index, p: float):
    """One head: q, k, v (B, L, Dh); time_k, time_v (k+2, Dh) with a zero row for the masked bucket k+1."""
    per_bucket = q @ time_k.T  # (B, L, k+2): q_i . E^K[c]
    # bucket k+1 = masked pair: a finite floor, not -inf, so no row can turn into NaN (each keeps its diagonal)
    per_bucket[..., -1] = torch.finfo(q.dtype).min
    logits = per_bucket.gather(-1, index).baddbmm_(q, k.transpose(1, 2))  # (B, L, L)
    # in place: softmax kernels reduce a row before writing it, so aliasing input and output is safe
    attn = torch.ops.aten._softmax.out(logits, -1, False, out=logits)
    kept = attn * keep_mask(attn.shape, p, attn.device) if p > 0 else attn  # dropout(A) * (1 - p)
    mass = torch.zeros_like(per_bucket).scatter_add_(-1, index, kept)  # (B, L, k+2): weight per bucket
    out = (mass @ time_v).baddbmm_(kept, v)  # (B, L, Dh), still to be divided by 1 - p
    return out, attn, kept, mass


def _head_backward(d_out, q, k, v, time_k, time_v, index, attn, kept, mass):
    """Gradients of one head; d_out (B, L, Dh) already carries the dropout scale."""
    d_time_v = mass.flatten(0, 1).T @ d_out.flatten(0, 1)  # (k+2, Dh)
    d_v = kept.transpose(1, 2) @ d_out
    grad = (d_out @ time_v.T).gather(-1, index)  # (B, L, L): dLoss/dA_d through the bucket masses ...
    grad.baddbmm_(d_out, v.transpose(1, 2))  # ... and through A_d V
    grad.mul_(kept)  # dLoss/dA_d * A_d * (1 - p) = dLoss/dA * A: the dropout mask is inside `kept`
    grad.addcmul_(attn, grad.sum(-1, keepdim=True), value=-1)  # softmax backward: A*g - A*sum_j(A*g)
    d_per_bucket = torch.zeros_like(mass).scatter_add_(-1, index, grad)  # (B, L, k+2)
    d_q = (grad @ k).add_(d_per_bucket @ time_k)
    d_k = grad.transpose(1, 2) @ q
    d_time_k = d_per_bucket.flatten(0, 1).T @ q.flatten(0, 1)  # (k+2, Dh)
    return d_q, d_k, d_v, d_time_k, d_time_v


class BucketedAttention(torch.autograd.Function):
    """softmax(Q K^T + gather(Q E^K^T, R)) applied to V and to E^V through scatter_add; one autograd node.

    Gradients are written from the equations so that each (B, L, L) buffer is touched as few times as possible:
    forward and backward allocate three per head (logits, kept weights, their gradient) where composing autograd
    ops needs about nine. Heads run one at a time: on CPU a buffer above glibc's 32 MiB mmap ceiling is returned
    to the OS when freed and page-faulted in again on every allocation, and one head's (B, L, L) at B=128, L=200
    (20 MB) stays below it. Shapes: q, k, v (H, B, L, Dh) with q pre-scaled by 1/sqrt(Dh); time_k, time_v
    (H, k+1, Dh); index (B, L, L) int64 from relation_index(); p the attention-weight dropout (0 in eval).
    Returns (H, B, L, Dh). The dropout scale 1/(1-p) is applied to small tensors only.
    """

    @staticmethod
    def forward(ctx, q, k, v, time_k, time_v, index, p: float):
        q, k, v, time_k, time_v = (t.to(q.dtype) for t in (q, k, v, time_k, time_v))  # autocast may mix dtypes
        time_k, time_v = (torch.nn.functional.pad(t, (0, 0, 0, 1)) for t in (time_k, time_v))  # (H, k+2, Dh)
        heads = [_head_forward(*t, index, p) for t in zip(q, k, v, time_k, time_v)]
        ctx.scale, ctx.num_heads = 1 / (1 - p), len(heads)
        ctx.save_for_backward(q, k, v, time_k, time_v, index, *(t for head in heads for t in head[1:]))
        return torch.stack([head[0] for head in heads]).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, time_k, time_v, index, *saved = ctx.saved_tensors
        d_out = d_out * ctx.scale  # through the dropout scale
        grads = [
            _head_backward(d_out[h], q[h], k[h], v[h], time_k[h], time_v[h], index, *saved[3 * h : 3 * h + 3])
            for h in range(ctx.num_heads)
        ]
        d_q, d_k, d_v, d_time_k, d_time_v = (torch.stack(g) for g in zip(*grads))
        return d_q, d_k, d_v, d_time_k[:, :-1], d_time_v[:, :-1], None, None


class TimeIntervalAttention(CausalSelfAttention):
    """Multi-head causal attention with relative time-interval and absolute-position keys and values.

    Q, K and V all come from the sublayer input (as in our SASRec attention, so Pre-LN and Post-LN behave the same
    way for both models), followed by an output projection. The position and interval tables are shared by all
    blocks and arrive, already dropped out, through ctx.extras:

        relation_index: (B, L, L) int64, from relation_index()
        pos_k, pos_v: (B, L, D) absolute-position key/value embeddings of each slot
        time_k, time_v: (k+1, D) interval key/value tables

    Dropout is applied to the attention weights here, with the cheap mask SASRec's attention uses
    (seqrec.nn.dropout); the tables are dropped out as a whole (one mask per bucket)
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

        y = BucketedAttention.apply(
            q * Dh**-0.5,  # scaled here, not on the (L, L) logits
            k + heads(ex["pos_k"]),
            v + heads(ex["pos_v"]),
            heads(ex["time_k"]),
            heads(ex["time_v"]),
            ex["relation_index"],
            self.dropout if self.training else 0.0,
        )  # (H, B, L, Dh)
        return self.out(y.permute(1, 2, 0, 3).reshape(B, L, D))
