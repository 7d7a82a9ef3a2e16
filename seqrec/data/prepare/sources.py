"""Reading the downloaded files: plain, gzip, or a member of a zip/tar; CSV through pyarrow; one record per line as
JSON or as a Python literal (parsed with `ast.literal_eval`, never `eval`). Every malformed line is a `DataError`
naming the file and the line."""

from __future__ import annotations

import ast
import contextlib
import csv
import gzip
import io
import json
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from seqrec.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Source:
    """One input file: on disk, or a member of a zip/tar archive on disk."""

    path: Path  # the file on disk (its sha256 is recorded)
    member: str | None = None  # archive member, or None

    @property
    def label(self) -> str:
        """How errors name it: `path` or `archive:member`."""
        return f"{self.path}:{self.member}" if self.member else str(self.path)


def locate(path: str | Path, basenames: tuple[str, ...], expected: str) -> Source:
    """The input file: `path` itself, the first of `basenames` inside the folder `path`, or that member of the
    zip/tar archive `path`.

    Args:
        expected: what the user should pass, for the error messages (e.g. "ml-20m.zip or its ratings.csv").
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found (expected {expected})")
    if path.is_dir():
        if not basenames:
            raise DataError(f"{path}: is a folder; pass the file itself (expected {expected})")
        for name in basenames:
            if (path / name).is_file():
                return Source(path / name)
        raise DataError(f"{path}: folder has none of {', '.join(basenames)} (expected {expected})")
    if zipfile.is_zipfile(path):
        return Source(path, _member(_zip_names(path), basenames, path, expected))
    if path.suffix.lower() == ".zip":
        raise DataError(f"{path}: not a valid zip file (truncated download?); download it again")
    if path.name.endswith((".tar", ".tgz", ".tar.gz")) and _is_tar(path):
        with tarfile.open(path) as tf:
            names = [m.name for m in tf.getmembers() if m.isfile()]
        return Source(path, _member(names, basenames, path, expected))
    return Source(path)


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: cannot read the zip ({e}); download it again") from None


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _member(names: list[str], basenames: tuple[str, ...], archive: Path, expected: str) -> str:
    for basename in basenames:
        found = [n for n in names if n.rsplit("/", 1)[-1] == basename and not n.startswith("__MACOSX")]
        if found:
            return min(found, key=len)
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise DataError(f"{archive}: the archive has no {' or '.join(basenames)} (members: {shown}; expected {expected})")


@contextlib.contextmanager
def open_binary(source: Source) -> Iterator[BinaryIO]:
    """The file's bytes, gunzipped when they start with the gzip magic (whatever the file is called)."""
    with contextlib.ExitStack() as stack:
        try:
            if source.member is None:
                raw = stack.enter_context(open(source.path, "rb"))
            elif zipfile.is_zipfile(source.path):
                raw = stack.enter_context(stack.enter_context(zipfile.ZipFile(source.path)).open(source.member))
            else:
                tf = stack.enter_context(tarfile.open(source.path))
                raw = stack.enter_context(tf.extractfile(source.member))
        except (OSError, zipfile.BadZipFile, tarfile.TarError) as e:
            raise DataError(f"{source.label}: cannot be read ({e})") from None
        buffered = stack.enter_context(io.BufferedReader(raw, 1 << 20)) if not hasattr(raw, "peek") else raw
        if buffered.peek(2)[:2] == GZIP_MAGIC:
            buffered = stack.enter_context(gzip.GzipFile(fileobj=buffered))
        yield buffered


def first_line(source: Source) -> tuple[int, bytes]:
    """(line number, line) of the first non-blank line, a UTF-8 byte-order mark removed; (0, b"") when none."""
    lines = numbered_lines(source)
    try:
        lineno, line = next(lines, (0, b""))
    finally:
        lines.close()
    return lineno, line.removeprefix(b"\xef\xbb\xbf")


def numbered_lines(source: Source) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its newline) for every non-blank line."""
    with open_binary(source) as f:
        try:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip(b"\r\n")
                if line.strip():
                    yield lineno, line
        except (OSError, EOFError, gzip.BadGzipFile, zipfile.BadZipFile) as e:
            raise DataError(f"{source.label}: cannot be read to the end ({e}; truncated download?)") from None


# ------------------------------------------------------------------------------------------- one record per line


@dataclass(frozen=True)
class RecordFormat:
    """Which keys of a one-record-per-line file hold the user, the item and the time, and how to read the time."""

    name: str  # e.g. "Amazon 2014/2018 reviews"
    user: str
    item: str
    time: str
    time_kind: str  # "unix" (seconds), "unix_ms" (milliseconds), or a strptime format for date strings

    @property
    def keys(self) -> str:
        return f"{self.user}, {self.item}, {self.time}"


def read_records(source: Source, formats: tuple[RecordFormat, ...]) -> tuple[list, list, np.ndarray, RecordFormat]:
    """Users, items and unix-second times from a file of one JSON object or Python dict literal per line.

    The first record decides which of `formats` the file is in (the first whose keys it has); every line must then
    have those keys.

    Returns:
        (users, items, times, format): lists of the original ids as str, (N,) int64 seconds, the format found.
    """
    users: list = []
    items: list = []
    stamps: list = []
    linenos: list = []
    fmt = None
    parsers = [_parse_json, _parse_literal]
    for lineno, line in numbered_lines(source):
        record = None
        for k, parse in enumerate(parsers):
            record = parse(line)
            if record is not None:
                if k:  # the file is in the other syntax: try that one first from now on
                    parsers.reverse()
                break
        if fmt is None and isinstance(record, dict):
            fmt = next((f for f in formats if all(key in record for key in (f.user, f.item, f.time))), None)
        expected = fmt.keys if fmt is not None else " or ".join(f"{{{f.keys}}}" for f in formats)
        if (
            not isinstance(record, dict)
            or fmt is None
            or any(record.get(key) in (None, "") for key in (fmt.user, fmt.item, fmt.time))
        ):
            raise DataError(
                f"{source.label}:{lineno}: expected one JSON object or Python dict per line with {expected}, "
                f"got {show_line(line)!r}"
            )
        users.append(str(record[fmt.user]))
        items.append(str(record[fmt.item]))
        stamps.append(record[fmt.time])
        linenos.append(lineno)
    if fmt is None:
        raise DataError(f"{source.label}: empty file, expected one record per line")
    times = to_seconds(stamps, fmt.time_kind, source.label, linenos, fmt.time)
    return users, items, times, fmt


def _parse_json(line: bytes):
    try:
        return json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None


def _parse_literal(line: bytes):
    """A Python literal (the older McAuley dumps: single quotes, True/False/None); literal_eval evaluates no code."""
    try:
        return ast.literal_eval(line.decode("utf-8"))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def to_seconds(values: list, kind: str, label: str, linenos: list, key: str) -> np.ndarray:
    """(N,) int64 unix seconds; a DataError naming the first line whose value does not parse."""
    if kind in ("unix", "unix_ms"):
        parsed = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce")
        bad = parsed.isna().to_numpy() | ~np.isfinite(parsed.to_numpy(dtype=np.float64, na_value=np.nan))
        expected = "unix seconds" if kind == "unix" else "unix milliseconds"
    else:
        text = pd.Series([v if isinstance(v, str) else None for v in values], dtype=object)
        parsed = pd.to_datetime(text, format=kind, errors="coerce", utc=True)
        bad = parsed.isna().to_numpy()
        expected = f"a date {kind.replace('%Y', 'YYYY').replace('%m', 'MM').replace('%d', 'DD')}".replace(
            "%H:%M:%S", "HH:MM:SS"
        )
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise DataError(f"{label}:{linenos[k]}: expected {key} to be {expected}, got {values[k]!r}")
    if kind == "unix":
        return np.floor(parsed.to_numpy(dtype=np.float64)).astype(np.int64)
    if kind == "unix_ms":
        return np.floor_divide(parsed.to_numpy(dtype=np.float64), 1000).astype(np.int64)
    return parsed.to_numpy(dtype="datetime64[s]").astype(np.int64)  # dates are taken as UTC


def show_line(line: bytes, limit: int = 80) -> str:
    text = line.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------------------------------------- CSV


@dataclass(frozen=True)
class CsvLayout:
    """Where the user, item and time are in a CSV file."""

    columns: tuple[str, ...]  # names of all columns, in file order
    user: str
    item: str
    time: str
    header: bool  # the first line names the columns (and is skipped)
    integer_ids: bool  # ids must be integers (MovieLens); else kept as strings
    shown: str = ""  # the line shape for messages, when the column names do not say it

    @property
    def expected(self) -> str:
        shape = self.shown or "'" + ",".join(self.columns) + "'"
        return shape + (" lines after the header" if self.header else " lines")


def read_csv(source: Source, layout: CsvLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, times) of a CSV file in file order, parsed by pyarrow; times must be integers.

    On any parse error the file is scanned line by line to name the first bad line.
    """
    id_type = pa.int64() if layout.integer_ids else pa.string()
    read = pacsv.ReadOptions(column_names=list(layout.columns), skip_rows=1 if layout.header else 0, block_size=1 << 24)
    convert = pacsv.ConvertOptions(
        include_columns=[layout.user, layout.item, layout.time],
        column_types={layout.user: id_type, layout.item: id_type, layout.time: pa.int64()},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    try:
        with open_binary(source) as f:
            table = pacsv.read_csv(f, read_options=read, convert_options=convert)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        lineno, line = _first_bad_csv_line(source, layout)
        if lineno:
            raise DataError(f"{source.label}:{lineno}: expected {layout.expected}, got {line!r}") from None
        raise DataError(f"{source.label}: cannot be parsed as {layout.expected} ({str(e).splitlines()[0]})") from None
    if table.num_rows == 0:
        raise DataError(f"{source.label}: no interactions, expected {layout.expected}")
    users, items, times = (table.column(c) for c in (layout.user, layout.item, layout.time))
    if layout.integer_ids:
        return users.to_numpy(), items.to_numpy(), times.to_numpy()
    as_objects = dict(zero_copy_only=False)
    return users.to_numpy(**as_objects), items.to_numpy(**as_objects), times.to_numpy()


def _first_bad_csv_line(source: Source, layout: CsvLayout) -> tuple[int, str]:
    """Line scan (only after pyarrow failed): the first line with the wrong field count or a bad id/time."""
    wanted = [layout.columns.index(c) for c in (layout.user, layout.item, layout.time)]
    integer = [layout.integer_ids, layout.integer_ids, True]
    first = True
    for lineno, line in numbered_lines(source):
        if first and layout.header:
            first = False
            continue
        first = False
        try:
            fields = next(csv.reader([line.decode("utf-8")]))
        except (UnicodeDecodeError, csv.Error, StopIteration):
            return lineno, show_line(line)
        if len(fields) != len(layout.columns):
            return lineno, show_line(line)
        for col, must_be_int in zip(wanted, integer):
            if not fields[col].strip() or (must_be_int and not _is_int(fields[col])):
                return lineno, show_line(line)
    return 0, ""


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
