"""What every `prepare` command shares: atomic writes, checksums, downloads, and the benchmark pipeline
(date window -> k-core filter -> chronological order -> dense ids -> `interactions.tsv` plus id mappings)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from seqrec.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Raw:
    """Interactions as read from the source, in file order (file order is the tie-break on equal timestamps)."""

    users: np.ndarray  # (N,) original user ids (int64, or object array of str)
    items: np.ndarray  # (N,) original item ids
    times: np.ndarray  # (N,) int64 unix seconds


@dataclass(frozen=True)
class Filters:
    """The preprocessing a paper applied, as data: recorded in meta.json and README.md."""

    min_user: int  # users with fewer interactions are removed
    min_item: int  # items with fewer interactions are removed
    iterate: bool  # True: repeat until both hold (k-core fixed point); False: one pass on the raw counts
    since: int | None = None  # keep interactions with since <= timestamp < until (unix seconds)
    until: int | None = None

    def describe(self) -> str:
        parts = ["every interaction kept as implicit feedback"]
        if self.since is not None or self.until is not None:
            parts.append(f"only timestamps in [{_iso(self.since)}, {_iso(self.until)}) (UTC)")
        rules = [
            f"{kind} with < {k} interactions"
            for kind, k in (("users", self.min_user), ("items", self.min_item))
            if k > 1
        ]
        if rules:
            how = (
                " repeatedly until none is left (k-core fixed point)"
                if self.iterate
                else " in one pass, on the raw counts"
            )
            parts.append(" and ".join(rules) + " removed" + how)
        parts.append("each user's interactions sorted by timestamp, equal timestamps kept in file order")
        return "; ".join(parts)


def run_pipeline(raw: Raw, filters: Filters, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list, list]:
    """Filter, order and renumber.

    Returns:
        (users, items, times): (M,) int64 each, users 1..U in the order of their sorted original ids, items 1..I
        in order of first appearance in the output (so the `file`/`prepared` readers keep these item ids), rows
        sorted by (user, timestamp) with file order breaking ties; then the original user and item ids, where
        entry k-1 is the original id of dense id k.
    """
    users, items, times = raw.users, raw.items, raw.times
    if filters.since is not None or filters.until is not None:
        window = np.ones(len(times), dtype=bool)
        if filters.since is not None:
            window &= times >= filters.since
        if filters.until is not None:
            window &= times < filters.until
        users, items, times = users[window], items[window], times[window]
    user_code, user_names = pd.factorize(users, sort=True)  # (N,) codes into the sorted distinct ids
    item_code, item_names = pd.factorize(items, sort=False)
    keep = k_core(user_code, item_code, filters.min_user, filters.min_item, filters.iterate)
    if not keep.any():
        raise DataError(f"{source}: no interactions left after filtering ({filters.describe()})")
    user_code, item_code, times = user_code[keep], item_code[keep], times[keep]

    order = _chronological_order(user_code, times)
    user_code, item_code, times = user_code[order], item_code[order], times[order]
    kept_users, user_dense = _dense_ranks(user_code, len(user_names))  # in sorted original-id order
    item_dense, item_first = pd.factorize(item_code, sort=False)  # in order of first appearance
    user_ids = [_plain(x) for x in np.asarray(user_names)[kept_users]]
    item_ids = [_plain(x) for x in np.asarray(item_names)[item_first]]
    return user_dense + 1, item_dense.astype(np.int64) + 1, times.astype(np.int64), user_ids, item_ids


def _chronological_order(user_code: np.ndarray, times: np.ndarray) -> np.ndarray:
    """(N,) permutation sorting by (user, time), stable: equal timestamps keep their file order.

    One stable sort of a combined int64 key (user in the high 32 bits, time offset in the low 32) is about twice
    as fast as lexsort on two keys for 20M rows; lexsort remains for time spans beyond 136 years.
    """
    span = int(times.max()) - int(times.min()) if len(times) else 0
    if span < 2**32 and int(user_code.max(initial=0)) < 2**31:
        key = (user_code.astype(np.int64) << 32) | (times - times.min()).astype(np.int64)
        return np.argsort(key, kind="stable")
    return np.lexsort((times, user_code))


def _dense_ranks(codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct codes present, ascending; (N,) int64 rank of each code among them), in O(N + n)."""
    present = np.zeros(n, dtype=bool)
    present[codes] = True
    rank = np.cumsum(present, dtype=np.int64) - 1
    return np.flatnonzero(present), rank[codes]


def k_core(users: np.ndarray, items: np.ndarray, min_user: int, min_item: int, iterate: bool) -> np.ndarray:
    """(N,) bool mask of the interactions kept.

    Args:
        users, items: (N,) int64 codes 0..U-1 and 0..I-1.
        iterate: repeat until every kept user has >= min_user and every kept item >= min_item interactions
            (removing items can push users under the threshold and back); False applies both thresholds once, to
            the counts on the unfiltered data (SASRec's preprocessing).
    """
    keep = np.ones(len(users), dtype=bool)
    while True:
        user_count = np.bincount(users[keep], minlength=int(users.max(initial=-1)) + 1)
        item_count = np.bincount(items[keep], minlength=int(items.max(initial=-1)) + 1)
        new = keep & (user_count[users] >= min_user) & (item_count[items] >= min_item)
        if not iterate or np.array_equal(new, keep):
            return new
        keep = new


def write_prepared(
    out: Path, name: str, columns: tuple, user_ids: list, item_ids: list, meta: dict, readme: str
) -> None:
    """Write `interactions.tsv` (`user<TAB>item<TAB>timestamp`, header), `<name>.users.tsv` and
    `<name>.items.tsv` (`dense id<TAB>original id`), `meta.json` and `README.md`, each atomically."""
    out.mkdir(parents=True, exist_ok=True)
    users, items, times = columns
    _write_table_atomic(out / "interactions.tsv", {"user": users, "item": items, "timestamp": times})
    for kind, ids in (("user", user_ids), ("item", item_ids)):
        dense = np.arange(1, len(ids) + 1, dtype=np.int64)
        original = pa.array([str(i) for i in ids], type=pa.string())
        _write_table_atomic(out / f"{name}.{kind}s.tsv", {kind: dense, "original_id": original})
    write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    write_atomic(out / "README.md", readme)


def _write_table_atomic(path: Path, columns: dict) -> None:
    """A TSV with a bare header line, rows written by pyarrow (fast for 20M rows); an id holding a tab, quote or
    newline is quoted as in CSV, everything else is written as is."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="needed")
    try:
        with open(tmp, "wb") as f:
            f.write(("\t".join(columns) + "\n").encode())
            pacsv.write_csv(pa.table(columns), f, options)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, name: str) -> Path:
    """Download the zip at `url` to `dest` (kept for later runs); a clear DataError when offline."""
    if dest.is_file() and zipfile.is_zipfile(dest):
        log.info("using the cached %s", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    hint = f"download {url} elsewhere and run `python -m seqrec.data.prepare {name} --source PATH/TO/{dest.name}`"
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            bar = _progress(total, dest.name)
            while chunk := resp.read(1 << 16):
                f.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise DataError(f"cannot download {url} ({reason}); {hint}") from None
    if not zipfile.is_zipfile(tmp):
        tmp.unlink(missing_ok=True)
        raise DataError(f"{url}: the download is not a zip file; {hint}")
    os.replace(tmp, dest)
    return dest


def _progress(total: int | None, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc)


def _iso(seconds: int | None) -> str:
    if seconds is None:
        return "..."
    return str(np.datetime64(int(seconds), "s")).replace("T", " ")


def _plain(x):
    return x.item() if isinstance(x, np.generic) else x


def read_prepared(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, times) of a prepared `interactions.tsv`, (N,) int64 each in file order, parsed by pyarrow
    (20M rows in a few seconds, where the general reader `readers.read_interactions` needs tens of seconds).

    Any file pyarrow rejects goes through `readers.read_interactions(path, "generic")`, whose DataError names the
    first bad line.
    """
    from seqrec.data import readers  # the general reader, only for its error messages

    types = {"user": pa.int64(), "item": pa.int64(), "timestamp": pa.int64()}
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter="\t"),
            convert_options=pacsv.ConvertOptions(column_types=types, include_columns=list(types)),
        )
        if table.num_rows and all(table.column(c).null_count == 0 for c in types):
            return tuple(table.column(c).to_numpy() for c in types)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowKeyError, OSError):
        pass
    users, items, times = readers.read_interactions(path, "generic")
    if times is None:
        raise DataError(f"{path}: expected the header 'user<TAB>item<TAB>timestamp' of a prepared file")
    return users, items, times
