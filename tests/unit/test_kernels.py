"""seqrec.kernels: the switch (`auto` uses a plug-in, `reference` never does, a bad value is a one-line config
error), lazy plug-in loading, and each non-mHC plug-in against its reference layer, values and gradients
(gradcheck in float64 where the plug-in supports it). The mHC plug-in is tested in test_mhc_native.py."""

import logging

import pytest
import torch

from seqrec import kernels
from seqrec.errors import ConfigError
from seqrec.kernels import attention as attention_kernels
from seqrec.kernels import causal_attention, relation_attention
from seqrec.nn.attention import AttentionContext, attention, causal_padding_mask
from seqrec.nn.ffn import dropout
from seqrec.nn.time_attention import relation_attention as reference_relation_attention


def test_auto_finds_the_cpu_plugins_and_reference_finds_none():
    with kernels.using("auto"):
        assert kernels.find("dropout", torch.device("cpu")) is attention_kernels.dropout
        assert kernels.find("relation_attention", "cpu", torch.zeros(1)) is relation_attention.bucketed_attention
        assert kernels.find("no-such-op", "cpu") is None
        assert kernels.find("dropout", "meta") is None  # no plug-in for that device type: the reference runs
    with kernels.using("reference"):
        assert kernels.find("dropout", "cpu") is None


def test_a_bad_mode_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="kernels='fast' must be one of auto, reference"):
        kernels.use("fast")
    assert kernels.mode() in kernels.MODES


def test_a_plugin_that_cannot_be_imported_warns_once_and_the_reference_runs(monkeypatch, caplog):
    monkeypatch.setitem(kernels.PLUGINS, ("dropout", "cpu"), ["seqrec.kernels.not_installed:DROPOUT"])
    monkeypatch.setattr(kernels, "_loaded", {})
    x = torch.ones(1000)
    with caplog.at_level(logging.WARNING), kernels.using("auto"):
        torch.manual_seed(0)
        y = dropout(x, 0.5, training=True)
        dropout(x, 0.5, training=True)
    torch.manual_seed(0)
    assert torch.equal(y, torch.nn.functional.dropout(x, 0.5, training=True))
    assert len([r for r in caplog.records if "not_installed" in r.message]) == 1


def relation_inputs(dtype, H=2, B=3, L=7, Dh=4, span=5, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, :3] = False
    buckets = torch.randint(0, span + 1, (B, L, L), generator=g)
    index = buckets.masked_fill(~causal_padding_mask(valid)[:, 0], span + 1)
    return (
        rand(H, B, L, Dh) * Dh**-0.5,
        rand(H, B, L, Dh),
        rand(H, B, L, Dh),
        rand(H, span + 1, Dh),
        rand(H, span + 1, Dh),
        index,
    )


def test_bucketed_relation_attention_passes_gradcheck_and_equals_the_reference():
    q, k, v, tk, tv, index = relation_inputs(torch.float64)
    tensors = [t.requires_grad_() for t in (q, k, v, tk, tv)]
    assert torch.autograd.gradcheck(lambda *t: relation_attention.bucketed_attention(*t, index, 0.0), tensors)
    with kernels.using("reference"):
        assert torch.autograd.gradcheck(lambda *t: reference_relation_attention(*t, index, 0.0), tensors)
        reference = reference_relation_attention(*tensors, index, 0.0)
    fast = relation_attention.bucketed_attention(*tensors, index, 0.0)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    weight = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * weight).sum(), tensors)
    g_reference = torch.autograd.grad((reference * weight).sum(), tensors)
    for a, b in zip(g_fast, g_reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_relation_attention_with_dropout_keeps_the_expected_mass():
    q, k, v, tk, tv, index = relation_inputs(torch.float64, B=64)
    v = torch.ones_like(v)  # each output is sum_j dropout(A)_ij: 1 in expectation
    torch.manual_seed(0)
    fast = relation_attention.bucketed_attention(q, k, v, tk * 0, tv * 0, index, 0.25)
    with kernels.using("reference"):
        reference = reference_relation_attention(q, k, v, tk * 0, tv * 0, index, 0.25)
    for out in (fast, reference):
        assert abs(out.mean().item() - 1) < 0.05 and out.std() > 0.1  # dropped, rescaled, unbiased


def test_bucket_layout_sums_equal_scatter_add_bitwise_empty_buckets_included():
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 4, (3, 9, 9), generator=g)  # buckets 4..6 stay empty
    values = torch.randn(3, 9, 9, generator=g)
    layout = relation_attention.BucketLayout.of(index, 7)
    scattered = torch.zeros(3, 9, 7).scatter_add_(-1, index, values)
    assert torch.equal(layout.sums(values), scattered)  # same additions, same order (keys ascending per bucket)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_sort_free_bucket_sums_give_the_scatter_path_bitwise_and_one_layout_per_forward_pass(monkeypatch, p):
    """The path that CUDA takes under deterministic algorithms, run on the CPU against the scatter_add path."""
    q, k, v, tk, tv, index = relation_inputs(torch.float32, B=4, L=9)
    tensors = [t.requires_grad_() for t in (q, k, v, tk, tv)]
    weight = torch.randn(q.shape)
    results, cache = [], {}
    for sort_free in (False, True):
        monkeypatch.setattr(relation_attention, "needs_layout", lambda index, answer=sort_free: answer)
        torch.manual_seed(0)  # the same dropout mask
        out = relation_attention.bucketed_attention(*tensors, index, p, cache)
        results.append((out, torch.autograd.grad((out * weight).sum(), tensors)))
        assert len(cache) == sort_free  # built on first use, then reused by every head, block and the backward
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_the_sort_free_path_is_taken_only_where_scatter_add_is_not_deterministic():
    index = torch.zeros(1, 2, 2, dtype=torch.int64)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert not relation_attention.needs_layout(index)  # the CPU's scatter_add is deterministic as it is
        assert relation_attention.bucket_layout(index, 3, {}) is None
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_strict_deterministic_relation_attention_on_cuda_is_bitwise_repeatable_and_equals_the_cpu():
    q, k, v, tk, tv, index = relation_inputs(torch.float32, B=8, L=40, span=30)
    weight = torch.randn(q.shape)
    previous = torch.are_deterministic_algorithms_enabled()
    runs = []
    try:
        torch.use_deterministic_algorithms(True)  # strict: a nondeterministic CUDA kernel would raise
        for device in ("cuda", "cuda", "cpu"):
            tensors = [t.to(device).requires_grad_() for t in (q, k, v, tk, tv)]
            out = relation_attention.bucketed_attention(*tensors, index.to(device), 0.0, {})
            grads = torch.autograd.grad((out * weight.to(device)).sum(), tensors)
            runs.append([t.cpu() for t in (out, *grads)])
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    for a, b in zip(runs[0], runs[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_cpu_attention_equals_the_reference_without_dropout(training):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g, requires_grad=True) for _ in range(3))
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    outs = []
    for mode in ("reference", "auto"):
        ctx = AttentionContext(valid=valid, attn_mask=causal_padding_mask(valid), extras={})
        with kernels.using(mode):
            out = attention(q, k, v, ctx, 0.0, training)
        outs.append((out, torch.autograd.grad(out.square().sum(), (q, k, v))))
        assert ("float_mask" in ctx.cache) == (mode == "auto")  # built once per forward pass, shared
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def causal_inputs(B=3, H=2, L=9, Dh=4):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, Dh, generator=g, requires_grad=True) for _ in range(3))
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[0, :4] = False  # left padding of several lengths; row 2 has none
    valid[1, :8] = False
    return q, k, v, valid


def test_cuda_causal_attention_equals_the_reference_on_real_rows_in_values_and_gradients():
    q, k, v, valid = causal_inputs()
    weight = torch.randn(q.shape) * valid[:, None, :, None]  # padded rows are zeroed by the block later
    outs = []
    for run in (attention, causal_attention.causal_attention):  # the reference (bool mask), the CUDA plug-in
        ctx = AttentionContext(valid=valid, attn_mask=causal_padding_mask(valid), extras={})
        with kernels.using("reference"):
            out = run(q, k, v, ctx, 0.0, False)
        outs.append((out, torch.autograd.grad((out * weight).sum(), (q, k, v))))
    (ref, ref_grads), (fast, fast_grads) = outs
    real = valid[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(fast[real], ref[real], rtol=1e-6, atol=1e-6)
    assert torch.isfinite(fast).all()
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cuda_causal_attention_never_lets_a_padded_key_reach_a_real_query():
    q, k, v, valid = causal_inputs()
    ctx = AttentionContext(valid=valid, attn_mask=causal_padding_mask(valid), extras={})
    out = causal_attention.causal_attention(q, k, v, ctx, 0.0, False)
    padded = ~valid[:, None, :, None].expand_as(k)
    k2, v2 = k.detach().masked_fill(padded, 50.0), v.detach().masked_fill(padded, -7.0)  # huge logits, odd values
    out2 = causal_attention.causal_attention(q, k2, v2, ctx, 0.0, False)
    real = valid[:, None, :, None].expand_as(out)
    assert torch.equal(out[real], out2[real])  # not only close: the padded keys are outside every real row
    assert "rotations" in ctx.cache  # the per-row shifts: once per forward pass, shared by the layers


def test_cuda_causal_attention_refuses_rows_that_are_not_left_padded():
    """Its rotation assumes padding first, then items (as every window is built); a right-padded row or one with a
    gap would let padding in, so the plug-in stops instead (a device-side check: on a GPU it costs no sync)."""
    q, k, v, valid = causal_inputs()
    for broken in (valid.flip(1), valid.clone().index_fill_(1, torch.tensor([6]), False)):  # right-padded; a gap
        ctx = AttentionContext(valid=broken, attn_mask=causal_padding_mask(broken), extras={})
        with pytest.raises(RuntimeError, match="left-padded"):
            causal_attention.causal_attention(q, k, v, ctx, 0.0, False)


def test_cpu_attention_with_dropout_is_unbiased_and_masked():
    valid = torch.ones(64, 8, dtype=torch.bool)
    ctx = AttentionContext(valid=valid, attn_mask=causal_padding_mask(valid), extras={})
    q, k = torch.randn(64, 2, 8, 4), torch.randn(64, 2, 8, 4)
    v = torch.ones(64, 2, 8, 4)
    torch.manual_seed(0)
    out = attention_kernels.attention(q, k, v, ctx, 0.3, training=True)
    assert abs(out.mean().item() - 1) < 0.03 and out.std() > 0.1
    v_future = v.clone()
    v_future[:, :, -1] = 100.0  # the last key is visible to the last query only
    torch.manual_seed(0)
    assert torch.equal(attention_kernels.attention(q, k, v_future, ctx, 0.3, training=True)[:, :, :-1], out[:, :, :-1])


def test_cheap_dropout_mask_has_the_requested_rate():
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = attention_kernels.dropout(x, 0.2, training=True)
    assert abs((y == 0).float().mean().item() - 0.2) < 0.005
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1 / 0.8))
    assert attention_kernels.dropout(x, 0.2, training=False) is x


def test_the_config_switch_reaches_the_run_and_a_bad_value_stops_it_before_any_data(tmp_path, monkeypatch):
    from seqrec.run import run
    from tests.conftest import TINY, compose_config

    monkeypatch.setattr(kernels, "_mode", "auto")
    with pytest.raises(ConfigError, match="kernels='fast'"):
        run(compose_config(TINY + ["kernels=fast"], tmp_path / "bad"))
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    results = run(compose_config(TINY + ["kernels=reference", "residual=mhc", "trainer.num_epochs=1"], tmp_path / "ok"))
    assert kernels.mode() == "reference" and results
