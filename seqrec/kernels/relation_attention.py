"""TiSASRec's relation attention with hand-written gradients, one head at a time: less memory, fewer passes.

The plug-in for "relation_attention" (CPU and CUDA) of seqrec.kernels; the reference, with the maths, is
seqrec.nn.time_attention.relation_attention, and tests/unit/test_kernels.py checks values and gradients against it.
Dropout on the attention weights uses the cheap mask of seqrec.kernels.attention.
"""

from __future__ import annotations

import torch

from seqrec.kernels import Kernel
from seqrec.kernels.attention import keep_mask


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


def bucketed_attention(q, k, v, time_k, time_v, index, p: float):
    return BucketedAttention.apply(q, k, v, time_k, time_v, index, p)


BUCKETED = Kernel(run=bucketed_attention)
