"""Time-interval-aware causal self-attention (TiSASRec, Li, Wang & McAuley, WSDM 2020), without (B, L, L, D) tensors.

Query i attends to key j with logit q_i . (k_j + P^K_j + E^K[R_ij]) / sqrt(d_h) and reads v_j + P^V_j + E^V[R_ij],
where R_ij is the clipped time-interval bucket (seqrec.data.time) and E^K, E^V are (k+1, D) tables. The interval
terms depend on j only through the bucket, so they are computed per bucket (models.md 3.4):

    key side:   q_i . E^K[R_ij]          = gather(Q E^K^T, R)[i, j]          (L, k+1) -> (L, L) per head
    value side: sum_j a_ij E^V[R_ij]     = (scatter_add(A by bucket) E^V)_i  (L, L) -> (L, k+1) per head

Memory is O(B.H.L.(L + k)) instead of the naive O(B.L^2.D), and the two forms are equal up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqrec.nn.attention import AttentionContext


def relation_index(buckets: Tensor, attn_mask: Tensor, span: int, num_heads: int) -> Tensor:
    """The gather/scatter index that every TimeIntervalAttention of one forward pass shares.

    Args:
        buckets: (B, L, L) int64 interval buckets in 0..span; overwritten.
        attn_mask: (B, 1, L, L) bool, True where query i may attend to key j.
        span: the clip k.
        num_heads: H.
    Returns:
        (H*B, L, L) int64: the bucket of each visible pair, and k+1 for masked pairs. The attention gives column
        k+1 of its per-bucket scores the mask value, so one gather applies the interval term and the mask together.
        Materialised per head because gather and scatter_add convert a broadcast or int32 index on every call.
    """
    index = buckets.masked_fill_(~attn_mask[:, 0], span + 1)  # (B, L, L), in place: the buckets are ours to reuse
    return index.unsqueeze(0).expand(num_heads, *index.shape).reshape(-1, *index.shape[1:])


class _BucketedSoftmaxAttention(torch.autograd.Function):
    """Y = A_d V and W = scatter_add(A_d by bucket) with A = softmax(gather(S, R) + Q K^T), A_d = dropout(A).

    One autograd node for the (L, L) part with gradients written from the equations, so that forward and backward
    touch each (H*B, L, L) buffer as few times as possible and allocate three of them instead of about nine. Shapes:
    S (N, L, k+2) per-bucket scores (column k+1 = mask value), Q, K, V (N, L, Dh), R (N, L, L) int64, N = H*B.
    The dropout scale 1/(1-p) is applied to the small outputs and their gradients, never to an (L, L) buffer.
    """

    @staticmethod
    def forward(ctx, per_bucket, q, k, v, index, p: float):
        q, k, v = (t.to(per_bucket.dtype) for t in (q, k, v))  # one dtype for the in-place ops (autocast mixes)
        logits = per_bucket.gather(-1, index)  # (N, L, L)
        logits.baddbmm_(q, k.transpose(1, 2))
        # in place: softmax kernels reduce a row before writing it, so aliasing input and output is safe
        attn = torch.ops.aten._softmax.out(logits, -1, False, out=logits)
        kept = torch.empty_like(attn).bernoulli_(1 - p).mul_(attn) if p > 0 else attn  # A_d * (1 - p)
        scale = 1 / (1 - p)
        weight_per_bucket = torch.zeros_like(per_bucket).scatter_add_(-1, index, kept).mul_(scale)  # (N, L, k+2)
        out = torch.bmm(kept, v).mul_(scale)  # (N, L, Dh)
        ctx.save_for_backward(q, k, v, index, attn, kept)
        ctx.scale = scale
        return out, weight_per_bucket

    @staticmethod
    def backward(ctx, d_out, d_weight_per_bucket):
        q, k, v, index, attn, kept = ctx.saved_tensors
        d_out, d_weight_per_bucket = d_out * ctx.scale, d_weight_per_bucket * ctx.scale
        grad = d_weight_per_bucket.gather(-1, index)  # (N, L, L): dL/dA_d from the bucket sums ...
        grad.baddbmm_(d_out, v.transpose(1, 2))  # ... and from A_d V
        grad.mul_(kept)  # dL/dA_d * A_d * (1 - p) = dL/dA * A: the dropout mask is inside `kept`
        # softmax backward, in place: dlogits = A * g - A * sum_j(A * g)
        grad.addcmul_(attn, grad.sum(-1, keepdim=True), value=-1)
        d_per_bucket = torch.zeros_like(d_weight_per_bucket).scatter_add_(-1, index, grad)
        d_q, d_k = torch.bmm(grad, k), torch.bmm(grad.transpose(1, 2), q)
        d_v = torch.bmm(kept.transpose(1, 2), d_out)
        return d_per_bucket, d_q, d_k, d_v, None, None


class TimeIntervalAttention(nn.Module):
    """Multi-head causal attention with relative time-interval and absolute-position keys and values.

    Q, K and V all come from the sublayer input (as in our SASRec attention, so Pre-LN and Post-LN behave the same
    way for both models), followed by an output projection. The position and interval tables are shared by all
    blocks and arrive, already dropped out, through ctx.extras:

        relation_index: (H*B, L, L) int64, from relation_index()
        pos_k, pos_v: (B, L, D) absolute-position key/value embeddings of each slot
        time_k, time_v: (k+1, D) interval key/value tables

    Dropout is applied to the attention weights here; the tables are dropped out as a whole (one mask per bucket)
    because an elementwise mask per (i, j) pair, as in the TF code, has no bucketed form (models.md 3.4).
    All (L, L) work runs on 3-D (H*B, L, L) tensors, in place where autograd allows, because on CPU every fresh
    (B, H, L, L) buffer costs page faults and an in-place op on a 4-D view would make autograd copy the whole base.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_units={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        B, L, D = x.shape
        H, Dh, ex = self.num_heads, D // self.num_heads, ctx.extras
        index = ex["relation_index"]  # (H*B, L, L)
        q, k, v = self.qkv(x).view(B, L, 3, H, Dh).permute(2, 3, 0, 1, 4)  # (H, B, L, Dh) each
        q = q.contiguous().mul_(Dh**-0.5)  # (H, B, L, Dh); scaled once here rather than on the (L, L) logits
        k = (k + ex["pos_k"].view(B, L, H, Dh).permute(2, 0, 1, 3)).reshape(H * B, L, Dh)
        v = (v + ex["pos_v"].view(B, L, H, Dh).permute(2, 0, 1, 3)).reshape(H * B, L, Dh)
        time_k, time_v = ex["time_k"], ex["time_v"]  # (k+1, D)
        span = time_k.shape[0] - 1

        per_bucket = torch.bmm(q.view(H, B * L, Dh), time_k.view(span + 1, H, Dh).permute(1, 2, 0))  # (H, B*L, k+1): q_i . E^K[c]
        # bucket k+1 = masked pair: a finite floor, not -inf, so no row can turn into NaN (each keeps its diagonal)
        per_bucket = F.pad(per_bucket, (0, 1), value=torch.finfo(per_bucket.dtype).min)  # (H, B*L, k+2)
        p = self.dropout if self.training else 0.0
        y, weight_per_bucket = _BucketedSoftmaxAttention.apply(
            per_bucket.view(H * B, L, span + 2), q.view(H * B, L, Dh), k, v, index, p
        )  # (H*B, L, Dh) = A V, (H*B, L, k+2) = attention mass per bucket
        time_v = F.pad(time_v.view(span + 1, H, Dh).transpose(0, 1), (0, 0, 0, 1))  # (H, k+2, Dh); masked row 0
        y = y + torch.bmm(weight_per_bucket.view(H, B * L, span + 2), time_v).view(H * B, L, Dh)
        return self.out(y.view(H, B, L, Dh).permute(1, 2, 0, 3).reshape(B, L, D))
