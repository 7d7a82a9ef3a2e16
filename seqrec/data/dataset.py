"""Per-user chronological sequences (`SeqData`), the leave-one-out split of SASRec / TiSASRec (last item -> test,
second last -> validation, the rest -> training), and the Hydra factories used as `_target_` in
`conf/dataset/*.yaml`: `synthetic`, `from_file` and `prepared`.

Every factory ends in `validate`, the one place that checks what every later stage relies on (ids in range, CSR
offsets, timestamps in order per user, at least one validation target, one test target and one training window),
so bad data stops here with one `DataError` line instead of as an empty batch or all-zero metrics later. Row-level
problems (duplicates, suspicious timestamps) are handled in `build`, which still knows each row's file line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seqrec.data import readers
from seqrec.data import synthetic as generator
from seqrec.data.split import (
    TEMPORAL,
    check_no_leak,
    check_temporal_input,
    cutoff_time,
    parse_split,
    split_sequences,
)
from seqrec.errors import DataError
from seqrec.utils.rules import NON_NEGATIVE, SEED, config_rules, one_of

log = logging.getLogger(__name__)

SPLITS = ("valid", "test")


@dataclass(frozen=True, eq=False)
class SeqData:
    """Per-user chronological sequences after the leave-one-out split.

    Users are 0..U-1, items 1..I (0 is padding). Training sequences are stored CSR-style: user u's training items
    are `train_items[train_ptr[u]:train_ptr[u + 1]]`, oldest first.
    """

    name: str
    num_users: int  # internal user index 0..U-1
    num_items: int  # items are 1..I, 0 is padding
    train_ptr: np.ndarray  # (U+1,) int64 CSR offsets into train_items / train_times
    train_items: np.ndarray  # (N,) int64, each user's training items in time order
    train_times: np.ndarray | None  # (N,) int64 unix seconds, None if the source has no timestamps
    valid_item: np.ndarray  # (U,) int64: validation target (second last), 0 = user not evaluated
    valid_time: np.ndarray | None  # (U,) int64
    test_item: np.ndarray  # (U,) int64: test target (last), 0 = user not evaluated
    test_time: np.ndarray | None  # (U,) int64
    user_ids: np.ndarray  # (U,) original user ids
    item_ids: np.ndarray  # (I+1,) original item ids, [0] is a placeholder for padding
    item_titles: np.ndarray | None = None  # (I+1,) str titles, "" where unknown; None if the dataset has none
    split_rule: dict | None = None  # how targets were held out (seqrec.data.split), for the protocol fingerprint
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __repr__(self) -> str:
        return f"SeqData({self.summary()})"

    @property
    def has_time(self) -> bool:
        """Whether the source had timestamps (TiSASRec needs them)."""
        return self.train_times is not None

    @property
    def train_lengths(self) -> np.ndarray:
        """(U,) int64 number of training items per user."""
        return np.diff(self.train_ptr)

    @property
    def num_interactions(self) -> int:
        """All interactions: training items plus validation and test targets."""
        return int(len(self.train_items) + np.count_nonzero(self.valid_item) + np.count_nonzero(self.test_item))

    def _target(self, split: str) -> np.ndarray:
        if split == "valid":
            return self.valid_item
        if split == "test":
            return self.test_item
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

    def eval_users(self, split: str) -> np.ndarray:
        """int64 array of the users that have a target in `split` ("valid" or "test"), ascending."""
        return np.flatnonzero(self._target(split) > 0).astype(np.int64)

    def user_history(self, u: int) -> np.ndarray:
        """Training items of user u, oldest first (a view into `train_items`)."""
        return self.train_items[self.train_ptr[u] : self.train_ptr[u + 1]]

    def history_pairs(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Every (user, item) the model sees as input when evaluating `split`, to mask seen items in full ranking.

        Returns:
            (rows, items): (M,) int64 each, grouped by user in ascending order and chronological within a user:
            the training items for "valid"; training items plus the validation item for "test".
        """
        self._target(split)  # validates split
        key = f"history_pairs/{split}"
        if key not in self._cache:
            lengths = self.train_lengths
            rows = np.repeat(np.arange(self.num_users, dtype=np.int64), lengths)
            if split == "valid":
                items = self.train_items.copy()
            else:
                has_valid = self.valid_item > 0
                lengths2 = lengths + has_valid
                ptr2 = np.zeros(self.num_users + 1, dtype=np.int64)
                np.cumsum(lengths2, out=ptr2[1:])
                items = np.empty(int(ptr2[-1]), dtype=np.int64)
                # train item k of user u moves from train_ptr[u] + j to ptr2[u] + j
                items[np.arange(len(rows)) + (ptr2[:-1] - self.train_ptr[:-1])[rows]] = self.train_items
                items[ptr2[1:][has_valid] - 1] = self.valid_item[has_valid]
                rows = np.repeat(np.arange(self.num_users, dtype=np.int64), lengths2)
            rows.setflags(write=False)
            items.setflags(write=False)
            self._cache[key] = (rows, items)
        return self._cache[key]

    def all_item_sets_sorted_keys(self) -> np.ndarray:
        """Sorted unique int64 keys `user * (num_items + 1) + item` over ALL of each user's items (train, valid
        and test), to sample evaluation negatives: `item` is in u's set iff the key is found by searchsorted."""
        if "all_keys" not in self._cache:
            stride = self.num_items + 1
            rows = np.repeat(np.arange(self.num_users, dtype=np.int64), self.train_lengths)
            users = np.arange(self.num_users, dtype=np.int64)
            keys = np.concatenate(
                [
                    rows * stride + self.train_items,
                    (users * stride + self.valid_item)[self.valid_item > 0],
                    (users * stride + self.test_item)[self.test_item > 0],
                ]
            )
            keys = np.unique(keys)
            keys.setflags(write=False)
            self._cache["all_keys"] = keys
        return self._cache["all_keys"]

    def summary(self) -> str:
        """One line: users, items, interactions, average sequence length, timestamps yes/no."""
        n = self.num_interactions
        avg = n / max(self.num_users, 1)
        return (
            f"{self.name}: {self.num_users:,} users, {self.num_items:,} items, {n:,} interactions, "
            f"avg length {avg:.1f}, timestamps {'yes' if self.has_time else 'no'}"
        )


def split_leave_one_out(
    name: str,
    user_index: np.ndarray,
    item_index: np.ndarray,
    times: np.ndarray | None,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    item_titles: np.ndarray | None = None,
    split: str | dict = "leave-one-out",
) -> SeqData:
    """Leave-one-out split: per user with >= 3 interactions, last -> test, second last -> valid, rest -> train.

    Users with fewer than 3 interactions keep everything in training and get no targets (valid/test = 0).
    `split` may name another rule (`temporal:q0.8`, see seqrec.data.split); the default is leave-one-out.

    Args:
        name: dataset name for logs.
        user_index: (N,) int internal users 0..U-1, grouped by user and chronological within a user (if the groups
            are not in ascending user order they are reordered stably).
        item_index: (N,) int items 1..I.
        times: (N,) int unix seconds, or None.
        user_ids: (U,) original user ids; U = len(user_ids).
        item_ids: (I+1,) original item ids with a placeholder at [0]; I = len(item_ids) - 1.
        item_titles: (I+1,) titles or None.

    Returns:
        The SeqData.
    """
    user_index = np.asarray(user_index, dtype=np.int64)
    item_index = np.asarray(item_index, dtype=np.int64)
    num_users, num_items = len(user_ids), len(item_ids) - 1
    n = len(user_index)
    if len(item_index) != n or (times is not None and len(times) != n):
        raise ValueError("user_index, item_index and times must have the same length")
    if n and (user_index.min() < 0 or user_index.max() >= num_users):
        raise ValueError(f"user_index must lie in 0..{num_users - 1}")
    if n and (item_index.min() < 1 or item_index.max() > num_items):
        raise ValueError(f"item_index must lie in 1..{num_items}")
    if item_titles is not None and len(item_titles) != num_items + 1:
        raise ValueError("item_titles must have num_items + 1 entries")
    if times is not None:
        times = np.asarray(times, dtype=np.int64)
    if n > 1 and np.any(user_index[1:] < user_index[:-1]):
        order = np.argsort(user_index, kind="stable")
        user_index, item_index = user_index[order], item_index[order]
        times = None if times is None else times[order]

    spec = split if isinstance(split, dict) else parse_split(split)
    fields, item_ids, item_titles, rule = split_sequences(
        spec, user_index, item_index, times, np.asarray(item_ids), item_titles, num_users, name
    )
    data = SeqData(
        name=name,
        num_users=num_users,
        num_items=len(item_ids) - 1,
        **fields,
        user_ids=np.asarray(user_ids),
        item_ids=np.asarray(item_ids),
        item_titles=None if item_titles is None else np.asarray(item_titles),
        split_rule=rule,
    )
    return check_no_leak(data)


DUPLICATES = ("drop", "keep", "error")  # what `build` does with exact duplicate rows
MILLISECONDS_FROM = 10**11  # unix seconds past the year 5000: the timestamps are almost surely milliseconds


def build(
    name: str,
    table: readers.Interactions,
    *,
    min_item_interactions: int = 0,
    min_user_interactions: int = 0,
    titles: dict | None = None,
    duplicates: str = "drop",
    split: str | dict = "leave-one-out",
) -> SeqData:
    """Parsed rows in file order -> SeqData: sort per user by time (stable), drop duplicates, filter, remap ids,
    split, validate.

    Users are ordered by raw id; each user's interactions by timestamp, with file order breaking ties (file order
    alone when there are no timestamps). Exact duplicate rows are dropped (or kept / refused, see
    `find_duplicates`). Items with fewer than `min_item_interactions` are dropped in one pass (counts on the raw
    data, as SASRec's preprocessing), then users with fewer than `min_user_interactions` of the remaining
    interactions. With a temporal split the filters count only the interactions before the cutoff (a quantile
    cutoff is taken over the timestamps of every row left after the duplicates, before the filters): whatever
    happens after the cutoff is the future, and an item or user that reaches a threshold only through it is
    dropped. Items are renumbered 1..I in order of first appearance and users 0..U-1, so a file already in
    SASRec's form (like ml-1m.txt) keeps its item ids.
    """
    spec = split if isinstance(split, dict) else parse_split(split)
    source = table.source
    for key, value in (
        ("min_item_interactions", min_item_interactions),
        ("min_user_interactions", min_user_interactions),
    ):
        if int(value) < 0:
            raise DataError(f"{source}: dataset.{key} must be >= 0, got {value}")
    if duplicates not in DUPLICATES:
        raise DataError(f"{source}: dataset.duplicates must be one of {', '.join(DUPLICATES)}, got {duplicates!r}")
    # From here on build owns users, items and times (copies) and overwrites them (codes, dropped rows) instead
    # of allocating another (N,) array per step: on 20M rows each fresh 160 MB array costs more than the step.
    users, items, times = table.users, table.items, table.times
    order, scratch = _user_time_order(users, times)
    if order is None:
        users, items = users.copy(), items.copy()
        times = None if times is None else times.copy()
    else:
        # mode="clip" (the indices are all valid): with the default mode, take fills a hidden (N,) buffer first
        users = users[order] if scratch is None else np.take(users, order, out=scratch, mode="clip")
        items = items[order]
        times = None if times is None else times[order]
    lines = _LinesOfSortedRows(table, order)
    if times is not None:
        warn_about_timestamps(times, lines, source)
    keep = ~find_duplicates(users, items, times, lines, source, duplicates)
    del lines, order

    user_values, user_codes = _sorted_codes(users)  # (U,) raw ids, (N,) 0..U-1 in users' buffer
    item_values, item_codes = _dense_codes(items)  # (K,) raw ids, (N,) 0..K-1 (in items' buffer when dense)
    del users, items
    counted = keep  # the rows the filters count
    if spec["rule"] == TEMPORAL:
        spec, before = _cutoff_of(spec, times, keep, source)
        counted = keep & before  # never the future: counts before the cutoff only
    if min_item_interactions > 1:  # the filters count codes: the same counts as raw ids
        counts = np.bincount(item_codes[counted], minlength=len(item_values))
        keep &= counts[item_codes] >= min_item_interactions
    if min_user_interactions > 1:
        counts = np.bincount(user_codes[counted & keep], minlength=len(user_values))
        keep &= counts[user_codes] >= min_user_interactions
    if not keep.all():
        user_codes, item_codes, times = _drop_rows([user_codes, item_codes, times], keep)
        if len(user_codes) == 0:
            raise DataError(
                f"{source}: no interactions left after filtering (dataset.min_item_interactions="
                f"{min_item_interactions}, dataset.min_user_interactions={min_user_interactions}); expected at "
                f"least one row to survive: lower the thresholds"
            )
        kept_users, user_codes = _sorted_codes(user_codes)  # renumber the users left 0..U'-1
        user_values = user_values[kept_users]

    # users are numbered by first appearance too, which is ascending order for rows sorted by user
    user_ids, user_index = user_values, user_codes
    first_codes, item_index = _first_appearance(item_codes, len(item_values))
    item_raw = item_values[first_codes]
    item_index += 1
    if table.user_names is not None:  # text ids: users/items are ranks into the names, which sort the same way
        user_ids = table.user_names[user_ids]
    if table.item_names is not None:
        item_raw = table.item_names[item_raw]
    item_ids = np.concatenate([np.zeros(1, dtype=item_raw.dtype), item_raw])
    item_titles = None
    if titles is not None:
        item_titles = np.array([""] + [titles.get(_plain(i), "") for i in item_raw], dtype=str)
        missing = int(np.count_nonzero(item_titles[1:] == ""))
        if missing:
            log.warning("%s: %d of %d items have no title", source, missing, len(item_raw))
    data = split_leave_one_out(name, user_index, item_index, times, user_ids, item_ids, item_titles, spec)
    return validate(data, source)


def _cutoff_of(spec: dict, times: np.ndarray | None, rows: np.ndarray, source: str) -> tuple[dict, np.ndarray]:
    """A temporal split's cutoff fixed before the filters: (the spec with its "cutoff", (N,) bool rows before it).

    A quantile is taken over the timestamps of `rows` (the rows left after the duplicates); the split then uses
    that same cutoff, whatever the filters remove.
    """
    times = check_temporal_input(times, source)
    cutoff = cutoff_time(times if rows.all() else times[rows], spec)
    return dict(spec, cutoff=cutoff), times < cutoff


# --------------------------------------------------------------------------- validation (every dataset passes here)


def find_duplicates(
    users: np.ndarray,
    items: np.ndarray,
    times: np.ndarray | None,
    lines: np.ndarray,
    source: str,
    duplicates: str = "drop",
) -> np.ndarray:
    """Exact duplicate rows of rows sorted by user (then time, then file order); warns or raises per `duplicates`.

    The rule: with timestamps, a row with the same (user, item, timestamp) as an earlier row is a duplicate;
    repeated consumption at another time is kept. Without timestamps, a row that repeats the same user's previous
    row (the same item straight again) is a duplicate, because nothing tells it from a line written twice; a
    repeat with other items in between (a b a) is kept. The first row of each group is kept.

    Args:
        users, items: (N,) int64, sorted by user, then time, then file order.
        times: (N,) int64 or None.
        lines: the file line of each row: an (N,) int64 array or anything indexed like one (`lines[rows]`).
        duplicates: "drop" (warn with the count), "keep" (warn, keep them) or "error" (raise DataError).

    Returns:
        (N,) bool, True at the rows to drop (all False for "keep").
    """
    n = len(users)
    dup = np.zeros(n, dtype=bool)
    if n < 2:
        return dup
    if times is None:
        order = np.arange(n)
        same = (users[1:] == users[:-1]) & (items[1:] == items[:-1])
    else:
        # Only rows that share (user, timestamp) with a neighbour can be duplicates (rows are sorted by user and
        # time); sorting just those by item makes duplicates neighbours, earliest line first.
        tie = (users[1:] == users[:-1]) & (times[1:] == times[:-1])
        candidate = np.zeros(n, dtype=bool)
        candidate[1:] |= tie
        candidate[:-1] |= tie
        order = np.flatnonzero(candidate)
        order = order[np.lexsort((lines[order], items[order], times[order], users[order]))]
        u, i, t = users[order], items[order], times[order]
        same = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (t[1:] == t[:-1])
    dup[order[1:][same]] = True
    count = int(dup.sum())
    if count == 0:
        return dup
    # the earliest duplicate line in the file, and the line it repeats
    dup_rows = np.flatnonzero(dup)
    first = int(dup_rows[np.argmin(lines[dup_rows])])
    pos = int(np.flatnonzero(order == first)[0])
    original = pos - 1
    while dup[order[original]]:
        original -= 1
    what = "same user, item and timestamp" if times is not None else "same user and item straight again, no timestamps"
    where = f"{source}:{int(lines[first])}: duplicate of line {int(lines[order[original]])} ({what})"
    if duplicates == "error":
        raise DataError(f"{where}; {count} duplicate row{'s' * (count > 1)} in all (dataset.duplicates=error)")
    action = "kept (dataset.duplicates=keep)" if duplicates == "keep" else "dropped (dataset.duplicates=drop)"
    log.warning("%s; %d duplicate row%s in all, %s", where, count, "s" * (count > 1), action)
    return dup if duplicates == "drop" else np.zeros(n, dtype=bool)


def warn_about_timestamps(times: np.ndarray, lines: np.ndarray, source: str) -> None:
    """Warn about legal but suspicious timestamps: negative (before 1970) or so large they look like milliseconds."""
    negative = np.flatnonzero(times < 0)
    if len(negative):
        first = negative[np.argmin(lines[negative])]
        log.warning(
            "%s:%d: %d negative timestamp%s (before 1970), kept: only differences between timestamps are used",
            source,
            int(lines[first]),
            len(negative),
            "s" * (len(negative) > 1),
        )
    huge = np.flatnonzero(times >= MILLISECONDS_FROM)
    if len(huge):
        first = huge[np.argmin(lines[huge])]
        log.warning(
            "%s:%d: timestamp %d is past the year 5000 in unix seconds (%d such rows): milliseconds? seqrec reads "
            "seconds, so TiSASRec's model.time_unit buckets would be 1000x too fine; divide them by 1000",
            source,
            int(lines[first]),
            int(times[first]),
            len(huge),
        )


def validate(data: SeqData, source: str = "") -> SeqData:
    """Check the invariants every later stage relies on; raise DataError naming `source` for the first broken one.

    Structure (CSR offsets, id ranges, array lengths, timestamps in order within each user), then usability: at
    least one user with a validation and a test target, and one user with a training window (>= 2 training items).
    Warns about items that are only ever targets (their embeddings never train). Returns `data` unchanged.
    """
    source = source or data.name
    _check_structure(data, source)
    _check_time_order(data, source)
    _check_usable(data, source)
    _report_cold_items(data, source)
    short = int(np.count_nonzero(data.valid_item == 0))
    if short:
        log.info("%s: %d users with < 3 interactions are used for training only", source, short)
    return data


def _check_structure(data: SeqData, source: str) -> None:
    u, i = data.num_users, data.num_items
    ptr = np.asarray(data.train_ptr)
    checks = (
        (u >= 1, f"no users, expected at least one (num_users={u})"),
        (i >= 1, f"no items, expected at least one (num_items={i})"),
        (ptr.shape == (u + 1,), f"train_ptr has shape {ptr.shape}, expected ({u + 1},)"),
        (len(ptr) == 0 or (ptr[0] == 0 and ptr[-1] == len(data.train_items)), "train_ptr does not span train_items"),
        (bool(np.all(np.diff(ptr) >= 0)), "train_ptr is not non-decreasing"),
        (data.valid_item.shape == (u,) and data.test_item.shape == (u,), f"valid/test targets need shape ({u},)"),
        (_in_range(data.train_items, 1, i), f"training items must lie in 1..{i}"),
        (_in_range(data.valid_item, 0, i) and _in_range(data.test_item, 0, i), f"targets must lie in 0..{i}"),
        (len(data.item_ids) == i + 1 and len(data.user_ids) == u, "user_ids/item_ids do not match the counts"),
    )
    if data.has_time:
        checks += (
            (
                data.train_times.shape == data.train_items.shape
                and data.valid_time is not None
                and data.test_time is not None
                and data.valid_time.shape == (u,)
                and data.test_time.shape == (u,),
                "timestamps do not match the items",
            ),
        )
    for ok, problem in checks:
        if not ok:
            raise DataError(f"{source}: malformed dataset: {problem}")


def _check_time_order(data: SeqData, source: str) -> None:
    """Timestamps never go back within a user: training items, then the validation target, then the test target."""
    if not data.has_time:
        return
    t, ptr = data.train_times, data.train_ptr
    lengths = np.diff(ptr)
    inner = np.ones(max(len(t) - 1, 0), dtype=bool)  # consecutive pairs within one user
    starts = ptr[1:-1]
    inner[starts[(starts > 0) & (starts < len(t))] - 1] = False
    back = np.flatnonzero(inner & (t[1:] < t[:-1]))
    last_train = np.where(lengths > 0, t[np.maximum(ptr[1:] - 1, 0)] if len(t) else 0, np.iinfo(np.int64).min)
    has_valid, has_test = data.valid_item > 0, data.test_item > 0
    bad_users = np.flatnonzero(
        (has_valid & (data.valid_time < last_train)) | (has_test & has_valid & (data.test_time < data.valid_time))
    )
    if len(back):
        bad_users = np.union1d(bad_users, np.searchsorted(ptr, back, side="right") - 1)
    if len(bad_users):
        user = data.user_ids[bad_users[0]]
        raise DataError(
            f"{source}: timestamps of user {_plain(user)} go back in time after sorting "
            f"({len(bad_users)} users), expected each user's interactions in time order"
        )


def _check_usable(data: SeqData, source: str) -> None:
    """At least one validation target, one test target and one training window, or every later stage is empty."""
    counts = data.train_lengths + (data.valid_item > 0) + (data.test_item > 0)
    most = int(counts.max()) if len(counts) else 0
    for split in SPLITS:
        if not np.any(data._target(split) > 0):
            raise DataError(
                f"{source}: no user has a {'validation' if split == 'valid' else 'test'} target: leave-one-out "
                f"holds out each user's last two interactions and needs users with >= 3 interactions "
                f"(the most any of the {data.num_users:,} users has here: {most})"
            )
    if not np.any(data.train_lengths >= 2):
        raise DataError(
            f"{source}: no user has 2 training interactions left after the validation and test targets are held "
            f"out, so there is nothing to train on; expected a user with >= 4 interactions (the most here: {most})"
        )


def _report_cold_items(data: SeqData, source: str) -> None:
    """Warn about items that are validation/test targets but never occur in training (untrained embeddings)."""
    seen = np.zeros(data.num_items + 1, dtype=bool)
    seen[data.train_items] = True
    targets = np.concatenate([data.valid_item[data.valid_item > 0], data.test_item[data.test_item > 0]])
    cold = np.unique(targets[~seen[targets]])
    if len(cold):
        log.warning(
            "%s: %d item%s appear only as validation/test targets, never in training (e.g. item %s): "
            "their embeddings keep their initial values and they are rarely ranked high",
            source,
            len(cold),
            "s" * (len(cold) > 1),
            _plain(data.item_ids[cold[0]]),
        )


def _in_range(values: np.ndarray, low: int, high: int) -> bool:
    return len(values) == 0 or (int(values.min()) >= low and int(values.max()) <= high)


def _sorted_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing int64 values -> (distinct values, ascending; (N,) int64 index of each row's value among
    them), the index written over `values`.

    For sorted values this is the numbering by first appearance, found in one pass without a hash table.
    """
    new = np.ones(len(values), dtype=bool)
    np.not_equal(values[1:], values[:-1], out=new[1:])
    distinct = values[new]
    np.cumsum(new, out=values)
    values -= 1
    return distinct, values


def _dense_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((K,) the value of each code, (N,) int64 codes in 0..K-1), where equal values get equal codes.

    Values that span a range no wider than about N (item ids almost always) are coded as value - min, written
    over `values`, with K the width of the range, some codes unused; otherwise Arrow's hash table numbers the
    distinct values, in a new array.
    """
    low, high = int(values.min()), int(values.max())
    if high - low < len(values) + (1 << 16):
        values -= low
        return np.arange(low, high + 1, dtype=np.int64), values
    column = pa.array(values)
    distinct = pc.unique(column)
    codes = pc.index_in(column, value_set=distinct).to_numpy().astype(np.int64, copy=False)
    return distinct.to_numpy(zero_copy_only=False).astype(values.dtype, copy=False), codes


_FEW_DROPPED = 4096  # up to this many dropped rows, `_drop_rows` moves the rows in place


def _drop_rows(columns: list, keep: np.ndarray) -> list:
    """`column[keep]` for each (N,) column (None stays None). When few rows go (duplicates), the rows after each
    dropped one are moved left in place and views are returned: no new (N,) arrays. The columns are overwritten."""
    dropped = np.flatnonzero(~keep)
    if len(dropped) > _FEW_DROPPED:
        return [None if c is None else c[keep] for c in columns]
    out = []
    for column in columns:
        if column is None:
            out.append(None)
            continue
        write = int(dropped[0])
        for start, stop in zip(dropped + 1, np.append(dropped[1:], len(column))):
            # 1-D slices in the same direction: numpy moves overlapping data like memmove, without a copy
            column[write : write + stop - start] = column[start:stop]
            write += stop - start
        out.append(column[:write])
    return out


_SCAN = 1 << 16  # rows looked at per step of `_first_appearance`


def _first_appearance(codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes that occur, in order of first appearance; (N,) int64 index of each row's code among them, written
    over `codes`).

    codes: (N,) int64 in 0..k-1. The rows are scanned in blocks; a block's unseen codes (few after the first
    blocks: a catalogue is mostly seen early) are ordered by their first row in it. Linear in N, no sort of N.
    """
    seen = np.zeros(k, dtype=bool)
    found = []
    for start in range(0, len(codes), _SCAN):
        block = codes[start : start + _SCAN]
        fresh = block[~seen[block]]
        if len(fresh):
            values, first_row = np.unique(fresh, return_index=True)
            values = values[np.argsort(first_row)]
            seen[values] = True
            found.append(values)
    ordered = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    rank = np.zeros(k, dtype=np.int64)
    rank[ordered] = np.arange(len(ordered), dtype=np.int64)
    for start in range(0, len(codes), _SCAN):  # in place, a block at a time: no second (N,) array
        block = codes[start : start + _SCAN]
        block[...] = rank[block]
    return ordered, codes


def _user_time_order(users: np.ndarray, times: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(the stable order by user, then timestamp (file order breaks ties), or None when rows are in it already;
    a scratch (N,) int64 array free for reuse, or None).

    Both keys are packed into one int64 when they fit (one stable sort instead of np.lexsort's two); the order is
    the same as np.lexsort((times, users)). The packed key is the scratch array once the sort is done.
    """
    if times is None:
        key = scratch = users
    else:
        u_low, t_low = int(users.min()), int(times.min())
        span = int(times.max()) - t_low + 1
        if (int(users.max()) - u_low + 1) * span >= 2**63:
            return np.lexsort((times, users)), None
        # (users - u_low) * span + (times - t_low) in place: one (N,) array instead of four. A partial sum may
        # wrap around int64, but the final key fits, and wrapping arithmetic is exact modulo 2**64.
        key = scratch = users - u_low
        key *= span
        key += times
        key -= t_low
    if not np.any(key[1:] < key[:-1]):
        return None, None
    return np.argsort(key, kind="stable"), (None if scratch is users else scratch)


class _LinesOfSortedRows:
    """File lines of the sorted rows, looked up for the rows a warning or an error names: an (N,) array of them
    would cost 160 MB on 20M rows and is almost never read. `lines[rows]` as for an array."""

    def __init__(self, table: readers.Interactions, order: np.ndarray | None):
        self._table, self._order = table, order  # order: sorted row -> file row (None: the same)

    def __getitem__(self, rows):
        rows = np.asarray(rows)
        return self._table.lines_of(rows if self._order is None else self._order[rows])


def _plain(x):
    return x.item() if isinstance(x, np.generic) else x


# --------------------------------------------------------------------------- Hydra factories (conf/dataset/*.yaml)


@config_rules(**{**generator.generate.RULES, "seed": SEED})  # the generator's rules; seeds as the run's seed
def synthetic(
    *,
    num_users: int = 2000,
    num_items: int = 1000,
    seed: int = 0,
    mean_length: float = 50.0,
    min_length: int = 5,
    max_length: int = 200,
    zipf_exponent: float = 1.0,
    p_habit: float = 0.6,
    habit_lag_hours: float = 24.0,
    mean_gap_hours: float = 6.0,
    p_pattern: float = 0.5,
    num_topics: int = 20,
    topic_strength: float = 0.5,
    split: str = "leave-one-out",
) -> SeqData:
    """The bundled default dataset: generated in well under a second, no download (see `seqrec.data.synthetic`).

    Args:
        num_users: users U.
        num_items: items I (ids 1..I, all of them valid ranking candidates).
        seed: the data's own seed (independent of the run's seed): same seed, same data.
        mean_length: mean sequence length before clipping (lognormal).
        min_length: shortest sequence.
        max_length: longest sequence.
        zipf_exponent: item popularity ~ 1 / rank ** zipf_exponent.
        p_habit: probability of the habit: next = the habit successor of the latest item consumed at least
            habit_lag_hours before the current one (if not consumed yet); only timestamps locate that item.
        habit_lag_hours: the habit's lag ("what I did a day ago").
        mean_gap_hours: mean gap between consecutive interactions (gamma, shape 2).
        p_pattern: otherwise, probability that the next item is the last item's successor.
        num_topics: topics for the per-user preference of the non-pattern draws.
        topic_strength: probability that a non-pattern draw comes from the user's topic.
        split: leave-one-out | temporal:q<quantile> | temporal:t<unix seconds> (see `seqrec.data.split`).

    Returns:
        SeqData named "synthetic", with timestamps.
    """
    source = "dataset=synthetic"
    s = generator.generate(
        num_users=num_users,
        num_items=num_items,
        seed=seed,
        mean_length=mean_length,
        min_length=min_length,
        max_length=max_length,
        zipf_exponent=zipf_exponent,
        p_habit=p_habit,
        habit_lag_hours=habit_lag_hours,
        mean_gap_hours=mean_gap_hours,
        p_pattern=p_pattern,
        num_topics=num_topics,
        topic_strength=topic_strength,
    )
    data = split_leave_one_out(
        "synthetic",
        s.users,
        s.items,
        s.times,
        user_ids=np.arange(num_users, dtype=np.int64),
        item_ids=np.arange(num_items + 1, dtype=np.int64),
        split=parse_split(split, "dataset.split"),
    )
    return validate(data, source)


@config_rules(
    format=one_of(*readers.FORMATS),
    min_item_interactions=NON_NEGATIVE,
    min_user_interactions=NON_NEGATIVE,
    duplicates=one_of(*DUPLICATES),
)
def from_file(
    *,
    path: str,
    format: str = "auto",
    min_item_interactions: int = 0,
    min_user_interactions: int = 0,
    titles_path: str | None = None,
    duplicates: str = "drop",
    split: str = "leave-one-out",
    ids: str = "integer",
    cache: bool = True,
) -> SeqData:
    """Any interaction file: SASRec `user item`, MovieLens u.data / ratings.csv / ratings.dat, a generic
    `user item [timestamp]` file (whitespace, comma or tab separated, optional header), Parquet or JSON lines.

    Args:
        path: the interaction file, relative to the current directory.
        format: auto | sasrec | udata | csv | dat | generic (Parquet and JSON lines are recognised with auto).
        min_item_interactions: drop items with fewer interactions (one pass; SASRec's ML-1M uses 5).
        min_user_interactions: then drop users with fewer interactions.
        titles_path: optional movies.dat / u.item / movies.csv / titles.tsv for item titles.
        duplicates: drop | keep | error: what to do with exact duplicate rows (see `find_duplicates`).
        split: leave-one-out | temporal:q<quantile> | temporal:t<unix seconds> (see `seqrec.data.split`).
        ids: integer | string: integer ids only, or any text ids (Amazon, Yelp); predictions name the original ids.
        cache: keep the built dataset in the processed cache (`seqrec.data.cache`) and load it from there.

    Returns:
        SeqData named after the file.
    """

    def load() -> SeqData:
        table = readers.load_interactions(path, format, ids)
        titles = readers.read_titles(titles_path) if titles_path else None
        return build(
            Path(path).stem,
            table,
            min_item_interactions=int(min_item_interactions),
            min_user_interactions=int(min_user_interactions),
            titles=titles,
            duplicates=duplicates,
            split=parse_split(split, "dataset.split"),
        )

    settings = dict(
        factory="from_file",
        name=Path(path).stem,
        format=format,
        min_item_interactions=int(min_item_interactions),
        min_user_interactions=int(min_user_interactions),
        duplicates=duplicates,
        split=split,
        ids=ids,
    )
    data = _through_cache(load, [path, titles_path], settings, cache)
    log.info("%s", data.summary())
    return data


def _through_cache(load, files: list, settings: dict, use_cache: bool) -> SeqData:
    """`load()`, or the processed-cache entry of the same files and settings (written after a fresh load).

    The warnings of the fresh load (duplicates, suspicious timestamps, missing titles) are stored with the entry
    and repeated on every cached load, so a cached run tells the user what the first one did.
    """
    if not use_cache:
        return load()
    from seqrec.data import cache

    for f in files:  # a missing file is reported by the loader, with its usual message
        if f is not None and not Path(f).is_file():
            return load()
    settings = dict(settings, files=[None if f is None else str(Path(f).resolve()) for f in files])
    key = cache.entry_key(files, settings)
    entry = cache.load(key, SeqData)
    if entry is not None:
        data, warnings = entry
        for message in warnings:
            log.warning("%s", message)
        log.info("%s: loaded from the processed cache (%s)", files[0], key)
        with _Silenced(log):  # its warnings were recorded and repeated above
            return validate(data, str(files[0]))
    with _Recorder() as recorded:
        data = load()
    cache.store(key, data, recorded.messages)
    return data


class _Silenced(logging.Filter):
    """Drops the warnings of `logger` while active."""

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self._logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING

    def __enter__(self):
        self._logger.addFilter(self)
        return self

    def __exit__(self, *exc):
        self._logger.removeFilter(self)


class _Recorder(logging.Handler):
    """Collects the warnings logged under `seqrec.data` while it is active."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self._logger = logging.getLogger("seqrec.data")

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self):
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self)


@config_rules(duplicates=one_of(*DUPLICATES))
def prepared(
    *,
    name: str = "ml-1m",
    root: str = "data",
    duplicates: str = "drop",
    split: str = "leave-one-out",
    cache: bool = True,
) -> SeqData:
    """A dataset written by `python -m seqrec.data.prepare NAME --root ROOT` (`ROOT/NAME/interactions.tsv`, plus
    `titles.tsv` when available).

    Args:
        name: the dataset folder under root (e.g. "ml-1m").
        root: the data folder, relative to the current directory.
        duplicates: drop | keep | error: what to do with exact duplicate rows (see `find_duplicates`).
        split: leave-one-out | temporal:q<quantile> | temporal:t<unix seconds> (see `seqrec.data.split`).
        cache: keep the built dataset in the processed cache (`seqrec.data.cache`) and load it from there.

    Returns:
        SeqData named `name`.
    """
    folder = Path(root) / name
    path = folder / "interactions.tsv"
    if not path.is_file():
        raise DataError(
            f"{path}: not found; prepare the dataset first with `python -m seqrec.data.prepare {name} --root {root}` "
            f"(add --source PATH/TO/{name}.zip when offline)"
        )
    titles_file = folder / "titles.tsv"

    def load() -> SeqData:
        table = readers.load_interactions(path, "generic")
        titles = readers.read_titles(titles_file) if titles_file.is_file() else None
        return build(name, table, titles=titles, duplicates=duplicates, split=parse_split(split, "dataset.split"))

    settings = dict(factory="prepared", name=name, duplicates=duplicates, split=split)
    files = [path, titles_file if titles_file.is_file() else None]
    data = _through_cache(load, files, settings, cache)
    log.info("%s", data.summary())
    return data
