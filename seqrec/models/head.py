"""The item head: the one place where a hidden state becomes item scores.

    score(h, i) = h · W[i] + b[i]

W is the (I+1, D) output item table (by default the model's input item embedding, as in SASRec), b an optional
(I+1,) output bias; row 0 is padding and never scored as a candidate. Losses, the evaluator and recommendations
all score through a model's `head`, so a model with a bias or a separate output table changes this module only.

A table built with `nn.Embedding(sparse=True)` (`model.sparse_embedding=true`) is gathered with a sparse gradient
here too: `score_one` and `score` then touch only their candidates' rows, while `score_all` / `linear` use the
whole table (dense gradient), which is why full-softmax losses refuse sparse tables (seqrec/utils/config.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ItemHead(nn.Module):
    """Scores items for hidden states with a linear map over the item table.

    Args:
        table: (I+1, D) output item table.
        tied: True: `table` is the model's input embedding, registered (saved, moved, regularised) by the model;
            the head keeps only a reference, so checkpoints and parameter lists hold it once. False: the head owns
            `table` (a separate output table).
        bias: add a learned per-item output bias b (zero-initialised).
    The head gathers rows with a sparse gradient when `table.sparse` is set (the module docstring).
    """

    def __init__(self, table: nn.Embedding, *, tied: bool = True, bias: bool = False):
        super().__init__()
        self._tied_table = (table,) if tied else ()  # a tuple is not registered as a submodule
        if not tied:
            self.table = table
        self.sparse = table.sparse
        self.bias = nn.Parameter(torch.zeros(table.num_embeddings)) if bias else None

    @property
    def weight(self) -> Tensor:
        """(I+1, D) output item table; row 0 is padding."""
        return (self._tied_table[0] if self._tied_table else self.table).weight

    @property
    def num_items(self) -> int:
        """I: the scoreable items are 1..I."""
        return self.weight.shape[0] - 1

    def score_one(self, h: Tensor, items: Tensor) -> Tensor:
        """Score of one item per hidden state: h (..., D), items (...) -> (...), e.g. the targets."""
        scores = (h * self._rows(items, h.dtype)).sum(-1)  # elementwise: cheaper than many 1 x 1 matmuls
        return scores if self.bias is None else scores + self.bias[items]

    def score(self, h: Tensor, items: Tensor) -> Tensor:
        """Scores of candidate sets.

        Args:
            h: (*P, *R, D) hidden states.
            items: (*P, K) item ids; its leading dims P index the leading dims of h, and every row of h under
                one index (the R dims) is scored against the same K candidates, e.g. h (B, L, D) with items
                (B, L, K) per position, or with items (B, N) shared by the L positions of a sequence.
        Returns:
            (*P, *R, K) scores.
        """
        batch, k = items.shape[:-1], items.shape[-1]
        if h.shape[: len(batch)] != batch:
            raise ValueError(f"items {tuple(items.shape)} do not index the leading dims of h {tuple(h.shape)}")
        shared = h.shape[len(batch) : -1]  # R
        m, d = math.prod(batch), h.shape[-1]
        rows = self._rows(items, h.dtype).reshape(m, k, d)  # (M, K, D), M = prod(P)
        scores = torch.einsum("mrd,mkd->mrk", h.reshape(m, -1, d), rows).reshape(*h.shape[:-1], k)  # (*P, *R, K)
        if self.bias is not None:
            scores = scores + self.bias[items].reshape(*batch, *(1,) * len(shared), k)
        return scores

    def _rows(self, items: Tensor, dtype: torch.dtype) -> Tensor:
        """W[items] in `dtype`: (...) -> (..., D)."""
        if self.sparse:
            # gather, then cast the rows: indexing W (or casting all of it) would give W a dense (I+1, D) gradient.
            # Row 0 is padding (a masked target): it gets no gradient, as in the input embedding.
            return F.embedding(items, self.weight, padding_idx=0, sparse=True).to(dtype)
        return self.weight.to(dtype)[items]

    def score_all(self, h: Tensor) -> Tensor:
        """(..., D) hidden states -> (..., I) scores of items 1..I (column j is item j + 1)."""
        weight, bias = self.linear()
        scores = h @ weight.to(h.dtype).T
        return scores if bias is None else scores + bias

    def linear(self) -> tuple[Tensor, Tensor | None]:
        """(W (I, D), b (I,) or None) with score_all(h) = h @ W.T + b, for objectives that stream the catalogue
        in blocks instead of materialising score_all (the chunked full cross-entropy)."""
        return self.weight[1:], None if self.bias is None else self.bias[1:]
