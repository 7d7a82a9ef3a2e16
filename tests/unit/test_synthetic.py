"""The bundled synthetic dataset: deterministic, right size, power-law popularity, and a habit ("the successor of
what I did a day ago") that the timestamps locate but positions do not."""

import numpy as np
import pytest

from seqrec.data.dataset import synthetic
from seqrec.data.synthetic import EPOCH, RULE_DRAW, RULE_HABIT, RULE_SUCC, generate
from seqrec.errors import ConfigError


@pytest.fixture(scope="module")
def gen():
    return generate(seed=0)  # how fast: bench/bench_synthetic.py


def day_ago_anchors(s):
    """For every x_{t+1} (t >= 0): the index of x_t, of its anchor and of the user's first item.

    The anchor is recomputed here from the timestamps alone: the latest earlier interaction of the same user at
    least habit_lag_seconds before x_t (-1 if none)."""
    n = len(s.items)
    start = np.r_[0, np.flatnonzero(np.diff(s.users)) + 1]
    first = np.repeat(start, np.diff(np.r_[start, n]))  # index of each interaction's user's first interaction
    anchor = np.full(n, -1)
    for lo, hi in zip(start, np.r_[start[1:], n]):
        t = s.times[lo:hi]
        anchor[lo:hi] = lo + np.searchsorted(t, t - s.habit_lag_seconds, side="right") - 1
    anchor[anchor < first] = -1
    cur = np.flatnonzero(np.r_[s.users[1:] == s.users[:-1], False])  # x_t with a next item in its user
    return cur, anchor[cur], first[cur]


def test_deterministic_given_seed(gen):
    s = gen
    again = generate(seed=0)
    for name in ("users", "items", "times", "succ", "succ_habit", "rule"):
        assert np.array_equal(getattr(s, name), getattr(again, name)), name
    other = generate(seed=1)
    assert len(other.items) != len(s.items) or not np.array_equal(other.items, s.items)


def test_shapes_and_ranges(gen):
    s = gen
    lengths = np.bincount(s.users, minlength=2000)
    assert len(lengths) == 2000 and lengths.min() >= 5 and lengths.max() <= 200
    assert 40 <= lengths.mean() <= 60 and 80_000 <= len(s.items) <= 120_000
    assert s.items.min() >= 1 and s.items.max() <= 1000
    assert (np.diff(s.users) >= 0).all()
    same = s.users[1:] == s.users[:-1]
    assert (np.diff(s.times)[same] > 0).all()  # strictly increasing within a user
    first = s.times[np.r_[0, np.flatnonzero(~same) + 1]]
    assert first.min() >= EPOCH and first.max() < EPOCH + 366 * 86400
    items = np.arange(1, 1001)
    assert (s.succ[1:] != items).all() and (s.succ_habit[1:] != items).all() and (s.succ[1:] != s.succ_habit[1:]).all()
    assert np.array_equal(np.sort(s.succ_habit[1:]), items)  # a permutation: habit targets are spread evenly


def test_power_law_popularity(gen):
    s = gen
    counts = np.sort(np.bincount(s.items, minlength=1001)[1:])[::-1]
    # top 10% of items hold 0.36 (uniform: 0.10): the popularity draws are a third of the data, the habit and
    # successor targets are spread evenly
    assert counts[:100].sum() / counts.sum() > 0.3
    assert counts[0] > 20 * np.median(counts)


def test_rule_mix(gen):
    s = gen
    share = np.bincount(s.rule, minlength=3) / len(s.rule)
    # measured draw / succ / habit 0.33 / 0.31 / 0.36: the habit fires on a third of all interactions, and the
    # rest stays learnable by SASRec
    assert 0.28 < share[RULE_HABIT] < 0.45 and 0.22 < share[RULE_SUCC] < 0.4 and 0.25 < share[RULE_DRAW] < 0.42


def test_habit_target_is_the_successor_of_the_item_a_day_before_the_current_one(gen):
    s = gen
    cur, anchor, first = day_ago_anchors(s)
    nxt, rule = s.items[cur + 1], s.rule[cur + 1]
    has = anchor >= 0
    hit = has & (nxt == s.succ_habit[s.items[np.maximum(anchor, 0)]])
    habit = rule == RULE_HABIT
    assert (hit[habit]).all() and habit[~has].sum() == 0  # every habit item is exactly the timestamp rule's target
    assert hit.mean() > 0.3  # measured 0.37 of all next items
    # the habit never repeats an item: its targets are always rankable under eval.filter_seen
    user_start = np.r_[0, np.flatnonzero(np.diff(s.users)) + 1]
    for lo, hi in zip(user_start[:200], user_start[1:201]):
        seen_before = [s.items[k] in s.items[lo:k] for k in range(lo, hi) if s.rule[k] == RULE_HABIT]
        assert not any(seen_before)


def test_positions_alone_do_not_locate_the_anchor(gen):
    s = gen
    cur, anchor, first = day_ago_anchors(s)
    habit = s.rule[cur + 1] == RULE_HABIT
    steps_back = (cur - anchor)[habit]
    share = np.bincount(steps_back) / len(steps_back)
    # measured: 2-7 steps back, the most common step count (4) holds 0.28, 90% lie within 6 steps (so inside the
    # maxlen windows the tests train with)
    assert share.max() < 0.35 and (share > 0.05).sum() >= 5
    assert np.quantile(steps_back, 0.9) <= 8
    # ...so a positions-only guess, "the habit successor of the item at the most common step count", is mostly wrong
    k = int(share.argmax())
    guess_ok = (cur - k >= first) & (s.items[cur + 1] == s.succ_habit[s.items[np.maximum(cur - k, 0)]])
    assert guess_ok[habit].mean() < 0.35


def test_anchor_is_within_tisasrecs_default_time_span(gen):
    s = gen
    cur, anchor, first = day_ago_anchors(s)
    habit = (s.rule[cur + 1] == RULE_HABIT) & (anchor >= 0)
    hours = (s.times[cur] - s.times[anchor])[habit] // 3600
    assert hours.min() >= 24  # the hour bucket of the anchor interval is >= the lag...
    # ...and almost always below model.time_span=100, where buckets clip (measured q99 = 37 h)
    assert np.quantile(hours, 0.99) < 100
    # the next-earlier interaction is in a later (larger) bucket most of the time, so "the smallest bucket >= 24"
    # singles the anchor out
    before = anchor[habit] - 1
    ok = before >= first[habit]
    later = (s.times[cur[habit]] - s.times[np.maximum(before, 0)]) // 3600 > hours
    assert later[ok].mean() > 0.9  # measured 0.98


def test_factory_returns_seqdata():
    d = synthetic(num_users=300, num_items=100, seed=3)
    assert d.name == "synthetic" and d.has_time
    assert (d.num_users, d.num_items) == (300, 100)
    assert d.item_ids.tolist() == list(range(101)) and d.user_ids.tolist() == list(range(300))
    assert len(d.eval_users("test")) == 300  # min_length 5 >= 3
    assert d.test_item.min() >= 1 and d.test_item.max() <= 100
    assert (d.test_time > d.valid_time).all()
    assert "timestamps yes" in d.summary()
    same = synthetic(num_users=300, num_items=100, seed=3)
    assert np.array_equal(same.train_items, d.train_items) and np.array_equal(same.train_times, d.train_times)


def test_tiny_catalogue_still_generates():
    s = generate(num_users=5, num_items=3, seed=0)
    assert (s.succ[1:] != np.arange(1, 4)).all() and (s.succ[1:] != s.succ_habit[1:]).all()


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"num_users": 0}, "dataset.num_users=0: must be >= 1"),
        ({"num_items": 2}, "dataset.num_items=2: must be >= 3"),
        ({"seed": -1}, "dataset.seed=-1: must be >= 0"),
        ({"p_habit": float("nan")}, "dataset.p_habit=nan: must be a finite number"),
        ({"min_length": 10, "max_length": 5}, "dataset.min_length=10: must be <= dataset.max_length=5"),
    ],
)
def test_impossible_settings_are_config_errors_naming_the_key(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        synthetic(**{"num_users": 10, "num_items": 10, **kwargs})
    assert needle in str(err.value) and "\n" not in str(err.value)
