"""The per-user test ranks a run leaves beside its results, `test_ranks.npy`, so that two settings can be compared
user by user (`python -m seqrec.results DIR --paired A B --over users`).

The file is one NumPy record per test user, by ascending user index (np.save, no pickled objects):
- `user` (int32): the user's 0-based index in the data set, the same in every run under one protocol fingerprint;
- `rank` (int32): the 0-based pessimistic rank of the user's test target that the run's test metrics are computed
  from, under the primary protocol (`eval.protocol`). Full ranking stops counting at max(eval.ks), where every
  reported metric is already 0, and stores max(ks) for "max(ks) or worse".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seqrec.errors import SeqrecError

FILE = "test_ranks.npy"
DTYPE = np.dtype([("user", "<i4"), ("rank", "<i4")])


def write_test_ranks(run_dir: Path, users: np.ndarray, ranks: np.ndarray) -> Path:
    """Write `run_dir/test_ranks.npy` from (U,) user indices and their (U,) ranks, in any order; atomic."""
    from seqrec.train.checkpoint import atomic_write_bytes

    order = np.argsort(users, kind="stable")
    records = np.empty(len(users), DTYPE)
    records["user"], records["rank"] = users[order], ranks[order]
    path = Path(run_dir) / FILE
    atomic_write_bytes(path, lambda f: np.save(f, records, allow_pickle=False))
    return path


def read_test_ranks(run_dir: Path) -> np.ndarray:
    """The records of `run_dir/test_ranks.npy`, checked to be this format; SeqrecError naming the file if not."""
    path = Path(run_dir) / FILE
    try:
        records = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SeqrecError(f"{path}: not readable as per-user test ranks ({str(e).splitlines()[0][:160]})") from None
    if records.dtype != DTYPE or records.ndim != 1:
        raise SeqrecError(f"{path}: expected int32 records (user, rank), got {records.dtype} of shape {records.shape}")
    return records
