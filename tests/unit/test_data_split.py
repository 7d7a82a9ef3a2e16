"""Leave-one-out split, id remapping, filters and the SeqData helpers, on hand-made tiny files."""

import pickle

import numpy as np
import pytest

from seqrec.data.dataset import SeqData, from_file, prepared, split_leave_one_out, validate
from seqrec.errors import DataError

# user item timestamp, deliberately out of order (users interleaved, times unsorted, one same-second tie)
TINY = """\
user,item,timestamp
7,100,50
5,300,10
7,200,40
5,100,30
5,200,20
5,400,40
7,300,60
7,400,40
9,300,5
8,100,1
8,200,2
"""


@pytest.fixture
def tiny(tmp_path) -> SeqData:
    path = tmp_path / "tiny.csv"
    path.write_text(TINY)
    return from_file(path=str(path))


def test_split_on_tiny_file(tiny):
    # sorted by raw user, then time (stable): user 5: 300@10 200@20 100@30 400@40
    #   user 7: 200@40 400@40 (tie: file order) 100@50 300@60;  user 8: 100@1 200@2;  user 9: 300@5
    assert tiny.name == "tiny"
    assert tiny.user_ids.tolist() == [5, 7, 8, 9]
    assert tiny.item_ids.tolist() == [0, 300, 200, 100, 400]  # first appearance
    assert (tiny.num_users, tiny.num_items, tiny.num_interactions) == (4, 4, 11)
    assert tiny.train_ptr.tolist() == [0, 2, 4, 6, 7]
    assert tiny.train_items.tolist() == [1, 2, 2, 4, 3, 2, 1]
    assert tiny.train_times.tolist() == [10, 20, 40, 40, 1, 2, 5]
    assert tiny.valid_item.tolist() == [3, 3, 0, 0] and tiny.valid_time.tolist() == [30, 50, 0, 0]
    assert tiny.test_item.tolist() == [4, 1, 0, 0] and tiny.test_time.tolist() == [40, 60, 0, 0]
    assert tiny.has_time and tiny.train_lengths.tolist() == [2, 2, 2, 1]
    assert tiny.eval_users("valid").tolist() == [0, 1] and tiny.eval_users("test").tolist() == [0, 1]
    assert tiny.user_history(1).tolist() == [2, 4]
    for arr in (tiny.train_ptr, tiny.train_items, tiny.valid_item, tiny.test_item, tiny.train_times):
        assert arr.dtype == np.int64


def test_no_timestamps_keep_file_order(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("2 30\n1 20\n2 10\n1 10\n1 30\n2 20\n3 10\n3 20\n")
    d = from_file(path=str(path))
    assert not d.has_time and d.train_times is None and d.valid_time is None and d.test_time is None
    assert d.user_ids.tolist() == [1, 2, 3] and d.item_ids.tolist() == [0, 20, 10, 30]
    # user 1: 20 10 30 -> train [20], valid 10, test 30; user 2: 30 10 20; user 3 (2 items): training only
    assert d.train_items.tolist() == [1, 3, 2, 1]
    assert d.valid_item.tolist() == [2, 2, 0] and d.test_item.tolist() == [3, 1, 0]


def test_short_users_kept_for_training(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("1 1\n2 1\n2 2\n3 1\n3 2\n3 3\n")  # 1, 2 and 3 interactions
    d = from_file(path=str(path))
    assert d.train_lengths.tolist() == [1, 2, 1]
    assert d.valid_item.tolist() == [0, 0, 2] and d.test_item.tolist() == [0, 0, 3]
    assert d.eval_users("test").tolist() == [2]
    assert d.num_interactions == 6


def test_only_short_users_split_without_targets():
    # the split itself accepts users without targets; `validate` (every factory) refuses data with none at all
    d = split_leave_one_out("x", np.array([0, 1, 1]), np.array([1, 2, 1]), None, np.array([1, 2]), np.arange(3))
    assert len(d.eval_users("valid")) == 0 and d.train_lengths.tolist() == [1, 2]
    assert d.history_pairs("test")[1].tolist() == [1, 2, 1]
    assert "2 users, 2 items, 3 interactions" in d.summary()


def test_only_short_users_in_a_file_are_refused(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("1 1\n2 2\n2 1\n")
    with pytest.raises(DataError, match=r"x\.txt: no user has a validation target: .* needs users with >= 3"):
        from_file(path=str(path))


def test_min_interaction_filters(tmp_path):
    lines = [f"{u} {i}" for u in (1, 2, 3) for i in (1, 2, 3, 4)] + ["1 9", "4 1", "4 2"]
    path = tmp_path / "x.txt"
    path.write_text("\n".join(lines) + "\n")
    d = from_file(path=str(path), min_item_interactions=2)  # item 9 (1 interaction) goes
    assert 9 not in d.item_ids.tolist() and d.num_interactions == 14 and d.num_users == 4
    d = from_file(path=str(path), min_item_interactions=2, min_user_interactions=3)  # then user 4 (2 left) goes
    assert d.user_ids.tolist() == [1, 2, 3] and d.num_interactions == 12


def test_split_accepts_ungrouped_input():
    d = split_leave_one_out(
        "x",
        user_index=np.array([1, 0, 1, 0, 1, 0]),
        item_index=np.array([1, 2, 3, 1, 2, 3]),
        times=None,
        user_ids=np.array(["a", "b"], dtype=object),
        item_ids=np.array([0, 10, 20, 30]),
    )
    assert d.train_items.tolist() == [2, 1] and d.valid_item.tolist() == [1, 3] and d.test_item.tolist() == [3, 2]
    assert d.user_ids.tolist() == ["a", "b"]


def test_split_rejects_out_of_range_items():
    with pytest.raises(ValueError, match="item_index"):
        split_leave_one_out("x", np.array([0]), np.array([0]), None, np.array([1]), np.array([0, 5]))


def test_history_pairs(tiny):
    rows, items = tiny.history_pairs("valid")
    assert rows.tolist() == [0, 0, 1, 1, 2, 2, 3] and items.tolist() == tiny.train_items.tolist()
    rows, items = tiny.history_pairs("test")
    assert rows.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3]
    assert items.tolist() == [1, 2, 3, 2, 4, 3, 3, 2, 1]
    with pytest.raises(ValueError, match="split"):
        tiny.history_pairs("train")


def test_history_pairs_random_against_brute_force():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 8, size=50)
    users = np.repeat(np.arange(50), lengths)
    items = rng.integers(1, 21, size=len(users))
    d = split_leave_one_out("r", users, items, None, np.arange(50), np.arange(21))
    rows, seen = d.history_pairs("test")
    for u in range(50):
        own = items[users == u]
        expected = own[:-1] if len(own) >= 3 else own
        assert seen[rows == u].tolist() == expected.tolist()
    keys = d.all_item_sets_sorted_keys()
    expected_keys = np.unique(users * 21 + items)
    assert keys.tolist() == expected_keys.tolist()


def test_all_item_sets_sorted_keys(tiny):
    keys = tiny.all_item_sets_sorted_keys()
    stride = tiny.num_items + 1
    expected = {0: {1, 2, 3, 4}, 1: {2, 4, 3, 1}, 2: {3, 2}, 3: {1}}
    assert keys.tolist() == sorted(u * stride + i for u, s in expected.items() for i in s)
    assert not keys.flags.writeable
    # membership by searchsorted, as the sampled evaluator does
    probe = np.array([2 * stride + 3, 2 * stride + 4, 3 * stride + 1, 3 * stride + 2])
    pos = np.minimum(np.searchsorted(keys, probe), len(keys) - 1)
    assert (keys[pos] == probe).tolist() == [True, False, True, False]


def test_summary_repr_and_pickle(tiny):
    s = tiny.summary()
    assert s == "tiny: 4 users, 4 items, 11 interactions, avg length 2.8, timestamps yes"
    assert repr(tiny) == f"SeqData({s})"
    tiny.all_item_sets_sorted_keys()
    clone = pickle.loads(pickle.dumps(tiny))
    assert clone.train_items.tolist() == tiny.train_items.tolist() and clone.summary() == s


def test_eval_users_rejects_unknown_split(tiny):
    with pytest.raises(ValueError, match="split must be one of"):
        tiny.eval_users("train")


def test_prepared_missing_tells_the_command(tmp_path):
    with pytest.raises(DataError) as e:
        prepared(name="ml-1m", root=str(tmp_path))
    msg = str(e.value)
    assert "interactions.tsv: not found" in msg and f"python -m seqrec.data.prepare ml-1m --root {tmp_path}" in msg
    assert "\n" not in msg


def _two_users(**changes) -> SeqData:
    """Two users with 4 interactions each, timestamps 10, 20, 30, 40 (valid at 30, test at 40)."""
    fields = dict(
        name="v",
        num_users=2,
        num_items=4,
        train_ptr=np.array([0, 2, 4]),
        train_items=np.array([1, 2, 3, 4]),
        train_times=np.array([10, 20, 10, 20]),
        valid_item=np.array([3, 1]),
        valid_time=np.array([30, 30]),
        test_item=np.array([4, 2]),
        test_time=np.array([40, 40]),
        user_ids=np.array([7, 8]),
        item_ids=np.arange(5),
    )
    fields.update(changes)
    return SeqData(**fields)


def test_validate_accepts_consistent_data():
    d = _two_users()
    assert validate(d, "src") is d


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"train_items": np.array([1, 2, 3, 5])}, "src: malformed dataset: training items must lie in 1..4"),
        ({"train_ptr": np.array([0, 3, 5])}, "src: malformed dataset: train_ptr does not span"),
        ({"train_ptr": np.array([0, 3, 2])}, "src: malformed dataset: train_ptr"),
        ({"train_times": np.array([10, 20, 20, 10])}, "src: timestamps of user 8 go back in time"),
        ({"valid_time": np.array([15, 30])}, "src: timestamps of user 7 go back in time"),
        ({"test_time": np.array([40, 25])}, "src: timestamps of user 8 go back in time"),
        ({"valid_item": np.array([0, 0])}, "src: no user has a validation target"),
        ({"test_item": np.array([0, 0])}, "src: no user has a test target"),
    ],
)
def test_validate_names_the_broken_invariant(changes, needle):
    with pytest.raises(DataError) as err:
        validate(_two_users(**changes), "src")
    assert str(err.value).startswith(needle), str(err.value)


def test_validate_needs_a_training_window():
    one_each = dict(train_ptr=np.array([0, 1, 2]), train_items=np.array([1, 3]), train_times=np.array([10, 10]))
    with pytest.raises(DataError, match="src: no user has 2 training interactions left .* nothing to train on"):
        validate(_two_users(**one_each), "src")
