"""The item head is the one place where scores are made: its shapes, its tie to the input embedding, and a model
with an output bias (defined here, in this file only) that trains, evaluates and recommends through it."""

import copy

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from seqrec.data.dataset import split_leave_one_out
from seqrec.eval.evaluator import Evaluator
from seqrec.models.head import ItemHead
from seqrec.models.sasrec import SASRec
from seqrec.predict import recommend
from seqrec.run import run
from tests.conftest import REPO, TINY, compose_config, train_cli
from tests.unit.test_metrics import FixedScores


class SASRecWithBias(SASRec):
    """SASRec with a learned per-item output bias: score(h, i) = h · E[i] + b[i]."""

    def make_head(self) -> ItemHead:
        return ItemHead(self.item_emb, tied=True, bias=True)


BIASED_TARGET = "tests.unit.test_item_head.SASRecWithBias"  # importable from the repository root, in any process


def small_model(cls=SASRec, num_items=30, seed=0):
    torch.manual_seed(seed)
    return cls(num_items=num_items, maxlen=8, hidden_units=16, num_blocks=1, num_heads=1, dropout_rate=0.0).eval()


def random_data(num_users=40, num_items=30, length=9, seed=0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(num_users), length)
    items = np.concatenate([rng.choice(np.arange(1, num_items + 1), length, replace=False) for _ in range(num_users)])
    return split_leave_one_out("r", users, items, None, np.arange(num_users), np.arange(num_items + 1))


# --- the head ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SASRec, SASRecWithBias])
def test_every_scoring_path_agrees_with_score_all(cls):
    model = small_model(cls)
    if cls is SASRecWithBias:
        torch.nn.init.normal_(model.head.bias)
    head = model.head
    h = torch.randn(3, 5, 16)  # (B, L, D)
    every = head.score_all(h)  # (B, L, I)
    assert every.shape == (3, 5, 30)

    def gathered(items):  # (B, L, K) -> the same scores read from score_all
        return every.gather(-1, items - 1)

    per_position = torch.randint(1, 31, (3, 5, 4))
    torch.testing.assert_close(head.score(h, per_position), gathered(per_position))
    shared = torch.randint(1, 31, (3, 6))  # one candidate set per sequence, for all of its positions
    torch.testing.assert_close(head.score(h, shared), gathered(shared[:, None, :].expand(3, 5, 6)))
    targets = torch.randint(1, 31, (3, 5))
    torch.testing.assert_close(head.score_one(h, targets), gathered(targets[..., None]).squeeze(-1))
    weight, bias = head.linear()
    expected = h @ weight.T + (bias if bias is not None else 0)
    torch.testing.assert_close(every, expected)


def test_candidates_that_do_not_index_the_hidden_states_are_refused():
    head = small_model().head
    with pytest.raises(ValueError, match="do not index the leading dims"):
        head.score(torch.randn(3, 5, 16), torch.randint(1, 31, (4, 2)))


def test_the_tied_head_is_the_input_embedding_and_adds_nothing_to_checkpoints():
    model = small_model()
    assert model.head.weight is model.item_emb.weight
    assert not [k for k in model.state_dict() if k.startswith("head.")]  # checkpoints from before still load
    assert len(list(model.parameters())) == len(list(model.head.parameters())) + len(
        [p for name, p in model.named_parameters() if not name.startswith("head.")]
    )
    twin = copy.deepcopy(model)
    assert twin.head.weight is twin.item_emb.weight and twin.head.weight is not model.head.weight
    biased = small_model(SASRecWithBias)
    assert list(biased.state_dict())[-1] == "head.bias"  # a head's own parameters come last
    assert biased.head.bias.shape == (31,) and biased.head.bias.abs().sum() == 0


# --- a model with an output bias, through the trainer, the evaluator and predict ------------------------------------


@pytest.mark.parametrize("loss", ["bce", "ce", "sampled_softmax", "gbce"])
def test_a_biased_model_trains_under_every_loss(loss, tmp_path):
    overrides = TINY + [f"loss={loss}", "model=sasrec", "residual=plain", f"model._target_={BIASED_TARGET}"]
    cfg = compose_config(overrides + ["trainer.num_epochs=1", "eval.also_sampled=true"], tmp_path)
    results = run(cfg)
    assert np.isfinite(results["val/ndcg@10"]) and np.isfinite(results["val_sampled/ndcg@10"])
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    bias = state["head.bias"]
    assert torch.isfinite(bias).all() and bias[1:].abs().sum() > 0  # trained
    model = instantiate(cfg.model, num_items=bias.shape[0] - 1)
    model.load_state_dict(state)  # the checkpoint rebuilds the biased model


def dominated_by_bias(data, seed=0):
    """A biased model whose bias (1000 x a random permutation) outweighs every h · E[i] (|h · E[i]| < 100)."""
    model = small_model(SASRecWithBias, num_items=data.num_items, seed=seed)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(data.num_items + 1)).float()
    with torch.no_grad():
        model.head.bias.copy_(1000.0 * order)
        h = model(torch.randint(1, data.num_items + 1, (64, 8)))
        assert (h @ model.item_emb.weight.T).abs().max() < 100
    return model, order


@pytest.mark.parametrize("protocol", ["full", "sampled"])
def test_evaluation_ranks_by_the_bias_when_it_dominates(protocol):
    data = random_data()
    model, order = dominated_by_bias(data)
    evaluator = Evaluator(data, protocol=protocol, num_negatives=10, ks=[1, 5, 10], maxlen=8, also_sampled=True)
    for split in ("valid", "test"):
        assert evaluator.evaluate(model, split) == evaluator.evaluate(FixedScores(order.tolist()), split)


def test_recommend_ranks_by_the_bias_and_never_returns_a_seen_item():
    data = random_data()
    model, order = dominated_by_bias(data)
    users = np.arange(data.num_users)
    items, _ = recommend(data, model, users, k=3, maxlen=8)
    for u in users:
        seen = set(data.user_history(u)) | {data.valid_item[u], data.test_item[u]}
        unseen = [i for i in np.argsort(-order.numpy()) if i != 0 and i not in seen]
        assert items[u].tolist() == unseen[:3]


def test_a_huge_bias_puts_its_item_first_for_every_user_who_has_not_seen_it():
    data = random_data()
    model = small_model(SASRecWithBias, num_items=data.num_items)
    with torch.no_grad():
        model.head.bias[7] = 1e4
    users = np.arange(data.num_users)
    items, _ = recommend(data, model, users, k=2, maxlen=8)
    seen_7 = np.array([7 in set(data.user_history(u)) | {data.valid_item[u], data.test_item[u]} for u in users])
    assert 0 < seen_7.sum() < len(users)  # both kinds of user are tested
    assert (items[~seen_7, 0] == 7).all() and not (items[seen_7] == 7).any()


@pytest.mark.slow
def test_a_biased_model_trains_under_ddp_with_identical_replicas(tmp_path):
    """The bias is used only by the loss, outside DDP's forward: its gradient must still be all-reduced."""
    run_dir = tmp_path / "ddp"
    overrides = [*TINY, "hardware=cpu", "trainer.devices=2", "model=sasrec", "residual=plain"]
    proc = train_cli(*overrides, f"model._target_={BIASED_TARGET}", run_dir=run_dir, cwd=tmp_path, timeout=180,
                     env={"PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parameters identical on all 2 ranks" in (run_dir / "train.log").read_text()
    bias = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]["head.bias"]
    assert bias[1:].abs().sum() > 0
