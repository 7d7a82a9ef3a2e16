"""Multi-threaded pyarrow parsing of interaction files: the fast path of `seqrec.data.readers`.

Text files (CSV/TSV/space separated, SASRec, MovieLens) are parsed by `pyarrow.csv` with the column layout the
general reader detected. The fast path only ever returns what the general (line-scanning) reader would return for
the same bytes: whenever pyarrow refuses the file, or the file has a shape whose line numbers pyarrow cannot give
back (blank lines, a header below line 1), it returns None and the general reader parses the file and names the
first bad line. Parquet and JSON-lines files have no such twin and are read here only.

Ids are integers (`ids="integer"`, the default) or any text (`ids="string"`): text ids are replaced by their rank
among the distinct values (byte order) and the distinct values are returned, so the original ids are kept.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from seqrec.errors import DataError

IDS = ("integer", "string")
PARQUET_MAGIC = b"PAR1"


def text_columns(source, head: bytes, layout, ids: str, first_lineno: int) -> dict | None:
    """Parse a delimited text file with pyarrow.

    Args:
        source: the file's path or a pyarrow buffer of its bytes (BOM already blanked).
        head: the file's first bytes (to choose the delimiter).
        layout: the general reader's `_Layout` (separator, column count and roles, header).
        ids: "integer" or "string".
        first_lineno: line number of the first non-empty line (the header, or the first row).

    Returns:
        {"users", "items", "times", "user_names", "item_names"}: (N,) int64 arrays (times may be None, names are
        None for integer ids), and "first_line", the line of the first row (row k is on line first_line + k); or
        None when the general reader must parse the file.
    """
    if first_lineno != 1:
        return None  # leading blank lines: pyarrow would number the rows differently
    delimiter = _delimiter(head, layout.sep)
    if delimiter is None:
        return None
    ncols = 2 * layout.ncols - 1 if layout.sep == "::" else layout.ncols
    index = (lambda c: 2 * c) if layout.sep == "::" else (lambda c: c)  # "a::b" is "a", "", "b" with ":"
    roles = {"users": layout.user_col, "items": layout.item_col, "times": layout.time_col}
    wanted = {role: f"f{index(col)}" for role, col in roles.items() if col is not None}
    id_type = pa.int64() if ids == "integer" else pa.string()
    types = {wanted["users"]: id_type, wanted["items"]: id_type}
    if "times" in wanted and _integer_field(head, layout.header, delimiter, index(layout.time_col)):
        # Integer timestamps in the first row: declare the column int64. Left to inference, pyarrow parses it
        # about 1 s (CPU) slower on 20M rows; a later row that is not an integer fails the parse, and the general
        # reader takes the file, as it does when inference finds anything but integers or dates.
        types[wanted["times"]] = pa.int64()
    options = dict(
        read_options=pacsv.ReadOptions(
            column_names=[f"f{c}" for c in range(ncols)], skip_rows=1 if layout.header else 0, use_threads=True
        ),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter,
            quote_char='"' if layout.sep == "," else False,
            ignore_empty_lines=False,  # a blank line fails the parse: the general reader keeps line numbers
        ),
        convert_options=pacsv.ConvertOptions(
            column_types=types, include_columns=list(wanted.values()), strings_can_be_null=False
        ),
    )
    out = {"first_line": 1 + layout.header, "times": None, "user_names": None, "item_names": None}
    try:
        if isinstance(source, str) and len(types) == len(wanted) and all(t == pa.int64() for t in types.values()):
            columns = _stream_int64(source, head, list(wanted.values()), options)
            if columns is None:
                return None
            return out | dict(zip(wanted, columns))
        table = pacsv.read_csv(source, **options)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowKeyError):
        return None
    n = table.num_rows
    if n == 0 or any(table.column(c).null_count for c in wanted.values()):
        return None
    for role in ("users", "items"):
        out[role], out[role[:-1] + "_names"] = id_codes(table.column(wanted[role]))
    if "times" in wanted:
        out["times"] = _times(table.column(wanted["times"]))
        if out["times"] is None:
            return None
    return out


def _stream_int64(path: str, head: bytes, names: list[str], options: dict) -> list[np.ndarray] | None:
    """The int64 columns `names` of the file, or None when a field is empty.

    pyarrow's streaming reader parses the file block by block, and each block is copied into arrays allocated
    once, at about their final size: the parsed blocks never add up to a second copy of the columns, which
    read_csv's table plus the copy out of it would be (0.5 GB and about 1.5 s CPU on a 20M-row file). The size
    is the file's bytes over the head's bytes per line, with a margin; arrays that fill up grow (rarely), and
    the returned arrays are views of their first rows (pages never written cost no memory).
    """
    rows_per_byte = max(head.count(b"\n"), 1) / len(head)
    capacity = int(os.path.getsize(path) * rows_per_byte * 1.25) + 1024
    columns = [np.empty(capacity, dtype=np.int64) for _ in names]
    filled = 0
    with pacsv.open_csv(path, **options) as reader:
        for batch in reader:
            k = batch.num_rows
            if filled + k > capacity:
                capacity = max(2 * capacity, filled + k)
                columns = [_grown(column, filled, capacity) for column in columns]
            for column, name in zip(columns, names):
                values = batch.column(name)
                if values.null_count:
                    return None
                column[filled : filled + k] = values.to_numpy()
            filled += k
    return [column[:filled] for column in columns] if filled else None


def _grown(column: np.ndarray, filled: int, capacity: int) -> np.ndarray:
    out = np.empty(capacity, dtype=column.dtype)
    out[:filled] = column[:filled]
    return out


def id_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray | None]:
    """(N,) int64 ids and None for an integer column; for text, (N,) int64 ranks into the sorted distinct values
    and those values as a str array."""
    if pa.types.is_integer(column.type):
        return int64_array(column), None
    column = column.cast(pa.string())
    names = pc.unique(column).sort()
    codes = pc.index_in(column, value_set=names).to_numpy().astype(np.int64, copy=False)
    return codes, np.asarray(names.to_numpy(zero_copy_only=False), dtype=str)


def int64_array(column: pa.ChunkedArray) -> np.ndarray:
    """(N,) int64 numpy copy of an integer column without nulls (values past int64 wrap, as astype does).

    The chunks are copied into an array numpy allocates, not concatenated by Arrow: numpy asks the kernel for
    huge pages on large arrays, and on a 20M-row file that makes each column's copy several times cheaper.
    """
    out = np.empty(len(column), dtype=np.int64)
    start = 0
    for chunk in column.chunks:
        out[start : start + len(chunk)] = chunk.to_numpy(zero_copy_only=False)
        start += len(chunk)
    return out


def _times(column: pa.ChunkedArray) -> np.ndarray | None:
    """(N,) int64 unix seconds of an integer column or of ISO-8601 dates; None for anything else (the general
    reader then names the line: fractional seconds, floats, text)."""
    if pa.types.is_integer(column.type):
        return int64_array(column)
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        seconds = column.cast(pa.timestamp("s"), safe=False) if not pa.types.is_date(column.type) else column
        if pa.types.is_date(seconds.type):
            seconds = seconds.cast(pa.date64()).cast(pa.int64()).to_numpy() // 1000
            return seconds.astype(np.int64, copy=False)
        return seconds.cast(pa.int64()).to_numpy().astype(np.int64, copy=False)
    return None


def _integer_field(head: bytes, header: bool, delimiter: str, column: int) -> bool:
    """Whether field `column` (pyarrow's numbering) of the first data row, read from the file's head, is an
    integer; False when the head does not hold that whole row."""
    rows = head.split(b"\n", 2 + header)
    if len(rows) < 2 + header:
        return False
    fields = rows[header].rstrip(b"\r").split(delimiter.encode())
    if column >= len(fields):
        return False
    text = fields[column].strip().strip(b'"')
    return text.lstrip(b"-").isdigit()


def _delimiter(head: bytes, sep: str) -> str | None:
    """pyarrow's one-character delimiter for the general reader's separator; None when the file's whitespace is
    not a single kind of byte (runs of spaces, tabs and spaces mixed)."""
    if sep == ",":
        return ","
    if sep == "::":
        return ":"
    if sep == "\t":
        return "\t"
    # "ws": any run of whitespace separates fields; pyarrow needs exactly one tab or one space
    if b"\t" in head:
        return "\t" if b" " not in head else None
    return " " if b"  " not in head else None


# --------------------------------------------------------------------------- Parquet and JSON lines


def columnar_file_columns(data: bytes, path: str, kind: str, ids: str, names: dict) -> dict:
    """Read a Parquet or JSON-lines file (`data`, named `path` in errors); `names` maps each role to its accepted
    column names (lower case).

    Returns:
        The dict of `text_columns`; lines are row numbers (1-based) for Parquet and line numbers for JSON lines.

    Raises:
        DataError: unreadable file, missing user/item column, null or non-integer ids, bad timestamps.
    """
    table = _read_columnar(data, path, kind)
    columns = _pick_columns(table.column_names, names, path)
    out: dict = {"times": None}
    n = table.num_rows
    if n == 0:
        raise DataError(f"{path}: no interactions (0 rows), expected rows with user and item columns")
    what = "row" if kind == "parquet" else "line"
    for role, name in columns.items():
        column = table.column(name)
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0]) + 1
            raise DataError(f"{path}: {what} {row}: column {name!r} is empty (null), expected a value")
        if role == "times":
            times = _columnar_times(column, path, name)
            out["times"] = times
            continue
        if ids == "integer" and not pa.types.is_integer(column.type):
            raise DataError(
                f"{path}: column {name!r} holds {column.type} values, expected integer ids "
                f"(set dataset.ids=string for text ids)"
            )
        out[role], out[role[:-1] + "_names"] = id_codes(column)
    out["first_line"] = 1
    return out


def _read_columnar(data: bytes, path: str, kind: str) -> pa.Table:
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(pa.BufferReader(data))
        import pyarrow.json as pajson

        return pajson.read_json(pa.BufferReader(data))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        if kind == "jsonl":
            _raise_bad_json_line(data, path)
        raise DataError(f"{path}: cannot be read as {kind} ({str(e).splitlines()[0][:120]})") from None


def _raise_bad_json_line(data: bytes, path: str) -> None:
    """Re-scan a JSON-lines file that pyarrow refused, to name the first bad line."""
    import json

    for lineno, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        shown = line.decode("utf-8", "replace").strip()[:80]
        try:
            value = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: expected one JSON object per line, got {shown!r} ({e.msg})") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{lineno}: expected one JSON object per line, got {shown!r}")
    raise DataError(f"{path}: cannot be read as JSON lines (mixed value types in one field?)")


def _pick_columns(available: list[str], names: dict, path: str) -> dict:
    """{role: column name} by the accepted names; user and item are required."""
    lower = {c.lower(): c for c in available}
    picked = {}
    for role, aliases in names.items():
        found = [lower[a] for a in aliases if a in lower]
        if found:
            picked[role + "s"] = found[0]
    if "users" not in picked or "items" not in picked:
        raise DataError(
            f"{path}: expected a user column ({'/'.join(names['user'][:3])}) and an item column "
            f"({'/'.join(names['item'][:3])}), got columns {available}"
        )
    return picked


def _columnar_times(column: pa.ChunkedArray, path: str, name: str) -> np.ndarray:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            column = column.cast(pa.timestamp("s"))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(
                f"{path}: column {name!r} holds text that is not an ISO-8601 date, expected unix seconds or dates"
            ) from None
    if pa.types.is_floating(column.type):
        values = column.to_numpy()
        if not np.isfinite(values).all():
            raise DataError(f"{path}: column {name!r} holds nan/inf, expected finite unix seconds")
        return np.floor(values).astype(np.int64)
    times = _times(column)
    if times is None:
        raise DataError(f"{path}: column {name!r} holds {column.type} values, expected unix seconds or dates")
    return times
