"""Right-aligned input windows (left-padded with 0) built for many users at once with fancy indexing.

Training: input = training items [:-1], target = training items [1:]. Evaluation on "valid": input = the
training items; on "test": the training items plus the validation item. With `trim`, the window is as long as
the longest sequence in the batch (at most maxlen) instead of maxlen: the model's right-aligned positions make
this exactly equivalent, and it skips the padding work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Windows:
    """(B, W) int64 arrays; W <= maxlen. `pos` only for training windows, `times` only with timestamps."""

    seq: np.ndarray
    pos: np.ndarray | None
    times: np.ndarray | None


def _gather(values: np.ndarray, idx: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return np.where(valid, values[np.where(valid, idx, 0)], 0)


def train_windows(data, users: np.ndarray, maxlen: int, trim: bool = True, ends: np.ndarray | None = None) -> Windows:
    """Input/target windows of the users' training sequences (users need >= 2 training items).

    `ends` (B,): each window's end in `data.train_items` (exclusive: the last target is train_items[end - 1]);
    default: the end of the user's training sequence, i.e. the last maxlen targets.
    """
    starts = data.train_ptr[users]
    ends = data.train_ptr[users + 1] if ends is None else ends
    n_in = np.minimum(ends - starts - 1, maxlen)  # (B,) real input items
    width = int(n_in.max()) if trim and len(users) else maxlen
    slot = np.arange(width)
    valid = slot[None, :] >= (width - n_in)[:, None]  # (B, W)
    idx = ends[:, None] - 1 - width + slot[None, :]  # index of the input item in each slot
    seq = _gather(data.train_items, idx, valid)
    pos = _gather(data.train_items, idx + 1, valid)
    times = _gather(data.train_times, idx, valid) if data.train_times is not None else None
    return Windows(seq, pos, times)


def eval_windows(data, users: np.ndarray, split: str, maxlen: int, trim: bool = True) -> Windows:
    """Model inputs for ranking the `split` ("valid" or "test") target of each user."""
    starts, ends = data.train_ptr[users], data.train_ptr[users + 1]
    extra = 1 if split == "test" else 0  # the validation item is part of the test input
    n_in = np.minimum(ends - starts + extra, maxlen)
    width = int(n_in.max()) if trim and len(users) else maxlen
    slot = np.arange(width)
    valid = slot[None, :] >= (width - n_in)[:, None]
    idx = ends[:, None] - width + extra + slot[None, :]
    from_train = valid & (idx < ends[:, None])  # for "test" the last slot holds the validation item
    seq = _gather(data.train_items, idx, from_train)
    times = _gather(data.train_times, idx, from_train) if data.train_times is not None else None
    if extra:
        seq[:, -1] = data.valid_item[users]
        if times is not None:
            times[:, -1] = data.valid_time[users]
    return Windows(seq, None, times)


def user_time_scale(data) -> np.ndarray | None:
    """(U,) each user's smallest non-zero gap between consecutive training timestamps (1 if none)."""
    if data.train_times is None:
        return None
    gaps = np.diff(data.train_times).astype(np.float64)
    same_user = np.ones(gaps.shape, dtype=bool)
    inner_starts = data.train_ptr[1:-1]
    same_user[inner_starts[(inner_starts > 0) & (inner_starts <= gaps.size)] - 1] = False  # gaps across users
    gaps = np.where(same_user & (gaps > 0), gaps, np.inf)
    scale = np.full(data.num_users, np.inf)
    lengths = np.diff(data.train_ptr)
    has_gap = lengths >= 2
    if gaps.size:
        # a user's gaps occupy gaps[start : end - 1]
        mins = np.minimum.reduceat(np.append(gaps, np.inf), data.train_ptr[:-1].clip(max=gaps.size))
        scale[has_gap] = mins[has_gap]
    return np.where(np.isfinite(scale), scale, 1).astype(np.int64)
