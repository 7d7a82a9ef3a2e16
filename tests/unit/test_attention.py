"""SASRec forward pass: causality, left-padding invariance, no padding leak, no NaN on empty rows; each with the
CPU's attention plug-in (float mask) and with CUDA's (rows rotated to right padding, is_causal, no mask tensor),
which runs on the CPU too."""

import pytest
import torch

from seqrec import kernels
from seqrec.models.sasrec import SASRec
from seqrec.nn.attention import causal_padding_mask


@pytest.fixture(autouse=True, params=["seqrec.kernels.attention:ATTENTION", "seqrec.kernels.causal_attention:CAUSAL"])
def attention_plugin(request, monkeypatch):
    monkeypatch.setitem(kernels.PLUGINS, ("attention", "cpu"), [request.param])
    with kernels.using("auto"):
        yield request.param


def make_model(norm_first: bool, **kw) -> SASRec:
    torch.manual_seed(0)
    model = SASRec(num_items=50, maxlen=12, hidden_units=16, num_heads=2, norm_first=norm_first, **kw)
    return model.eval()


def left_padded(rows: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([[0] * (width - len(r)) + r for r in rows])


@pytest.mark.parametrize("norm_first", [False, True])
def test_changing_future_items_never_changes_earlier_outputs(norm_first):
    model = make_model(norm_first)
    seq = left_padded([[3, 7, 9, 11, 2, 5], [1, 2, 3]], 12)
    changed = seq.clone()
    changed[:, -2:] = torch.tensor([[40, 41], [42, 43]])
    out, out_changed = model(seq), model(changed)
    assert torch.allclose(out[:, :-2], out_changed[:, :-2], atol=1e-6)
    assert not torch.allclose(out[:, -1], out_changed[:, -1])


@pytest.mark.parametrize("norm_first", [False, True])
def test_more_left_padding_never_changes_a_users_scores(norm_first):
    model = make_model(norm_first)
    rows = [[3, 7, 9, 11, 2, 5], [8, 1]]
    short, full = model(left_padded(rows, 6)), model(left_padded(rows, 12))
    assert torch.allclose(short[:, -1], full[:, -1], atol=1e-5)
    scores_short, scores_full = model.head.score_all(short[:, -1]), model.head.score_all(full[:, -1])
    assert torch.allclose(scores_short, scores_full, atol=1e-4)


def test_padding_embedding_does_not_leak_into_attention():
    """Even a non-zero padding embedding must not reach real positions (the key-padding mask)."""
    model = make_model(False)
    seq = left_padded([[3, 7, 9], [4, 5, 6, 7, 8]], 12)
    before = model(seq)
    with torch.no_grad():
        model.item_emb.weight[0].normal_()
        model.pos_emb.weight[0].normal_()
    after = model(seq)
    valid = seq != 0
    assert torch.allclose(before[valid], after[valid], atol=1e-6)


def test_fully_padded_rows_give_finite_outputs_and_masks_allow_self():
    model = make_model(True)
    seq = torch.zeros(2, 12, dtype=torch.long)
    seq[1, -1] = 4
    model.train()
    out = model(seq)
    assert torch.isfinite(out).all()
    mask = causal_padding_mask(seq != 0)
    assert mask[:, 0].diagonal(dim1=-2, dim2=-1).all()  # every query sees at least itself
    assert not mask[1, 0, -1, :-1].any()  # the real query sees no padded key


def test_longer_input_than_maxlen_is_rejected():
    with pytest.raises(ValueError, match="maxlen"):
        make_model(False)(torch.ones(1, 13, dtype=torch.long))
