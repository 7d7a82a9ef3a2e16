"""TiSASRec: bucketed attention == the naive (B, L, L, D) form; causality, padding, trimming, the no-time error."""

import pytest
import torch
from omegaconf import OmegaConf

from seqrec.errors import ConfigError
from seqrec.kernels.attention import keep_mask
from seqrec.models.sasrec import SASRec
from seqrec.models.tisasrec import TiSASRec, check_time_available
from seqrec.nn import residual as residual_module
from seqrec.nn.residual import Plain
from seqrec.nn.time_attention import TimeIntervalAttention

T0 = 1_600_000_000


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: on a busy 2-core machine OpenMP's thread hand-offs made these tests 50x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class NaiveTimeIntervalAttention(TimeIntervalAttention):
    """Reference only: gathers E^K[R], E^V[R] as (B, L, L, D) tensors, exactly the paper's equations."""

    def forward(self, x, ctx):
        B, L, D = x.shape
        H, ex = self.num_heads, ctx.extras
        q, k, v = self.qkv(x).view(B, L, 3, H, D // H).unbind(2)  # (B, L, H, Dh)
        R = ex["relation_index"].clamp(max=self.span)  # (B, L, L); masked pairs (k+1) may use any bucket
        ek = ex["time_k"][R].view(B, L, L, H, D // H)  # (B, L, L, H, Dh): the tensor the fast path avoids
        ev = ex["time_v"][R].view(B, L, L, H, D // H)
        kp = k + ex["pos_k"].view(B, L, H, -1)
        vp = v + ex["pos_v"].view(B, L, H, -1)
        # (H, B, L, L): the fast path's layout, so that dropout draws the same mask from the same RNG state
        logits = torch.einsum("bihd,bjhd->hbij", q, kp) + torch.einsum("bihd,bijhd->hbij", q, ek)
        logits = (logits / (D // H) ** 0.5).masked_fill(~ctx.attn_mask[:, 0], float("-inf"))
        a = logits.softmax(-1)
        if self.training:  # the fast path's cheap mask, drawn for all heads at once (the same random stream)
            a = a * keep_mask(a.shape, self.dropout, a.device) / (1 - self.dropout)
        y = torch.einsum("hbij,bjhd->bihd", a, vp) + torch.einsum("hbij,bijhd->bihd", a, ev)
        return self.out(y.reshape(B, L, D))


class NaiveTiSASRec(TiSASRec):
    def make_attention(self):
        attn = NaiveTimeIntervalAttention(self.dim, self.num_heads, self.dropout_rate)
        attn.span = self.time_span
        return attn


def make(cls=TiSASRec, **kw):
    args = dict(num_items=30, maxlen=12, hidden_units=8, num_blocks=2, num_heads=2, dropout_rate=0.3, time_span=6)
    args.update(kw)
    return cls(**args)


def batch(B=4, L=12, seed=0, num_items=30):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, num_items + 1, (B, L), generator=g)
    lengths = torch.tensor([L, L - 3, 2, 1][:B] + [L] * max(0, B - 4))
    seq[torch.arange(L) < (L - lengths)[:, None]] = 0  # left padding, incl. a 1-item user
    gaps = torch.randint(0, 3 * 3600, (B, L), generator=g)
    gaps[:, 3] = 0  # a tie
    times = (T0 + gaps.cumsum(1)) * (seq != 0)
    return seq, times, torch.full((B,), 600)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("unit", ["hour", "personal"])
def test_bucketed_attention_equals_naive_outputs_and_gradients(dtype, tol, norm_first, unit):
    torch.manual_seed(0)
    fast = make(norm_first=norm_first, time_unit=unit).to(dtype).eval()
    naive = make(NaiveTiSASRec, norm_first=norm_first, time_unit=unit).to(dtype).eval()
    naive.load_state_dict(fast.state_dict())
    seq, times, scale = batch()
    assert fast.context(seq, times, scale).extras["relation_index"].unique().numel() > 3  # several buckets in play
    outs = []
    for model in (fast, naive):
        h = model(seq, times, scale)
        (h * torch.linspace(-1, 1, h.numel(), dtype=dtype).view_as(h)).sum().backward()
        outs.append((h, {n: p.grad for n, p in model.named_parameters()}))
    (h_fast, g_fast), (h_naive, g_naive) = outs
    torch.testing.assert_close(h_fast, h_naive, rtol=tol, atol=tol)
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_naive[name], rtol=tol, atol=tol, msg=name)
    assert g_fast["time_k.weight"].abs().sum() > 0 and g_fast["time_v.weight"].abs().sum() > 0


def test_dropout_placement_keeps_the_equivalence_in_train_mode():
    # table dropout (one mask per bucket) and attention-weight dropout exist in both forms, drawn in the same order
    fast, naive = make().double().train(), make(NaiveTiSASRec).double().train()
    naive.load_state_dict(fast.state_dict())
    seq, times, scale = batch()
    outs = []
    for model in (fast, naive):
        torch.manual_seed(7)
        h = model(seq, times, scale)
        (h * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view_as(h)).sum().backward()
        outs.append((h, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-10)
    for g_fast, g_naive in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(g_fast, g_naive, rtol=1e-10, atol=1e-10)


def test_causality_future_items_and_times_never_change_the_past():
    torch.manual_seed(0)
    model = make().double().eval()
    seq, times, scale = batch()
    h = model(seq, times, scale)
    t = 7
    seq2, times2 = seq.clone(), times.clone()
    seq2[:, t + 1 :] = torch.randint(1, 31, seq2[:, t + 1 :].shape)
    times2[:, t + 1 :] += 10**6
    h2 = model(seq2, times2, scale)
    torch.testing.assert_close(h2[:, : t + 1], h[:, : t + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(h2[:, t + 1 :], h[:, t + 1 :])


@pytest.mark.parametrize("norm_first", [False, True])
def test_more_left_padding_or_trimming_never_changes_the_last_output(norm_first):
    torch.manual_seed(0)
    model = make(maxlen=20, norm_first=norm_first).double().eval()
    seq, times, scale = batch(B=3, L=9)
    pad = torch.zeros(3, 11, dtype=torch.long)
    h_trim = model(seq, times, scale)[:, -1]  # (B, D) from a window of 9
    h_full = model(torch.cat([pad, seq], 1), torch.cat([pad, times], 1), scale)[:, -1]  # window of 20
    torch.testing.assert_close(h_full, h_trim, rtol=0, atol=1e-12)


def test_train_mode_with_dropout_is_finite_and_reaches_every_table():
    torch.manual_seed(0)
    model = make().train()
    seq, times, scale = batch()
    seq[2], times[2] = 0, 0  # a fully padded row must not give NaN
    h = model(seq, times, scale)
    h.pow(2).sum().backward()
    assert torch.isfinite(h).all()
    for name in ("pos_k", "pos_v", "time_k", "time_v"):
        assert getattr(model, name).weight.grad.abs().sum() > 0, name
    assert model.pos_k.weight.grad[0].abs().sum() == 0  # the padding position row stays untouched


def test_works_behind_the_mhc_residual_and_under_bf16_autocast():
    mhc = getattr(residual_module, "MHC", None)
    if mhc is None:
        pytest.skip("no MHC residual yet")
    torch.manual_seed(0)
    seq, times, scale = batch()
    model = make(residual=mhc(), norm_first=True).train()
    h = model(seq, times, scale)
    h.pow(2).sum().backward()
    assert torch.isfinite(h).all() and model.time_v.weight.grad.abs().sum() > 0
    model = make().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model(seq, times, scale)
    h.float().pow(2).sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(model.time_k.weight.grad).all()


def test_no_timestamps_is_a_config_error_naming_the_fix():
    model = make()
    seq, _, _ = batch()
    with pytest.raises(ConfigError, match="model=sasrec"):
        model(seq)
    with pytest.raises(ConfigError, match="dataset 'beauty' has none.*model=sasrec"):
        check_time_available(False, "beauty")
    check_time_available(True, "ml1m")
    assert TiSASRec.requires_time and not getattr(SASRec, "requires_time", False)
    with pytest.raises(ConfigError, match="time_unit"):
        make(time_unit="week")


def test_yaml_node_builds_the_model_with_sasrec_keys_plus_time_keys():
    from tests.conftest import compose_config

    cfg = compose_config(["model=tisasrec"]).model  # the node as composed: sasrec.yaml's keys are inherited
    sasrec_keys = set(OmegaConf.load("conf/model/sasrec.yaml")) - {"_target_"}
    assert set(cfg) - {"_target_"} == sasrec_keys | {"time_unit", "time_span"}
    assert (cfg.time_unit, cfg.time_span) == ("hour", 100)
    kwargs = {k: cfg[k] for k in cfg if k not in ("_target_", "num_items", "residual")}
    model = TiSASRec(num_items=10, residual=Plain(), **kwargs)
    assert model.time_k.num_embeddings == 101 and not hasattr(model, "pos_emb")


def test_scores_use_the_shared_item_table():
    model = make().eval()
    seq, times, scale = batch()
    h = model(seq, times, scale)[:, -1]
    assert model.head.score_all(h).shape == (4, 30)
    torch.testing.assert_close(model.head.score_all(h), h @ model.item_emb.weight[1:].T)
    cands = torch.randint(1, 31, (4, 5))
    torch.testing.assert_close(model.head.score(h, cands), model.head.score_all(h).gather(1, cands - 1))


def gap_task(n, L=8, seed=0):
    """Next item = 1 after a short gap (5 min), 2 after a long one (3 days); inputs are random items 3..20."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(3, 21, (n, L), generator=g)
    short = torch.rand(n, L, generator=g) < 0.5
    gaps = torch.where(short, 300, 3 * 86_400)
    times = T0 + gaps.cumsum(1)
    return seq, times, torch.where(short, 1, 2)  # target[t] depends on the gap between seq[t-1] and seq[t]


@pytest.mark.parametrize("cls, expect_time_signal", [(TiSASRec, True), (SASRec, False)])
def test_the_time_signal_reaches_the_prediction(cls, expect_time_signal):
    torch.manual_seed(0)
    kw = dict(num_items=20, maxlen=8, hidden_units=16, num_blocks=1, num_heads=1, dropout_rate=0.0)
    model = cls(**kw, **({"time_span": 10} if cls is TiSASRec else {}))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    seq, times, target = gap_task(256)
    scale = torch.ones(len(seq), dtype=torch.long)
    for _ in range(150):
        logits = model.head.score_all(model(seq, times, scale)[:, 1:].reshape(-1, 16))  # positions with a previous gap
        loss = torch.nn.functional.cross_entropy(logits, target[:, 1:].reshape(-1) - 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seq, times, target = gap_task(512, seed=1)
    with torch.no_grad():
        pred = model.head.score_all(model(seq, times, scale[:1].expand(512))[:, -1]).argmax(-1) + 1
    accuracy = (pred == target[:, -1]).float().mean().item()
    assert accuracy > 0.95 if expect_time_signal else accuracy < 0.65, accuracy
