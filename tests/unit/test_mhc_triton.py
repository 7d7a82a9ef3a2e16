"""The mHC Triton plug-in (seqrec/kernels/mhc_triton.py) gives the reference connection's values and gradients,
run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1): Pre-LN and Post-LN, padding, S not a power
of two, the stride-0 expanded embedding, the sum readout's stride-0 gradient, and an evaluation pass.
tests/test_gpu.py repeats the comparison compiled, on CUDA."""

import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from seqrec import kernels
from seqrec.nn.residual import MHC, MHCConnection

if torch.cuda.is_available():  # tests/test_gpu.py runs the compiled kernels there; the interpreter is for CPUs
    pytest.skip("CUDA present: the compiled kernels are tested in tests/test_gpu.py", allow_module_level=True)
if "triton" in sys.modules and not os.environ.get("TRITON_INTERPRET"):
    pytest.skip("triton was imported without TRITON_INTERPRET=1 before this module", allow_module_level=True)


def _interpreted_module():
    """seqrec.kernels.mhc_triton run by Triton's interpreter: whether triton.language and the kernels are
    interpreted is decided when they are decorated, i.e. imported."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        return importlib.import_module("seqrec.kernels.mhc_triton")
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


mhc_triton = _interpreted_module()


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """The interpreter also reads TRITON_INTERPRET while it runs the kernels."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


REPO = Path(__file__).resolve().parents[2]
KW = dict(res_diag_init=None, fp32_mappings=True, ln_eps=1e-8)


def make_connection(streams, dim, norm_first, iters=20, seed=0):
    """A connection with deliberately non-neutral weights (gates, bias, gain, LayerNorm weight all moved)."""
    torch.manual_seed(seed)
    connection = MHCConnection(dim, norm_first, streams=streams, sinkhorn_iters=iters, init_gate=0.8, **KW)
    with torch.no_grad():
        connection.bias.add_(torch.randn_like(connection.bias))
        connection.gain.add_(0.3 * torch.randn_like(connection.gain))
        connection.norm.weight.add_(0.2 * torch.randn_like(connection.norm.weight))
        connection.norm.bias.add_(0.1 * torch.randn_like(connection.norm.bias))
    return connection


def run_both(connection, state, keep, loss_of):
    """(output, gradients of loss_of(output) w.r.t. the state, the connection's and the sublayer's parameters)
    for the reference (first) and the Triton plug-in (second), on the same weights."""
    linear = torch.nn.Linear(connection.dim, connection.dim)
    results = []
    for run in (connection, lambda *args: mhc_triton.forward(connection, *args)):
        x = state.detach().clone().requires_grad_()
        connection.zero_grad()
        linear.zero_grad()
        with kernels.using("reference"):
            out = run(x, lambda u: torch.tanh(linear(u)), keep)
        loss_of(out).backward()
        grads = {"state": x.grad}
        grads.update({name: p.grad.clone() for name, p in connection.named_parameters()})
        grads.update({f"sublayer.{name}": p.grad.clone() for name, p in linear.named_parameters()})
        last = {key: value.clone() for key, value in connection.last.items()}
        results.append((out.detach(), grads, last))
    return results


def assert_same(reference, plugin, rtol=1e-5):
    (out_r, grads_r, last_r), (out_t, grads_t, last_t) = reference, plugin
    torch.testing.assert_close(out_t, out_r, rtol=rtol, atol=rtol * out_r.abs().max().item())
    assert grads_t.keys() == grads_r.keys()
    for name in grads_r:
        scale = grads_r[name].abs().max().clamp_min(1e-6)
        assert (grads_t[name] - grads_r[name]).abs().max() / scale < 10 * rtol, name
    for key in ("pre", "post", "res", "real"):
        torch.testing.assert_close(last_t[key], last_r[key], rtol=rtol, atol=1e-6)


def padded_state(B, L, S, D, seed=1):
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(B, L, S, D, generator=g)
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0, :3] = False
    keep[2, :6] = False
    state[~keep] = 0  # padding tokens carry all-zero streams, as in the model
    return state, keep, torch.randn(B, L, S, D, generator=g)


@pytest.mark.parametrize("streams", [1, 2, 4])
@pytest.mark.parametrize("dim", [16, 50])
@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("with_keep", [True, False])
def test_triton_connection_is_the_reference_connection(streams, dim, norm_first, with_keep):
    state, keep, out_weight = padded_state(3, 7, streams, dim)  # 21 tokens: two token blocks at S=4, D=50
    connection = make_connection(streams, dim, norm_first)
    reference, plugin = run_both(connection, state, keep if with_keep else None, lambda y: (y * out_weight).sum())
    assert_same(reference, plugin)
    if with_keep:
        assert torch.equal(plugin[0][~keep], torch.zeros_like(plugin[0][~keep]))


@pytest.mark.parametrize("norm_first", [True, False])
def test_expanded_embedding_sum_readout_and_three_streams(norm_first):
    """S = 3 (padded to 4 inside the kernels), the state as MHC.expand's stride-0 view, the loss through the sum
    readout (whose gradient has stride 0 over the streams), few Sinkhorn rounds."""
    residual = MHC(expansion_rate=3, sinkhorn_iters=3)
    g = torch.Generator().manual_seed(2)
    embedding = torch.randn(2, 9, 24, generator=g)
    state = residual.expand(embedding)
    assert state.stride(-2) == 0
    target = torch.randn(2, 9, 24, generator=g)
    connection = make_connection(3, 24, norm_first, iters=3)
    reference, plugin = run_both(connection, state, None, lambda y: (residual.reduce(y) * target).sum())
    assert_same(reference, plugin)


def test_evaluation_pass_without_gradients_matches():
    connection = make_connection(4, 16, False)
    state, keep, _ = padded_state(3, 7, 4, 16)
    with torch.no_grad(), kernels.using("reference"):
        expected = connection(state, torch.tanh, keep)
        got = mhc_triton.forward(connection, state, torch.tanh, keep)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_registered_for_cuda_and_supports_only_what_the_kernels_run(monkeypatch):
    monkeypatch.setattr(mhc_triton, "verified", lambda *args: True)  # the self-check needs CUDA: tested below
    assert kernels.PLUGINS[("mhc", "cuda")] == ["seqrec.kernels.mhc_triton:MHC"]

    def state(device="cuda", dtype=torch.float32):
        return SimpleNamespace(device=torch.device(device), dtype=dtype)

    four, nine = make_connection(4, 16, True), make_connection(9, 8, True)
    low = MHCConnection(16, True, streams=4, sinkhorn_iters=20, init_gate=0.8, res_diag_init=None,
                        fp32_mappings=False, ln_eps=1e-8)  # fmt: skip
    assert mhc_triton.supports(four, state())
    assert mhc_triton.supports(four, state(dtype=torch.bfloat16))  # fp32 mappings: the state is taken to float32
    assert not mhc_triton.supports(four, state("cpu"))
    assert not mhc_triton.supports(four, state(dtype=torch.float64))
    assert not mhc_triton.supports(nine, state())  # S > 8: the Sinkhorn no longer fits in registers
    assert not mhc_triton.supports(low, state(dtype=torch.bfloat16))  # low-precision mapping matmuls
    assert mhc_triton.supports(low, state())
    monkeypatch.setattr(mhc_triton, "verified", lambda *args: False)
    assert not mhc_triton.supports(four, state())


def test_sasrec_through_the_plugin_matches_the_reference_model(monkeypatch):
    """A whole model (two blocks, padding, dropout off) with the plug-in found through seqrec.kernels as it is on
    CUDA (here registered for the CPU): output and every parameter's gradient."""
    from seqrec.kernels import Kernel
    from seqrec.models.sasrec import SASRec

    monkeypatch.setitem(kernels.PLUGINS, ("mhc", "cpu"), ["test:TRITON"])
    calls = []

    def counted(*args):
        calls.append(1)
        return mhc_triton.forward(*args)

    monkeypatch.setattr(kernels, "_loaded", {"test:TRITON": Kernel(run=counted)})
    seq = torch.randint(1, 41, (3, 8))
    seq[1, :3] = 0
    target = torch.randn(3, 8, 16)
    outputs, models = [], []
    for mode in ("reference", "auto"):
        torch.manual_seed(0)
        model = SASRec(num_items=40, maxlen=8, hidden_units=16, num_blocks=2, num_heads=2, dropout_rate=0.0,
                       residual=MHC(init_gate=0.5))  # fmt: skip
        with kernels.using(mode):
            h = model(seq)
        (h * target).sum().backward()
        outputs.append(h.detach())
        models.append(model)
    assert len(calls) == 4  # two blocks, two connections each, all through the plug-in
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    scale = max(p.grad.abs().max().item() for p in models[0].parameters())
    for (name, p_r), (_, p_t) in zip(models[0].named_parameters(), models[1].named_parameters(), strict=True):
        assert (p_t.grad - p_r.grad).abs().max() < 1e-5 * scale, name


def test_self_check_passes_the_kernels_and_catches_wrong_or_failing_ones(monkeypatch):
    cpu = torch.device("cpu")
    rng = torch.get_rng_state()
    assert mhc_triton.self_check(3, 16, False, cpu) is None
    assert torch.equal(torch.get_rng_state(), rng)  # a training run's random stream is left as it was
    with torch.inference_mode():  # the caller's modes do not reach the check
        assert mhc_triton.self_check(2, 16, True, cpu) is None
    monkeypatch.setattr(mhc_triton, "RMS_EPS", 1.0)  # the kernels now compute something else
    assert mhc_triton.self_check(2, 16, True, cpu).startswith("output differs from the reference's by")
    monkeypatch.undo()

    def failing(*args):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(mhc_triton._Read, "apply", failing)
    assert mhc_triton.self_check(2, 16, True, cpu) == "RuntimeError: no kernel image for this device"


def test_a_failed_self_check_warns_once_and_the_reference_runs(monkeypatch, caplog):
    monkeypatch.setattr(mhc_triton, "self_check", lambda *args: "CompilationError: boom")
    mhc_triton.verified.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert not mhc_triton.verified(4, 16, True, torch.device("cuda"))
            assert not mhc_triton.verified(4, 16, True, torch.device("cuda"))
            monkeypatch.setattr(mhc_triton, "self_check", lambda *args: 1 / 0)  # the check itself fails
            assert not mhc_triton.verified(4, 16, False, torch.device("cuda"))
    finally:
        mhc_triton.verified.cache_clear()
    assert [r.message for r in caplog.records] == [
        "mHC: the Triton kernels failed their check on cuda (CompilationError: boom); using the reference layer",
        "mHC: the Triton kernels failed their check on cuda (ZeroDivisionError: division by zero); using the "
        "reference layer",
    ]


COMPILE_SCRIPT = """
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from seqrec.kernels import mhc_triton as m

arch, S, D = (int(a) for a in sys.argv[1:])
BT, SP, DP = m._tiles(S, D)
tiles = dict(S=S, SP=SP, DP=DP, BT=BT)
for kernel, flags in [
    (m._read_forward_kernel, dict(SAVE=True)),
    (m._read_backward_kernel, dict(HAS_GU=True, HAS_GMAPS=True)),
    (m._write_forward_kernel, dict(HAS_KEEP=True, POST_LN=True)),
    (m._write_backward_kernel, dict(HAS_KEEP=True, POST_LN=True)),
]:
    names = list(inspect.signature(kernel.fn).parameters)
    constants = dict(tiles, **flags)
    types = {"xt": "i32", "xs": "i32", "gt": "i32", "gs": "i32", "N": "i32", "D": "i32", "iters": "i32",
             "eps": "fp32", "FLOOR": "fp32"}
    signature = {n: "constexpr" if n in constants else types.get(n, "*fp32") for n in names}
    source = ASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    assert compiled.asm["cubin"], kernel.fn.__name__
    print("compiled", kernel.fn.__name__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [70, 90])  # V100, H100/H200
def test_the_kernels_compile_to_gpu_code_without_a_gpu(arch, tmp_path):
    """Triton's real compiler (front end to ptxas) on every kernel, in a process without TRITON_INTERPRET: what the
    interpreter cannot show (a construct the compiler rejects) shows here, on a machine without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compiled afresh, not found in a cache
    cmd = [sys.executable, "-c", COMPILE_SCRIPT, str(arch), "3", "50"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == 4
