"""Columnar ingestion (pyarrow fast path, Parquet, JSON lines, text ids, ISO dates) and the processed cache."""

from __future__ import annotations

import logging
import os
import stat

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seqrec.data import cache, readers
from seqrec.data.dataset import from_file
from seqrec.data.synthetic import power_law_interactions
from seqrec.errors import DataError
from seqrec.utils.private_dir import UnsafeCacheDir, private_dir


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQREC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "datasets"


def _general(path, ids="integer"):
    """The general (numpy + line scan) reader, bypassing the pyarrow fast path."""
    data = path.read_bytes()
    first = readers._first_lines(data, 1)
    return readers._parse_bulk(data, str(path), readers._detect(first, str(path), "auto", ids), ids)


def _assert_same(a, b):
    for key in ("users", "items", "times", "lines", "user_names", "item_names"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None) == (y is None), key
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), key


def _rows(n=3000, seed=0):
    return power_law_interactions(60, 40, n, seed=seed)


@pytest.mark.parametrize(
    "layout",
    ["space", "tab", "comma_header", "udata", "dat", "sasrec", "crlf", "quoted_csv", "blank_line", "floats"],
)
def test_fast_path_gives_the_general_readers_arrays(tmp_path, layout, monkeypatch):
    users, items, times = _rows()
    lines = {
        "space": [f"{u} {i} {t}" for u, i, t in zip(users, items, times)],
        "tab": [f"{u}\t{i}\t{t}" for u, i, t in zip(users, items, times)],
        "comma_header": ["userId,movieId,timestamp"] + [f"{u},{i},{t}" for u, i, t in zip(users, items, times)],
        "udata": [f"{u}\t{i}\t5\t{t}" for u, i, t in zip(users, items, times)],
        "dat": [f"{u}::{i}::5::{t}" for u, i, t in zip(users, items, times)],
        "sasrec": [f"{u} {i}" for u, i in zip(users, items)],
        "crlf": [f"{u} {i} {t}\r" for u, i, t in zip(users, items, times)],
        "quoted_csv": [f'"{u}","{i}","{t}"' for u, i, t in zip(users, items, times)],
        "blank_line": [f"{u} {i} {t}" for u, i, t in zip(users, items, times)][:10] + [""] + ["1 2 3"],
        "floats": [f"{u} {i} {t}.5" for u, i, t in zip(users, items, times)],
    }[layout]
    path = tmp_path / "x.txt"
    path.write_text("\n".join(lines) + "\n")
    general = _general(path)
    if layout not in ("blank_line", "floats"):  # those two are the general reader's (line numbers, floor)

        def no_general(*args):
            raise AssertionError("the fast path refused the file")

        monkeypatch.setattr(readers, "_parse_bulk", no_general)
    _assert_same(readers.load_interactions(path), general)


def test_fast_path_error_names_the_line(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("1 2 10\n1 3 11\n1 x 12\n")
    with pytest.raises(DataError, match=r"x\.txt:3: expected 'user item timestamp' with integer ids, got '1 x 12'"):
        readers.load_interactions(path)


@pytest.mark.parametrize("time", [-(2**63), -(2**62), 2**62])
def test_both_readers_refuse_timestamps_past_2_62(tmp_path, time):
    """-2**63 too: its np.abs wraps to a negative number, which the range check used to let through."""
    path = tmp_path / "x.txt"
    path.write_text(f"1 2 10\n1 3 {time}\n")
    for read in (readers.load_interactions, _general):
        with pytest.raises(DataError, match=r"x\.txt:2: timestamp out of range"):
            read(path)
    inside = 2**62 - 1 if time > 0 else -(2**62) + 1
    path.write_text(f"1 2 10\n1 3 {inside}\n")  # the largest magnitude accepted
    _assert_same(readers.load_interactions(path), _general(path))


def test_text_ids_keep_the_original_ids(tmp_path):
    rows = [("A2SUAM1J3GNN3B", "0000013714", k) for k in range(4)]
    rows += [("B9", f"B00{k}", 100 + k) for k in range(5)]
    path = tmp_path / "amazon.csv"
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    with pytest.raises(DataError, match=r"amazon\.csv:2: .*integer ids"):
        from_file(path=str(path))
    data = from_file(path=str(path), ids="string")
    assert data.user_ids.tolist() == ["A2SUAM1J3GNN3B", "B9"]  # ordered by id, as integer ids are
    assert "0000013714" in data.item_ids.tolist()  # leading zeros kept: the id is text
    assert data.item_ids[data.test_item[1]] == "B004"
    table = readers.load_interactions(path, ids="string")
    _assert_same(table, _general(path, "string"))


def test_iso_dates_become_unix_seconds(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("1\t5\t2020-01-02\n1\t6\t2020-01-02T00:00:10\n")
    _, _, times = readers.read_interactions(path)
    assert times.tolist() == [1577923200, 1577923210]
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t5\t2020-01-02\n1\t6\tyesterday\n")
    with pytest.raises(DataError, match=r"bad\.tsv:2: .*numeric timestamp"):
        readers.read_interactions(bad)


def test_parquet_and_json_lines(tmp_path):
    users, items, times = _rows(500)
    pq.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": times}), tmp_path / "x.parquet")
    text = "".join(f'{{"user": {u}, "item": {i}, "ts": {t}}}\n' for u, i, t in zip(users, items, times))
    (tmp_path / "x.jsonl").write_text(text)
    for name in ("x.parquet", "x.jsonl"):
        got = readers.read_interactions(tmp_path / name)
        assert [g.tolist() for g in got] == [users.tolist(), items.tolist(), times.tolist()], name


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"user": 1, "item": 2}\n{"user": 1, "item": \n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: expected one JSON object per line"):
        readers.read_interactions(path)


def test_parquet_without_an_item_column(tmp_path):
    pq.write_table(pa.table({"user": [1, 2], "rating": [3, 4]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"expected a user column .* and an item column"):
        readers.read_interactions(tmp_path / "x.parquet")


# --------------------------------------------------------------------------- processed cache


def _file(tmp_path, seed=0):
    users, items, times = _rows(seed=seed)
    path = tmp_path / "log.txt"
    path.write_text("".join(f"{u} {i} {t}\n" for u, i, t in zip(users, items, times)))
    return path


def _equal(a, b):
    for key in ("train_ptr", "train_items", "train_times", "valid_item", "test_item", "user_ids", "item_ids"):
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype and np.array_equal(x, y), key
    assert (a.name, a.num_users, a.num_items) == (b.name, b.num_users, b.num_items)


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    path = _file(tmp_path)
    first = from_file(path=str(path))

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed again")

    monkeypatch.setattr(readers, "load_interactions", no_parsing)
    _equal(from_file(path=str(path)), first)
    with pytest.raises(AssertionError, match="parsed again"):  # another setting is another entry
        from_file(path=str(path), min_user_interactions=3)


def test_a_changed_file_never_hits_the_old_entry(tmp_path):
    path = _file(tmp_path)
    from_file(path=str(path))
    stat_before = path.stat()
    text = path.read_text().replace("\n1 ", "\n2 ", 1)  # same size, same mtime
    path.write_text(text)
    os.utime(path, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    _equal(from_file(path=str(path)), from_file(path=str(path), cache=False))


def test_corrupted_entry_is_rebuilt(tmp_path, private_cache, caplog):
    path = _file(tmp_path)
    good = from_file(path=str(path))
    (entry,) = private_cache.iterdir()
    blob = bytearray(entry.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    entry.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING):
        _equal(from_file(path=str(path)), good)
    assert "corrupted (digest mismatch); rebuilding it" in caplog.text
    assert cache.load(entry.stem, type(good)) is not None  # rewritten


def test_warnings_are_repeated_on_a_cached_load(tmp_path, caplog):
    path = _file(tmp_path)
    path.write_text(path.read_text() + path.read_text().splitlines(keepends=True)[0])  # one duplicate row
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            from_file(path=str(path))
        assert caplog.text.count("1 duplicate row in all, dropped") == 1


def test_validation_warnings_are_not_doubled_on_a_cached_load(tmp_path, caplog):
    path = tmp_path / "cold.txt"
    rows = [(u, i) for u in range(1, 6) for i in (1, 2, 3, 4)] + [(6, 1), (6, 2), (6, 3), (6, 9)]  # item 9: cold
    path.write_text("".join(f"{u} {i}\n" for u, i in rows))
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            from_file(path=str(path))
        assert caplog.text.count("appear only as validation/test targets") == 1


def test_cache_dir_writable_by_others_is_refused(tmp_path, private_cache, caplog):
    private_cache.mkdir(parents=True)
    private_cache.chmod(0o777)
    with pytest.raises(UnsafeCacheDir, match="writable by other users"):
        private_dir(private_cache)
    with caplog.at_level(logging.WARNING):
        from_file(path=str(_file(tmp_path)))
    assert "dataset cache not used" in caplog.text and list(private_cache.iterdir()) == []


def test_cache_dir_is_created_private(tmp_path):
    folder = private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_fast_path_on_the_shared_files(shared_data):
    names = ["ml-1m.txt", "ml-1m_original_ids_bert4rec_order.txt", "ml-100k/u.data", "ml-latest-small/ratings.csv"]
    paths = [shared_data / name for name in names] + sorted((shared_data / "ml-1m").glob("ratings*.dat"))
    for path in paths:
        if path.is_file():
            _assert_same(readers.load_interactions(path), _general(path))


@pytest.mark.slow  # trains a tiny run (~10 s quiet, 100 s under load)
def test_predictions_name_text_ids(tmp_path):
    from tests.test_predict import main as predict
    from tests.test_predict import read_csv, train_run

    rng = np.random.default_rng(0)
    lines = []
    for u in range(30):
        items = rng.choice(np.arange(1, 25), size=rng.integers(5, 10), replace=False)
        lines += [f"A{u:03d}X,{i:010d},2020-01-{1 + t:02d}" for t, i in enumerate(items)]
    path = tmp_path / "reviews.csv"
    path.write_text("user_id,item_id,date\n" + "\n".join(lines) + "\n")
    run_dir = train_run(tmp_path / "run", ["dataset=file", f"dataset.path={path}", "dataset.ids=string"])
    out = tmp_path / "recs.csv"
    assert predict([str(run_dir), "--users", "A007X", "--k", "3", "--out", str(out)]) == 0
    rows = read_csv(out)
    assert [r["user"] for r in rows] == ["A007X"] * 3
    assert all(len(r["item"]) == 10 and r["item"].startswith("0") for r in rows)  # leading zeros kept
