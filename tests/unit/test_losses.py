"""Losses against their textbook formulas."""

import pytest
import torch
import torch.nn.functional as F

from seqrec.train.losses import BCE, GBCE, CrossEntropy, SampledSoftmax


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
    loss = BCE(num_negatives=1)(h, w, pos, neg)
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
    assert torch.allclose(CrossEntropy()(h, w, pos, None), expected, atol=1e-6)
    assert torch.allclose(CrossEntropy(chunk_tokens=4)(h, w, pos, None), expected, atol=1e-6)


@pytest.mark.parametrize("block", [3, 256])
def test_cross_entropy_gradients_match_torch(block):
    torch.manual_seed(1)
    h, w = torch.randn(37, 8, requires_grad=True), torch.randn(21, 8, requires_grad=True)  # 37 rows, items 0..20
    pos = torch.randint(0, 21, (37,))
    pos[::5] = 0  # padding rows: no loss, no gradient
    F.cross_entropy(h[pos > 0] @ w[1:].T, pos[pos > 0] - 1).mul(2.5).backward()
    expected = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    CrossEntropy(chunk_tokens=block)(h[None], w, pos[None], None).mul(2.5).backward()
    assert torch.allclose(h.grad, expected[0], atol=1e-6)
    assert torch.allclose(w.grad, expected[1], atol=1e-6)
    assert w.grad[0].abs().sum() == 0  # the padding item's row gets nothing


def test_cross_entropy_refuses_a_second_backward_through_its_reused_buffer():
    h, w, pos, _ = setup()
    h.requires_grad_(True)
    loss = CrossEntropy()(h, w, pos, None)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_cross_entropy_under_bfloat16_autocast_stays_close_and_in_float32():
    torch.manual_seed(2)
    h, w, pos = torch.randn(2, 30, 16, requires_grad=True), torch.randn(50, 16), torch.randint(1, 50, (2, 30))
    exact = CrossEntropy()(h, w, pos, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = CrossEntropy()(h, w, pos, None)
    mixed.backward()
    assert mixed.dtype == torch.float32 and h.grad.dtype == torch.float32
    assert abs(mixed.item() - exact.item()) < 0.05 * exact.item()


def test_sampled_softmax_with_all_other_items_equals_full_softmax():
    h, w, pos, _ = setup()
    pos[:] = 1  # the target is item 1 everywhere, negatives are items 2..20
    neg = torch.arange(2, 21).expand(3, 19)
    expected = F.cross_entropy((h @ w[1:].T).reshape(-1, 20), torch.zeros(15, dtype=torch.long))
    assert torch.allclose(SampledSoftmax(num_negatives=19)(h, w, pos, neg), expected, atol=1e-5)


def test_gbce_with_t_zero_is_scaled_bce():
    h, w, pos, neg = setup(k=4)
    assert torch.allclose(GBCE(num_negatives=4, t=0.0)(h, w, pos, neg), BCE(num_negatives=4)(h, w, pos, neg) / 5)
