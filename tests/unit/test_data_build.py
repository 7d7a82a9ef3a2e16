"""`build` (sort, duplicates, filters, id maps) against its definition written the plain way: np.lexsort for the
order, np.unique for the ids. The fast path (one packed stable sort, run-length user ids, block-scanned item ids)
must give the same arrays, bit for bit."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest

from seqrec.data import readers
from seqrec.data.dataset import build, find_duplicates, split_leave_one_out


def reference_build(table: readers.Interactions, min_item: int = 0, min_user: int = 0) -> object:
    users, items, times, lines = table.users, table.items, table.times, table.lines
    order = np.argsort(users, kind="stable") if times is None else np.lexsort((times, users))
    users, items, lines = users[order], items[order], lines[order]
    times = None if times is None else times[order]
    keep = ~find_duplicates(users, items, times, lines, table.source, "drop")
    if min_item > 1:
        _, inverse, counts = np.unique(items[keep], return_inverse=True, return_counts=True)
        keep[keep] = counts[inverse] >= min_item
    if min_user > 1:
        _, inverse, counts = np.unique(users[keep], return_inverse=True, return_counts=True)
        keep[keep] = counts[inverse] >= min_user
    users, items = users[keep], items[keep]
    times = None if times is None else times[keep]
    user_ids, user_index = np.unique(users, return_inverse=True)  # sorted users: first appearance is ascending
    values, first, inverse = np.unique(items, return_index=True, return_inverse=True)
    by_first = np.argsort(first)
    rank = np.empty(len(values), dtype=np.int64)
    rank[by_first] = np.arange(len(values))
    item_ids = np.concatenate([np.zeros(1, dtype=items.dtype), values[by_first]])
    return split_leave_one_out("x", user_index, rank[inverse] + 1, times, user_ids, item_ids)


def random_table(seed: int, n: int, item_scale: int = 1, with_times: bool = True, shuffle_lines: bool = False):
    rng = np.random.default_rng(seed)
    users = rng.integers(-5, 60, n)  # negative raw ids too
    items = rng.zipf(1.3, n) % 200 * item_scale - 7
    times = rng.integers(0, 40, n) * 1000 if with_times else None  # few distinct times: many ties
    dup = rng.integers(0, n, n // 20)  # exact duplicate rows appended
    users, items = np.concatenate([users, users[dup]]), np.concatenate([items, items[dup]])
    times = None if times is None else np.concatenate([times, times[dup]])
    lines = None
    if shuffle_lines:  # the general reader's explicit line numbers (e.g. after blank lines)
        lines = np.cumsum(rng.integers(1, 3, len(users))).astype(np.int64)
    return readers.Interactions(users, items, times, lines, "t.txt")


def assert_same(a, b):
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), f.name
        elif f.name not in ("name", "_cache"):
            assert x == y, f.name


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(item_scale=10**15),  # ids spread over a huge range: the hash-table path
        dict(with_times=False),
        dict(shuffle_lines=True),
        dict(min_item=5, min_user=8),
        dict(item_scale=10**15, min_item=3),
    ],
)
def test_build_equals_its_plain_definition(seed, case):
    case = dict(case)
    min_item, min_user = case.pop("min_item", 0), case.pop("min_user", 0)
    table = random_table(seed, 3000, **case)
    got = build("x", table, min_item_interactions=min_item, min_user_interactions=min_user)
    assert_same(got, reference_build(table, min_item, min_user))


def test_item_ids_number_by_first_appearance_across_scan_blocks(monkeypatch):
    """Items first seen in later blocks of the scan keep their order of first appearance."""
    from seqrec.data import dataset

    monkeypatch.setattr(dataset, "_SCAN", 7)
    table = random_table(5, 500)
    assert_same(build("x", table), reference_build(table))


def test_lines_are_lazy_but_exact():
    table = readers.Interactions(np.array([1, 1, 2]), np.array([5, 6, 7]), None, None, "f.txt", first_line=2)
    assert table.lines.tolist() == [2, 3, 4]
    assert table.where(2) == "f.txt:4"
    assert table.lines_of(np.array([2, 0])).tolist() == [4, 2]


@pytest.mark.parametrize("few", [0, 4096])  # 0: every drop takes the boolean-index path
def test_drop_rows_equals_boolean_indexing(monkeypatch, few):
    from seqrec.data import dataset

    monkeypatch.setattr(dataset, "_FEW_DROPPED", few)
    rng = np.random.default_rng(0)
    for keep in (rng.random(200) < 0.9, np.r_[False, True, True, False, False, True, False]):
        columns = [np.arange(len(keep)) * 3, None, rng.integers(0, 9, len(keep))]
        expected = [None if c is None else c[keep] for c in columns]
        got = dataset._drop_rows([None if c is None else c.copy() for c in columns], keep)
        for e, g in zip(expected, got):
            assert (e is None and g is None) or np.array_equal(e, g)


def test_filters_that_drop_many_rows_equal_the_definition(monkeypatch):
    from seqrec.data import dataset

    monkeypatch.setattr(dataset, "_FEW_DROPPED", 0)
    table = random_table(7, 3000)
    assert_same(build("x", table, min_item_interactions=6, min_user_interactions=9), reference_build(table, 6, 9))
