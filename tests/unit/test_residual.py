"""Residual factories: Plain is x + F(LN x) / LN(x + F x); Gated puts a sigmoid gate on F; MHC (docs/MODELS.md,
section 4.5) equals Plain at neutral init for Pre-LN and Post-LN, SASRec and TiSASRec; gradients, causality, padding,
bf16, n = 1, diagnostics."""

import pickle

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from seqrec import kernels
from seqrec.errors import ConfigError
from seqrec.models.sasrec import SASRec
from seqrec.nn.residual import MHC, Gated, GatedConnection, MHCConnection, Plain
from tests.conftest import CONF

NUM_ITEMS, MAXLEN = 40, 12


@pytest.fixture(autouse=True, params=["reference", "auto"])
def kernels_mode(request, monkeypatch):
    """Every test runs on the reference layers and on the fast kernels (the CPU plug-ins)."""
    monkeypatch.setattr(kernels, "_mode", request.param)
    return request.param


def make(residual, norm_first=True, cls=SASRec, **kw):
    torch.manual_seed(0)
    args = dict(num_items=NUM_ITEMS, maxlen=MAXLEN, hidden_units=16, num_blocks=2, num_heads=2, dropout_rate=0.2)
    return cls(**args, **kw, norm_first=norm_first, residual=residual)


def batch(B=4, L=MAXLEN, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, NUM_ITEMS + 1, (B, L), generator=g)
    lengths = torch.tensor([L, L - 4, 1, 0][:B])  # full, left-padded, one item, fully padded
    seq[torch.arange(L) < (L - lengths)[:, None]] = 0
    return seq


def neutral_mhc_copy_of(plain_model, norm_first, cls=SASRec, expansion_rate=4, **kw):
    """MHC twin of `plain_model`: alpha = 0, readout mean, all shared weights copied; random phi and b_res."""
    model = make(MHC(expansion_rate=expansion_rate, init_gate=0.0, readout="mean"), norm_first, cls, **kw)
    missing, unexpected = model.load_state_dict(plain_model.state_dict(), strict=False)
    assert not unexpected and all(k.rsplit(".", 1)[-1] in ("phi", "bias", "alpha", "gain") for k in missing)
    S = expansion_rate
    with torch.no_grad():
        for c in connections(model):
            c.phi.normal_()  # irrelevant while alpha = 0
            c.bias[2 * S :].normal_(std=2.0)  # any static H_res: rows sum to 1 and the streams are equal
    return model


def connections(model):
    return [m for m in model.modules() if isinstance(m, MHCConnection)]


def test_plain_connection_is_pre_or_post_ln():
    x, f = torch.randn(2, 3, 8), torch.nn.Linear(8, 8)
    pre, post = Plain().connection(8, True), Plain().connection(8, False)
    torch.testing.assert_close(pre(x, f), x + f(pre.norm(x)))
    torch.testing.assert_close(post(x, f), post.norm(x + f(x)))
    assert torch.equal(Plain().expand(x), x) and torch.equal(Plain().reduce(x), x)


def test_gated_connection_gates_the_update_with_the_stream():
    x, f = torch.randn(2, 3, 8), torch.nn.Linear(8, 8)
    pre, post = Gated().connection(8, True), Gated().connection(8, False)
    gate = torch.sigmoid(pre.gate(x))
    torch.testing.assert_close(pre(x, f), x + gate * f(pre.norm(x)))
    gate = torch.sigmoid(post.gate(x))
    torch.testing.assert_close(post(x, f), post.norm(x + gate * f(x)))
    assert torch.equal(Gated().expand(x), x) and torch.equal(Gated().reduce(x), x)


@pytest.mark.parametrize("norm_first", [True, False])
def test_an_open_gate_is_the_plain_residual(norm_first):
    """W = 0, b = 40: sigmoid rounds to 1, and the gated model computes exactly what its plain twin computes."""
    plain = make(Plain(), norm_first).eval()
    gated = make(Gated(), norm_first).eval()
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".gate." in k for k in missing) and missing
    with torch.no_grad():
        for c in (m for m in gated.modules() if isinstance(m, GatedConnection)):
            c.gate.weight.zero_()
            c.gate.bias.fill_(40.0)
    seq = batch()
    torch.testing.assert_close(gated(seq), plain(seq), rtol=0, atol=0)


def test_gated_model_is_causal_keeps_padding_zero_and_trains_its_gates():
    model = make(Gated(), ffn="swiglu", ffn_multiplier=4).train()
    states = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda mod, args: states.append(args[0]))
    seq = batch()
    model(seq).square().mean().backward()
    for state in states[1:]:  # the state after the first block
        assert torch.equal(state[seq == 0], torch.zeros_like(state[seq == 0]))
    gates = [m.gate for m in model.modules() if isinstance(m, GatedConnection)]
    assert len(gates) == 4 and all(g.weight.grad.abs().sum() > 0 for g in gates)
    model.eval()
    out = model(seq)
    later = seq.clone()
    later[:2, 6:] = torch.randint(1, NUM_ITEMS + 1, (2, MAXLEN - 6))
    torch.testing.assert_close(model(later)[:2, :6], out[:2, :6])  # positions <= 5 ignore the future


@pytest.mark.parametrize("norm_first", [True, False])
def test_neutral_mhc_equals_plain_sasrec(norm_first):
    plain = make(Plain(), norm_first).eval()
    mhc = neutral_mhc_copy_of(plain, norm_first).eval()
    seq = batch()
    torch.testing.assert_close(mhc(seq), plain(seq), rtol=1e-5, atol=1e-5)


def test_neutral_mhc_equals_plain_tisasrec():
    tisasrec = pytest.importorskip("seqrec.models.tisasrec")
    seq = batch()
    times = (1_600_000_000 + torch.arange(MAXLEN) * 3600).expand_as(seq) * (seq != 0)
    scale = torch.full((seq.shape[0],), 600)
    plain = make(Plain(), True, tisasrec.TiSASRec, time_span=6).eval()
    mhc = neutral_mhc_copy_of(plain, True, tisasrec.TiSASRec, time_span=6).eval()
    torch.testing.assert_close(mhc(seq, times, scale), plain(seq, times, scale), rtol=1e-5, atol=1e-5)


def test_sum_readout_differs_from_mean_only_through_the_norm_eps():
    mean = neutral_mhc_copy_of(make(Plain()), True).eval()
    summed = make(MHC(init_gate=0.0, readout="sum")).eval()
    summed.load_state_dict(mean.state_dict())
    seq = batch()
    torch.testing.assert_close(summed(seq), mean(seq), rtol=1e-4, atol=1e-4)


def test_one_stream_is_the_plain_residual():
    plain = make(Plain()).eval()
    mhc = neutral_mhc_copy_of(plain, True, expansion_rate=1).eval()
    seq = batch()
    torch.testing.assert_close(mhc(seq), plain(seq), rtol=1e-5, atol=1e-5)
    for c in connections(mhc):
        assert torch.equal(c.last["res"], torch.ones(seq.shape + (1, 1)))  # H_res = [[1]]
    default = make(MHC(expansion_rate=1)).train()
    default(seq).sum().backward()  # the gated dynamic part alone: finite
    assert all(torch.isfinite(p.grad).all() for p in default.parameters() if p.grad is not None)


def test_gradients_reach_every_mapping_parameter():
    model = make(MHC()).train()
    model(batch()).square().mean().backward()
    S = 4
    for i, c in enumerate(connections(model)):
        for name in ("phi", "bias", "alpha", "gain"):
            grad = getattr(c, name).grad
            assert grad is not None and grad.abs().sum() > 0, (i, name)
        if i > 0:  # the first sublayer sees S equal streams: H_res and the H_pre mix cannot matter there yet
            assert c.bias.grad[:S].abs().sum() > 0 and c.bias.grad[2 * S :].abs().sum() > 0, i
        assert c.bias.grad[S : 2 * S].abs().sum() > 0, i


def test_causal_and_left_padding_invariant():
    model = make(MHC()).eval()
    seq = batch()
    out = model(seq)
    later = seq.clone()
    later[:2, 6:] = torch.randint(1, NUM_ITEMS + 1, (2, MAXLEN - 6))
    torch.testing.assert_close(model(later)[:2, :6], out[:2, :6])  # positions <= 5 ignore the future
    trimmed = model(seq[:2, 4:])  # same users, 4 fewer padding slots
    torch.testing.assert_close(trimmed[1], out[1, 4:], rtol=1e-5, atol=1e-5)


def test_padded_positions_are_zero_in_every_stream():
    model = make(MHC()).train()
    states = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda mod, args: states.append(args[0]))
    seq = batch()
    model(seq)
    assert len(states) == 2 and states[0].shape == seq.shape + (4, 16)
    for state in states:
        assert torch.equal(state[seq == 0], torch.zeros_like(state[seq == 0]))
    assert torch.isfinite(model(seq)).all()  # incl. the fully padded row


@pytest.mark.parametrize("fp32_mappings", [True, False])
def test_bf16_autocast_step_is_finite(fp32_mappings):
    model = make(MHC(fp32_mappings=fp32_mappings)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(batch()).float().square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if fp32_mappings:  # else only the mapping matmul runs in bf16 (the fp32 bias then promotes the logits)
        assert all(c.last["res"].dtype == torch.float32 for c in connections(model))


def test_diagnostics_at_init():
    model = make(MHC()).eval()
    model(batch())
    stats = MHC.diagnostics(model)
    assert len([k for k in stats if k.endswith("/res_row_min")]) == 4
    assert abs(stats["mhc/blocks.0.attn_connection/pre_mean"] - 0.25) < 0.01
    assert abs(stats["mhc/blocks.1.ffn_connection/post_mean"] - 1.0) < 0.02
    assert stats["mhc/blocks.0.attn_connection/alpha_res"] == pytest.approx(0.01)
    assert 1 - 1e-3 < stats["mhc/composite_fwd_gain"] < 1 + 1e-3
    assert 1 - 1e-2 < stats["mhc/composite_bwd_gain"] < 1 + 1e-2


def test_config_builds_a_picklable_factory_and_rejects_bad_values():
    node = OmegaConf.load(CONF / "residual" / "mhc.yaml")
    factory = instantiate(node, expansion_rate=2)
    assert isinstance(factory, MHC) and factory.expansion_rate == 2
    assert repr(pickle.loads(pickle.dumps(factory))) == repr(factory)
    with pytest.raises(ConfigError, match="readout"):
        MHC(readout="max")
    with pytest.raises(ConfigError, match="expansion_rate"):
        MHC(expansion_rate=0)
