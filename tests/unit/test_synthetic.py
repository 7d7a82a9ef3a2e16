"""The bundled synthetic dataset: deterministic, right size, power-law popularity, and a successor signal that only
the last time gap reveals."""

import time

import numpy as np
import pytest

from seqrec.data.dataset import synthetic
from seqrec.data.synthetic import EPOCH, generate


@pytest.fixture(scope="module")
def gen():
    start = time.perf_counter()
    s = generate(seed=0)
    return s, time.perf_counter() - start


def transitions(s):
    """(current item, next item, was the gap before the current item short) for x_t -> x_{t+1}, t >= 1."""
    same = s.users[1:] == s.users[:-1]
    idx = np.flatnonzero(same[:-1] & same[1:]) + 1  # x_t has a predecessor and a successor in its user
    return s.items[idx], s.items[idx + 1], s.short_gap[idx]


def test_deterministic_given_seed(gen):
    s, _ = gen
    again = generate(seed=0)
    for name in ("users", "items", "times", "succ_fast", "succ_slow"):
        assert np.array_equal(getattr(s, name), getattr(again, name)), name
    other = generate(seed=1)
    assert len(other.items) != len(s.items) or not np.array_equal(other.items, s.items)


def test_shapes_and_ranges(gen):
    s, seconds = gen
    assert seconds < 1.0, f"generation took {seconds:.2f} s"
    lengths = np.bincount(s.users, minlength=2000)
    assert len(lengths) == 2000 and lengths.min() >= 5 and lengths.max() <= 200
    assert 40 <= lengths.mean() <= 60 and 80_000 <= len(s.items) <= 120_000
    assert s.items.min() >= 1 and s.items.max() <= 1000
    assert (np.diff(s.users) >= 0).all()
    same = s.users[1:] == s.users[:-1]
    assert (np.diff(s.times)[same] > 0).all()  # strictly increasing within a user
    first = s.times[np.r_[0, np.flatnonzero(~same) + 1]]
    assert first.min() >= EPOCH and first.max() < EPOCH + 366 * 86400
    assert (s.succ_fast[1:] != s.succ_slow[1:]).all() and (s.succ_fast[1:] != np.arange(1, 1001)).all()


def test_power_law_popularity(gen):
    s, _ = gen
    counts = np.sort(np.bincount(s.items, minlength=1001)[1:])[::-1]
    assert counts[:100].sum() / counts.sum() > 0.6  # top 10% of items hold a clear majority
    assert counts[0] > 20 * np.median(counts)


def test_successor_follows_last_gap(gen):
    s, _ = gen
    cur, nxt, short = transitions(s)
    fast_after_short = (nxt[short] == s.succ_fast[cur[short]]).mean()
    slow_after_long = (nxt[~short] == s.succ_slow[cur[~short]]).mean()
    assert 0.70 < fast_after_short < 0.82 and 0.70 < slow_after_long < 0.82
    assert (nxt[short] == s.succ_slow[cur[short]]).mean() < 0.05
    assert (nxt[~short] == s.succ_fast[cur[~short]]).mean() < 0.05
    # ignoring the gap, each successor is right only about half of the time
    assert 0.30 < (nxt == s.succ_fast[cur]).mean() < 0.45 and 0.30 < (nxt == s.succ_slow[cur]).mean() < 0.45


def test_gap_is_visible_in_timestamps(gen):
    s, _ = gen
    same = s.users[1:] == s.users[:-1]
    gaps = np.diff(s.times)
    assert ((gaps[same] < 3600) == s.short_gap[1:][same]).mean() > 0.97  # < 1 h tells a short gap


def test_time_gaps_bimodal(gen):
    s, _ = gen
    same = s.users[1:] == s.users[:-1]
    gaps = np.diff(s.times)[same]
    short, middle, long = (
        (gaps < 3600).mean(),
        ((gaps >= 3600) & (gaps < 43200)).mean(),
        (gaps >= 43200).mean(),
    )
    assert 0.45 < short < 0.55 and long > 0.33 and middle < 0.15
    assert 300 < np.median(gaps[gaps < 3600]) < 900  # short mode ~ 10 min
    assert 86400 < np.median(gaps[gaps >= 43200]) < 4 * 86400  # long mode ~ days


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
