"""Relative time-interval buckets for TiSASRec (Li, Wang & McAuley, WSDM 2020), computed per batch.

For a window of timestamps t_1..t_L (left-padded with 0), the bucket of the pair (i, j) is

    R[i, j] = min(span, floor(|t_i - t_j| / unit))

with `unit` = 1 s (second), 60 s (minute), 3,600 s (hour), 86,400 s (day), or the user's smallest non-zero gap
between consecutive training timestamps (personal: the paper's per-user scaling, docs/MODELS.md Eq. 8). Equal timestamps
fall in bucket 0; the order of the timestamps does not matter (|.|); gaps of span units or more share bucket span.
Pairs that involve a padded slot get bucket 0 (they are masked in attention anyway). Nothing is precomputed per
user: the (B, L, L) matrix lives only for the forward pass that needs it. A pure tensor function of the model's
inputs (timestamps, and the per-user scale the data side computes, seqrec.data.windows.user_time_scale): the
model computes it with its own unit and span, so the data side needs no knowledge of the model's configuration.
"""

from __future__ import annotations

import torch
from torch import Tensor

UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3_600, "day": 86_400}
TIME_UNITS = (*UNIT_SECONDS, "personal")


def interval_buckets(times: Tensor, valid: Tensor, unit: str, span: int, time_scale: Tensor | None = None) -> Tensor:
    """Clipped time-interval bucket of every (query, key) pair of a batch.

    Args:
        times: (B, L) int64 unix seconds, any order; padding slots are ignored.
        valid: (B, L) bool, True at real items.
        unit: one of TIME_UNITS.
        span: clip value k; buckets are 0..k.
        time_scale: (B,) int64 per-user unit in seconds for unit="personal" (values < 1 count as 1).
    Returns:
        (B, L, L) int64 buckets. int64 because torch.gather and scatter_add convert any other index to int64 on
        every call (measured 2-3x slower on CPU with int32); computed once per batch, shared by all blocks and heads.
    """
    if unit not in TIME_UNITS:
        raise ValueError(f"time_unit must be one of {TIME_UNITS}, got {unit!r}")
    if unit == "personal":
        if time_scale is None:
            raise ValueError("time_unit='personal' needs the per-user time_scale")
        divisor = time_scale.to(device=times.device, dtype=torch.int64).clamp(min=1)[:, None, None]  # (B, 1, 1)
    else:
        divisor = UNIT_SECONDS[unit]
    gap = (times[:, :, None] - times[:, None, :]).abs_()  # (B, L, L) int64: unix seconds overflow int32 arithmetic
    buckets = gap.div_(divisor, rounding_mode="trunc").clamp_(max=span)  # gap >= 0: trunc == floor, and faster
    both_real = valid[:, :, None] & valid[:, None, :]  # (B, L, L)
    return buckets.masked_fill_(~both_real, 0)
