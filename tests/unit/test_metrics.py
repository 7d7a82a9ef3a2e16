"""Metrics against hand-computed values, and the Evaluator's protocols on a dataset small enough to reason about."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from seqrec.data.dataset import split_leave_one_out
from seqrec.eval.evaluator import Evaluator
from seqrec.eval.metrics import metric_sums, rank_of_target
from seqrec.models.head import ItemHead


def test_metrics_match_hand_computed_values():
    ranks = torch.tensor([0, 1, 4, 9, 10, 30])
    sums = metric_sums(ranks, ks=[1, 5, 10])
    assert sums["hr@1"] == 1
    assert sums["hr@5"] == 3 and sums["hr@10"] == 4
    assert sums["ndcg@5"].item() == pytest.approx(1 + 1 / math.log2(3) + 1 / math.log2(6))
    assert sums["ndcg@10"].item() == pytest.approx(1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11))
    assert sums["mrr@10"].item() == pytest.approx(1 + 1 / 2 + 1 / 5 + 1 / 10)


def test_ties_count_against_the_target():
    scores = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    assert rank_of_target(scores, torch.tensor([2.0, 1.0])).tolist() == [2, 0]


class FixedScores(nn.Module):
    """Every user gets the same item scores: item i scores `scores[i]` (1-d hidden state, like Popularity)."""

    def __init__(self, scores):
        super().__init__()
        table = nn.Embedding.from_pretrained(torch.tensor(scores, dtype=torch.float32).unsqueeze(1))  # (I+1, 1)
        self.head = ItemHead(table, tied=False)

    def forward(self, seq, times=None, time_scale=None):
        return torch.ones(seq.shape + (1,))


def tiny_data():
    # user 0: 1 2 3 4 5 -> train [1 2 3], valid 4, test 5; user 1: 6 7 2 -> train [6], valid 7, test 2
    users = np.array([0] * 5 + [1] * 3)
    items = np.array([1, 2, 3, 4, 5, 6, 7, 2])
    return split_leave_one_out("tiny", users, items, None, np.array([10, 11]), np.arange(8))


def test_full_ranking_excludes_seen_items_and_ranks_the_target():
    data = tiny_data()
    # item scores: 7 > 6 > 5 > 4 > 3 > 2 > 1
    model = FixedScores([0, 1, 2, 3, 4, 5, 6, 7])
    ev = Evaluator(data, protocol="full", ks=[1, 2], maxlen=5)
    val = ev.evaluate(model, "valid")
    # user 0 valid 4: competitors not seen = {5, 6, 7} -> rank 3; user 1 valid 7: rank 0
    assert val["val/hr@1"] == pytest.approx(0.5)
    assert val["val/mrr@2"] == pytest.approx(0.5)
    test = ev.evaluate(model, "test")
    # user 0 test 5 (seen 1..4): {6, 7} above -> rank 2; user 1 test 2 (seen 6, 7): {3, 4, 5} above -> rank 3
    assert test["test/hr@2"] == 0.0
    assert test["test/ndcg@2"] == 0.0
    no_filter = Evaluator(data, protocol="full", ks=[10], maxlen=5, filter_seen=False).evaluate(model, "test")
    assert no_filter["test/mrr@10"] == pytest.approx((1 / 3 + 1 / 6) / 2)  # ranks 2 and 5


def test_sampled_protocol_equals_full_when_negatives_cover_every_unseen_item():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(30), 8)
    items = np.concatenate([rng.choice(np.arange(1, 41), 8, replace=False) for _ in range(30)])
    data = split_leave_one_out("r", users, items, None, np.arange(30), np.arange(41))
    model = FixedScores(rng.normal(size=41).tolist())
    full = Evaluator(data, protocol="full", ks=[5, 10], maxlen=8).evaluate(model, "test")
    sampled_ev = Evaluator(data, protocol="sampled", num_negatives=2000, ks=[5, 10], maxlen=8)
    sampled = sampled_ev.evaluate(model, "test")
    # with 2000 draws from <= 33 unseen items every unseen item is a candidate; duplicates count once
    # in the full ranking but several times in sampled, so compare hit rates only through rank 0 / misses
    assert sampled["test/hr@5"] <= full["test/hr@5"] + 1e-9
    negatives = sampled_ev.negatives("test")
    for u in range(30):
        seen = set(items[users == u])
        assert not seen & set(negatives[u].tolist())
        assert set(negatives[u].tolist()) == set(range(1, 41)) - seen


def test_sampled_negatives_are_fixed_per_seed_and_differ_across_seeds():
    data = tiny_data()
    a = Evaluator(data, protocol="sampled", num_negatives=5, seed=1).negatives("valid")
    b = Evaluator(data, protocol="sampled", num_negatives=5, seed=1).negatives("valid")
    c = Evaluator(data, protocol="sampled", num_negatives=5, seed=2).negatives("valid")
    assert (a == b).all() and not (a == c).all()


def test_sharded_evaluation_sums_to_the_single_process_numbers():
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(50), 6)
    items = rng.integers(1, 60, size=300)
    data = split_leave_one_out("r", users, items, None, np.arange(50), np.arange(60))
    model = FixedScores(rng.normal(size=60).tolist())
    whole = Evaluator(data, ks=[10], maxlen=6).evaluate(model, "test")
    sums = np.zeros(len(whole))
    for rank in range(3):
        part = Evaluator(data, ks=[10], maxlen=6, rank=rank, world_size=3)
        n = len(part.users("test")[rank::3])
        sums += np.array(list(part.evaluate(model, "test").values())) * n
    assert np.allclose(sums / len(data.eval_users("test")), list(whole.values()))


class PreviousScoring(Evaluator):
    """The evaluator's ranking as it was written before scoring moved into the model's head."""

    def _ranks(self, model, h, users, target, split):
        out = []
        weight = model.item_emb.weight.float()
        target_scores = (h * weight[target]).sum(-1)
        if self.protocol == "full":
            scores = h @ weight[1:].T
            rows = torch.arange(len(users), device=h.device)
            scores[rows, target - 1] = -torch.inf
            if self.filter_seen:
                r, items = self._seen(users, split)
                scores[r, items - 1] = -torch.inf
            out.append(rank_of_target(scores, target_scores))
        if self.needs_sampled:
            cand = torch.from_numpy(self.negatives(split)[users])
            out.append(rank_of_target(torch.einsum("bd,bnd->bn", h, weight[cand]), target_scores))
        return out


@pytest.mark.parametrize("protocol", ["full", "sampled"])
def test_a_model_gets_bitwise_the_metrics_of_the_previous_scoring(protocol):
    from seqrec.models.sasrec import SASRec

    rng = np.random.default_rng(2)
    users = np.repeat(np.arange(200), 12)
    items = np.concatenate([rng.choice(np.arange(1, 301), 12, replace=False) for _ in range(200)])
    data = split_leave_one_out("r", users, items, None, np.arange(200), np.arange(301))
    torch.manual_seed(0)
    model = SASRec(num_items=300, maxlen=12, hidden_units=16, num_blocks=1, num_heads=1, dropout_rate=0.0)
    kwargs = dict(protocol=protocol, num_negatives=50, ks=[1, 5, 10, 20], maxlen=12, also_sampled=True)
    for split in ("valid", "test"):
        now, before = Evaluator(data, **kwargs), PreviousScoring(data, **kwargs)
        assert now.evaluate(model, split) == before.evaluate(model, split)


# --- evaluation at scale: item-chunked full ranking, a fixed validation user sample --------------------------------


def random_data(num_users=120, num_items=90, per_user=10, seed=3):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(num_users), per_user)
    items = np.concatenate(
        [rng.choice(np.arange(1, num_items + 1), per_user, replace=False) for _ in users[::per_user]]
    )
    return split_leave_one_out("r", users, items, None, np.arange(num_users), np.arange(num_items + 1))


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("filter_seen", [True, False])
def test_item_chunked_ranking_is_bitwise_the_whole_catalogue_ranking(chunk, filter_seen):
    data = random_data()
    # scores on a coarse grid: many exact ties, which must count against the target in every block alike
    model = FixedScores((np.random.default_rng(4).integers(0, 6, size=91) / 2).tolist())
    kwargs = dict(ks=[1, 5, 10, 20], maxlen=10, filter_seen=filter_seen, batch_size=32)
    for split in ("valid", "test"):
        whole = PreviousScoringByHead(data, **kwargs).evaluate(model, split)
        assert Evaluator(data, item_chunk=chunk, **kwargs).evaluate(model, split) == whole


class PreviousScoringByHead(Evaluator):
    """Full ranking over the materialised (users, items) score matrix, as before the catalogue was chunked."""

    def _full_ranks(self, head, h, users, target, target_scores, split):
        scores = head.score_all(h)
        scores[torch.arange(len(users)), target - 1] = -torch.inf
        if self.filter_seen:
            r, items = self._seen(users, split)
            scores[r, items - 1] = -torch.inf
        return rank_of_target(scores, target_scores)


def test_validation_user_sample_is_fixed_per_seed_and_test_keeps_everyone():
    data = random_data()
    ev = Evaluator(data, valid_users=30, seed=5, maxlen=10)
    sample = ev.users("valid")
    assert len(sample) == 30 and len(set(sample.tolist())) == 30
    assert set(sample.tolist()) <= set(data.eval_users("valid").tolist())
    assert np.array_equal(np.sort(sample), np.sort(Evaluator(data, valid_users=30, seed=5, maxlen=10).users("valid")))
    assert np.array_equal(sample, ev.users("valid"))  # the same users every epoch
    other = Evaluator(data, valid_users=30, seed=6, maxlen=10).users("valid")
    assert set(other.tolist()) != set(sample.tolist())
    assert len(ev.users("test")) == len(data.eval_users("test"))  # test is never sampled
    assert len(Evaluator(data, valid_users=0, maxlen=10).users("valid")) == len(data.eval_users("valid"))
    model = FixedScores(np.random.default_rng(7).normal(size=91).tolist())
    assert ev.evaluate(model, "valid") == ev.evaluate(model, "valid")


# --- exact ranks whatever the blocks: near-ties are rescored with the target's own routine --------------------------


class HiddenByLastItem(nn.Module):
    """A 64-d model: the hidden state after a sequence is a fixed random vector of its last item, and the head
    scores a (I+1, 64) table, optionally with a bias. Rows of the table can be planted as exact copies."""

    def __init__(self, num_items: int, bias: bool = False, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.hidden = nn.Embedding.from_pretrained(torch.randn(num_items + 1, 64, generator=g))
        self.head = ItemHead(nn.Embedding.from_pretrained(torch.randn(num_items + 1, 64, generator=g)), tied=False)
        if bias:
            self.head.bias = nn.Parameter(torch.randn(num_items + 1, generator=g))

    def forward(self, seq, times=None, time_scale=None):
        return self.hidden(seq)


class EveryScoreByScoreOne(Evaluator):
    """The definition: every competitor scored by head.score_one, the routine that scores the target."""

    def _full_ranks(self, head, h, users, target, target_scores, split):
        items = torch.arange(1, head.num_items + 1).expand(len(users), -1)  # (b, I)
        scores = head.score_one(h[:, None, :], items)
        scores[torch.arange(len(users)), target - 1] = -torch.inf
        if self.filter_seen:
            r, seen = self._seen(users, split)
            scores[r, seen - 1] = -torch.inf
        return rank_of_target(scores, target_scores)


def planted_ties(model: HiddenByLastItem, data, copies: int = 40) -> None:
    """Copy the test (and validation) target rows of some users into other items' rows: exact ties, which must
    count against the target whatever block or kernel scores the copy."""
    weight = model.head.weight.data
    targets = np.unique(np.concatenate([data.test_item[data.test_item > 0], data.valid_item[data.valid_item > 0]]))
    free = np.setdiff1d(np.arange(1, model.head.num_items + 1), targets)
    for target, copy in zip(targets[:copies], free[:copies]):
        weight[copy] = weight[target]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk, batch", [(1, 32), (3, 7), (64, 1), (64, 32), (1000, 32)])
def test_full_ranking_is_score_one_everywhere_whatever_the_blocks(bias, chunk, batch):
    data = random_data(num_users=120, num_items=300, per_user=10)
    model = HiddenByLastItem(300, bias=bias)
    planted_ties(model, data)
    ks = [1, 5, 10, 299]  # max(ks) >= every rank: no user leaves early, every rank is compared
    for filter_seen in (True, False):
        kwargs = dict(ks=ks, maxlen=10, filter_seen=filter_seen, batch_size=batch)
        for split in ("valid", "test"):
            expected = EveryScoreByScoreOne(data, **kwargs).evaluate(model, split)
            assert Evaluator(data, item_chunk=chunk, **kwargs).evaluate(model, split) == expected


def test_an_exact_copy_of_the_target_counts_against_it():
    data = random_data(num_users=120, num_items=300, per_user=10)
    model = HiddenByLastItem(300)
    planted_ties(model, data, copies=300)
    with_copies = Evaluator(data, ks=[299], maxlen=10, filter_seen=False).evaluate(model, "test")
    model_without = HiddenByLastItem(300)
    without = Evaluator(data, ks=[299], maxlen=10, filter_seen=False).evaluate(model_without, "test")
    # every target has an exact copy ranked with it: each user's rank grows by one, never stays
    expected = EveryScoreByScoreOne(data, ks=[299], maxlen=10, filter_seen=False).evaluate(model, "test")
    assert with_copies == expected and with_copies["test/mrr@299"] < without["test/mrr@299"]


def test_count_at_least_rescores_exactly_the_near_ties():
    from seqrec.eval.metrics import count_at_least

    g = torch.Generator().manual_seed(0)
    exact = torch.randn(50, 400, generator=g)
    target = exact[:, 0].clone()
    exact[:, 1] = target  # an exact tie in every row
    exact[:, 2] = torch.nextafter(target, torch.tensor(-torch.inf))  # one ulp below: does not beat
    exact[:, 3] = torch.nextafter(target, torch.tensor(torch.inf))  # one ulp above: beats
    competitors = exact[:, 1:]
    tolerance = torch.full((50,), 1e-3)
    noisy = competitors + (torch.rand(competitors.shape, generator=g) - 0.5) * 1.9e-3  # off by < tolerance
    rescored = []

    def rescore(rows, cols):
        rescored.append(len(rows))
        return competitors[rows, cols]

    room = torch.full((50,), 10**6)
    counts = count_at_least(noisy, target, tolerance, room, rescore)
    assert counts.tolist() == (competitors >= target[:, None]).sum(-1).tolist()
    assert 0 < sum(rescored) < competitors.numel() / 10  # only the near-ties were rescored
