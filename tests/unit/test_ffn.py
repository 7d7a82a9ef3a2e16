"""The FFN sublayers: SASRec's ReLU FFN (inner width a multiple of D) and the SwiGLU FFN, and the model options."""

import pytest
import torch
import torch.nn.functional as F

from seqrec.models.sasrec import SASRec
from seqrec.nn.ffn import PointwiseFFN, SwiGLUFFN, make_ffn


def test_swiglu_is_a_gated_linear_unit_without_biases():
    torch.manual_seed(0)
    ffn = make_ffn("swiglu", 8, 0.5, 4).eval()
    assert isinstance(ffn, SwiGLUFFN)
    x = torch.randn(2, 5, 8)
    expected = (F.silu(x @ ffn.gate.weight.T) * (x @ ffn.up.weight.T)) @ ffn.out.weight.T
    torch.testing.assert_close(ffn(x), expected)
    assert sum(p.numel() for p in ffn.parameters()) == 3 * 8 * 32


def test_relu_ffn_keeps_sasrec_by_default_and_widens_with_the_multiplier():
    assert [p.shape for p in PointwiseFFN(8, 0.0).parameters()] == [(8, 8), (8,), (8, 8), (8,)]
    wide = make_ffn("relu", 8, 0.0, 4)
    assert [p.shape for p in wide.parameters()] == [(32, 8), (32,), (8, 32), (8,)]


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    ffn, x = make_ffn("swiglu", 8, 0.5, 2), torch.randn(4, 8)
    assert not torch.equal(ffn.train()(x), ffn.train()(x))
    assert torch.equal(ffn.eval()(x), ffn.eval()(x))


@pytest.mark.parametrize("ffn,multiplier", [("relu", 1), ("relu", 2), ("swiglu", 4)])
def test_the_model_builds_the_ffn_it_is_asked_for(ffn, multiplier):
    model = SASRec(num_items=30, maxlen=6, hidden_units=8, num_heads=1, ffn=ffn, ffn_multiplier=multiplier)
    if ffn == "relu":
        assert model.blocks[0].ffn.net[0].out_features == 8 * multiplier
    else:
        assert isinstance(model.blocks[0].ffn, SwiGLUFFN) and model.blocks[0].ffn.up.out_features == 32
    assert model(torch.tensor([[0, 0, 1, 2, 3, 4]])).shape == (1, 6, 8)
