"""Interaction and title readers: every format, every bad-input case (one clear DataError line), real MovieLens."""

from pathlib import Path

import numpy as np
import pytest

from seqrec.data.dataset import from_file
from seqrec.data.readers import read_interactions, read_titles
from seqrec.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")


def write(tmp_path, name, text):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, newline="")
    return path


# ------------------------------------------------------------------------------------------------ formats


def test_sasrec_format(tmp_path):
    path = write(tmp_path, "a.txt", "1 10\n1 11\n2 10\n")
    users, items, times = read_interactions(path)
    assert users.dtype == np.int64 and items.dtype == np.int64
    assert users.tolist() == [1, 1, 2] and items.tolist() == [10, 11, 10] and times is None


def test_udata_format_keeps_file_order(tmp_path):
    path = write(tmp_path, "u.data", "2\t5\t3\t900\n1\t7\t4\t800\n1\t5\t1\t700\n")
    users, items, times = read_interactions(path)
    assert users.tolist() == [2, 1, 1] and items.tolist() == [5, 7, 5] and times.tolist() == [900, 800, 700]


def test_csv_format_with_header_and_crlf(tmp_path):
    path = write(
        tmp_path,
        "ratings.csv",
        "userId,movieId,rating,timestamp\r\n1,1,4.0,964982703\r\n1,3,4.5,964981247\r\n",
    )
    users, items, times = read_interactions(path)
    assert users.tolist() == [1, 1] and items.tolist() == [1, 3] and times.tolist() == [964982703, 964981247]


def test_dat_format(tmp_path):
    path = write(tmp_path, "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
    _, items, times = read_interactions(path)
    assert items.tolist() == [1193, 661] and times.tolist() == [978300760, 978302109]


@pytest.mark.parametrize(
    "text",
    [
        "user,item,timestamp\n1,2,100\n3,4,200\n",
        "1,2,100\n3,4,200\n",
        "1\t2\t100\n3\t4\t200\n",
        "1 2 100\n\n3 4 200\n",
        "user item timestamp\n1 2 100\n3 4 200\n",
        "item,timestamp,user\n2,100,1\n4,200,3\n",  # columns found by name
        '"user","item","ts"\r\n"1","2","100"\r\n"3","4","200"\r\n',
        "\ufeffuser,item,timestamp\n1,2,100.7\n3,4,200\n",  # BOM, fractional seconds
    ],
)
def test_generic_formats(tmp_path, text):
    path = write(tmp_path, "x.csv", text.encode("utf-8"))
    users, items, times = read_interactions(path)
    assert users.tolist() == [1, 3] and items.tolist() == [2, 4] and times.tolist() == [100, 200]


def test_forced_format_overrides_detection(tmp_path):
    path = write(tmp_path, "x.txt", "1\t2\n3\t4\n")
    users, items, times = read_interactions(path, format="generic")
    assert users.tolist() == [1, 3] and times is None
    users, items, times = read_interactions(path, format="sasrec")
    assert items.tolist() == [2, 4]


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=r"nope\.txt: file not found") as e:
        read_interactions(path)
    assert "\n" not in str(e.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_interactions(tmp_path)


def test_empty_file(tmp_path):
    path = write(tmp_path, "empty.txt", "")
    with pytest.raises(DataError, match=r"empty\.txt: empty file"):
        read_interactions(path)


def test_blank_lines_only(tmp_path):
    path = write(tmp_path, "blank.txt", "\n  \n\r\n")
    with pytest.raises(DataError, match=r"blank\.txt: empty file"):
        read_interactions(path)


def test_header_only(tmp_path):
    path = write(tmp_path, "h.csv", "userId,movieId,rating,timestamp\n")
    with pytest.raises(DataError, match=r"h\.csv: no interactions"):
        read_interactions(path)


def test_malformed_line_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.txt", "1 2\n1 3\n\n1 4 5 6 7\n2 2\n")
    with pytest.raises(DataError) as e:
        read_interactions(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:4: expected 2 fields") and "got 5" in msg and "'1 4 5 6 7'" in msg
    assert "\n" not in msg


def test_malformed_line_in_dat(tmp_path):
    path = write(tmp_path, "ratings.dat", "1::2::5::100\n1::3::5\n")
    with pytest.raises(DataError, match=r"ratings\.dat:2: expected 4 fields 'UserID::MovieID::Rating::Timestamp'"):
        read_interactions(path)


def test_non_integer_ids(tmp_path):
    lines = [f"{u} {u + 100}" for u in range(1, 17)] + ["a b"] + ["1 2"] * 3
    path = write(tmp_path, "x.txt", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        read_interactions(path)
    assert str(e.value) == f"{path}:17: expected 'user item' with integer ids, got 'a b'"


def test_non_integer_item_in_csv(tmp_path):
    path = write(tmp_path, "r.csv", "userId,movieId,rating,timestamp\n1,1,4.0,10\n1,x1,4.0,11\n")
    with pytest.raises(DataError, match=r"r\.csv:3: expected 'userId,movieId,rating,timestamp' with integer ids"):
        read_interactions(path)


def test_non_numeric_timestamp(tmp_path):
    path = write(tmp_path, "t.txt", "1 2 100\n1 3 yesterday\n")
    with pytest.raises(DataError) as e:
        read_interactions(path)
    assert str(e.value).startswith(f"{path}:2: expected 'user item timestamp' with a numeric timestamp")
    assert "yesterday" in str(e.value)


def test_unknown_format(tmp_path):
    path = write(tmp_path, "x.txt", "1 2\n")
    with pytest.raises(DataError, match="unknown format 'parquet', expected one of auto, sasrec"):
        read_interactions(path, format="parquet")


def test_forced_format_mismatch(tmp_path):
    path = write(tmp_path, "x.txt", "1 2\n")
    with pytest.raises(DataError, match=r"x\.txt:1: expected 4 fields 'UserID::MovieID::Rating::Timestamp', got 2"):
        read_interactions(path, format="dat")


def test_single_column_file(tmp_path):
    path = write(tmp_path, "one.txt", "1\n2\n")
    with pytest.raises(DataError, match=r"one\.txt:1: expected 'user item \[timestamp\]'"):
        read_interactions(path)


def test_from_file_errors_are_data_errors(tmp_path):
    path = write(tmp_path, "x.txt", "1 2\n")
    with pytest.raises(DataError, match="titles file not found"):
        from_file(path=str(path), titles_path=str(tmp_path / "movies.dat"))
    with pytest.raises(DataError, match="no interactions left after filtering"):
        from_file(path=str(path), min_item_interactions=5)
    with pytest.raises(DataError, match="min_user_interactions must be >= 0"):
        from_file(path=str(path), min_user_interactions=-1)


# ------------------------------------------------------------------------------------------------ titles


def test_titles_dat_latin1(tmp_path):
    path = write(
        tmp_path,
        "movies.dat",
        "1::Toy Story (1995)::Animation\n2::Misérables, Les (1995)::Drama\n".encode("latin-1"),
    )
    assert read_titles(path) == {1: "Toy Story (1995)", 2: "Misérables, Les (1995)"}


def test_titles_uitem_latin1(tmp_path):
    path = write(tmp_path, "u.item", "1|Café (1995)|01-Jan-1995||http://x|0|1\n".encode("latin-1"))
    assert read_titles(path) == {1: "Café (1995)"}


def test_titles_csv_quotes(tmp_path):
    text = 'movieId,title,genres\r\n11,"American President, The (1995)",Comedy|Drama\r\n12,Heat (1995),Action\r\n'
    path = write(tmp_path, "movies.csv", text.encode("utf-8"))
    assert read_titles(path) == {11: "American President, The (1995)", 12: "Heat (1995)"}


def test_titles_malformed(tmp_path):
    path = write(tmp_path, "movies.dat", "1::A::x\n2\n")
    with pytest.raises(DataError, match=r"movies\.dat:2: expected 'item::title::\.\.\.'"):
        read_titles(path)


def test_from_file_with_titles(tmp_path):
    data = write(tmp_path, "r.dat", "1::20::5::1\n1::10::5::2\n1::30::5::3\n1::20::5::4\n")
    movies = write(tmp_path, "movies.dat", "10::Ten::x\n20::Twenty::x\n".encode("latin-1"))
    d = from_file(path=str(data), titles_path=str(movies))
    assert d.item_ids.tolist() == [0, 20, 10, 30]
    assert d.item_titles.tolist() == ["", "Twenty", "Ten", ""]


# ------------------------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def ml1m():
    # read once per module; how fast is bench/bench_sasrec.py's business, not a test's (timed asserts flake under load)
    return from_file(path=str(SHARED / "ml-1m.txt"))


@pytest.mark.realdata
@needs_shared
def test_real_ml1m_txt(ml1m):
    d = ml1m
    assert (d.num_users, d.num_items, d.num_interactions) == (6040, 3416, 999611)
    assert d.item_ids.tolist() == list(range(3417))  # SASRec ids kept exactly
    assert d.user_ids.tolist() == list(range(1, 6041))
    assert not d.has_time and d.train_times is None
    assert len(d.eval_users("test")) == 6040
    assert d.train_lengths.sum() / 6040 == pytest.approx(163.50, abs=0.01)  # as documented in the data README
    first = np.loadtxt(SHARED / "ml-1m.txt", dtype=np.int64, max_rows=50)
    user1 = first[first[:, 0] == 1, 1]
    assert d.user_history(0)[: len(user1)].tolist() == user1.tolist()


@pytest.mark.realdata
@needs_shared
def test_real_ml1m_filter_counts():
    d = from_file(path=str(SHARED / "ml-1m_original_ids_bert4rec_order.txt"), format="sasrec", min_item_interactions=5)
    assert (d.num_users, d.num_items, d.num_interactions) == (6040, 3416, 999611)
    mapping = np.loadtxt(SHARED / "ml-1m_sas_to_original_items.txt", dtype=np.int64)
    assert set(d.item_ids[1:].tolist()) == set(mapping[:, 1].tolist())


@pytest.mark.realdata
@needs_shared
def test_real_ml100k_chronological():
    d = from_file(path=str(SHARED / "ml-100k" / "u.data"), titles_path=str(SHARED / "ml-100k" / "u.item"))
    assert (d.num_users, d.num_items, d.num_interactions) == (943, 1682, 100000)
    assert d.has_time and d.user_ids.tolist() == list(range(1, 944))
    _assert_chronological(d)
    assert "Misérables, Les (1995)" in d.item_titles.tolist()


@pytest.mark.realdata
@needs_shared
def test_real_ml_latest_small_crlf_csv():
    folder = SHARED / "ml-latest-small"
    d = from_file(path=str(folder / "ratings.csv"), titles_path=str(folder / "movies.csv"))
    assert (d.num_users, d.num_items, d.num_interactions) == (610, 9724, 100836)
    assert d.has_time and int(d.train_times.min()) == 828124615
    _assert_chronological(d)
    assert (d.item_titles[1:] != "").all()


@pytest.mark.realdata
@needs_shared
def test_real_ml1m_half_dat():
    d = from_file(path=str(SHARED / "ml-1m" / "ratings_users0001-2999.dat"))
    assert (d.num_users, d.num_items, d.num_interactions) == (2999, 3615, 487650)
    _assert_chronological(d)


@pytest.mark.realdata
@needs_shared
def test_real_titles():
    titles = read_titles(SHARED / "ml-1m" / "movies.dat")
    assert len(titles) == 3883 and titles[1] == "Toy Story (1995)"
    assert "Misérables, Les (1995)" in titles.values()
    assert len(read_titles(SHARED / "ml-100k" / "u.item")) == 1682
    movies = read_titles(SHARED / "ml-latest-small" / "movies.csv")
    assert len(movies) == 9742 and movies[11] == "American President, The (1995)"


def _assert_chronological(d):
    rows = np.repeat(np.arange(d.num_users), d.train_lengths)
    same = rows[1:] == rows[:-1]
    assert (np.diff(d.train_times)[same] >= 0).all()
    last_train = d.train_times[d.train_ptr[1:] - 1]
    ev = d.eval_users("test")
    assert (d.valid_time[ev] >= last_train[ev]).all() and (d.test_time[ev] >= d.valid_time[ev]).all()


def test_id_out_of_int64_range(tmp_path):
    path = write(tmp_path, "big.txt", "1 2\n1 99999999999999999999\n")
    with pytest.raises(DataError, match=r"big\.txt:2: expected 'user item' with integer ids"):
        read_interactions(path)
