"""GPU-only precision and DDP paths (skipped without CUDA): fp16 + GradScaler, bf16, NCCL workers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, compose_config, train_cli
from test_amp import _trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _steps(trainer, n: int = 3) -> None:
    for batch in list(trainer.sampler.epoch(0))[:n]:
        loss = trainer.train_step(batch.to(trainer.device))
        assert torch.isfinite(loss), loss
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())


def test_fp16_with_grad_scaler_step(tmp_path):
    cfg = compose_config(TINY + ["hardware=4xv100", "trainer.devices=1", "trainer.device=cuda"], tmp_path)
    trainer = _trainer(cfg, tmp_path)
    assert trainer.amp_dtype is torch.float16 and trainer.scaler.is_enabled()
    _steps(trainer)
    assert trainer.scaler.get_scale() > 0


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="GPU without bf16")
def test_bf16_step(tmp_path):
    cfg = compose_config(TINY + ["hardware=1gpu", "trainer.device=cuda"], tmp_path)
    trainer = _trainer(cfg, tmp_path, amp_dtype="bfloat16")
    assert trainer.amp_dtype is torch.bfloat16 and not trainer.scaler.is_enabled()
    _steps(trainer)


@pytest.mark.parametrize("model", ["sasrec", "tisasrec"])
@pytest.mark.parametrize("loss", ["bce", "ce", "sampled_softmax"])
def test_a_training_step_never_waits_for_the_gpu(tmp_path, model, loss):
    """Launch-light: under sync debug mode "error" any host-device synchronisation inside a step (an .item(), a
    boolean-mask selection, a blocking copy) raises. bf16 (GradScaler's inf check syncs, but only with fp16) and
    deterministic algorithms, as a default run; the first step (lazy initialisation, plug-in self-checks) and the
    batches' transfer stay outside."""
    extra = ["loss.negatives=mixed", "loss.num_negatives=8"] if loss == "sampled_softmax" else []
    overrides = [f"model={model}", f"loss={loss}", *extra, "hardware=1gpu", "trainer.device=cuda"]
    cfg = compose_config(TINY + overrides, tmp_path)
    trainer = _trainer(cfg, tmp_path, amp_dtype="bfloat16", grad_clip=1.0)
    batches = [b.to(trainer.device) for b in list(trainer.sampler.epoch(0))[:3]]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        trainer.train_step(batches[0])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            losses = [trainer.train_step(b) for b in batches[1:]]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.isfinite(x) for x in losses)


def test_pinned_batches_reach_the_gpu_without_a_host_sync(tmp_path):
    """What the trainer does on CUDA: batches pinned in the prefetch thread copy asynchronously; the same batch
    from pageable memory makes the copy wait (sync debug mode "error" raises on it), so the test can fail."""
    cfg = compose_config(TINY + ["hardware=1gpu", "trainer.device=cuda"], tmp_path)
    trainer = _trainer(cfg, tmp_path, amp_dtype="bfloat16")
    batch = next(iter(trainer.sampler.epoch(0)))
    pinned = batch.pin_memory()
    assert pinned.seq.is_pinned() and pinned.loss_weight == batch.loss_weight
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = pinned.to(trainer.device)
        with pytest.raises(RuntimeError):
            batch.to(trainer.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(on_gpu.seq.cpu(), batch.seq) and torch.equal(on_gpu.pos.cpu(), batch.pos)


def test_cuda_attention_runs_on_flash_attention_deterministically_and_matches_the_reference():
    """The CUDA attention plug-in passes no mask, so SDPA may take FlashAttention (forced here: "no available
    kernel" would raise otherwise); strict deterministic mode selects flash's deterministic backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from seqrec import kernels
    from seqrec.kernels.causal_attention import causal_attention
    from seqrec.nn.attention import AttentionContext, attention, causal_padding_mask

    torch.manual_seed(0)
    B, H, L, Dh = 8, 2, 200, 32
    q, k, v = (torch.randn(B, H, L, Dh, device="cuda") for _ in range(3))
    valid = torch.arange(L, device="cuda") >= torch.randint(0, L, (B, 1), device="cuda")  # (B, L) left-padded
    weight = torch.randn(q.shape, device="cuda") * valid[:, None, :, None]
    previous = torch.are_deterministic_algorithms_enabled()
    runs = []
    try:
        torch.use_deterministic_algorithms(True)
        for _ in range(2):
            x = [t.bfloat16().requires_grad_() for t in (q, k, v)]
            ctx = AttentionContext(valid=valid, attn_mask=causal_padding_mask(valid), extras={})
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = causal_attention(*x, ctx, 0.0, False)
                grads = torch.autograd.grad((out.float() * weight).sum(), x)
            runs.append([out, *grads])
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    ctx = AttentionContext(valid=valid, attn_mask=causal_padding_mask(valid), extras={})
    with kernels.using("reference"):
        reference = attention(q, k, v, ctx, 0.0, False)  # float32, bool mask
    real = valid[:, None, :, None].expand_as(reference)
    assert (runs[0][0].float() - reference)[real].abs().max().item() < 3e-2


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_nccl_workers(tmp_path):
    overrides = [*TINY, "hardware=4xv100", "trainer.devices=2", "trainer.device=cuda"]
    proc = train_cli(*overrides, run_dir=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parameters identical on all 2 ranks" in (tmp_path / "train.log").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["epochs_run"] == 2


@pytest.mark.parametrize("streams", [1, 3, 4])
@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_mhc_triton_matches_reference_on_cuda(streams, norm_first, autocast):
    """The compiled Triton plug-in (what kernels=auto runs for mHC on CUDA) against the reference connection:
    output, the gradients of the state, the sublayer and every parameter; float32, and bf16 autocast around the
    sublayer (fp32 mappings), where only the sublayer's rounding of nearly equal inputs may differ."""
    pytest.importorskip("triton")
    from seqrec import kernels
    from seqrec.kernels import mhc_triton
    from seqrec.nn.residual import MHCConnection

    if autocast and not torch.cuda.is_bf16_supported():
        pytest.skip("GPU without bf16")
    D = 50
    torch.manual_seed(0)
    connection = MHCConnection(D, norm_first, streams=streams, sinkhorn_iters=20, init_gate=0.8,
                               res_diag_init=None, fp32_mappings=True, ln_eps=1e-8).cuda()  # fmt: skip
    with torch.no_grad():
        connection.bias.add_(torch.randn_like(connection.bias))
        connection.gain.add_(0.3 * torch.randn_like(connection.gain))
    linear = torch.nn.Linear(D, D).cuda()
    state = torch.randn(8, 200, streams, D, device="cuda")  # several thousand tokens: many token blocks
    keep = torch.rand(8, 200, device="cuda") > 0.2
    state[~keep] = 0
    weight = torch.randn_like(state)
    results = []
    for mode in ("reference", "auto"):
        with kernels.using(mode):
            found = kernels.find("mhc", state.device, connection, state)
            assert (found is mhc_triton.forward) == (mode == "auto")
            x = state.clone().requires_grad_()
            connection.zero_grad()
            linear.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out = connection(x, lambda u: torch.tanh(linear(u)), keep)
            (out.float() * weight).sum().backward()
        grads = {"state": x.grad, **{n: p.grad.clone() for n, p in connection.named_parameters()}}
        grads.update({f"sublayer.{n}": p.grad.clone() for n, p in linear.named_parameters()})
        results.append((out.detach().float(), grads))
    (out_r, grads_r), (out_t, grads_t) = results
    tol = 2e-2 if autocast else 1e-4
    assert ((out_t - out_r).abs().max() / out_r.abs().max()).item() < tol
    for name in grads_r:
        scale = grads_r[name].abs().max().clamp_min(1e-6)
        assert ((grads_t[name] - grads_r[name]).abs().max() / scale).item() < 10 * tol, name
