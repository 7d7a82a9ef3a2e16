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


def metric_values(ranks: Tensor, ks) -> dict[str, Tensor]:
    """Every metric@k of each user: (N,) float64 each, keyed "hr@10", "ndcg@10", "mrr@10"."""
    ranks = ranks.double()
    out = {}
    for k in ks:
        hit = (ranks < k).double()
        out[f"hr@{k}"] = hit
        out[f"ndcg@{k}"] = hit / torch.log2(ranks + 2)
        out[f"mrr@{k}"] = hit / (ranks + 1)
    return out


def metric_sums(ranks: Tensor, ks) -> dict[str, Tensor]:
    """Sums over users of every metric@k (divide by the user count for means); float64 scalars."""
    return {name: values.sum() for name, values in metric_values(ranks, ks).items()}
