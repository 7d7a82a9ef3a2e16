"""Readers for interaction files (SASRec `user item`, MovieLens u.data / ratings.csv / ratings.dat, generic
`user item [timestamp]`) and item-title files (movies.dat, u.item, movies.csv, titles.tsv).

Interaction files are parsed by pyarrow, multi-threaded (`seqrec.data.columnar`); when pyarrow refuses a file, it
is parsed in bulk with numpy, and only when that fails too is the file scanned line by line, so the error names the
first bad line. Both parsers give the same arrays for every file both accept. Parquet and JSON-lines files
(recognised by their content) are read by pyarrow with named columns. Every problem with the input raises
`DataError` with one line naming the file.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from seqrec.data import columnar
from seqrec.errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("auto", "sasrec", "udata", "csv", "dat", "generic")

_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True  # exactly the bytes that bytes.split() splits on
_ID_NAMES = {
    "user": ("user", "userid", "user_id", "uid", "users", "visitorid", "customer_id"),
    "item": ("item", "itemid", "item_id", "iid", "items", "movieid", "movie_id", "product_id", "productid"),
    "time": ("timestamp", "time", "ts", "unix_timestamp", "datetime", "date"),
}


# Timestamps are subtracted pairwise (time intervals); below this bound no difference overflows int64.
MAX_ABS_TIMESTAMP = 2**62


@dataclass(frozen=True)
class Interactions:
    """Parsed interaction rows in file order, with where each came from (for errors that name a line).

    Line numbers are given either for every row (`row_lines`) or, when row k is on line `first_line + k` (every
    file the pyarrow fast path reads), by `first_line` alone: a 20M-row file then carries no 160 MB array of
    consecutive numbers, and `build` asks only for the lines of the rows it names.
    """

    users: np.ndarray  # (N,) int64 raw user ids
    items: np.ndarray  # (N,) int64 raw item ids
    times: np.ndarray | None  # (N,) int64 unix seconds, or None when the format has no timestamps
    row_lines: np.ndarray | None  # (N,) int64 1-based line of each row, or None: row k is on line first_line + k
    source: str  # the file (or archive member) the rows were read from
    user_names: np.ndarray | None = None  # (U,) str original ids when ids are text; `users` then index into it
    item_names: np.ndarray | None = None  # (I,) str, likewise for `items`
    first_line: int = 1  # line of row 0 when row_lines is None (row number for Parquet)

    @property
    def lines(self) -> np.ndarray:
        """(N,) int64 1-based line number of each row in `source` (row number for Parquet)."""
        return self.lines_of(np.arange(len(self.users), dtype=np.int64))

    def lines_of(self, rows: np.ndarray) -> np.ndarray:
        """(K,) int64 line numbers of the rows `rows` ((K,) int64 row indices)."""
        if self.row_lines is not None:
            return self.row_lines[rows]
        return rows + self.first_line

    def where(self, row: int) -> str:
        """`source:line` of row `row`."""
        return f"{self.source}:{int(self.lines_of(np.int64(row)))}"


@dataclass(frozen=True)
class _Layout:
    """How to cut a file into columns."""

    format: str
    sep: str  # "ws" (any whitespace), ",", "\t" or "::"
    ncols: int
    user_col: int
    item_col: int
    time_col: int | None
    header: bool  # the first non-empty line is a header
    expected: str  # the line shape, for error messages


def read_interactions(
    path: str | Path, format: str = "auto", ids: str = "integer"
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read an interaction file in file order.

    Args:
        path: the file: `sasrec` (`user item`), `udata` (`user<TAB>item<TAB>rating<TAB>ts`), `csv`
            (`userId,movieId,rating,timestamp` with a header), `dat` (`UserID::MovieID::Rating::Timestamp`) or
            `generic` (`user item [timestamp]` separated by whitespace, commas or tabs, optional header).
            Parquet and JSON-lines files are recognised by their content (with `auto`).
        format: one of `FORMATS`; `auto` detects it from the first non-empty lines.
        ids: "integer" (ids must be integers) or "string" (any text; ids are then returned as their rank among
            the distinct values, see `load_interactions` for the values themselves).

    Returns:
        (users, items, times): (N,) int64 raw ids in file order, and (N,) int64 unix seconds (integers or ISO-8601
        dates in the file) or None when the format has no timestamps.

    Raises:
        DataError: missing or empty file, wrong field count, non-integer ids, non-numeric or out-of-range
            timestamps.
    """
    table = load_interactions(path, format, ids)
    return table.users, table.items, table.times


def load_interactions(path: str | Path, format: str = "auto", ids: str = "integer") -> Interactions:
    """`read_interactions` that also keeps each row's line number, for later checks that name a line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found (expected an interaction file: 'user item [timestamp]' lines)")
    if not path.is_file():
        raise DataError(f"{path}: is a directory, expected an interaction file ('user item [timestamp]' lines)")
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
        table = _fast_text_file(path, head, format, ids)
        if table is not None:
            return table
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    return parse_table(data, str(path), format, ids)


_HEAD = 1 << 16  # bytes read to detect the layout (and binary content) before the whole file is parsed


def _fast_text_file(path: Path, head: bytes, format: str, ids: str) -> Interactions | None:
    """A plain-text file parsed by pyarrow straight from disk (no copy of the file in memory), or None when the
    general path must read it (Parquet, JSON lines, a BOM, a first line longer than the head, bad arguments)."""
    if format not in FORMATS or ids not in columnar.IDS or _columnar_kind(head) or head.startswith(b"\xef\xbb\xbf"):
        return None
    if b"\r" in head.replace(b"\r\n", b""):
        return None  # a lone CR: pyarrow ends a line there, the general reader does not
    source = str(path)
    _refuse_binary(head, source)  # looks at the first 64 KiB only, as in parse_table
    first = _first_lines(head, 1)
    if not first or (len(head) == _HEAD and b"\n" not in head[: head.find(first[0][1]) + len(first[0][1]) + 1]):
        return None
    layout = _detect(first, source, format, ids)
    found = columnar.text_columns(source, head, layout, ids, first[0][0])
    pa.default_memory_pool().release_unused()  # hand the parser's buffers back to the OS before the build
    if found is None:
        return None
    return _checked(found, source, lambda lineno: _show(_read_line(path, lineno)))


def _read_line(path: Path, lineno: int) -> bytes:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if number == lineno:
                return line
    return b""


def parse_interactions(
    data: bytes, source: str, format: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`read_interactions` on bytes already in memory (e.g. a zip member); `source` names it in errors."""
    table = parse_table(data, source, format)
    return table.users, table.items, table.times


def parse_table(data: bytes, source: str, format: str = "auto", ids: str = "integer") -> Interactions:
    """`load_interactions` on bytes already in memory."""
    if format not in FORMATS:
        raise DataError(f"{source}: unknown format {format!r}, expected one of {', '.join(FORMATS)}")
    if ids not in columnar.IDS:
        raise DataError(f"{source}: dataset.ids must be one of {', '.join(columnar.IDS)}, got {ids!r}")
    kind = _columnar_kind(data) if format == "auto" else None
    if kind:
        found = columnar.columnar_file_columns(data, source, kind, ids, _ID_NAMES)
        return _checked(found, source, lambda row: "")
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM (Excel exports)
        data = b"   " + data[3:]
    _refuse_binary(data, source)
    first = _first_lines(data, 1)
    if not first:
        raise DataError(f"{source}: empty file, expected at least one 'user item [timestamp]' line")
    layout = _detect(first, source, format, ids)
    found = columnar.text_columns(pa.py_buffer(data), data[:_HEAD], layout, ids, first[0][0])
    if found is not None:
        return _checked(found, source, lambda lineno: _show(data.split(b"\n", lineno)[lineno - 1]))
    return _parse_bulk(data, source, layout, ids)


def _columnar_kind(data: bytes) -> str | None:
    """ "parquet" or "jsonl" when the content is one of them (by its magic bytes / first character)."""
    if data.startswith(columnar.PARQUET_MAGIC):
        return "parquet"
    if data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{":
        return "jsonl"
    return None


def _out_of_range(times: np.ndarray) -> np.ndarray:
    """(N,) bool: |t| >= 2**62. Two bounds, not np.abs, whose abs(-2**63) wraps to a negative number and passed."""
    return (times <= -MAX_ABS_TIMESTAMP) | (times >= MAX_ABS_TIMESTAMP)


def _checked(found: dict, source: str, line_text) -> Interactions:
    """The fast path's columns as `Interactions`, after the timestamp range check of the general reader."""
    times, first_line = found["times"], found["first_line"]
    if times is not None:
        out_of_range = np.flatnonzero(_out_of_range(times))
        if len(out_of_range):
            lineno = int(out_of_range[0]) + first_line
            raise DataError(
                f"{source}:{lineno}: timestamp out of range, expected unix seconds with absolute value below "
                f"2**62, got {line_text(lineno)!r}"
            )
    return Interactions(
        found["users"], found["items"], times, None, source, found["user_names"], found["item_names"], first_line
    )


def _parse_bulk(data: bytes, source: str, layout: _Layout, ids: str) -> Interactions:
    """The general reader: numpy over the whole buffer, then a line scan to name the first bad line."""

    # Normalise the separators to whitespace (same byte length, so offsets and line numbers are kept).
    buf = data
    if layout.sep == "::":
        buf = buf.replace(b"::", b"  ")
    elif layout.sep == ",":
        buf = buf.replace(b",", b" ").replace(b'"', b" ")  # quoted ids: "1","2"

    # Fields per physical line, vectorised: a field starts at a non-whitespace byte after whitespace.
    a = np.frombuffer(buf, dtype=np.uint8)
    ws = _WHITESPACE[a]
    starts = ~ws
    starts[1:] &= ws[:-1]
    newlines = np.flatnonzero(a == 10)
    line_of_field = np.searchsorted(newlines, np.flatnonzero(starts))
    counts = np.bincount(line_of_field, minlength=len(newlines) + 1)
    body_start = 0
    if layout.header:
        header_line = int(line_of_field[0])
        counts[header_line] = 0
        body_start = int(newlines[header_line]) + 1 if header_line < len(newlines) else len(buf)
    bad = np.flatnonzero((counts != 0) & (counts != layout.ncols))
    if len(bad):
        lineno = int(bad[0]) + 1
        got = int(counts[bad[0]])
        text = _line_text(data, newlines, lineno)
        raise DataError(
            f"{source}:{lineno}: expected {layout.ncols} fields {layout.expected}, got {got}: {text!r}"
            + _other_separator_hint(text, layout.sep)
        )
    lines = np.flatnonzero(counts).astype(np.int64) + 1  # (N,) the line of each row
    n = len(lines)
    if n == 0:
        raise DataError(f"{source}: no interactions (only a header line), expected 'user item [timestamp]' lines")

    fields = buf[body_start:].split()
    del a, ws, starts, line_of_field
    if ids == "string":
        users, user_names = _to_codes(fields[layout.user_col :: layout.ncols])
        items, item_names = _to_codes(fields[layout.item_col :: layout.ncols])
    else:
        users = _to_int(fields[layout.user_col :: layout.ncols])
        items = _to_int(fields[layout.item_col :: layout.ncols])
        user_names = item_names = None
    if users is None or items is None:
        cols = (layout.user_col, layout.item_col)
        lineno, line = _first_bad_line(buf, data, layout, cols, _is_int)
        raise DataError(f"{source}:{lineno}: expected {layout.expected} with integer ids, got {line!r}")
    times = None
    if layout.time_col is not None:
        times = _to_time(fields[layout.time_col :: layout.ncols])
        if times is None:
            lineno, line = _first_bad_line(buf, data, layout, (layout.time_col,), _is_time)
            raise DataError(f"{source}:{lineno}: expected {layout.expected} with a numeric timestamp, got {line!r}")
        out_of_range = np.flatnonzero(_out_of_range(times))
        if len(out_of_range):
            lineno = int(lines[out_of_range[0]])
            raise DataError(
                f"{source}:{lineno}: timestamp out of range, expected unix seconds with absolute value below "
                f"2**62, got {_line_text(data, newlines, lineno)!r}"
            )
    return Interactions(users, items, times, lines, source, user_names, item_names)


def read_titles(path: str | Path) -> dict:
    """Read item titles: ML-1M `movies.dat` (latin-1, `::`), ML-100K `u.item` (latin-1, `|`), ML-latest
    `movies.csv` (quoted CSV with a header) or `titles.tsv` (`item<TAB>title`, as written by `prepare`).

    Returns:
        {raw item id (int when integer): title}.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: titles file not found (expected movies.dat, u.item, movies.csv or titles.tsv)")
    return parse_titles(path.read_bytes(), str(path))


def parse_titles(data: bytes, source: str) -> dict:
    """`read_titles` on bytes already in memory (e.g. a zip member); `source` names it in errors."""
    first = _first_lines(data, 1)
    if not first:
        raise DataError(f"{source}: empty titles file, expected 'item<sep>title' lines")
    line0 = first[0][1]
    titles: dict = {}
    if b"::" in line0 or (b"|" in line0 and b"\t" not in line0 and _is_int(line0.split(b"|")[0])):
        sep = "::" if b"::" in line0 else "|"
        for lineno, line in enumerate(data.decode("latin-1").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split(sep)
            if len(parts) < 2:
                raise DataError(f"{source}:{lineno}: expected 'item{sep}title{sep}...', got {line[:80]!r}")
            titles[_int_or_str(parts[0])] = parts[1].strip()
    else:
        delimiter = "\t" if b"\t" in line0 else ","
        rows = csv.reader(io.StringIO(_decode(data), newline=""), delimiter=delimiter)
        shown = "<TAB>" if delimiter == "\t" else delimiter
        for row in rows:
            lineno = rows.line_num
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise DataError(f"{source}:{lineno}: expected 'item{shown}title', got {delimiter.join(row)[:80]!r}")
            key = _int_or_str(row[0])
            if not titles and isinstance(key, str) and lineno == 1:
                continue  # header
            titles[key] = row[1].strip()
    if not titles:
        raise DataError(f"{source}: no titles found, expected 'item<sep>title' lines")
    return titles


# ---------------------------------------------------------------------------------------------------------------


_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"PK\x03\x04": "zip",
    b"BZh": "bzip2",
    b"\xfd7zXZ": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}


def _refuse_binary(data: bytes, source: str) -> None:
    """One clear line for content that is not plain text, instead of a field-count error on a garbled line."""
    for magic, kind in _COMPRESSED.items():
        if data.startswith(magic):
            raise DataError(f"{source}: is a {kind}-compressed file, expected plain text: decompress it first")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{source}: is UTF-16 text, expected ASCII or UTF-8: re-save it as UTF-8")
    nul = data.find(b"\x00", 0, 1 << 16)
    if nul >= 0:
        lineno = data.count(b"\n", 0, nul) + 1
        raise DataError(
            f"{source}:{lineno}: binary content (a NUL byte), expected a plain-text interaction file "
            f"('user item [timestamp]' lines)"
        )


def _first_lines(data: bytes, k: int) -> list[tuple[int, bytes]]:
    """The first k non-empty lines as (1-based line number, stripped bytes)."""
    out = []
    start = 0
    lineno = 0
    while len(out) < k and start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        lineno += 1
        line = data[start:end].strip()
        if line:
            out.append((lineno, line))
        start = end + 1
    return out


def _split(line: bytes, sep: str) -> list[bytes]:
    if sep == "ws":
        return line.split()
    return [f.strip() for f in line.split(sep.encode())]


def _detect(first: list[tuple[int, bytes]], source: str, format: str, ids: str = "integer") -> _Layout:
    """Choose the column layout from the first non-empty line (or check the forced `format`).

    With integer ids a first line whose first field is not an integer is a header; with text ids, a first line
    that names a user and an item column (`_ID_NAMES`)."""
    line0 = first[0][1]
    if format == "auto":
        if b"::" in line0:
            format = "dat"
        else:
            sep = "," if b"," in line0 else "\t" if b"\t" in line0 else "ws"
            ncols = len(_split(line0, sep))
            header = not _is_int(_split(line0, sep)[0].strip(b'\x27"'))
            if sep == "," and ncols == 4:
                format = "csv"
            elif sep != "," and ncols == 4 and not header:
                format = "udata"
            elif sep == "ws" and ncols == 2 and not header:
                format = "sasrec"
            else:
                format = "generic"

    if format == "sasrec":
        return _Layout("sasrec", "ws", 2, 0, 1, None, False, "'user item'")
    if format == "udata":
        return _Layout("udata", "ws", 4, 0, 1, 3, False, "'user<TAB>item<TAB>rating<TAB>timestamp'")
    if format == "dat":
        return _Layout("dat", "::", 4, 0, 1, 3, False, "'UserID::MovieID::Rating::Timestamp'")

    sep = "::" if b"::" in line0 else "," if b"," in line0 else "\t" if b"\t" in line0 else "ws"
    if format == "csv":
        sep = ","
    names = [f.decode("utf-8", "replace").strip().strip('"').lower() for f in _split(line0, sep)]
    ncols = len(names)
    header = not _is_int(_split(line0, sep)[0].strip(b'\x27"'))
    if ids == "string":
        header = any(n in _ID_NAMES["user"] for n in names) and any(n in _ID_NAMES["item"] for n in names)
    if header:
        cols = {}
        for role, aliases in _ID_NAMES.items():
            found = [i for i, name in enumerate(names) if name in aliases]
            if found:
                cols[role] = found[0]
        if "user" in cols and "item" in cols:
            user_col, item_col, time_col = cols["user"], cols["item"], cols.get("time")
        else:
            user_col, item_col, time_col = _positional(ncols)
    else:
        user_col, item_col, time_col = _positional(ncols)
    shown = {"ws": " ", "\t": "<TAB>", ",": ",", "::": "::"}[sep]
    if format == "csv":
        if ncols < 2 or user_col is None:
            raise DataError(
                f"{source}:{first[0][0]}: expected 'userId,movieId,rating,timestamp' (or named user/item/timestamp "
                f"columns), got {_show(line0)!r}"
            )
        expected = "'userId,movieId,rating,timestamp'" if (ncols, time_col) == (4, 3) else f"{ncols} CSV columns"
        return _Layout("csv", ",", ncols, user_col, item_col, time_col, header, expected)
    if ncols < 2 or user_col is None:
        raise DataError(
            f"{source}:{first[0][0]}: expected 'user item [timestamp]' (whitespace, comma or tab separated), "
            f"got {_show(line0)!r}"
        )
    expected = {2: "'user item'", 3: "'user item timestamp'", 4: "'user item rating timestamp'"}.get(ncols)
    expected = "'" + shown.join(expected.strip("'").split(" ")) + "'" if expected else f"{ncols} columns"
    return _Layout("generic", sep, ncols, user_col, item_col, time_col, header, expected)


def _positional(ncols: int) -> tuple[int | None, int | None, int | None]:
    """Column roles by position: user item [timestamp] or user item rating timestamp."""
    if ncols == 2:
        return 0, 1, None
    if ncols == 3:
        return 0, 1, 2
    if ncols == 4:
        return 0, 1, 3
    return None, None, None


def _to_int(col: list[bytes]) -> np.ndarray | None:
    try:
        return np.array(col, dtype=np.int64)
    except (ValueError, OverflowError):
        return None


def _to_codes(col: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Text ids -> ((N,) int64 rank among the distinct values in byte order, (K,) str distinct values)."""
    names, codes = np.unique(np.array(col, dtype=bytes), return_inverse=True)
    return codes.reshape(-1).astype(np.int64), np.char.decode(names, "utf-8", "replace").astype(str)


def _to_time(col: list[bytes]) -> np.ndarray | None:
    out = _to_int(col)
    if out is not None:
        return out
    try:
        f = np.array(col, dtype=np.float64)
    except ValueError:
        return _iso_seconds(col)
    if not np.isfinite(f).all():
        return None
    # fractional unix seconds; values past int64 are clipped here and refused by the range check after
    return np.floor(np.clip(f, -(2.0**63), 2.0**62)).astype(np.int64)


def _iso_seconds(col: list[bytes]) -> np.ndarray | None:
    """ISO-8601 dates (`2020-01-31`, `2020-01-31T10:00:00`, a trailing `Z`) as int64 unix seconds, or None."""
    try:
        text = np.char.rstrip(np.char.decode(np.array(col, dtype=bytes), "ascii"), "Z")
        return np.array(text, dtype="datetime64[s]").astype(np.int64)
    except (ValueError, UnicodeDecodeError):
        return None


def _is_int(s: bytes) -> bool:
    try:
        return -(2**63) <= int(s) < 2**63
    except ValueError:
        return False


def _is_time(s: bytes) -> bool:
    try:
        return bool(np.isfinite(float(s)))
    except ValueError:
        return _iso_seconds([s]) is not None


def _first_bad_line(buf: bytes, data: bytes, layout: _Layout, cols: tuple, ok) -> tuple[int, str]:
    """Line scan (only after the bulk parse failed): the first line whose `cols` fail `ok`."""
    skip_header = layout.header
    for lineno, line in enumerate(buf.split(b"\n"), 1):
        fields = line.split()
        if not fields:
            continue
        if skip_header:
            skip_header = False
            continue
        if not all(ok(fields[c]) for c in cols):
            return lineno, _show(data.split(b"\n", lineno)[lineno - 1])
    return 0, ""  # unreachable: the bulk parse failed on some line


def _other_separator_hint(text: str, sep: str) -> str:
    """A hint when a bad line uses another separator than the one detected from the file's first line."""
    used = [name for mark, name in ((",", "commas"), ("\t", "tabs"), ("::", "'::'")) if mark in text and mark != sep]
    if not used or (sep == "ws" and used == ["tabs"]):  # tabs are whitespace
        return ""
    first = {"ws": "whitespace", ",": "commas", "\t": "tabs", "::": "'::'"}[sep]
    return f" (this line uses {' and '.join(used)}; the file's first line uses {first}: use one separator)"


def _line_text(data: bytes, newlines: np.ndarray, lineno: int) -> str:
    start = int(newlines[lineno - 2]) + 1 if lineno >= 2 else 0
    end = int(newlines[lineno - 1]) if lineno - 1 < len(newlines) else len(data)
    return _show(data[start:end])


def _show(line: bytes, limit: int = 80) -> str:
    text = line.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _int_or_str(s: str):
    s = s.strip()
    try:
        return int(s)
    except ValueError:
        return s
