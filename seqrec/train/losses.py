"""Training objectives over the model's item scores (docs/MODELS.md, Eq. 20-23).

Every loss scores items through the model's head (seqrec.models.head.ItemHead) and averages over non-padding
target positions only. `num_negatives` and `shared_negatives` tell the sampler what to draw: per position (B, L, K)
or per sequence (B, N), never from the user's history.

No data-dependent shapes: padding positions are scored like the others and then weighted 0 in a masked mean
(`masked_mean`), instead of being dropped with `x[pos != 0]`. Selecting them would give a tensor whose size only
the GPU knows, so the host would wait for the GPU at every step, and torch.compile / CUDA graphs could not capture
the step. The gradients are the same as the selection's (0 at padding, 1/M at targets); the loss value is the same
sum in another order (a few ulps). The cost is the padding's scores: 3.5 % of the positions of ML-1M's batches at
maxlen 200 with the sampler's default length bucketing, but 46 % with sampler.bucket_by_length=false, where the
full cross-entropy then costs up to 2x on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seqrec.errors import ConfigError
from seqrec.models.head import ItemHead
from seqrec.utils.rules import POSITIVE, UNIT_INTERVAL, interval, one_of


class Loss:
    """Base: select target positions, compute the objective."""

    num_negatives: int = 0
    shared_negatives: bool = False  # True: one set of negatives per sequence, shared by its positions
    scores_every_item: bool = False  # True: the item table's gradient is dense (no use for model.sparse_embedding)

    def __call__(self, h: Tensor, head: ItemHead, pos: Tensor, neg: Tensor | None) -> Tensor:
        """Args:
            h: (B, L, D) hidden states.
            head: the model's item head, which scores hidden states against items.
            pos: (B, L) next-item targets, 0 at padding.
            neg: (B, L, K) per-position or (B, N) per-sequence negatives, or None.
        Returns: scalar mean loss over target positions.
        """
        raise NotImplementedError


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over the True positions of `mask` (same shape), with shapes independent of the data.

    Masked positions must hold finite values (0 * inf is NaN). No target at all gives 0, not NaN."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


def _target_and_negative_scores(h: Tensor, head: ItemHead, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """Scores at every position: h (B, L, D), pos (B, L), neg (B, L, K) -> (B, L) targets, (B, L, K) negatives.
    At padding, pos and neg are 0: the padding row of the table is scored (finite) and later weighted 0."""
    return head.score_one(h, pos), head.score(h, neg)


class BCE(Loss):
    """-log σ(s+) - Σ_k log(1 - σ(s_k)) per target position, averaged over positions (K = 1 is the paper's)."""

    RULES = {"num_negatives": POSITIVE}

    def __init__(self, *, num_negatives: int = 1):
        self.num_negatives = num_negatives

    def __call__(self, h, head, pos, neg):
        s_pos, s_neg = _target_and_negative_scores(h, head, pos, neg)  # (B, L), (B, L, K)
        return masked_mean(F.softplus(-s_pos) + F.softplus(s_neg).sum(-1), pos != 0)


class GBCE(Loss):
    """gBCE (gSASRec, arXiv 2308.07192): the positive term weighted by β = α(t(1 - 1/α) + 1/α), α = K/(I-1)."""

    RULES = {"num_negatives": POSITIVE, "t": UNIT_INTERVAL}

    def __init__(self, *, num_negatives: int = 256, t: float = 0.75):
        self.num_negatives, self.t = num_negatives, t

    def __call__(self, h, head, pos, neg):
        alpha = self.num_negatives / (head.num_items - 1)
        beta = alpha * (self.t * (1 - 1 / alpha) + 1 / alpha)
        s_pos, s_neg = _target_and_negative_scores(h, head, pos, neg)  # (B, L), (B, L, K)
        per_position = (beta * F.softplus(-s_pos) + F.softplus(s_neg).sum(-1)) / (self.num_negatives + 1)
        return masked_mean(per_position, pos != 0)


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Weighted mean of -log softmax(h W^T + b)[target] over rows, with the logits never leaving a row block.

    Each row's term is multiplied by its weight (1 at a target, 0 at padding) and the sum divided by the weights'
    sum, so padding rows are computed but count for nothing, in the loss and in every gradient.

    Memory is O(block x I): the forward keeps only h, W, the targets and one logsumexp per row; the backward
    recomputes each block's logits and turns them into softmax - onehot in place. Saving the (M, I) probabilities
    instead would need M x I x 4 bytes (25.6 GB at 6400 positions and 10^6 items) for one extra matmul saved.
    F.cross_entropy on materialised logits makes several full passes over the (M, I) matrix and keeps it for the
    backward; here each block is multiplied, normalised and exponentiated while it is still in cache.
    """

    @staticmethod
    def forward(
        ctx,
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        row_weight: Tensor,
        block: int,
        dtype: torch.dtype,
        smoothing: float,
    ) -> Tensor:
        # h: (M, D), weight: (I, D), bias: (I,) or None, target: (M,) in [0, I), row_weight: (M,) float32;
        # dtype: the matmuls' dtype (autocast's, else float32); the bias is added to the float32 logits;
        # smoothing: eps of the label smoothing, the target distribution is (1 - eps) onehot + eps / I
        h_mm, w_mm = h.to(dtype), weight.to(dtype)
        b32 = bias.float() if bias is not None else None
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)  # (M,)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        buffer = _logit_buffer(h, weight, block)
        for start in range(0, h.shape[0], block):
            rows = slice(start, start + block)
            logits = _block_logits(buffer, h_mm[rows], w_mm, b32)  # (m, I)
            lse[rows] = torch.logsumexp(logits, dim=1)
            # -sum_j q_j log p_j = lse - (1 - eps) z_target - eps mean_j z_j
            picked = logits.gather(1, target[rows, None]).squeeze(1)  # (m,)
            if smoothing:
                picked = (1 - smoothing) * picked + smoothing * logits.mean(1)
            total += ((lse[rows] - picked) * row_weight[rows]).sum()
        count = row_weight.sum().clamp_min(1)  # a tensor: the host never waits for it
        ctx.save_for_backward(h_mm, w_mm, b32, target, row_weight, lse, count)
        ctx.block, ctx.smoothing = block, smoothing
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        h_mm, w_mm, b32, target, row_weight, lse, count = ctx.saved_tensors
        scale = grad / count
        grad_h = torch.empty(h_mm.shape, dtype=torch.float32, device=h_mm.device)  # (M, D)
        grad_w = torch.zeros(w_mm.shape, dtype=torch.float32, device=h_mm.device)  # (I, D)
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_b = torch.zeros(w_mm.shape[0], dtype=torch.float32, device=h_mm.device) if b_dtype is not None else None
        buffer = _logit_buffer(h_mm, w_mm, ctx.block)
        for start in range(0, h_mm.shape[0], ctx.block):
            rows = slice(start, start + ctx.block)
            g = _block_logits(buffer, h_mm[rows], w_mm, b32)  # recomputed logits (m, I)
            g.sub_(lse[rows, None]).exp_()  # softmax
            if ctx.smoothing:  # d loss_sum / d logits = softmax - q, q = (1 - eps) onehot + eps / I
                g.sub_(ctx.smoothing / g.shape[1])
            g[torch.arange(g.shape[0], device=g.device), target[rows]] -= 1 - ctx.smoothing
            g.mul_(row_weight[rows, None])  # padding rows: no gradient
            if grad_b is not None:
                grad_b += g.sum(0)  # float32, before the cast to the matmul dtype
            g = g.to(w_mm.dtype)
            grad_h[rows] = g @ w_mm
            grad_w += (g.T @ h_mm[rows]).float()
        grad_b = (grad_b * scale).to(b_dtype) if grad_b is not None else None
        return (grad_h * scale).to(h_dtype), (grad_w * scale).to(w_dtype), grad_b, None, None, None, None, None


def _logit_buffer(h: Tensor, weight: Tensor, block: int) -> Tensor:
    """One (block, I) float32 buffer reused by every row block."""
    return torch.empty(min(block, h.shape[0]), weight.shape[0], dtype=torch.float32, device=h.device)


def _block_logits(buffer: Tensor, h_rows: Tensor, w_mm: Tensor, b32: Tensor | None) -> Tensor:
    """float32 logits h_rows @ w_mm.T (+ b32) of one row block, written into `buffer`: (m, D) -> (m, I)."""
    logits = buffer[: h_rows.shape[0]]
    if h_rows.dtype == torch.float32:
        torch.matmul(h_rows, w_mm.T, out=logits)
    else:  # autocast's bfloat16 / float16 product, widened
        logits.copy_(h_rows @ w_mm.T)
    if b32 is not None:
        logits.add_(b32)
    return logits


def softmax_cross_entropy(
    h: Tensor,
    weight: Tensor,
    target: Tensor,
    block: int = 256,
    bias: Tensor | None = None,
    row_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Mean over rows of -log softmax(h @ weight.T + bias)[target], weighted by row_weight (default: all 1);
    h (M, D), weight (I, D), bias (I,) or None, target (M,), row_weight (M,) -> scalar. With label_smoothing eps
    the target distribution is (1 - eps) onehot + eps / I, as in F.cross_entropy(..., label_smoothing=eps)."""
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else torch.float32
    if row_weight is None:
        row_weight = torch.ones(h.shape[0], device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        return _SoftmaxCrossEntropy.apply(
            h, weight, bias, target, row_weight.float(), block, dtype, float(label_smoothing)
        )


class CrossEntropy(Loss):
    """Full softmax over items 1..I (the padding logit is excluded)."""

    scores_every_item = True
    RULES = {"chunk_tokens": POSITIVE, "label_smoothing": interval(0, 1, "[)")}

    def __init__(self, *, chunk_tokens: int | None = None, label_smoothing: float = 0.0):
        # positions per block; a CPU block's (positions, I) logits stay in cache while they are normalised, a GPU
        # wants few, large launches. None: 256 on a CPU, 8192 on a GPU.
        self.chunk_tokens = chunk_tokens
        # eps moves that much of each target's probability mass onto all items evenly: the model is no longer
        # pushed towards certainty on the (context, next item) pairs it has seen, which it otherwise memorises
        self.label_smoothing = label_smoothing

    def __call__(self, h, head, pos, neg=None):
        block = self.chunk_tokens or (256 if h.device.type == "cpu" else 8192)
        weight, bias = head.linear()  # score_all(h) = h @ weight.T + bias, streamed block by block
        rows, target = h.flatten(0, -2), pos.flatten()  # (B·L, D), (B·L,): padding rows weigh 0
        return softmax_cross_entropy(
            rows, weight, (target - 1).clamp_min(0), block, bias, target != 0, self.label_smoothing
        )


class SampledSoftmax(Loss):
    """Softmax over the target and N negatives shared by all positions of a sequence (SASRec+N), with the logQ
    correction (docs/MODELS.md, Eq. 22-22b).

    negatives:
        uniform: N items drawn by the sampler uniformly outside the user's history. Their sampling probability is
            the same for every item, so the correction is a constant that cancels in the softmax and is skipped.
        in_batch: N of the batch's own targets, drawn uniformly with replacement among its non-padding
            positions, so item j is drawn with probability c_j / M (c_j: its count among the M targets);
            popular items are drawn more often and the correction subtracts log(N c_j / M) from their logits.
        mixed: N - N // 2 uniform negatives and N // 2 in-batch ones; each candidate is corrected by its expected
            count in the union, N_u / I + N_b c_j / M.
    A negative equal to the position's target (an accidental hit) is masked out of the softmax.
    """

    shared_negatives = True
    NEGATIVES = ("uniform", "in_batch", "mixed")
    RULES = {"num_negatives": POSITIVE, "negatives": one_of(*NEGATIVES)}

    def __init__(self, *, num_negatives: int = 256, negatives: str = "uniform", logq: bool = True):
        if negatives not in self.NEGATIVES:
            raise ConfigError(f"loss.negatives={negatives!r}: expected one of {', '.join(self.NEGATIVES)}")
        self.pool_size, self.negatives, self.logq = num_negatives, negatives, logq
        self.in_batch = {"uniform": 0, "in_batch": num_negatives, "mixed": num_negatives // 2}[negatives]
        self.num_negatives = num_negatives - self.in_batch  # what the sampler draws (uniform, per sequence)

    def __call__(self, h, head, pos, neg):
        mask = pos != 0
        cand = self._candidates(pos, mask, neg)  # (B, N)
        s_pos = head.score_one(h, pos)  # (B, L)
        s_neg = head.score(h, cand)  # (B, L, N): each sequence's N negatives are shared by its L positions
        logits = torch.cat([s_pos.unsqueeze(-1), s_neg], dim=-1).float()  # (B, L, 1 + N)
        if self.in_batch and self.logq:  # with uniform negatives only, log Q is a constant: skipped
            log_q_pos, log_q_neg = self.log_expected_counts(pos, mask, cand, head.num_items)  # (B, L), (B, N)
            logits[..., 0] -= log_q_pos
            logits[..., 1:] -= log_q_neg[:, None, :]
        hit = cand[:, None, :] == pos[..., None]  # (B, L, N): a negative that is the target does not compete
        logits[..., 1:] = logits[..., 1:].masked_fill(hit, -torch.inf)
        nll = torch.logsumexp(logits, dim=-1) - logits[..., 0]  # (B, L)
        return masked_mean(nll, mask)

    def _candidates(self, pos: Tensor, mask: Tensor, neg: Tensor | None) -> Tensor:
        """(B, N) item ids: the sampler's uniform negatives, then the in-batch draws (the same for every row)."""
        parts = [] if neg is None else [neg]
        if self.in_batch:
            parts.append(draw_targets(pos, mask, self.in_batch).expand(pos.shape[0], -1))
        return torch.cat(parts, dim=-1)

    def log_expected_counts(self, pos: Tensor, mask: Tensor, cand: Tensor, num_items: int) -> tuple[Tensor, Tensor]:
        """log Q: the log of an item's expected number of copies in a sequence's candidate pool,
        N_u / I + N_b c_j / M, for the targets pos (B, L) (0 at padding) and the candidates cand (B, N)."""
        # (I + 1,): c_j over the M targets, padding slots adding 0 (bincount would size its output from the data)
        counts = torch.zeros(num_items + 1, device=pos.device).index_add_(0, pos.flatten(), mask.flatten().float())
        per_draw = self.in_batch / mask.sum().clamp_min(1)

        def log_q(items: Tensor) -> Tensor:
            return (self.num_negatives / num_items + per_draw * counts[items]).log()

        return log_q(pos).masked_fill(~mask, 0.0), log_q(cand)  # padding targets have no count and no loss


def draw_targets(pos: Tensor, mask: Tensor, n: int) -> Tensor:
    """(n,) targets drawn uniformly with replacement among the M non-padding positions of pos (B, L), M >= 1.

    Without selecting them (pos[mask] has a data-dependent size): draw a rank d in 0..M-1 and find the slot holding
    the (d+1)-th target through the running count of targets (integer cumsum, then a binary search)."""
    seen = mask.flatten().cumsum(0)  # (B·L,) int64: targets up to and including each slot
    total = seen[-1]  # M, on the device
    rank = (torch.rand(n, device=pos.device) * total).long().minimum(total - 1)  # (n,) in 0..M-1
    slot = torch.searchsorted(seen, rank, right=True).clamp_max(seen.numel() - 1)  # first slot with seen > rank
    return pos.flatten()[slot]
