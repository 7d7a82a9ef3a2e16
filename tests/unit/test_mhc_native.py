"""The mHC CPU plug-in (seqrec/kernels/mhc_cpu.cpp) gives the reference connection's values and gradients, padding
and Post-LN included; without a C++ compiler `auto` warns once and runs the reference."""

import logging

import pytest
import torch

from seqrec import kernels
from seqrec.kernels import cache, mhc_cpu
from seqrec.models.sasrec import SASRec
from seqrec.models.tisasrec import TiSASRec
from seqrec.nn.residual import MHC, MHCConnection

pytestmark = pytest.mark.skipif(mhc_cpu.library() is None, reason="no C++ compiler to build the kernels")

KW = dict(res_diag_init=None, fp32_mappings=True, ln_eps=1e-8)


def connection_pair(streams, norm_first, dim=12, iters=20, seed=0):
    """Two connections with the same, deliberately non-neutral, weights: run one as reference, one as `auto`."""
    torch.manual_seed(seed)
    reference = MHCConnection(dim, norm_first, streams=streams, sinkhorn_iters=iters, init_gate=0.8, **KW)
    with torch.no_grad():
        reference.bias.add_(torch.randn_like(reference.bias))
        reference.gain.add_(0.3 * torch.randn_like(reference.gain))
        reference.norm.weight.add_(0.2 * torch.randn_like(reference.norm.weight))
    native = MHCConnection(dim, norm_first, streams=streams, sinkhorn_iters=iters, init_gate=0.8, **KW)
    native.load_state_dict(reference.state_dict())
    return reference, native


def run_connection(connection, state, keep, sublayer, out_weight, mode="auto"):
    """Output and the gradients of a fixed projection of it w.r.t. the state and every parameter."""
    state = state.clone().requires_grad_()
    connection.zero_grad()
    with kernels.using(mode):
        out = connection(state, sublayer, keep=keep)
    (out * out_weight).sum().backward()
    grads = {"state": state.grad}
    grads.update({name: p.grad.clone() for name, p in connection.named_parameters()})
    return out.detach(), grads


@pytest.mark.parametrize("streams", [1, 3, 4])
@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("with_keep", [True, False])
@pytest.mark.parametrize("dim", [12, 50])  # 12: shorter than one 16-lane sum; 50: three 16-lane chunks and a tail of 2
def test_native_connection_is_the_reference_connection(streams, norm_first, with_keep, dim):
    B, L, D = 3, 37, dim  # 111 tokens: several 16-token blocks and a ragged last one
    g = torch.Generator().manual_seed(1)
    state = torch.randn(B, L, streams, D, generator=g)
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0, :5] = False
    keep[2, :30] = False
    state[~keep] = 0  # padding tokens carry all-zero streams, as in the model
    linear = torch.nn.Linear(D, D)
    out_weight = torch.randn(B, L, streams, D, generator=g)
    reference, native = connection_pair(streams, norm_first, D)
    results = [
        run_connection(c, state, keep if with_keep else None, lambda u: torch.tanh(linear(u)), out_weight, mode)
        for c, mode in ((reference, "reference"), (native, "auto"))
    ]
    (out_r, grads_r), (out_n, grads_n) = results
    torch.testing.assert_close(out_n, out_r, rtol=1e-5, atol=1e-5)
    assert grads_r.keys() == grads_n.keys()
    for name in grads_r:
        scale = grads_r[name].abs().max().clamp_min(1e-6)
        assert (grads_n[name] - grads_r[name]).abs().max() / scale < 1e-4, name
    if with_keep:
        assert torch.equal(out_n[~keep], torch.zeros_like(out_n[~keep]))
    for key in ("pre", "post", "res", "real"):
        torch.testing.assert_close(native.last[key], reference.last[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [SASRec, TiSASRec])
@pytest.mark.parametrize("norm_first", [False, True])
def test_native_model_matches_reference_model_in_training_and_evaluation(cls, norm_first):
    """Whole models (two blocks, dropout off): outputs and every parameter's gradient, then a no-grad pass. Between
    connections the backward writes over the gradient buffers it made (Post-LN and Pre-LN alike)."""
    seq = torch.randint(1, 41, (4, 16))
    seq[1, :6] = 0
    seq[3, :15] = 0
    times = torch.cumsum(torch.randint(0, 5, (4, 16)), dim=1) * (seq > 0)
    target = torch.randn(4, 16, 16)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        extra = {"time_span": 8} if cls is TiSASRec else {}
        models.append(
            cls(num_items=40, maxlen=16, hidden_units=16, num_blocks=2, num_heads=2, dropout_rate=0.0,
                norm_first=norm_first, residual=MHC(init_gate=0.5), **extra)
        )  # fmt: skip
    modes = ("reference", "auto")
    outs = []
    for model, mode in zip(models, modes):
        with kernels.using(mode):
            h = model(seq, times) if cls is TiSASRec else model(seq)
        (h * target).sum().backward()
        outs.append(h.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    scale = max(p.grad.abs().max().item() for p in models[0].parameters())
    for (name, p_r), (_, p_n) in zip(models[0].named_parameters(), models[1].named_parameters(), strict=True):
        assert (p_n.grad - p_r.grad).abs().max() < 1e-5 * scale, name
    evals = []
    for model, mode in zip(models, modes):
        with torch.no_grad(), kernels.using(mode):
            evals.append(model.eval()(seq, times) if cls is TiSASRec else model.eval()(seq))
    torch.testing.assert_close(evals[1], evals[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # four builds of the library, 30-60 s each
@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_vector_width_does_not_change_a_single_bit(monkeypatch, lanes):
    """The kernels use the machine's vector width (16 floats with AVX-512, 8 with AVX, else 4) but sum over D on 16
    lanes by one fixed tree and split token loops without changing any token's arithmetic, so every width computes
    the same values and gradients bit for bit. Where the compiler fuses a multiply and an add (FMA) is the one thing
    it decides per CPU and code shape (GCC's Zen tuning avoids FMA chains in some loops), so both builds here leave
    products and sums separate (-ffp-contract=off); the product's build lets the compiler fuse."""
    builds = [
        mhc_cpu.library(("-ffp-contract=off",)),
        mhc_cpu.library(("-ffp-contract=off", f"-DSEQREC_MHC_LANES={lanes}")),
    ]
    assert None not in builds  # the machine's own width, then `lanes`
    B, L = 3, 37
    for streams, norm_first, D in [(4, False, 50), (4, True, 50), (3, False, 12), (8, True, 20)]:
        g = torch.Generator().manual_seed(streams * D)
        state = torch.randn(B, L, streams, D, generator=g)
        keep = torch.ones(B, L, dtype=torch.bool)
        keep[1, :9] = False
        state[~keep] = 0
        linear = torch.nn.Linear(D, D)
        out_weight = torch.randn(B, L, streams, D, generator=g)
        results = []
        for lib in builds:
            monkeypatch.setattr(mhc_cpu, "library", lambda extra_flags=(), lib=lib: lib)
            _, native = connection_pair(streams, norm_first, D)
            results.append(run_connection(native, state, keep, lambda u, f=linear: torch.tanh(f(u)), out_weight))
            monkeypatch.undo()
        (out_a, grads_a), (out_b, grads_b) = results
        assert torch.equal(out_a, out_b), (streams, norm_first, D)
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), (streams, norm_first, D, name)


def test_threads_split_the_tokens_without_changing_the_result():
    reference, native = connection_pair(4, True)
    state = torch.randn(4, 400, 4, 12)  # 1,600 tokens: several TOKENS_PER_TASK chunks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_connection(native, state, None, torch.tanh, torch.ones_like(state))
        torch.set_num_threads(3)
        three = run_connection(native, state, None, torch.tanh, torch.ones_like(state))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1]["state"], three[1]["state"])  # per token
    for name in one[1]:  # sums over tokens: torch's matmul orders them by thread count
        torch.testing.assert_close(three[1][name], one[1][name], rtol=1e-4, atol=1e-4)


def test_without_a_compiler_auto_warns_once_and_runs_the_reference(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("SEQREC_CACHE", str(tmp_path))  # no built library to find there either
    monkeypatch.setattr(cache, "compiler", lambda: None)
    mhc_cpu.library.cache_clear()
    try:
        reference, native = connection_pair(4, True)
        state = torch.randn(2, 5, 4, 12)
        with caplog.at_level(logging.WARNING):
            out = native(state, torch.tanh)
            native(state, torch.tanh)
        with kernels.using("reference"):
            torch.testing.assert_close(out, reference(state, torch.tanh))
        assert [r.message for r in caplog.records if "C++" in r.message] == [
            "mHC: the C++ kernels are unavailable (no C++ compiler found ($CXX, g++, c++, clang++)); "
            "using the reference layer"
        ]
    finally:
        mhc_cpu.library.cache_clear()
