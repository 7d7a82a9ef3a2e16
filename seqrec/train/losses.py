"""Training objectives over the shared item embedding (models.md section 6).

Every loss sees hidden states at non-padding target positions only. `num_negatives` and `shared_negatives`
tell the sampler what to draw: per position (B, L, K) or per sequence (B, N), never from the user's history.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class Loss:
    """Base: select target positions, compute the objective."""

    num_negatives: int = 0
    shared_negatives: bool = False  # True: one set of negatives per sequence, shared by its positions

    def __call__(self, h: Tensor, item_weight: Tensor, pos: Tensor, neg: Tensor | None) -> Tensor:
        """Args:
            h: (B, L, D) hidden states.
            item_weight: (I+1, D) shared item embedding.
            pos: (B, L) next-item targets, 0 at padding.
            neg: (B, L, K) per-position or (B, N) per-sequence negatives, or None.
        Returns: scalar mean loss over target positions.
        """
        raise NotImplementedError


def _pos_logits(h_sel: Tensor, item_weight: Tensor, pos_sel: Tensor) -> Tensor:
    return (h_sel * item_weight[pos_sel]).sum(-1)  # (M,)


class BCE(Loss):
    """-log σ(s+) - Σ_k log(1 - σ(s_k)) per target position, averaged over positions (K = 1 is the paper's)."""

    def __init__(self, *, num_negatives: int = 1):
        self.num_negatives = num_negatives

    def __call__(self, h, item_weight, pos, neg):
        mask = pos != 0
        h_sel = h[mask]  # (M, D)
        s_pos = _pos_logits(h_sel, item_weight, pos[mask])  # (M,)
        s_neg = torch.einsum("md,mkd->mk", h_sel, item_weight[neg[mask]])  # (M, K)
        return (F.softplus(-s_pos) + F.softplus(s_neg).sum(-1)).mean()


class GBCE(Loss):
    """gBCE (gSASRec, arXiv 2308.07192): the positive term weighted by β = α(t(1 - 1/α) + 1/α), α = K/(I-1)."""

    def __init__(self, *, num_negatives: int = 256, t: float = 0.75):
        self.num_negatives, self.t = num_negatives, t

    def __call__(self, h, item_weight, pos, neg):
        num_items = item_weight.shape[0] - 1
        alpha = self.num_negatives / (num_items - 1)
        beta = alpha * (self.t * (1 - 1 / alpha) + 1 / alpha)
        mask = pos != 0
        h_sel = h[mask]
        s_pos = _pos_logits(h_sel, item_weight, pos[mask])
        s_neg = torch.einsum("md,mkd->mk", h_sel, item_weight[neg[mask]])
        return ((beta * F.softplus(-s_pos) + F.softplus(s_neg).sum(-1)) / (self.num_negatives + 1)).mean()


class CrossEntropy(Loss):
    """Full softmax over items 1..I (the padding logit is excluded)."""

    def __init__(self, *, chunk_tokens: int = 8192):
        self.chunk_tokens = chunk_tokens  # bounds the (M, I) logit tensor when there are many positions

    def __call__(self, h, item_weight, pos, neg=None):
        mask = pos != 0
        h_sel, target = h[mask], pos[mask] - 1  # (M, D), (M,)
        total = h_sel.new_zeros(())
        for start in range(0, h_sel.shape[0], self.chunk_tokens):
            logits = h_sel[start : start + self.chunk_tokens] @ item_weight[1:].T  # (m, I)
            total = total + F.cross_entropy(logits.float(), target[start : start + self.chunk_tokens], reduction="sum")
        return total / h_sel.shape[0]


class SampledSoftmax(Loss):
    """Softmax over the target and N uniform negatives shared by all positions of a sequence (SASRec+N).

    Uniform sampling makes the logQ correction a constant, so it is dropped.
    """

    shared_negatives = True

    def __init__(self, *, num_negatives: int = 256):
        self.num_negatives = num_negatives

    def __call__(self, h, item_weight, pos, neg):
        s_pos = (h * item_weight[pos]).sum(-1)  # (B, L)
        s_neg = torch.einsum("bld,bnd->bln", h, item_weight[neg])  # (B, L, N)
        logits = torch.cat([s_pos.unsqueeze(-1), s_neg], dim=-1).float()  # (B, L, 1 + N)
        nll = torch.logsumexp(logits, dim=-1) - logits[..., 0]  # (B, L)
        mask = pos != 0
        return nll[mask].mean()
