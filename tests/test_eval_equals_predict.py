"""Evaluation equals inference: the test-split ranks `seqrec.predict` gives a user are the ranks the Evaluator scores.

The two differ by design in two ways, and the comparison removes exactly those:
- predict's input is the user's whole known sequence (train, validation and test items), the evaluator's input for
  the test target is the history up to it (train + validation item). So predict is run on the data with the test
  targets held out, which makes its input the evaluator's.
- predict never recommends an item the user has already seen; the full-ranking evaluator (filter_seen) excludes seen
  items too, except the target itself when it repeats an earlier item, which stays rankable. So the exact match is
  over users whose test target is new to them; for the others the test checks the documented difference.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from seqrec.eval.evaluator import Evaluator
from seqrec.eval.user_ranks import read_test_ranks
from seqrec.predict import load_run, recommend
from seqrec.results import user_metric
from seqrec.run_dirs import read_run
from tests.test_predict import train_run

KS = [1, 5, 10]


@pytest.fixture(scope="module", params=["sasrec", "tisasrec"])
def trained_dir(request, tmp_path_factory):
    """A tiny trained run on a timestamped file where every 4th user's last item repeats an earlier one."""
    root = tmp_path_factory.mktemp(f"eval_predict_{request.param}")
    rng = np.random.default_rng(1)
    lines = []
    for u in range(48):
        items = list(rng.choice(np.arange(1, 41), size=rng.integers(5, 14), replace=False))
        if u % 4 == 0:
            items.append(items[0])  # a repeat as the test target
        lines += [f"{u} {i} {1_000_000 + 3600 * t + 60 * (t % 3)}" for t, i in enumerate(items)]
    (root / "interactions.txt").write_text("\n".join(lines) + "\n")
    return train_run(
        root / "run", ["dataset=file", f"dataset.path={root / 'interactions.txt'}", f"model={request.param}"]
    )


@pytest.fixture(scope="module")
def trained(trained_dir):
    return load_run(trained_dir)


def held_out_test(data):
    """The data with no test targets: predict's input is then train + validation item, the evaluator's test input."""
    zeros = np.zeros_like(data.test_item)
    return dataclasses.replace(data, test_item=zeros, test_time=None if data.test_time is None else zeros)


def seen_before_test(data, u: int) -> np.ndarray:
    return np.append(data.user_history(u), data.valid_item[u])


def predict_positions(data, model, users: np.ndarray, maxlen: int) -> np.ndarray:
    """(B,) 0-based position of each user's test target in predict's full ranking of unseen items (-1: absent)."""
    items, scores = recommend(held_out_test(data), model, users, k=data.num_items, maxlen=maxlen)
    ranked = [row[np.isfinite(s)] for row, s in zip(items, scores, strict=True)]  # drop the masked (seen) items
    return np.array([int(np.flatnonzero(r == data.test_item[u])[0]) if data.test_item[u] in r else -1
                     for r, u in zip(ranked, users, strict=True)])  # fmt: skip


def metric_means(ranks: np.ndarray) -> dict[str, float]:
    ranks = ranks.astype(np.float64)
    out = {}
    for k in KS:
        hit = ranks < k
        out[f"test/hr@{k}"] = hit.mean()
        out[f"test/ndcg@{k}"] = (hit / np.log2(ranks + 2)).mean()
        out[f"test/mrr@{k}"] = (hit / (ranks + 1)).mean()
    return out


def test_predict_ranks_give_the_evaluators_test_metrics(trained):
    data, model, cfg = trained
    maxlen = int(cfg["model"]["maxlen"])
    users = data.eval_users("test")
    repeat = np.array([data.test_item[u] in seen_before_test(data, u) for u in users])
    assert repeat.any() and (~repeat).sum() >= 20
    new = users[~repeat]

    positions = predict_positions(data, model, new, maxlen)
    assert (positions >= 0).all()

    # the evaluator on exactly these users (the others' test targets removed): same means
    only_new = dataclasses.replace(data, test_item=np.where(np.isin(np.arange(data.num_users), new), data.test_item, 0))
    evaluator = Evaluator(only_new, protocol="full", ks=KS, filter_seen=True, maxlen=maxlen)
    reported = evaluator.evaluate(model, "test")
    expected = metric_means(positions)
    for key, value in expected.items():
        assert reported[key] == pytest.approx(value, abs=1e-12), key

    # and per user: the evaluator's pessimistic rank of each target is predict's position
    order = evaluator.users("test")
    with torch.no_grad():
        h = evaluator._last_hidden(model, order, "test", "cpu")
        ranks = evaluator._ranks(model, h, order, torch.from_numpy(data.test_item[order]), "test")[0].numpy()
    assert dict(zip(order.tolist(), ranks.tolist(), strict=True)) == dict(
        zip(new.tolist(), positions.tolist(), strict=True)
    )


def test_a_repeated_test_target_is_ranked_by_the_evaluator_but_never_recommended(trained):
    data, model, cfg = trained
    users = data.eval_users("test")
    repeat = users[[data.test_item[u] in seen_before_test(data, u) for u in users]]
    assert (
        predict_positions(data, model, repeat, int(cfg["model"]["maxlen"])) == -1
    ).all()  # predict masks every seen item


def test_the_run_keeps_the_ranks_its_test_metrics_came_from(trained_dir, trained):
    """test_ranks.npy holds, per test user by index, the evaluator's rank of the target (counted up to max(ks)), and
    gives the run's results.json metrics: what `seqrec.results --over users` pairs."""
    data, model, cfg = trained
    records = read_test_ranks(trained_dir)
    users = data.eval_users("test")
    assert records["user"].tolist() == sorted(users.tolist())
    evaluator = Evaluator(data, protocol="full", ks=[5, 10, 20], filter_seen=True, maxlen=int(cfg["model"]["maxlen"]))
    with torch.no_grad():
        h = evaluator._last_hidden(model, records["user"], "test", "cpu")
        ranks = evaluator._ranks(model, h, records["user"], torch.from_numpy(data.test_item[records["user"]]), "test")
    assert records["rank"].tolist() == ranks[0].clamp(max=20).tolist()
    results = json.loads((trained_dir / "results.json").read_text())
    for metric in ("test/ndcg@10", "test/hr@5", "test/mrr@20"):
        values = user_metric(read_run(trained_dir), metric)  # checks the file against results.json itself
        assert values.mean() == pytest.approx(results[metric], abs=1e-12)
