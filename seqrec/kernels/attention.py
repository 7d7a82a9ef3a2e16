"""Attention and dropout plug-ins: a cheaper CPU dropout mask, a float attention mask, an unfused CPU path.

Plug-ins for "dropout" and "attention" on the CPU of seqrec.kernels (CUDA's attention plug-in is
seqrec/kernels/causal_attention.py); the reference layers are seqrec.nn.ffn.Dropout and
seqrec.nn.attention.attention.

- Dropout mask: torch's CPU `bernoulli_` draws one random number per element (~16 ns/element here); dropout on the
  (B, H, L, L) attention weights made it ~38 % of a SASRec epoch. `keep_mask` draws 64-bit random integers and
  reads them as four 16-bit uniforms each (~8x cheaper), so p is quantised to a multiple of 1/65536
  (0.2 -> 0.2000122). The mask is bool, so the backward keeps 1 byte per element. Drawn from torch's global
  generator: seeded and resumable like torch's own dropout, but a different random stream.
- Float mask: torch's CPU flash kernel converts a bool mask on every call (~40 % of its time); the additive float
  form (0 or -inf) is built once per forward pass and shared by every layer (cached in the AttentionContext).
- With dropout on the CPU, SDPA falls back to its unfused path with `bernoulli_`; the same unfused path is
  written out here with the cheap mask (~5x faster).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from seqrec.kernels import Kernel


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """Bool mask with P(False) = p (to 1/65536), drawn from torch's global generator (seeded, resumable)."""
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    uniform16 = words.view(torch.int16)[:n].view(shape)  # each int16 uniform on [-32768, 32767]
    return uniform16 >= round(p * 65536) - 32768


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    if not training or p == 0.0:
        return x
    return x.masked_fill(~keep_mask(x.shape, p, x.device), 0.0) * (1.0 / (1.0 - p))


def float_mask(ctx) -> Tensor:
    """(B, 1, L, L) float32 additive form of ctx.attn_mask (0 or -inf), built once per forward pass."""
    if "float_mask" not in ctx.cache:
        mask = ctx.attn_mask
        ctx.cache["float_mask"] = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, -torch.inf)
    return ctx.cache["float_mask"]


def attention(q: Tensor, k: Tensor, v: Tensor, ctx, dropout_p: float, training: bool) -> Tensor:
    """seqrec.nn.attention.attention: (B, H, L, Dh) in and out."""
    # every row keeps its diagonal, so -inf never fills a whole row
    mask = float_mask(ctx) if q.dtype == torch.float32 else ctx.attn_mask
    if not training or dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p if training else 0.0)
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
    weights = torch.where(keep_mask(weights.shape, dropout_p, q.device), weights, 0.0)
    return (weights @ v).mul_(1.0 / (1.0 - dropout_p))  # rescaling the (B, H, L, Dh) output is cheaper


DROPOUT = Kernel(run=dropout)
ATTENTION = Kernel(run=attention)
