"""The two ways seqrec holds out validation and test targets, chosen by `dataset.split`:

- `leave-one-out` (the default, SASRec / TiSASRec): per user, the last interaction is the test target, the second
  last the validation target, the rest is training. "Last" follows the order `seqrec.data.dataset.build` gives each
  user's interactions: a stable sort by timestamp, so interactions with equal timestamps keep their file order (file
  order alone without timestamps).
- `temporal:q0.8` or `temporal:t<unix seconds>`: one global cutoff time T (given, or the q-quantile of all
  timestamps). Training is every interaction strictly before T. A user with at least one interaction before T and
  two at or after it is evaluated: the first interaction at or after T is the validation target, the second the test
  target (the test input is the training history plus the validation target, as in leave-one-out); later
  interactions are not used. The item catalog is what existed before T: items that first occur at or after T are
  dropped from the post-cutoff interactions before targets are chosen, so neither the training negatives (drawn from
  1..num_items) nor popularity counts can know them. The filters applied before the split
  (`dataset.min_item_interactions`, `dataset.min_user_interactions`, see `seqrec.data.dataset.build`) count only the
  interactions before T, so no statistic of the future decides what is trained on; the quantile cutoff is then
  taken over the timestamps before those filters.
"""

from __future__ import annotations

import numpy as np

from seqrec.errors import DataError

LEAVE_ONE_OUT = "leave-one-out"
TEMPORAL = "temporal"


def parse_split(spec: str, source: str = "dataset.split") -> dict:
    """`leave-one-out` | `temporal:q0.8` | `temporal:t1700000000` -> {"rule": ..., "quantile"/"cutoff": ...}."""
    rule, _, arg = str(spec).partition(":")
    if rule == LEAVE_ONE_OUT and not arg:
        return {"rule": LEAVE_ONE_OUT}
    if rule == TEMPORAL:
        key, value = arg[:1], arg[1:]  # no "=" inside: Hydra would need the override quoted
        try:
            number = float(value) if key == "q" else int(value)
        except ValueError:
            number = None
        if key == "q" and number is not None and 0.0 < number < 1.0:
            return {"rule": TEMPORAL, "quantile": number}
        if key == "t" and number is not None:
            return {"rule": TEMPORAL, "cutoff": number}
    raise DataError(
        f"{source}={spec!r}: expected leave-one-out, temporal:q<quantile in (0, 1)> (e.g. temporal:q0.8) or "
        "temporal:t<unix seconds> (e.g. temporal:t1700000000)"
    )


def leave_one_out_positions(user_index: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by user -> (evaluated users mask (U,), validation row per evaluated user, test row per user)."""
    counts = np.bincount(user_index, minlength=num_users)
    end = np.cumsum(counts)  # one past each user's last interaction
    evaluated = counts >= 3
    return evaluated, end[evaluated] - 2, end[evaluated] - 1


def cutoff_time(times: np.ndarray, spec: dict) -> int:
    """The cutoff T in unix seconds: given (or already resolved by `build`, then with the quantile it came from),
    or the quantile of all timestamps (the lower value, no interpolation)."""
    if "cutoff" in spec:
        return int(spec["cutoff"])
    return int(np.quantile(times, spec["quantile"], method="lower"))


def temporal_positions(
    user_index: np.ndarray, item_index: np.ndarray, times: np.ndarray, num_users: int, cutoff: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by user, chronological within a user -> (train rows mask (N,), evaluated users mask (U,),
    validation row and test row per evaluated user), under the rule of the module docstring."""
    before = times < cutoff
    known = np.zeros(int(item_index.max()) + 1, dtype=bool)
    known[item_index[before]] = True
    usable = ~before & known[item_index]  # post-cutoff rows whose item existed before the cutoff
    rows = np.flatnonzero(usable)
    users_after = user_index[rows]
    # k-th usable post-cutoff row of its user: position within the user's group of usable rows
    first_of_user = np.searchsorted(users_after, users_after, side="left")
    k = np.arange(len(rows)) - first_of_user
    has_history = np.bincount(user_index[before], minlength=num_users) > 0
    valid_row = np.full(num_users, -1, dtype=np.int64)
    test_row = np.full(num_users, -1, dtype=np.int64)
    valid_row[users_after[k == 0]] = rows[k == 0]
    test_row[users_after[k == 1]] = rows[k == 1]
    evaluated = has_history & (valid_row >= 0) & (test_row >= 0)
    return before, evaluated, valid_row[evaluated], test_row[evaluated]


def check_temporal_input(times: np.ndarray | None, source: str) -> np.ndarray:
    if times is None:
        raise DataError(f"{source}: dataset.split=temporal needs timestamps, and this dataset has none")
    return np.asarray(times, dtype=np.int64)


def keep_known_items(
    item_index: np.ndarray, train: np.ndarray, used: np.ndarray, item_ids: np.ndarray, item_titles: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Renumber items to 1..I over the items of the training rows (the catalog known at the cutoff), keeping their
    relative order. `used` rows (train + targets) must only hold such items. -> (item_index, item_ids, item_titles)."""
    known = np.zeros(len(item_ids), dtype=bool)
    known[item_index[train]] = True
    assert known[item_index[used]].all(), "a target item is not in the training catalog"
    known[0] = True  # the padding placeholder stays at 0
    new_id = np.cumsum(known) - 1
    titles = None if item_titles is None else np.asarray(item_titles)[known]
    return new_id[item_index], np.asarray(item_ids)[known], titles


def assemble(
    user_index: np.ndarray,
    item_index: np.ndarray,
    times: np.ndarray | None,
    train: np.ndarray,
    evaluated: np.ndarray,
    valid_rows: np.ndarray,
    test_rows: np.ndarray,
) -> dict:
    """SeqData's array fields from rows grouped by user (chronological within a user): `train` (N,) bool marks the
    training rows, `evaluated` (U,) bool the users with targets at `valid_rows` / `test_rows` (one per such user)."""
    num_users = len(evaluated)
    valid_item = np.zeros(num_users, dtype=np.int64)
    test_item = np.zeros(num_users, dtype=np.int64)
    valid_item[evaluated], test_item[evaluated] = item_index[valid_rows], item_index[test_rows]
    train_ptr = np.zeros(num_users + 1, dtype=np.int64)
    # all rows per user minus the held-out ones (few), instead of compacting user_index[train] first
    held_out = np.bincount(user_index[~train], minlength=num_users)
    np.cumsum(np.bincount(user_index, minlength=num_users) - held_out, out=train_ptr[1:])
    valid_time = test_time = train_times = None
    if times is not None:
        valid_time = np.zeros(num_users, dtype=np.int64)
        test_time = np.zeros(num_users, dtype=np.int64)
        valid_time[evaluated], test_time[evaluated] = times[valid_rows], times[test_rows]
        train_times = np.ascontiguousarray(times[train])
    return {
        "train_ptr": train_ptr,
        "train_items": np.ascontiguousarray(item_index[train]),
        "train_times": train_times,
        "valid_item": valid_item,
        "valid_time": valid_time,
        "test_item": test_item,
        "test_time": test_time,
    }


def split_sequences(
    spec: dict,
    user_index: np.ndarray,
    item_index: np.ndarray,
    times: np.ndarray | None,
    item_ids: np.ndarray,
    item_titles: np.ndarray | None,
    num_users: int,
    source: str,
) -> tuple[dict, np.ndarray, np.ndarray | None, dict]:
    """Rows grouped by user in ascending order, chronological within a user -> (SeqData array fields, item_ids,
    item_titles, the rule as recorded in the protocol fingerprint). Temporal renumbers the catalog (see above)."""
    if spec["rule"] == LEAVE_ONE_OUT:
        evaluated, valid_rows, test_rows = leave_one_out_positions(user_index, num_users)
        train = np.ones(len(user_index), dtype=bool)
        train[valid_rows] = train[test_rows] = False
        rule = {"rule": LEAVE_ONE_OUT, "valid": "second last", "test": "last"}
    else:
        times = check_temporal_input(times, source)
        cutoff = cutoff_time(times, spec)
        train, evaluated, valid_rows, test_rows = temporal_positions(user_index, item_index, times, num_users, cutoff)
        if not train.any():
            raise DataError(f"{source}: dataset.split cutoff {cutoff} is before every interaction: nothing to train on")
        if not evaluated.any():
            raise DataError(
                f"{source}: no user has an interaction before the dataset.split cutoff {cutoff} and two after it "
                "with items known before it, so there is nothing to validate and test on; move the cutoff"
            )
        used = train.copy()
        used[valid_rows] = used[test_rows] = True
        item_index, item_ids, item_titles = keep_known_items(item_index, train, used, item_ids, item_titles)
        rule = {
            "rule": TEMPORAL,
            "cutoff": cutoff,
            **({"quantile": spec["quantile"]} if "quantile" in spec else {}),
            "valid": "first interaction at/after the cutoff with an item known before it",
            "test": "second such interaction",
        }
    fields = assemble(user_index, item_index, times, train, evaluated, valid_rows, test_rows)
    return fields, item_ids, item_titles, rule


def check_no_leak(data):
    """Raise DataError if a split lets the future into training; returns `data`. Leave-one-out: no training
    interaction after the user's validation target. Temporal: no training interaction at or after the cutoff, no
    target before it, and every catalog item (1..num_items) occurs in training (else it was known only later)."""
    rule = (data.split_rule or {}).get("rule", LEAVE_ONE_OUT)
    problems = []
    evaluated = data.valid_item > 0
    if data.has_time and len(data.train_times) and np.any(evaluated & (_last_train_time(data) > data.valid_time)):
        owner = np.repeat(np.arange(data.num_users), data.train_lengths)  # only to count them for the message
        later = evaluated[owner] & (data.train_times > data.valid_time[owner])
        problems.append(f"{int(later.sum())} training interactions come after their user's validation target")
    if rule == TEMPORAL:
        cutoff = data.split_rule["cutoff"]
        if len(data.train_times) and data.train_times.max() >= cutoff:
            problems.append(f"a training interaction at {int(data.train_times.max())} is at/after the cutoff {cutoff}")
        if np.any(data.valid_time[evaluated] < cutoff):
            problems.append(f"a validation target lies before the cutoff {cutoff}")
        in_training = np.zeros(data.num_items + 1, dtype=bool)
        in_training[data.train_items] = True
        unseen = np.flatnonzero(~in_training[1:]) + 1
        if len(unseen):
            problems.append(f"{len(unseen)} catalog items never occur before the cutoff (e.g. item {unseen[0]})")
    if problems:
        raise DataError(f"{data.name}: {rule} split leaks the future into training: " + "; ".join(problems))
    return data


def _last_train_time(data) -> np.ndarray:
    """(U,) int64 latest training timestamp of each user (int64 min for a user without training rows), one
    reduction per user's slice instead of a (N,) owner array."""
    latest = np.full(data.num_users, np.iinfo(np.int64).min, dtype=np.int64)
    starts = data.train_ptr[:-1]
    has_rows = data.train_ptr[1:] > starts
    # each non-empty user's slice runs from its start to the next non-empty user's start: reduceat's segments
    latest[has_rows] = np.maximum.reduceat(data.train_times, starts[has_rows])
    return latest
