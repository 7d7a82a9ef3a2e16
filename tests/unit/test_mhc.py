"""Sinkhorn-Knopp for mHC's H_res (docs/MODELS.md, section 4.3): doubly stochastic, non-expansive, closed under
products, the fast form equal to the log-space one (values and gradients), n = 1 exact, no NaN at any spread."""

import pytest
import torch

from seqrec.nn.mhc import default_res_diag
from seqrec.nn.sinkhorn import sinkhorn, sinkhorn_log


def batch_last(m):  # (N, n, n) -> (n, n, N), the layout `sinkhorn` takes
    return m.permute(1, 2, 0)


def batch_first(m):
    return m.permute(2, 0, 1)


def init_logits(count, n=4, std=0.5, seed=0):
    """The test distribution: init b_res (diagonal ln 27) + N(0, std^2), (count, n, n)."""
    g = torch.Generator().manual_seed(seed)
    return torch.eye(n) * default_res_diag(n) + std * torch.randn(count, n, n, generator=g)


def random_logits(count, n=4, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return std * torch.randn(count, n, n, generator=g)


def test_init_logits_give_point_nine_on_the_diagonal():
    H = batch_first(sinkhorn(batch_last(init_logits(1, std=0.0)), 20))[0]
    expected = torch.full((4, 4), 0.1 / 3) + torch.eye(4) * (0.9 - 0.1 / 3)
    torch.testing.assert_close(H, expected, rtol=0, atol=1e-6)


def test_rows_and_columns_sum_to_one_after_20_iterations():
    H = batch_first(sinkhorn(batch_last(init_logits(5_000)), 20))  # float32
    assert (H >= 0).all()
    assert (H.sum(-1) - 1).abs().max() < 1e-6  # rows: normalised last
    # columns, measured (log-space gives the same): median 4e-4, p99 4.6e-3, max 1.03e-2 over 20,000 such matrices;
    # a bound of 1e-3 holds for the median only
    col_error = (H.sum(-2) - 1).abs().amax(-1)
    assert col_error.median() < 1e-3 and col_error.quantile(0.99) < 1e-2 and col_error.max() < 2e-2


def test_columns_converge_with_more_iterations():
    H = batch_first(sinkhorn(batch_last(random_logits(2_000, std=1.0, seed=1).double()), 200))
    assert (H.sum(-2) - 1).abs().max() < 1e-5
    # std 3 converges more slowly: measured max 3.0e-3, p99 5.5e-4 after 200 iterations
    H = batch_first(sinkhorn(batch_last(random_logits(2_000, std=3.0, seed=1).double()), 200))
    assert (H.sum(-2) - 1).abs().amax(-1).median() < 1e-5


def test_spectral_norm_at_most_one():
    H = batch_first(sinkhorn(batch_last(random_logits(2_000, std=1.0, seed=2)), 20))
    assert torch.linalg.matrix_norm(H.double(), ord=2).max() <= 1 + 1e-3


def test_product_of_60_stays_doubly_stochastic():
    H = batch_first(sinkhorn(batch_last(random_logits(60, std=1.0, seed=3)), 20)).double()
    P = torch.eye(4, dtype=torch.float64)
    for h in H:
        P = h @ P
    assert (P.sum(-1) - 1).abs().max() < 1e-5
    assert (P.sum(-2) - 1).abs().max() < 1e-2


def test_fast_form_equals_log_space():
    Z = random_logits(500, std=2.0, seed=4)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        fast = batch_first(sinkhorn(batch_last(Z.to(dtype)), 20))
        torch.testing.assert_close(fast, sinkhorn_log(Z.to(dtype), 20), rtol=0, atol=tol)


def test_hand_written_backward_is_the_unrolled_gradient():
    Z = random_logits(6, std=1.5, seed=5).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: sinkhorn(batch_last(z), 7), (Z,))
    G = torch.randn(6, 4, 4, dtype=torch.float64)
    fast = torch.autograd.grad((batch_first(sinkhorn(batch_last(Z), 20)) * G).sum(), Z)[0]
    log = torch.autograd.grad((sinkhorn_log(Z, 20) * G).sum(), Z)[0]  # autograd through the unrolled loop
    torch.testing.assert_close(fast, log, rtol=0, atol=1e-10)


def test_one_stream_is_exactly_one():
    Z = 100 * torch.randn(1, 1, 50)
    assert torch.equal(sinkhorn(Z, 20), torch.ones(1, 1, 50))
    assert default_res_diag(1) == 0.0


def test_extreme_spreads_stay_finite():
    Z = random_logits(1_000, std=60.0, seed=6).requires_grad_()
    H = batch_first(sinkhorn(batch_last(Z), 20))
    H.sum().backward()
    assert torch.isfinite(H).all() and torch.isfinite(Z.grad).all()
    assert (H.sum(-1) - 1).abs().max() < 1e-5  # rows still normalised


def test_fused_connection_read_is_the_autograd_formula():
    """MHCConnection's hand-written forward and backward (RMS, mappings, Sinkhorn, read and mix in one autograd
    node) against Eq. 7-9 written with plain autograd and log-space Sinkhorn, in float64, padding token included."""
    from seqrec.nn.mhc import RMS_EPS, _MHCRead

    N, S, D, iters = 6, 4, 5, 7
    g = torch.Generator().manual_seed(7)
    X = torch.randn(N, S, D, generator=g, dtype=torch.float64)
    X[2] = 0  # a padded token: all-zero state
    W = 0.5 * torch.randn(S * D, 2 * S + S * S, generator=g, dtype=torch.float64)
    b = torch.randn(2 * S + S * S, generator=g, dtype=torch.float64)

    def fused(X, W, b):
        return _MHCRead.apply(X, W, b, iters, None)[:3]

    def reference(X, W, b):
        x = X.reshape(N, S * D)
        logits = (x @ W) * torch.rsqrt(x.square().mean(-1, keepdim=True) + RMS_EPS) + b
        pre, post = torch.sigmoid(logits[:, :S]), 2 * torch.sigmoid(logits[:, S : 2 * S])
        res = sinkhorn_log(logits[:, 2 * S :].view(N, S, S), iters)
        return (pre[:, None] @ X)[:, 0], res @ X, post

    inputs = [t.clone().requires_grad_() for t in (X, W, b)]
    outs, refs = fused(*inputs), reference(*inputs)
    for out, ref in zip(outs, refs, strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    weights = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in refs]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), inputs)
    ref_grads = torch.autograd.grad(sum((r * w).sum() for r, w in zip(refs, weights)), inputs)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=0, atol=1e-10)
    assert torch.autograd.gradcheck(fused, inputs)


def _read_case(dtype=torch.float64):
    """(B, L, S, D) streams with a padded (all-zero) token, a weight and a bias, for the two read paths."""
    B, L, S, D = 2, 3, 4, 5
    g = torch.Generator().manual_seed(11)
    state = torch.randn(B, L, S, D, generator=g, dtype=dtype)
    state[0, 0] = 0
    W = 0.5 * torch.randn(S * D, 2 * S + S * S, generator=g, dtype=dtype)
    b = torch.randn(2 * S + S * S, generator=g, dtype=dtype)
    return state, W, b


def _eager_read(state, W, b, iters):
    from seqrec.nn.mhc import _MHCRead

    B, L, S, D = state.shape
    return [t.view(B, L, *t.shape[1:]) for t in _MHCRead.apply(state.view(B * L, S, D), W, b, iters, None)]


@pytest.mark.slow
def test_compiled_read_is_the_eager_read():
    """residual.kernel=compile: the token-by-token read through torch.compile gives _MHCRead's values and gradients
    (float64, padding token included), and the diagnostics outputs too."""
    from seqrec.nn.mhc_compiled import CompiledRead

    iters = 3
    state, W, b = _read_case()
    compiled = CompiledRead()
    inputs = [t.clone().requires_grad_() for t in (state, W, b)]
    eager_inputs = [t.clone().requires_grad_() for t in (state, W, b)]
    B, L, S, D = state.shape
    outs = compiled(inputs[0], inputs[0].flatten(-2) @ inputs[1], inputs[2], iters)
    assert outs is not None, compiled.failure
    refs = _eager_read(*eager_inputs, iters)
    for out, ref in zip(outs, refs, strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in refs[:3]]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), inputs)
    ref_grads = torch.autograd.grad(sum((r * w).sum() for r, w in zip(refs, weights)), eager_inputs)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=0, atol=1e-10)


def test_compile_failure_falls_back_to_the_eager_read(monkeypatch, caplog):
    """Where torch.compile cannot work (no C++ compiler, say), the connection warns once and computes eagerly."""
    import seqrec.nn.mhc_compiled as mhc_compiled
    from seqrec.nn.mhc import MHCConnection

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return run

    monkeypatch.setattr(mhc_compiled.torch, "compile", broken_compile)
    monkeypatch.setattr(mhc_compiled, "compiled_read", mhc_compiled.CompiledRead())
    kwargs = dict(streams=4, sinkhorn_iters=5, init_gate=0.1, res_diag_init=None, fp32_mappings=True, ln_eps=1e-8)
    torch.manual_seed(0)
    fast = MHCConnection(5, True, kernel="compile", **kwargs)
    plain = MHCConnection(5, True, kernel="eager", **kwargs)
    plain.load_state_dict(fast.state_dict())
    state = torch.randn(2, 3, 4, 5)
    with caplog.at_level("WARNING"):
        out = fast(state, torch.tanh)
        fast(state, torch.tanh)
    torch.testing.assert_close(out, plain(state, torch.tanh))
    assert [r.message for r in caplog.records if "torch.compile failed" in r.message] == [
        "mHC: torch.compile failed (RuntimeError: InvalidCxxCompiler: No working C++ compiler found); "
        "using the eager kernels (as residual.kernel=eager)"
    ]
