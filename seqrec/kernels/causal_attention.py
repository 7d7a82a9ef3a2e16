"""Attention without a mask tensor, so that SDPA can choose its fused kernels: the "attention" plug-in for CUDA.

scaled_dot_product_attention runs FlashAttention only without an explicit `attn_mask`; a (B, 1, L, L) mask limits
it to the memory-efficient kernel (which reads the mask, forward and backward) or the unfused maths. Causality
alone is `is_causal=True`. Padding is the problem: sequences are left-padded, so a real query at position i would
see, causally, the padding keys 0..p-1 before the first real item at p (their keys are the qkv bias, not nothing).

The choice here: rotate each row so that its padding moves to the end (left-padded -> right-padded), run causal
attention, rotate the output back. In the rotated row the real items are 0..n-1 and a real query t sees keys
0..t: real items only, exactly the reference mask's keys (causal and real). A padded query (now after the real
items) sees real and padded keys; its output is finite and zeroed by the block afterwards, as the reference's is
(tests/unit/test_kernels.py checks the real rows' values and gradients against the reference, and that changing a
padded key changes nothing). The rotation is a gather of q, k, v and one of the output; its backward is the
inverse rotation (a gather too, not a scatter, so deterministic mode costs nothing extra). Per-row shifts live on
the device: nothing here waits for the GPU.

Against the reference the real rows agree to float rounding: the keys are the same but a fused kernel sums them
in its own blocks. Used on CUDA only: the CPU plug-in (seqrec/kernels/attention.py) keeps its float mask and
cheap dropout, bitwise as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seqrec.kernels import Kernel


class _RotateRows(torch.autograd.Function):
    """x (B, H, L, Dh) -> y with y[b, :, t] = x[b, :, index[b, t]]: a per-row permutation, inverted in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.gather(2, index.expand_as(x))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.gather(2, inverse.expand_as(grad)), None, None


def rotations(ctx) -> tuple[Tensor, Tensor]:
    """(to_right_padded, back), each (B, 1, L, 1) int64, built once per forward pass (cached in ctx.cache).

    Row b has p_b padding slots at its start; to_right_padded[b, t] = (t + p_b) mod L, back[b, t] = (t - p_b) mod L.
    """
    if "rotations" not in ctx.cache:
        valid = ctx.valid  # (B, L) bool, left-padded
        L = valid.shape[1]
        padding = L - valid.sum(1, keepdim=True)  # (B, 1), on the device
        t = torch.arange(L, device=valid.device)  # (L,)
        # the rotation is right only for left-padded rows (padding, then items): checked on the device, so a row
        # with a gap or right padding stops the run instead of letting padding into attention, without a host sync
        torch._assert_async((valid == (t >= padding)).all(), "causal attention needs left-padded rows")
        to_right = (t + padding) % L  # (B, L)
        back = (t - padding) % L
        ctx.cache["rotations"] = (to_right[:, None, :, None], back[:, None, :, None])
    return ctx.cache["rotations"]


def causal_attention(q: Tensor, k: Tensor, v: Tensor, ctx, dropout_p: float, training: bool) -> Tensor:
    """seqrec.nn.attention.attention for left-padded rows, as is_causal attention: (B, H, L, Dh) in and out."""
    to_right, back = rotations(ctx)
    q, k, v = (_RotateRows.apply(t, to_right, back) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p if training else 0.0, is_causal=True)
    return _RotateRows.apply(out, back, to_right)


CAUSAL = Kernel(run=causal_attention)
