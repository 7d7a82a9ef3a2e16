"""TiSASRec's relation attention with hand-written gradients, one head at a time: less memory, fewer passes.

The plug-in for "relation_attention" (CPU and CUDA) of seqrec.kernels; the reference, with the maths, is
seqrec.nn.time_attention.relation_attention, and tests/unit/test_kernels.py checks values and gradients against it.
Dropout on the attention weights uses the cheap mask of seqrec.kernels.attention.

Sums per bucket without a sort per call. Twice per head and block (forward: attention mass per bucket; backward:
the logit gradient per bucket) a (B, L, L) row is summed by its bucket index. `scatter_add_` does that in one pass
and is deterministic on the CPU (one thread owns an output row, adding in key order). On CUDA it adds with atomics
(order varies between runs), and under torch.use_deterministic_algorithms torch replaces each call by a sort of
all B.L.L indices. The bucket index is the same for every head, block, forward and backward of a batch, so
`BucketLayout` sorts it once per forward pass (stably: keys keep their order inside a bucket) and each sum becomes
a gather into that order plus a segment sum (`torch.segment_reduce`: one thread per bucket, adding its keys in
order): deterministic by construction, and the same additions in the same order as the CPU's scatter_add, so the
two are bitwise equal (tested on the CPU). It is used where the scatter would need the sort (CUDA with
deterministic algorithms); the CPU keeps scatter_add (about 6x cheaper there than gather + segment sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from seqrec.kernels import Kernel
from seqrec.kernels.attention import keep_mask


@dataclass(frozen=True)
class BucketLayout:
    """The keys of every (b, i) row grouped by bucket, computed once per forward pass from the bucket index.

    order: (B, L, L) int64, the keys j of each row sorted stably by bucket.
    offsets: (B, L, S + 1) int64, where bucket c starts in `order` (bucket c spans offsets[c] .. offsets[c+1]).
    """

    order: Tensor
    offsets: Tensor

    @classmethod
    def of(cls, index: Tensor, num_buckets: int) -> BucketLayout:
        """index (B, L, L) int64 in 0..num_buckets-1 -> its layout (a stable sort and a binary search, no scatter)."""
        sorted_index, order = index.sort(dim=-1, stable=True)  # (B, L, L) each
        starts = torch.arange(num_buckets + 1, device=index.device).expand(*index.shape[:-1], -1).contiguous()
        return cls(order, torch.searchsorted(sorted_index, starts))  # offsets: (B, L, S + 1)

    def sums(self, values: Tensor) -> Tensor:
        """(B, L, L) values -> (B, L, S): the sum of each row's values per bucket, keys added in order."""
        grouped = values.gather(-1, self.order)  # (B, L, L): each row's values, bucket by bucket
        return torch.segment_reduce(grouped, "sum", offsets=self.offsets, axis=2, unsafe=True)  # unsafe: no sync


def needs_layout(index: Tensor) -> bool:
    """Whether the bucket sums take the sort-free path: where scatter_add is not deterministic by itself."""
    return index.is_cuda and torch.are_deterministic_algorithms_enabled()


def bucket_layout(index: Tensor, num_buckets: int, cache: dict | None) -> BucketLayout | None:
    """The layout for bucket sums over `index`, shared through the forward pass's cache; None: use scatter_add."""
    if not needs_layout(index):
        return None
    cache = {} if cache is None else cache
    key = ("relation_layout", num_buckets)
    if key not in cache:
        cache[key] = BucketLayout.of(index, num_buckets)
    return cache[key]


def bucket_sums(values: Tensor, index: Tensor, num_buckets: int, layout: BucketLayout | None) -> Tensor:
    """(B, L, L) values summed per row by bucket index (B, L, L) -> (B, L, num_buckets)."""
    if layout is not None:
        return layout.sums(values)
    return values.new_zeros(*values.shape[:-1], num_buckets).scatter_add_(-1, index, values)


def _head_forward(q, k, v, time_k, time_v, index, layout, p: float):
    """One head: q, k, v (B, L, Dh); time_k, time_v (k+2, Dh) with a zero row for the masked bucket k+1."""
    per_bucket = q @ time_k.T  # (B, L, k+2): q_i . E^K[c]
    # bucket k+1 = masked pair: a finite floor, not -inf, so no row can turn into NaN (each keeps its diagonal)
    per_bucket[..., -1] = torch.finfo(q.dtype).min
    logits = per_bucket.gather(-1, index).baddbmm_(q, k.transpose(1, 2))  # (B, L, L)
    # in place: softmax kernels reduce a row before writing it, so aliasing input and output is safe
    attn = torch.ops.aten._softmax.out(logits, -1, False, out=logits)
    kept = attn * keep_mask(attn.shape, p, attn.device) if p > 0 else attn  # dropout(A) * (1 - p)
    mass = bucket_sums(kept, index, per_bucket.shape[-1], layout)  # (B, L, k+2): weight per bucket
    out = (mass @ time_v).baddbmm_(kept, v)  # (B, L, Dh), still to be divided by 1 - p
    return out, attn, kept, mass


def _head_backward(d_out, q, k, v, time_k, time_v, index, layout, attn, kept, mass):
    """Gradients of one head; d_out (B, L, Dh) already carries the dropout scale."""
    d_time_v = mass.flatten(0, 1).T @ d_out.flatten(0, 1)  # (k+2, Dh)
    d_v = kept.transpose(1, 2) @ d_out
    grad = (d_out @ time_v.T).gather(-1, index)  # (B, L, L): dLoss/dA_d through the bucket masses ...
    grad.baddbmm_(d_out, v.transpose(1, 2))  # ... and through A_d V
    grad.mul_(kept)  # dLoss/dA_d * A_d * (1 - p) = dLoss/dA * A: the dropout mask is inside `kept`
    grad.addcmul_(attn, grad.sum(-1, keepdim=True), value=-1)  # softmax backward: A*g - A*sum_j(A*g)
    d_per_bucket = bucket_sums(grad, index, mass.shape[-1], layout)  # (B, L, k+2)
    d_q = (grad @ k).add_(d_per_bucket @ time_k)
    d_k = grad.transpose(1, 2) @ q
    d_time_k = d_per_bucket.flatten(0, 1).T @ q.flatten(0, 1)  # (k+2, Dh)
    return d_q, d_k, d_v, d_time_k, d_time_v


class BucketedAttention(torch.autograd.Function):
    """softmax(Q K^T + gather(Q E^K^T, R)) applied to V and to E^V through bucket sums; one autograd node.

    Gradients are written from the equations so that each (B, L, L) buffer is touched as few times as possible:
    forward and backward allocate three per head (logits, kept weights, their gradient) where composing autograd
    ops needs about nine. Heads run one at a time: on CPU a buffer above glibc's 32 MiB mmap ceiling is returned
    to the OS when freed and page-faulted in again on every allocation, and one head's (B, L, L) at B=128, L=200
    (20 MB) stays below it. Shapes: q, k, v (H, B, L, Dh) with q pre-scaled by 1/sqrt(Dh); time_k, time_v
    (H, k+1, Dh); index (B, L, L) int64 from relation_index(); layout its BucketLayout or None (scatter_add);
    p the attention-weight dropout (0 in eval). Returns (H, B, L, Dh). The dropout scale 1/(1-p) is applied to
    small tensors only.
    """

    @staticmethod
    def forward(ctx, q, k, v, time_k, time_v, index, layout, p: float):
        q, k, v, time_k, time_v = (t.to(q.dtype) for t in (q, k, v, time_k, time_v))  # autocast may mix dtypes
        time_k, time_v = (torch.nn.functional.pad(t, (0, 0, 0, 1)) for t in (time_k, time_v))  # (H, k+2, Dh)
        heads = [_head_forward(*t, index, layout, p) for t in zip(q, k, v, time_k, time_v)]
        ctx.scale, ctx.num_heads, ctx.layout = 1 / (1 - p), len(heads), layout
        ctx.save_for_backward(q, k, v, time_k, time_v, index, *(t for head in heads for t in head[1:]))
        return torch.stack([head[0] for head in heads]).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, time_k, time_v, index, *saved = ctx.saved_tensors
        d_out = d_out * ctx.scale  # through the dropout scale
        grads = [
            _head_backward(
                d_out[h], q[h], k[h], v[h], time_k[h], time_v[h], index, ctx.layout, *saved[3 * h : 3 * h + 3]
            )
            for h in range(ctx.num_heads)
        ]
        d_q, d_k, d_v, d_time_k, d_time_v = (torch.stack(g) for g in zip(*grads))
        return d_q, d_k, d_v, d_time_k[:, :-1], d_time_v[:, :-1], None, None, None


def bucketed_attention(q, k, v, time_k, time_v, index, p: float, cache: dict | None = None):
    """The plug-in's call (seqrec.kernels): `cache`, the forward pass's AttentionContext.cache, keeps the
    BucketLayout that all heads and blocks share."""
    layout = bucket_layout(index, time_k.shape[-2] + 1, cache)  # k+1 buckets and the masked one
    return BucketedAttention.apply(q, k, v, time_k, time_v, index, layout, p)


BUCKETED = Kernel(run=bucketed_attention)
