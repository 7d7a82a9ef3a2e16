"""Uniform negative sampling that excludes given (user, item) pairs, vectorised with a sorted key array.

A pair (u, i) is encoded as u * (I + 1) + i; membership is one `searchsorted` over the sorted keys, and
only the rejected draws are redrawn, so there is no Python loop over users or positions.
"""

from __future__ import annotations

import numpy as np


def pair_keys(users: np.ndarray, items: np.ndarray, num_items: int) -> np.ndarray:
    """Sorted unique int64 keys u * (I + 1) + i of the given pairs."""
    return np.unique(users.astype(np.int64) * (num_items + 1) + items.astype(np.int64))


def contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Elementwise membership of `keys` in `sorted_keys` (bool array of keys' shape)."""
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    idx = np.searchsorted(sorted_keys, keys).clip(max=sorted_keys.size - 1)
    return sorted_keys[idx] == keys


def sample_excluding(
    rng: np.random.Generator,
    users: np.ndarray,
    shape: tuple[int, ...],
    num_items: int,
    excluded_keys: np.ndarray,
    max_rounds: int = 100,
) -> np.ndarray:
    """Draw item ids uniformly from 1..I avoiding each user's excluded items.

    Args:
        users: (B,) user index per row; `shape` starts with B.
        excluded_keys: sorted pair keys (see `pair_keys`) of the items each user must not get.
        max_rounds: redraw limit; a user who has seen (almost) every item keeps its last draws
            instead of looping forever.
    Returns: int64 array of `shape`.
    """
    user_keys = users.astype(np.int64).reshape((-1,) + (1,) * (len(shape) - 1)) * (num_items + 1)
    neg = rng.integers(1, num_items + 1, size=shape, dtype=np.int64)
    bad = np.flatnonzero(contains(excluded_keys, user_keys + neg))
    flat, flat_user = neg.reshape(-1), np.broadcast_to(user_keys, shape).reshape(-1)
    for _ in range(max_rounds):
        if bad.size == 0:
            break
        flat[bad] = rng.integers(1, num_items + 1, size=bad.size, dtype=np.int64)
        bad = bad[contains(excluded_keys, flat_user[bad] + flat[bad])]
    return neg
