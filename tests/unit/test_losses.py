"""Losses against their textbook formulas, and against the formulas they had before scoring moved into the head."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seqrec.models.head import ItemHead
from seqrec.train.losses import BCE, GBCE, CrossEntropy, SampledSoftmax, draw_targets, masked_mean


def head_of(w, bias=None):
    """An item head scoring with the (I+1, D) table w (trainable when w requires grad), plus an optional bias."""
    head = ItemHead(
        nn.Embedding.from_pretrained(w.detach(), freeze=not w.requires_grad), tied=False, bias=bias is not None
    )
    if bias is not None:
        with torch.no_grad():
            head.bias.copy_(bias)
    return head


def hit_free_negatives(pos, k, num_items=20):
    """(B, k) negatives per sequence that equal none of its targets, as the sampler's (which avoid the history)."""
    return torch.stack([torch.tensor([i for i in range(1, num_items + 1) if i not in row.tolist()][:k]) for row in pos])


def setup(k=1, shared=False):
    torch.manual_seed(0)
    B, L, D, I = 3, 5, 8, 20
    h = torch.randn(B, L, D)
    w = torch.randn(I + 1, D)
    pos = torch.randint(1, I + 1, (B, L))
    pos[0, :2] = 0
    neg = torch.randint(1, I + 1, (B, k) if shared else (B, L, k))
    return h, w, pos, neg


def test_bce_is_the_papers_formula():
    h, w, pos, neg = setup()
    loss = BCE(num_negatives=1)(h, head_of(w), pos, neg)
    terms = []
    for b in range(3):
        for t in range(5):
            if pos[b, t]:
                terms.append(-F.logsigmoid(h[b, t] @ w[pos[b, t]]) - F.logsigmoid(-(h[b, t] @ w[neg[b, t, 0]])))
    assert torch.allclose(loss, torch.stack(terms).mean())


def test_cross_entropy_matches_torch_over_real_items_and_chunks():
    h, w, pos, _ = setup()
    mask = pos > 0
    expected = F.cross_entropy(h[mask] @ w[1:].T, pos[mask] - 1)
    assert torch.allclose(CrossEntropy()(h, head_of(w), pos, None), expected, atol=1e-6)
    assert torch.allclose(CrossEntropy(chunk_tokens=4)(h, head_of(w), pos, None), expected, atol=1e-6)


@pytest.mark.parametrize("block", [3, 256])
def test_cross_entropy_gradients_match_torch(block):
    torch.manual_seed(1)
    h, w = torch.randn(37, 8, requires_grad=True), torch.randn(21, 8, requires_grad=True)  # 37 rows, items 0..20
    pos = torch.randint(0, 21, (37,))
    pos[::5] = 0  # padding rows: no loss, no gradient
    F.cross_entropy(h[pos > 0] @ w[1:].T, pos[pos > 0] - 1).mul(2.5).backward()
    expected = h.grad.clone(), w.grad.clone()
    h.grad = None
    head = head_of(w)
    CrossEntropy(chunk_tokens=block)(h[None], head, pos[None], None).mul(2.5).backward()
    assert torch.allclose(h.grad, expected[0], atol=1e-6)
    assert torch.allclose(head.weight.grad, expected[1], atol=1e-6)
    assert head.weight.grad[0].abs().sum() == 0  # the padding item's row gets nothing


def test_cross_entropy_saves_no_probabilities_so_a_second_backward_repeats_the_first():
    h, w, pos, _ = setup()
    h.requires_grad_(True)
    loss = CrossEntropy(chunk_tokens=4)(h, head_of(w), pos, None)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()  # the logits are recomputed from h, W and the saved logsumexp, nothing was overwritten
    assert torch.allclose(h.grad, 2 * first, atol=1e-6)


def test_cross_entropy_keeps_one_block_of_logits_not_the_whole_matrix():
    """Saved for the backward: h, W, targets and one float per row; nothing of size positions x items."""
    torch.manual_seed(3)
    m, num_items, d = 64, 500, 8
    h, w = torch.randn(1, m, d, requires_grad=True), torch.randn(num_items + 1, d)
    pos = torch.randint(1, num_items + 1, (1, m))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        CrossEntropy(chunk_tokens=16)(h, head_of(w), pos, None)
    assert max(saved) < m * num_items / 4


def test_cross_entropy_under_bfloat16_autocast_stays_close_and_in_float32():
    torch.manual_seed(2)
    h, w, pos = torch.randn(2, 30, 16, requires_grad=True), torch.randn(50, 16), torch.randint(1, 50, (2, 30))
    exact = CrossEntropy()(h, head_of(w), pos, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = CrossEntropy()(h, head_of(w), pos, None)
    mixed.backward()
    assert mixed.dtype == torch.float32 and h.grad.dtype == torch.float32
    assert abs(mixed.item() - exact.item()) < 0.05 * exact.item()


def test_sampled_softmax_with_all_other_items_equals_full_softmax():
    h, w, pos, _ = setup()
    pos[:] = 1  # the target is item 1 everywhere, negatives are items 2..20
    neg = torch.arange(2, 21).expand(3, 19)
    expected = F.cross_entropy((h @ w[1:].T).reshape(-1, 20), torch.zeros(15, dtype=torch.long))
    assert torch.allclose(SampledSoftmax(num_negatives=19)(h, head_of(w), pos, neg), expected, atol=1e-5)


def test_gbce_with_t_zero_is_scaled_bce():
    h, w, pos, neg = setup(k=4)
    assert torch.allclose(
        GBCE(num_negatives=4, t=0.0)(h, head_of(w), pos, neg), BCE(num_negatives=4)(h, head_of(w), pos, neg) / 5
    )


# --- the same numbers as the formulas the losses had before they scored through the head -------------------------


def previous_bce(h, w, pos, neg, beta=1.0, scale=1.0):
    mask = pos != 0
    h_sel = h[mask]
    s_pos = (h_sel * w[pos[mask]]).sum(-1)
    s_neg = torch.einsum("md,mkd->mk", h_sel, w[neg[mask]])
    return ((beta * F.softplus(-s_pos) + F.softplus(s_neg).sum(-1)) / scale).mean()


def previous_sampled_softmax(h, w, pos, neg):
    s_pos = (h * w[pos]).sum(-1)
    s_neg = torch.einsum("bld,bnd->bln", h, w[neg])
    logits = torch.cat([s_pos.unsqueeze(-1), s_neg], dim=-1).float()
    return (torch.logsumexp(logits, dim=-1) - logits[..., 0])[pos != 0].mean()


def value_and_gradients(loss_fn, h, w):
    """loss_fn(h, head) and its gradients with respect to h and the head's table (fresh leaves for each call)."""
    h, head = h.detach().clone().requires_grad_(), head_of(w.detach().clone().requires_grad_())
    value = loss_fn(h, head)
    return value, torch.autograd.grad(value, (h, head.weight))


def assert_same_gradients_and_value_to_rounding(got, want):
    """The masked mean adds the per-position terms in another order than x[mask].mean() (a few ulps apart); the
    gradients (1/M at targets, 0 at padding) are bitwise those of the selection."""
    (value, grads), (expected, expected_grads) = got, want
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))


@pytest.mark.parametrize("k", [1, 4])
def test_bce_and_gbce_give_bitwise_the_gradients_of_the_selecting_formula(k):
    h, w, pos, neg = setup(k=k)
    assert_same_gradients_and_value_to_rounding(
        value_and_gradients(lambda h, head: BCE(num_negatives=k)(h, head, pos, neg), h, w),
        value_and_gradients(lambda h, head: previous_bce(h, head.weight, pos, neg), h, w),
    )
    alpha = k / (20 - 1)
    beta = alpha * (0.75 * (1 - 1 / alpha) + 1 / alpha)
    assert_same_gradients_and_value_to_rounding(
        value_and_gradients(lambda h, head: GBCE(num_negatives=k, t=0.75)(h, head, pos, neg), h, w),
        value_and_gradients(lambda h, head: previous_bce(h, head.weight, pos, neg, beta=beta, scale=k + 1), h, w),
    )


def test_sampled_softmax_gives_bitwise_the_gradients_of_the_selecting_formula():
    """With the sampler's uniform negatives, which avoid the user's history and so never equal a target."""
    h, w, pos, _ = setup(k=7, shared=True)
    neg = hit_free_negatives(pos, 7)
    assert_same_gradients_and_value_to_rounding(
        value_and_gradients(lambda h, head: SampledSoftmax(num_negatives=7)(h, head, pos, neg), h, w),
        value_and_gradients(lambda h, head: previous_sampled_softmax(h, head.weight, pos, neg), h, w),
    )


# --- a head with an output bias: every loss scores with it ---------------------------------------------------------


def biased_setup(k=3, shared=False):
    h, w, pos, neg = setup(k=k, shared=shared)
    bias = torch.linspace(-2.0, 3.0, w.shape[0])
    return h, w, bias, pos, neg


def test_bce_and_gbce_add_the_bias_to_every_score():
    h, w, bias, pos, neg = biased_setup()
    loss = BCE(num_negatives=3)(h, head_of(w, bias), pos, neg)
    m = pos != 0
    s_pos = (h[m] * w[pos[m]]).sum(-1) + bias[pos[m]]
    s_neg = (h[m][:, None] * w[neg[m]]).sum(-1) + bias[neg[m]]
    assert torch.allclose(loss, (F.softplus(-s_pos) + F.softplus(s_neg).sum(-1)).mean(), atol=1e-6)
    gbce = GBCE(num_negatives=3, t=0.0)(h, head_of(w, bias), pos, neg)
    assert torch.allclose(gbce, loss / 4, atol=1e-6)  # t = 0: beta = 1


def test_sampled_softmax_adds_the_bias_to_every_score():
    h, w, bias, pos, _ = biased_setup(k=5, shared=True)
    neg = hit_free_negatives(pos, 5)
    loss = SampledSoftmax(num_negatives=5)(h, head_of(w, bias), pos, neg)
    items = torch.cat([pos[..., None], neg[:, None, :].expand(-1, pos.shape[1], -1)], -1)  # (B, L, 1 + N)
    logits = (h[..., None, :] * w[items]).sum(-1) + bias[items]
    expected = F.cross_entropy(logits[pos != 0], torch.zeros(int((pos != 0).sum()), dtype=torch.long))
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize("block", [3, 256])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_chunked_cross_entropy_with_a_bias_and_label_smoothing_matches_torch_in_value_and_gradients(block, eps):
    torch.manual_seed(3)
    h = torch.randn(1, 37, 8, requires_grad=True)
    w, bias = torch.randn(21, 8), torch.randn(21)
    pos = torch.randint(0, 21, (1, 37))
    pos[0, ::5] = 0
    reference = head_of(w.requires_grad_(), bias)
    m = pos != 0
    expected_value = F.cross_entropy(reference.score_all(h[m]), pos[m] - 1, label_smoothing=eps)
    expected_value.mul(2.5).backward()
    expected = h.grad.clone(), reference.weight.grad, reference.bias.grad
    h.grad = None
    head = head_of(w, bias)
    value = CrossEntropy(chunk_tokens=block, label_smoothing=eps)(h, head, pos, None)
    assert torch.allclose(value, expected_value, atol=1e-6)
    if eps:  # the smoothed target puts mass on items the model scores low: a larger loss
        assert value > CrossEntropy(chunk_tokens=block)(h, head, pos, None)
    value.mul(2.5).backward()
    for got, want in zip((h.grad, head.weight.grad, head.bias.grad), expected):
        assert torch.allclose(got, want, atol=1e-6)
    assert h.grad[0, ::5].abs().sum() == 0  # padding positions: no gradient
    assert head.bias.grad[0] == 0 and head.bias.grad.abs().sum() > 0  # the padding item is never a class


# --- sampled softmax: logQ correction, in-batch and mixed negatives, accidental hits -------------------------------


def manual_sampled_softmax(h, w, pos, cand, log_q_pos=None, log_q_neg=None):
    """Eq. 22b by loops: per target position, softmax over the target and the non-hit candidates, logits - log Q."""
    terms = []
    for b in range(pos.shape[0]):
        for t in range(pos.shape[1]):
            if pos[b, t] == 0:
                continue
            target = h[b, t] @ w[pos[b, t]] - (0 if log_q_pos is None else log_q_pos[b, t])
            others = [
                h[b, t] @ w[j] - (0 if log_q_neg is None else log_q_neg[b, k])
                for k, j in enumerate(cand[b].tolist())
                if j != pos[b, t]
            ]
            terms.append(torch.logsumexp(torch.stack([target, *others]), 0) - target)
    return torch.stack(terms).mean()


def test_logq_of_uniform_negatives_is_one_constant_that_leaves_the_loss_unchanged():
    h, w, pos, neg = setup(k=7, shared=True)
    loss = SampledSoftmax(num_negatives=7)
    log_q_pos, log_q_neg = loss.log_expected_counts(pos, pos != 0, neg, 20)
    q = torch.cat([log_q_pos[pos != 0], log_q_neg.flatten()])
    assert torch.allclose(q, torch.full_like(q, torch.log(torch.tensor(7 / 20)).item()))
    corrected = manual_sampled_softmax(h, w, pos, neg, log_q_pos, log_q_neg)
    assert torch.allclose(loss(h, head_of(w), pos, neg), corrected, atol=1e-5)


def test_in_batch_negatives_of_a_skewed_batch_are_corrected_by_their_batch_frequency():
    h, w, pos, _ = setup()
    pos[1:] = torch.tensor([[3, 3, 3, 3, 5], [3, 3, 7, 3, 3]])  # item 3 dominates the batch's targets
    loss = SampledSoftmax(num_negatives=6, negatives="in_batch")
    assert loss.num_negatives == 0  # the sampler draws nothing, the candidates come from the batch
    torch.manual_seed(4)
    value = loss(h, head_of(w), pos, None)
    torch.manual_seed(4)
    cand = loss._candidates(pos, pos != 0, None)  # the same draws
    m = int((pos != 0).sum())
    counts = torch.bincount(pos[pos != 0], minlength=21).float()
    expected = manual_sampled_softmax(
        h,
        w,
        pos,
        cand,
        (6 * counts[pos] / m).log(),
        (6 * counts[cand] / m).log(),  # log(N c_j / M)
    )
    assert torch.allclose(value, expected, atol=1e-5)
    torch.manual_seed(4)
    uncorrected = SampledSoftmax(num_negatives=6, negatives="in_batch", logq=False)(h, head_of(w), pos, None)
    assert not torch.allclose(uncorrected, value, atol=1e-3)  # the skew changes the objective


def test_in_batch_candidates_equal_to_the_target_are_masked():
    h, w, pos, _ = setup()
    pos[pos != 0] = 4  # every target is item 4: every in-batch candidate is an accidental hit
    value = SampledSoftmax(num_negatives=5, negatives="in_batch")(h, head_of(w), pos, None)
    assert value.item() == 0.0  # the target is alone in its softmax


def test_mixed_negatives_split_the_pool_and_mask_a_uniform_hit():
    h, w, pos, _ = setup()
    loss = SampledSoftmax(num_negatives=8, negatives="mixed")
    assert (loss.num_negatives, loss.in_batch) == (4, 4)
    neg = torch.randint(1, 21, (3, 4))
    neg[2, 0] = pos[2, 3]  # a uniform negative that is one position's target
    torch.manual_seed(5)
    value = loss(h, head_of(w), pos, neg)
    torch.manual_seed(5)
    cand = loss._candidates(pos, pos != 0, neg)
    assert cand.shape == (3, 8) and torch.equal(cand[:, :4], neg)
    log_q_pos, log_q_neg = loss.log_expected_counts(pos, pos != 0, cand, 20)
    counts = torch.bincount(pos[pos != 0], minlength=21).float()
    assert torch.allclose(log_q_neg, (4 / 20 + 4 * counts[cand] / int((pos != 0).sum())).log())
    assert torch.allclose(value, manual_sampled_softmax(h, w, pos, cand, log_q_pos, log_q_neg), atol=1e-5)


# --- no data-dependent shapes: the host never waits for the GPU inside a loss ----------------------------------------


def test_every_loss_traces_into_one_graph_without_data_dependent_shapes():
    """torch.compile(fullgraph=True) refuses x[mask], .item(), bincount and the like (their result's size or value
    is known only after the GPU has run). The "eager" backend traces without generating code: a check of the
    structure that costs seconds, not inductor's minutes. The traced loss equals the eager one."""
    cases = [
        (BCE(num_negatives=2), 2, False),
        (GBCE(num_negatives=2), 2, False),
        (CrossEntropy(chunk_tokens=4), 1, False),
        (SampledSoftmax(num_negatives=3), 3, True),
        (SampledSoftmax(num_negatives=6, negatives="mixed"), 3, True),
    ]
    for loss, k, shared in cases:
        h, w, pos, neg = setup(k=k, shared=shared)
        head = head_of(w)
        torch._dynamo.reset()
        traced = torch.compile(loss, fullgraph=True, backend="eager")
        torch.manual_seed(0)  # the in-batch draws
        value = traced(h, head, pos, neg)
        torch.manual_seed(0)
        assert torch.equal(value, loss(h, head, pos, neg)), type(loss).__name__
    torch._dynamo.reset()


def test_in_batch_draws_are_uniform_over_the_targets_and_never_padding():
    pos = torch.tensor([[0, 0, 3, 4], [0, 5, 6, 7]])
    torch.manual_seed(0)
    drawn = draw_targets(pos, pos != 0, 50_000)
    counts = torch.bincount(drawn, minlength=8)
    assert counts[[0, 1, 2]].sum() == 0  # only targets: 3..7
    assert ((counts[3:].float() / 50_000 - 0.2).abs() < 0.01).all()  # five targets, a fifth each


def test_masked_mean_of_no_target_is_zero_not_nan():
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


def test_unknown_negatives_mode_is_a_config_error():
    from seqrec.errors import ConfigError

    with pytest.raises(ConfigError, match="loss.negatives"):
        SampledSoftmax(negatives="popular")


@pytest.mark.parametrize(
    "make_loss, shared",
    [
        (lambda: BCE(num_negatives=3), False),
        (lambda: GBCE(num_negatives=3), False),
        (lambda: SampledSoftmax(num_negatives=3), True),
        (lambda: SampledSoftmax(num_negatives=4, negatives="mixed"), True),
    ],
)
def test_a_sparse_table_gives_the_same_loss_and_gradient_on_the_touched_rows_only(make_loss, shared):
    """model.sparse_embedding: the head gathers rows with a sparse gradient; the value is bitwise the dense one and the
    gradient the dense one's, nonzero on the targets' and candidates' rows alone."""
    h, w, pos, neg = setup(k=3 if not shared else 2, shared=shared)
    grads, values = [], []
    for sparse in (False, True):
        table = nn.Embedding.from_pretrained(w.clone(), freeze=False, sparse=sparse)
        torch.manual_seed(3)  # the same in-batch draws
        values.append(make_loss()(h, ItemHead(table, tied=False), pos, neg))
        values[-1].backward()
        grads.append(table.weight.grad)
    assert torch.equal(values[0], values[1])
    dense, sparse = grads
    assert sparse.is_sparse and not dense.is_sparse
    torch.testing.assert_close(sparse.to_dense(), dense, rtol=1e-6, atol=1e-7)
    rows = sparse.coalesce().indices()[0]
    assert 0 not in rows.tolist() and set(rows.tolist()) <= set(pos.flatten().tolist()) | set(neg.flatten().tolist())
