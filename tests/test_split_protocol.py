"""Splits (leave-one-out tie-break, the global temporal cutoff, planted leaks caught) and the protocol fingerprint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from seqrec.data.dataset import from_file, split_leave_one_out, synthetic, validate
from seqrec.data.split import check_no_leak, parse_split
from seqrec.errors import DataError
from seqrec.fingerprint import protocol_fingerprint

EVAL = {"protocol": "full", "ks": [5, 10, 20], "filter_seen": True, "num_negatives": 100, "seed": 0}


def write(tmp_path, rows: list[tuple]) -> str:
    path = tmp_path / "rows.csv"
    path.write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    return str(path)


# ------------------------------------------------------------------------------------------------ leave-one-out
def test_equal_timestamps_at_the_end_keep_file_order(tmp_path):
    # user 1's last three interactions share one second: file order decides valid (second last) and test (last)
    rows = [(1, 11, 1), (1, 12, 5), (1, 13, 5), (1, 14, 5)]
    forward = from_file(path=write(tmp_path, rows))
    ids = forward.item_ids
    assert ids[forward.valid_item[0]] == 13 and ids[forward.test_item[0]] == 14
    swapped = from_file(path=write(tmp_path, rows[:2] + [rows[3], rows[2]]))
    ids = swapped.item_ids
    assert ids[swapped.valid_item[0]] == 14 and ids[swapped.test_item[0]] == 13


def test_a_training_interaction_after_the_validation_target_is_caught():
    data = split_leave_one_out("x", np.zeros(4), np.array([1, 2, 3, 4]), np.array([1, 2, 3, 4]), [0], np.arange(5))
    leaked = dataclasses.replace(data, train_times=np.array([1, 9]))  # training item at 9 > validation time 3
    with pytest.raises(DataError, match="after their user's validation target"):
        check_no_leak(leaked)


def test_a_leak_is_caught_in_any_user_and_any_training_row():
    """The check reduces each user's slice to its latest time: the leak may sit in any row of any user, after users
    without rows."""
    users = np.array([0, 0, 0, 0, 2, 2, 2, 2, 2, 3, 3])  # user 1 has no rows, user 3 too few for targets
    times = np.array([1, 2, 3, 4, 1, 2, 3, 4, 5, 1, 2])
    data = split_leave_one_out("x", users, np.arange(1, 12), times, np.arange(4), np.arange(12))
    check_no_leak(data)
    user2_first = data.train_ptr[2]
    leaked = dataclasses.replace(data, train_times=np.where(np.arange(7) == user2_first, 99, data.train_times))
    with pytest.raises(DataError, match="1 training interactions come after"):
        check_no_leak(leaked)
    user3_late = dataclasses.replace(data, train_times=np.where(np.arange(7) == 6, 99, data.train_times))
    check_no_leak(user3_late)  # user 3 has no validation target: nothing to leak into


# ------------------------------------------------------------------------------------------------ temporal
def temporal_rows() -> list[tuple]:
    """Three users around the cutoff 100; item 99 first appears at 150 (after the cutoff)."""
    return [
        (1, 11, 10), (1, 12, 20), (1, 99, 150), (1, 13, 160), (1, 11, 170), (1, 12, 180),
        (2, 12, 30), (2, 13, 40), (2, 11, 120), (2, 12, 130),
        (3, 13, 50), (3, 11, 60), (3, 12, 110),  # one interaction after: not evaluated
        (4, 11, 200), (4, 12, 210), (4, 13, 220),  # nothing before: not evaluated
    ]  # fmt: skip


def test_temporal_split_trains_before_the_cutoff_and_tests_after(tmp_path):
    data = from_file(path=write(tmp_path, temporal_rows()), split="temporal:t100")
    ids, users = data.item_ids, data.user_ids.tolist()
    assert data.split_rule["rule"] == "temporal" and data.split_rule["cutoff"] == 100
    assert data.train_times.max() < 100
    u1, u2 = users.index(1), users.index(2)
    # user 1: 99 is not in the catalog, so the targets are c@160 and a@170; b@180 is not used
    assert ids[data.valid_item[u1]] == 13 and ids[data.test_item[u1]] == 11
    assert (data.valid_time[u1], data.test_time[u1]) == (160, 170)
    assert ids[data.valid_item[u2]] == 11 and ids[data.test_item[u2]] == 12
    assert data.eval_users("test").tolist() == sorted([u1, u2])
    assert 99 not in ids.tolist() and data.num_items == 3


def test_a_cached_load_keeps_the_split_rule(tmp_path, monkeypatch):
    """The processed cache stores the split rule with the arrays: a cached temporal split is not fingerprinted as
    leave-one-out."""
    monkeypatch.setenv("SEQREC_CACHE", str(tmp_path / "cache"))
    path = write(tmp_path, temporal_rows())
    first = from_file(path=path, split="temporal:t100", cache=True)
    again = from_file(path=path, split="temporal:t100", cache=True)
    assert list((tmp_path / "cache" / "datasets").glob("*.seqdata"))  # the second load came from the cache
    assert again.split_rule == first.split_rule and again.split_rule["rule"] == "temporal"
    assert protocol_fingerprint(again, {"protocol": "full"}) == protocol_fingerprint(first, {"protocol": "full"})


def test_temporal_quantile_picks_an_observed_time(tmp_path):
    times = np.array([t for *_, t in temporal_rows()])
    data = from_file(path=write(tmp_path, temporal_rows()), split="temporal:q0.5")
    assert data.split_rule["cutoff"] == int(np.quantile(times, 0.5, method="lower"))
    assert data.train_times.max() < data.split_rule["cutoff"]


def test_temporal_split_of_generated_data_has_no_leak():
    data = synthetic(num_users=300, num_items=200, split="temporal:q0.7")
    check_no_leak(data)
    cutoff = data.split_rule["cutoff"]
    evaluated = data.test_item > 0
    assert evaluated.any() and data.train_times.max() < cutoff
    assert (data.valid_time[evaluated] >= cutoff).all() and (data.test_time >= data.valid_time).all()
    catalog = np.zeros(data.num_items + 1, dtype=bool)
    catalog[data.train_items] = True
    assert catalog[1:].all()  # training negatives are drawn from 1..num_items: all known before the cutoff


def filter_leak_rows() -> list[tuple]:
    """Cutoff 100. Items 11-13 are common before it. Item 50 has 2 interactions before the cutoff and 4 after (6 in
    all); user 9 has 1 interaction before the cutoff and 4 after. With min_item / min_user 3 (users: 2), only the
    future lifts them over the thresholds."""
    rows = []
    for u in range(1, 7):  # six users: 3 interactions before the cutoff, 2 after
        rows += [(u, 11, 10 + u), (u, 12, 20 + u), (u, 13, 30 + u), (u, 11, 120 + u), (u, 12, 130 + u)]
    rows += [(1, 50, 40), (2, 50, 41)]  # item 50 before the cutoff: twice
    rows += [(u, 50, 140 + u) for u in (3, 4, 5, 6)]  # ... and four times after it
    rows += [(9, 13, 50)] + [(9, i, 150 + k) for k, i in enumerate((11, 12, 13, 11))]  # user 9: once before
    return rows


def test_a_temporal_split_filters_on_counts_before_the_cutoff(tmp_path):
    path = write(tmp_path, filter_leak_rows())
    data = from_file(path=path, split="temporal:t100", min_item_interactions=3, min_user_interactions=2)
    check_no_leak(data)
    assert 50 not in data.item_ids.tolist()  # 6 interactions in all, but 2 before the cutoff: dropped everywhere
    assert 9 not in data.user_ids.tolist()  # 5 in all, 1 before the cutoff
    assert data.item_ids[1:].tolist() == [11, 12, 13]
    # item 50 was the first interaction after the cutoff of users 3-6: it is gone, so 11@12x and 12@13x are targets
    u3 = data.user_ids.tolist().index(3)
    assert data.item_ids[[data.valid_item[u3], data.test_item[u3]]].tolist() == [11, 12]
    # leave-one-out has no cutoff: the filters count every interaction (SASRec's preprocessing), and 50 and 9 stay
    loo = from_file(path=path, min_item_interactions=3, min_user_interactions=2)
    assert 50 in loo.item_ids.tolist() and 9 in loo.user_ids.tolist()


def test_a_quantile_cutoff_is_taken_before_the_filters(tmp_path):
    rows = filter_leak_rows() + [(1, 77, 1), (2, 78, 2), (3, 79, 3)]  # three items the filter drops in any case
    path = write(tmp_path, rows)
    data = from_file(path=path, split="temporal:q0.6", min_item_interactions=3)
    times = np.array([t for *_, t in rows])
    assert data.split_rule["cutoff"] == int(np.quantile(times, 0.6, method="lower"))
    assert data.split_rule["quantile"] == 0.6 and data.train_times.max() < data.split_rule["cutoff"]


@pytest.mark.parametrize(
    "plant, needle",
    [
        (lambda d: {"train_times": np.where(np.arange(len(d.train_times)) == 0, 10**10, d.train_times)}, "at/after"),
        (lambda d: {"num_items": d.num_items + 1, "item_ids": np.append(d.item_ids, -1)}, "never occur before"),
        (lambda d: {"valid_time": np.where(d.valid_item > 0, 0, d.valid_time)}, "before the cutoff"),
    ],
    ids=["training-after-cutoff", "catalog-item-from-the-future", "target-before-cutoff"],
)
def test_a_planted_temporal_leak_is_caught(plant, needle):
    data = synthetic(num_users=100, num_items=80, split="temporal:q0.7")
    with pytest.raises(DataError, match=needle):
        check_no_leak(dataclasses.replace(data, **plant(data)))


@pytest.mark.parametrize("spec", ["temporal", "temporal:q1.5", "temporal:tsoon", "random"])
def test_a_bad_split_is_a_one_line_error(spec):
    with pytest.raises(DataError, match="dataset.split"):
        parse_split(spec)


def test_temporal_needs_timestamps(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("1 1\n1 2\n1 3\n2 1\n2 2\n2 3\n")
    with pytest.raises(DataError, match="needs timestamps"):
        from_file(path=str(path), split="temporal:q0.5")


# ------------------------------------------------------------------------------------------------ fingerprint
@pytest.fixture(scope="module")
def data():
    return synthetic(num_users=120, num_items=60)


def test_fingerprint_is_stable_and_names_the_protocol(data):
    a, b = protocol_fingerprint(data, EVAL), protocol_fingerprint(synthetic(num_users=120, num_items=60), EVAL)
    assert a == b and len(a["id"]) == 16
    assert a["dataset"]["users"] == 120 and a["dataset"]["interactions"] == data.num_interactions
    assert a["split"]["rule"] == "leave-one-out" and "file order" in a["split"]["tie_break"]
    assert a["evaluation"]["ks"] == [5, 10, 20] and "sampled" not in a["evaluation"]


@pytest.mark.parametrize(
    "change",
    [
        {"filter_seen": False},
        {"ks": [10]},
        {"protocol": "sampled"},
        {"also_sampled": True},
    ],
)
def test_every_protocol_setting_changes_the_fingerprint(data, change):
    assert protocol_fingerprint(data, {**EVAL, **change})["id"] != protocol_fingerprint(data, EVAL)["id"]


def test_different_targets_or_data_change_the_fingerprint(data):
    base = protocol_fingerprint(data, EVAL)
    target = data.test_item.copy()
    target[np.flatnonzero(target)[0]] = target[np.flatnonzero(target)[0]] % data.num_items + 1
    moved = protocol_fingerprint(validate(dataclasses.replace(data, test_item=target)), EVAL)
    assert moved["split"]["test_targets"] != base["split"]["test_targets"] and moved["id"] != base["id"]
    other = protocol_fingerprint(synthetic(num_users=120, num_items=60, seed=1), EVAL)
    assert other["dataset"]["content_hash"] != base["dataset"]["content_hash"]
    temporal = protocol_fingerprint(synthetic(num_users=120, num_items=60, split="temporal:q0.7"), EVAL)
    assert temporal["split"]["rule"] == "temporal" and temporal["id"] != base["id"]


def test_sampled_negatives_seed_is_recorded_but_seeds_share_a_protocol(data):
    one = protocol_fingerprint(data, {**EVAL, "protocol": "sampled", "seed": 1})
    two = protocol_fingerprint(data, {**EVAL, "protocol": "sampled", "seed": 2})
    assert one["evaluation"]["sampled"]["seed"] == 1 and two["evaluation"]["sampled"]["seed"] == 2
    assert one["id"] == two["id"]
    fewer = protocol_fingerprint(data, {**EVAL, "protocol": "sampled", "num_negatives": 50, "seed": 1})
    assert fewer["id"] != one["id"]


def test_the_evaluator_itself_gives_the_fingerprint_of_its_config(data):
    from seqrec.eval.evaluator import Evaluator

    cfg = {**EVAL, "protocol": "sampled", "num_negatives": 50, "seed": 3}
    evaluator = Evaluator(data, **cfg, maxlen=20)
    assert protocol_fingerprint(data, evaluator) == protocol_fingerprint(data, cfg)
    assert protocol_fingerprint(data, evaluator)["evaluation"]["sampled"] == {
        "num_negatives": 50,
        "seed": 3,
        "excluded": "every item of the user (train, valid, test)",
    }


def test_a_cutoff_that_leaves_no_targets_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="cutoff 1000 and two after it"):
        from_file(path=write(tmp_path, temporal_rows()), split="temporal:t1000")
