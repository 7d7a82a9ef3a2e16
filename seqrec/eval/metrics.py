"""Ranking metrics for one relevant item per user, as pure tensor functions.

`rank` is 0-based: the number of competing items scored at least as high as the target (ties count
against the target, the pessimistic convention). HR@k = 1[rank < k], NDCG@k = 1[rank < k] / log2(rank + 2),
MRR@k = 1[rank < k] / (rank + 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

METRICS = ("ndcg", "hr", "mrr")


def rank_of_target(scores: Tensor, target_scores: Tensor) -> Tensor:
    """(N, C) competitor scores, (N,) target scores -> (N,) int64 pessimistic 0-based ranks.

    The competitors must not include the target itself.
    """
    # an int32 count is ~25 % faster on a CPU than bool -> int64 (C < 2^31 always)
    return (scores >= target_scores[:, None]).sum(-1, dtype=torch.int32).long()


def metric_sums(ranks: Tensor, ks) -> dict[str, Tensor]:
    """Sums over users of every metric@k (divide by the user count for means); float64 scalars."""
    ranks = ranks.double()
    out = {}
    for k in ks:
        hit = (ranks < k).double()
        out[f"hr@{k}"] = hit.sum()
        out[f"ndcg@{k}"] = (hit / torch.log2(ranks + 2)).sum()
        out[f"mrr@{k}"] = (hit / (ranks + 1)).sum()
    return out
