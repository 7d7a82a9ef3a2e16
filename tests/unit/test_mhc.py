"""Sinkhorn-Knopp for mHC's H_res (docs/MODELS.md, section 4.3): doubly stochastic, non-expansive, closed under
products, equal to the log-space form (values and gradients), n = 1 exact, no NaN at any spread; and the reference
mHC connection and model equal, to float32 rounding, the numbers the earlier hand-written eager path produced."""

from pathlib import Path

import pytest
import torch

from seqrec.models.sasrec import SASRec
from seqrec.nn.residual import MHC, MHCConnection, default_res_diag, sinkhorn

FROZEN = Path(__file__).with_name("data") / "mhc_frozen.pt"


def sinkhorn_log(logits, iters):
    """Log-space Sinkhorn: (..., n, n) logits -> (..., n, n), columns then rows, exp at the end."""
    log_m = logits
    for _ in range(iters):
        log_m = log_m - log_m.logsumexp(dim=-2, keepdim=True)  # columns
        log_m = log_m - log_m.logsumexp(dim=-1, keepdim=True)  # rows
    return log_m.exp()


def init_logits(count, n=4, std=0.5, seed=0):
    """The test distribution: init b_res (diagonal ln 27) + N(0, std^2), (count, n, n)."""
    g = torch.Generator().manual_seed(seed)
    return torch.eye(n) * default_res_diag(n) + std * torch.randn(count, n, n, generator=g)


def random_logits(count, n=4, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return std * torch.randn(count, n, n, generator=g)


def test_init_logits_give_point_nine_on_the_diagonal():
    H = sinkhorn(init_logits(1, std=0.0), 20)[0]
    expected = torch.full((4, 4), 0.1 / 3) + torch.eye(4) * (0.9 - 0.1 / 3)
    torch.testing.assert_close(H, expected, rtol=0, atol=1e-6)


def test_rows_and_columns_sum_to_one_after_20_iterations():
    H = sinkhorn(init_logits(5_000), 20)  # float32
    assert (H >= 0).all()
    assert (H.sum(-1) - 1).abs().max() < 1e-6  # rows: normalised last
    # columns, measured (log-space gives the same): median 4e-4, p99 4.6e-3, max 1.03e-2 over 20,000 such matrices;
    # a bound of 1e-3 holds for the median only
    col_error = (H.sum(-2) - 1).abs().amax(-1)
    assert col_error.median() < 1e-3 and col_error.quantile(0.99) < 1e-2 and col_error.max() < 2e-2


def test_columns_converge_with_more_iterations():
    H = sinkhorn(random_logits(2_000, std=1.0, seed=1).double(), 200)
    assert (H.sum(-2) - 1).abs().max() < 1e-5
    # std 3 converges more slowly: measured max 3.0e-3, p99 5.5e-4 after 200 iterations
    H = sinkhorn(random_logits(2_000, std=3.0, seed=1).double(), 200)
    assert (H.sum(-2) - 1).abs().amax(-1).median() < 1e-5


def test_spectral_norm_at_most_one():
    H = sinkhorn(random_logits(2_000, std=1.0, seed=2), 20)
    assert torch.linalg.matrix_norm(H.double(), ord=2).max() <= 1 + 1e-3


def test_product_of_60_stays_doubly_stochastic():
    H = sinkhorn(random_logits(60, std=1.0, seed=3), 20).double()
    P = torch.eye(4, dtype=torch.float64)
    for h in H:
        P = h @ P
    assert (P.sum(-1) - 1).abs().max() < 1e-5
    assert (P.sum(-2) - 1).abs().max() < 1e-2


def test_scaling_form_equals_log_space():
    Z = random_logits(500, std=2.0, seed=4)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        fast = sinkhorn(Z.to(dtype), 20)
        torch.testing.assert_close(fast, sinkhorn_log(Z.to(dtype), 20), rtol=0, atol=tol)


def test_gradient_is_the_log_space_gradient():
    Z = random_logits(6, std=1.5, seed=5).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: sinkhorn(z, 7), (Z,))
    G = torch.randn(6, 4, 4, dtype=torch.float64)
    fast = torch.autograd.grad((sinkhorn(Z, 20) * G).sum(), Z)[0]
    log = torch.autograd.grad((sinkhorn_log(Z, 20) * G).sum(), Z)[0]  # autograd through the unrolled loop
    torch.testing.assert_close(fast, log, rtol=0, atol=1e-10)


def test_one_stream_is_exactly_one():
    Z = 100 * torch.randn(50, 1, 1)
    assert torch.equal(sinkhorn(Z, 20), torch.ones(50, 1, 1))
    assert default_res_diag(1) == 0.0


def test_extreme_spreads_stay_finite():
    Z = random_logits(1_000, std=60.0, seed=6).requires_grad_()
    H = sinkhorn(Z, 20)
    H.sum().backward()
    assert torch.isfinite(H).all() and torch.isfinite(Z.grad).all()
    assert (H.sum(-1) - 1).abs().max() < 1e-5  # rows still normalised


@pytest.mark.parametrize("norm_first", [True, False])
def test_reference_connection_equals_the_frozen_eager_numbers(norm_first, monkeypatch):
    """tests/unit/data/mhc_frozen.pt holds inputs, weights, output and gradients of the connection and of a small
    SASRec+mHC, computed by the hand-written eager path (`_MHCRead`, residual.kernel=eager) this reference replaced."""
    from seqrec import kernels

    monkeypatch.setattr(kernels, "_mode", "reference")
    frozen = torch.load(FROZEN, weights_only=True)[f"connection_norm_first={norm_first}"]
    connection = MHCConnection(
        8, norm_first, streams=4, sinkhorn_iters=20, init_gate=0.8, res_diag_init=None, fp32_mappings=True, ln_eps=1e-8
    )
    connection.load_state_dict(frozen["params"])
    state, A = frozen["state"].clone().requires_grad_(), frozen["A"].clone().requires_grad_()
    out = connection(state, lambda u: torch.tanh(u @ A), keep=frozen["keep"])
    (out * frozen["G"]).sum().backward()
    torch.testing.assert_close(out, frozen["out"], rtol=1e-5, atol=1e-5)
    grads = {"state": state.grad, "A": A.grad} | {k: p.grad for k, p in connection.named_parameters()}
    assert grads.keys() == frozen["grads"].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, frozen["grads"][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("norm_first", [True, False])
def test_reference_model_equals_the_frozen_eager_numbers(norm_first, monkeypatch):
    from seqrec import kernels

    monkeypatch.setattr(kernels, "_mode", "reference")
    frozen = torch.load(FROZEN, weights_only=True)[f"sasrec_mhc_norm_first={norm_first}"]
    model = SASRec(
        num_items=30, maxlen=6, hidden_units=8, num_blocks=2, num_heads=2, dropout_rate=0.0, norm_first=norm_first,
        residual=MHC(expansion_rate=4, init_gate=0.7),
    )  # fmt: skip
    model.load_state_dict(frozen["params"])
    h = model(frozen["seq"])
    h.square().sum().backward()
    torch.testing.assert_close(h, frozen["out"], rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, frozen["grads"][name], rtol=1e-4, atol=1e-5, msg=name)
