"""`python -m seqrec.data.prepare ml-1m`: SASRec preprocessing from a zip or ratings.dat, atomic outputs, read back
with `prepared()`, clear one-line errors (offline, bad zip, missing source).

The other benchmarks (second half of this file), `python -m seqrec.data.prepare <benchmark> --source FILE`: each
parser on its fixture in the real download format (tests/fixtures/, made by tests/fixtures/make_fixtures.py):
counts, id mappings, chronological order with file order breaking ties, the k-core fixed point versus SASRec's one
pass, date windows, gz/zip/tar inputs, and one-line errors naming file:line for malformed lines."""

import csv
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from seqrec.data import prepare as prep
from seqrec.data.dataset import from_file, prepared
from seqrec.data.prepare.common import _chronological_order, k_core, read_prepared
from seqrec.data.readers import read_interactions
from seqrec.errors import DataError

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / ".." / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")


def tiny_ratings() -> str:
    """5 users; items 1..3 have 5 ratings each, item 9 has 2 (dropped); user 5 has a same-second tie (3 before 2)."""
    lines = []
    for user in (1, 2, 3, 4):
        for k, item in enumerate((3, 2, 1)):
            lines.append(f"{user}::{item}::4::{1000 + 10 * user - k}")
    lines[0] = "1::3::4::1015"
    lines.insert(1, "1::9::3::1005")
    lines += ["5::1::5::500", "5::3::5::400", "5::2::5::400", "5::9::1::450"]
    return "\n".join(lines) + "\n"


MOVIES = "1::Toy Story (1995)::Animation\n2::Misérables, Les (1995)::Drama\n3::Heat (1995)::Action\n9::Rare::x\n"


@pytest.fixture
def ml1m_zip(tmp_path) -> Path:
    path = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", tiny_ratings())
        zf.writestr("ml-1m/movies.dat", MOVIES.encode("latin-1"))
        zf.writestr("ml-1m/README", "readme")
    return path


def test_prepare_from_zip(tmp_path, ml1m_zip, capsys):
    root = tmp_path / "data"
    assert prep.main(["ml-1m", "--source", str(ml1m_zip), "--root", str(root)]) == 0
    assert "ml-1m: 5 users, 3 items, 15 interactions" in capsys.readouterr().out
    out = root / "ml-1m"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "interactions.tsv",
        "meta.json",
        "titles.tsv",
    ]

    lines = (out / "interactions.tsv").read_text().splitlines()
    assert lines[0] == "user\titem\ttimestamp"
    rows = [tuple(map(int, line.split("\t"))) for line in lines[1:]]
    assert 9 not in {r[1] for r in rows}
    assert [r for r in rows if r[0] == 1] == [(1, 1, 1008), (1, 2, 1009), (1, 3, 1015)]
    assert [r for r in rows if r[0] == 5] == [(5, 3, 400), (5, 2, 400), (5, 1, 500)]
    assert rows == sorted(rows, key=lambda r: (r[0], r[2]))

    titles = (out / "titles.tsv").read_text(encoding="utf-8").splitlines()
    assert titles == ["item\ttitle", "1\tToy Story (1995)", "2\tMisérables, Les (1995)", "3\tHeat (1995)"]
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["users"], meta["items"], meta["interactions"]) == (5, 3, 15)
    assert meta["source_sha256"] == hashlib.sha256(ml1m_zip.read_bytes()).hexdigest()
    assert "15 interactions" in (out / "README.md").read_text()

    # every user has 3 interactions, so 1 training item each: nothing to train on, and reading it back says so
    with pytest.raises(DataError, match=r"interactions.tsv: no user has 2 training interactions left"):
        prepared(name="ml-1m", root=str(root))


def test_prepare_from_ratings_dat_with_sibling_movies(tmp_path):
    (tmp_path / "ratings.dat").write_text(tiny_ratings())
    (tmp_path / "movies.dat").write_bytes(MOVIES.encode("latin-1"))
    meta = prep.prepare("ml-1m", source=tmp_path / "ratings.dat", root=tmp_path / "data")
    assert (meta["users"], meta["items"], meta["interactions"], meta["titles"]) == (5, 3, 15, 3)
    again = prep.prepare("ml-1m", source=tmp_path, root=tmp_path / "data")  # a folder works too; overwrites
    assert again["interactions"] == 15
    assert not [p for p in (tmp_path / "data" / "ml-1m").iterdir() if p.name.endswith(".tmp")]


def test_offline_download_suggests_source(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as e:
        prep.prepare("ml-1m", root=tmp_path / "data")
    msg = str(e.value)
    assert msg.startswith("cannot download https://files.grouplens.org/datasets/movielens/ml-1m.zip")
    assert "--source PATH/TO/ml-1m.zip" in msg and "\n" not in msg
    assert not list((tmp_path / "data" / "ml-1m").iterdir())  # no partial download left


def test_cached_download_is_reused(tmp_path, ml1m_zip, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    (tmp_path / "data" / "ml-1m").mkdir(parents=True)
    os.replace(ml1m_zip, tmp_path / "data" / "ml-1m" / "ml-1m.zip")
    assert prep.prepare("ml-1m", root=tmp_path / "data")["interactions"] == 15


def test_corrupt_zip(tmp_path):
    bad = tmp_path / "ml-1m.zip"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=r"ml-1m\.zip: not a valid zip file"):
        prep.prepare("ml-1m", source=bad, root=tmp_path / "data")


def test_zip_without_ratings(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x/users.dat", "1::F::1::10::48067\n")
    with pytest.raises(DataError, match=r"other\.zip: the zip has no ratings\.dat"):
        prep.prepare("ml-1m", source=path, root=tmp_path / "data")


def test_missing_source(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.zip: not found"):
        prep.prepare("ml-1m", source=tmp_path / "nothere.zip", root=tmp_path / "data")


def test_malformed_ratings_in_zip(tmp_path):
    path = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", "1::2::5::100\n1::x::5::101\n")
    with pytest.raises(DataError, match=r"ml-1m\.zip:ratings\.dat:2: expected 'UserID::MovieID::Rating::Timestamp'"):
        prep.prepare("ml-1m", source=path, root=tmp_path / "data")


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'ml-25m': prepare knows ml-1m, ml-20m, amazon-beauty"):
        prep.prepare("ml-25m")


def test_cli_error_is_one_line_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "seqrec.data.prepare", "ml-1m", "--source", str(tmp_path / "x.zip")],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1
    expected = f"error: {tmp_path / 'x.zip'}: not found (expected ml-1m.zip, its ratings.dat, or a folder holding it)"
    assert proc.stderr.strip().splitlines() == [expected]


@pytest.mark.realdata
@needs_shared
def test_prepare_real_half_ml1m(tmp_path):
    source = SHARED / "ml-1m" / "ratings_users0001-2999.dat"
    meta = prep.prepare("ml-1m", source=source, root=tmp_path)
    users, items, times = read_interactions(source)
    counts = np.bincount(items)
    kept = counts[items] >= 5
    assert meta["users"] == 2999
    assert meta["items"] == len(np.unique(items[kept])) and meta["interactions"] == int(kept.sum())
    assert meta["titles"] == meta["items"]  # movies.dat next to the source covers every kept movie

    d = prepared(name="ml-1m", root=str(tmp_path))
    assert (d.num_users, d.num_items, d.num_interactions) == (2999, meta["items"], meta["interactions"])
    assert d.has_time and d.user_ids.tolist() == list(range(1, 3000))
    rows = np.repeat(np.arange(d.num_users), d.train_lengths)
    assert (np.diff(d.train_times)[rows[1:] == rows[:-1]] >= 0).all()
    assert (d.test_time >= d.valid_time).all()
    assert int(d.train_times.min()) >= 970620734 and int(d.test_time.max()) <= 1046388675
    # same-second ties keep the file order: user 1's first ratings at its earliest timestamp
    u1 = (users == 1) & kept
    t0 = times[u1].min()
    assert d.item_ids[d.user_history(0)[: int((times[u1] == t0).sum())]].tolist() == items[u1][times[u1] == t0].tolist()
    assert d.item_titles[d.item_ids.tolist().index(1)] == "Toy Story (1995)"


# ---------------------------------------------------------------------------------------------- benchmarks beyond ML-1M

FIXTURES = REPO / "tests" / "fixtures"
AMAZON = FIXTURES / "amazon"
DAY = 86400


def read_tsv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


def interactions(out: Path) -> list[tuple[int, int, int]]:
    rows = read_tsv(out / "interactions.tsv")
    assert rows[0] == ["user", "item", "timestamp"]
    return [tuple(map(int, r)) for r in rows[1:]]


def mapping(out: Path, name: str, kind: str) -> dict[int, str]:
    rows = read_tsv(out / f"{name}.{kind}s.tsv")
    assert rows[0] == [kind, "original_id"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, len(rows)))  # dense 1..N, in order
    return {int(r[0]): r[1] for r in rows[1:]}


def history(out: Path, name: str, user: str) -> list[tuple[str, int]]:
    """(original item id, timestamp) of one user (by original id), in file order."""
    users = {v: k for k, v in mapping(out, name, "user").items()}
    items = mapping(out, name, "item")
    return [(items[i], t) for u, i, t in interactions(out) if u == users[user]]


def check_standard_layout(out: Path, name: str, meta: dict) -> None:
    """Rows sorted by (user, time); items 1..I in first-appearance order; counts as in meta; readers agree."""
    rows = interactions(out)
    users = [r[0] for r in rows]
    assert rows == sorted(rows, key=lambda r: (r[0], r[2]))
    _, first = np.unique([r[1] for r in rows], return_index=True)
    assert np.all(np.diff(first) > 0)  # item k first appears before item k+1
    assert (meta["users"], meta["items"], meta["interactions"]) == (len(set(users)), len(first), len(rows))
    assert len(mapping(out, name, "user")) == meta["users"] and len(mapping(out, name, "item")) == meta["items"]
    data = from_file(path=str(out / "interactions.tsv"))
    assert (data.num_users, data.num_items, data.num_interactions) == (meta["users"], meta["items"], len(rows))
    assert data.item_ids[1:].tolist() == list(range(1, meta["items"] + 1))  # the reader keeps our item ids


# ------------------------------------------------------------------------------------------------------- Amazon

AMAZON_FILES = [
    "reviews_Beauty_5.json",  # 2014 5-core, strict JSON
    "reviews_Toys_and_Games_literal.json",  # Python dict literals, a blank line
    "Sports_and_Outdoors_5.json",  # 2018 5-core: true/false, nested dicts
    "ratings_Beauty.csv",  # 2014 ratings only: user,item,rating,timestamp
    "Toys_and_Games.csv",  # 2018 ratings only: item,user,rating,timestamp, CRLF
    "Beauty_and_Personal_Care.jsonl",  # 2023: user_id / parent_asin, milliseconds
]


@pytest.mark.parametrize("filename", AMAZON_FILES)
def test_amazon_formats_give_the_same_5core(tmp_path, filename):
    meta = prep.prepare("amazon-beauty", source=AMAZON / filename, out=tmp_path / "out")
    out = tmp_path / "out"
    assert (meta["users"], meta["items"], meta["interactions"], meta["read"]) == (6, 5, 30, 43)
    check_standard_layout(out, "amazon-beauty", meta)
    assert sorted(mapping(out, "amazon-beauty", "user").values()) == [f"A{u:02d}XQ7RZ3KD1PW" for u in range(1, 7)]
    assert "B00027D8IC" not in mapping(out, "amazon-beauty", "item").values()  # I6 falls in the 2nd round
    t0 = 1_356_998_400
    assert history(out, "amazon-beauty", "A01XQ7RZ3KD1PW") == [
        ("7806397051", t0 + 10 * DAY),
        ("B00004TMFE", t0 + 11 * DAY),  # tie: written first (lines grouped by item), stays first
        ("9759091062", t0 + 11 * DAY),
        ("B00005JS5C", t0 + 13 * DAY),
        ("B0000Y3NO6", t0 + 14 * DAY),
    ]
    reference = tmp_path / "ref"
    prep.prepare("amazon-beauty", source=AMAZON / "reviews_Beauty_5.json", out=reference)
    for f in ("interactions.tsv", "amazon-beauty.users.tsv", "amazon-beauty.items.tsv"):
        assert (out / f).read_bytes() == (reference / f).read_bytes()


def test_amazon_2023_csv_with_header(tmp_path):
    lines = (AMAZON / "Beauty_and_Personal_Care.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    rows = [f"{r['user_id']},{r['parent_asin']},{r['rating']},{r['timestamp']}" for r in records]
    path = tmp_path / "Beauty_and_Personal_Care.csv"
    path.write_text("\n".join(["user_id,parent_asin,rating,timestamp", *rows]) + "\n")
    meta = prep.prepare("amazon-beauty", source=path, out=tmp_path / "csv")
    prep.prepare("amazon-beauty", source=AMAZON / "Beauty_and_Personal_Care.jsonl", out=tmp_path / "jsonl")
    assert meta["interactions"] == 30 and meta["source_format"] == "Amazon Reviews 2023 CSV (ms timestamps)"
    assert (tmp_path / "csv" / "interactions.tsv").read_bytes() == (
        tmp_path / "jsonl" / "interactions.tsv"
    ).read_bytes()


def test_amazon_gz_and_one_pass(tmp_path):
    gz = tmp_path / "reviews_Beauty_5.json.gz"
    gz.write_bytes(gzip.compress((AMAZON / "reviews_Beauty_5.json").read_bytes()))
    meta = prep.prepare("amazon-beauty", source=gz, out=tmp_path / "a", iterate=False)
    # one pass on the raw counts keeps U7 (5 reviews) and I6 (5 reviewers, 4 of them removed in the same pass)
    assert (meta["users"], meta["items"], meta["interactions"]) == (7, 6, 35)
    assert meta["filters"] == {"min_user": 5, "min_item": 5, "iterate": False, "since": None, "until": None}
    assert "in one pass" in meta["preprocessing"] and "in one pass" in (tmp_path / "a" / "README.md").read_text()
    loose = prep.prepare("amazon-beauty", source=gz, out=tmp_path / "b", min_user=2, min_item=1)
    assert (loose["users"], loose["interactions"]) == (11, 43)


def test_amazon_csv_order_must_be_told_when_ambiguous(tmp_path):
    rows = (AMAZON / "ratings_Beauty.csv").read_text().replace("A0", "B0").replace("XQ7RZ3KD1PW", "XQ7RZ3K")
    path = tmp_path / "Beauty.csv"
    path.write_text(rows)  # both columns now look like 10-character ASINs
    with pytest.raises(DataError, match=r"Beauty\.csv: cannot tell .* pass --csv-order user-item"):
        prep.prepare("amazon-beauty", source=path, out=tmp_path / "out")
    meta = prep.prepare("amazon-beauty", source=path, out=tmp_path / "out", csv_order="user-item")
    assert meta["users"] == 6 and "2014 ratings CSV" in meta["source_format"]


# ------------------------------------------------------------------------------------------------ Steam, Yelp


def test_steam_python_literals_one_pass(tmp_path):
    gz = tmp_path / "steam_reviews.json.gz"
    gz.write_bytes(gzip.compress((FIXTURES / "steam" / "steam_reviews.json").read_bytes()))
    meta = prep.prepare("steam", source=gz, out=tmp_path / "out")
    out = tmp_path / "out"
    assert (meta["users"], meta["items"], meta["interactions"]) == (7, 6, 35)  # SASRec: one pass
    check_standard_layout(out, "steam", meta)
    users = mapping(out, "steam", "user")
    assert users[1] == "76561198011965365" and "₮ʜᴇ Ǥʀɪᴍ" in users.values() and "hello 'world'" in users.values()
    assert list(users.values()) == sorted(users.values())  # dense user ids follow the sorted original ids
    t0 = 1_483_228_800  # dates are midnight UTC
    assert history(out, "steam", "Chaos Syren")[:3] == [
        ("725281", t0 + 10 * DAY),
        ("725283", t0 + 11 * DAY),
        ("725282", t0 + 11 * DAY),
    ]
    iterated = prep.prepare("steam", source=gz, out=tmp_path / "k", iterate=True)
    assert (iterated["users"], iterated["items"], iterated["interactions"]) == (6, 5, 30)


def test_yelp_window_and_5core_from_tar(tmp_path):
    review = FIXTURES / "yelp" / "yelp_academic_dataset_review.json"
    archive = tmp_path / "yelp_dataset.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(review, arcname="yelp_academic_dataset_review.json")
        tf.add(FIXTURES / "ml-20m" / "movies.csv", arcname="yelp_academic_dataset_business.json")
    meta = prep.prepare("yelp", source=archive, out=tmp_path / "out")
    out = tmp_path / "out"
    assert (meta["users"], meta["items"], meta["interactions"], meta["read"]) == (6, 5, 30, 45)
    assert meta["source"] == f"{archive}:yelp_academic_dataset_review.json"
    check_standard_layout(out, "yelp", meta)
    rows = interactions(out)
    assert min(r[2] for r in rows) == 1_546_300_800 + 10 * 3 * 3600
    first = history(out, "yelp", "user01_xxxxxxxxxxxxxx")
    assert [i for i, _ in first[:3]] == ["biz01_yyyyyyyyyyyyyyy", "biz03_yyyyyyyyyyyyyyy", "biz02_yyyyyyyyyyyyyyy"]
    # the window is [since, until): the review at 2018-12-31 23:59:59 and the one at 2020-01-01 00:00:00 are out
    wide = prep.prepare(
        "yelp", source=review, out=tmp_path / "w", since=1_546_300_799, until=1_577_836_801, min_user=1, min_item=1
    )
    assert wide["interactions"] == 45
    edge = prep.prepare("yelp", source=review, out=tmp_path / "e", min_user=1, min_item=1)
    assert edge["interactions"] == 43 and edge["first_timestamp"] >= 1_546_300_800


# ------------------------------------------------------------------------------------------------------- ML-20M


def test_ml20m_zip_users_with_5_ratings_titles(tmp_path):
    archive = tmp_path / "ml-20m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(FIXTURES / "ml-20m" / "ratings.csv", "ml-20m/ratings.csv")
        zf.write(FIXTURES / "ml-20m" / "movies.csv", "ml-20m/movies.csv")
    root = tmp_path / "data"
    assert prep.main(["ml-20m", "--source", str(archive), "--root", str(root)]) == 0
    out = root / "ml-20m"
    meta = prep.prepare("ml-20m", source=archive, root=root)
    assert (meta["users"], meta["items"], meta["interactions"], meta["titles"]) == (4, 7, 24, 7)
    check_standard_layout(out, "ml-20m", meta)
    assert mapping(out, "ml-20m", "user") == {1: "1", 2: "2", 3: "3", 4: "5"}  # user 4 had 4 ratings
    t = 1_112_486_027
    assert history(out, "ml-20m", "2") == [
        ("151", t),
        ("2", t + 2000),
        ("10", t + 2120),  # three ratings in the same second keep the file order
        ("29", t + 2120),
        ("50", t + 2120),
        ("32", t + 2180),
        ("112", t + 2300),
    ]
    data = prepared(name="ml-20m", root=str(root))
    title = dict(zip(data.item_ids.tolist(), data.item_titles.tolist()))
    items = {v: k for k, v in mapping(out, "ml-20m", "item").items()}
    assert title[items["29"]] == "City of Lost Children, The (Cité des enfants perdus, La) (1995)"
    assert data.num_interactions == 24


def test_ml20m_header_is_checked(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("1,2,3.5,1112486027\n1,3,4.0,1112486028\n")
    with pytest.raises(DataError, match=r"ratings\.csv:1: expected the header 'userId,movieId,rating,timestamp'"):
        prep.prepare("ml-20m", source=path, out=tmp_path / "out")


# ---------------------------------------------------------------------------------------------- malformed lines

with_line = [
    ("amazon-beauty", "reviews_Beauty_5.json", 7, lambda line: line[: len(line) // 2], "expected one JSON object"),
    ("amazon-beauty", "reviews_Toys_and_Games_literal.json", 2, lambda line: line.replace("'asin'", "'ASIN'"), "asin"),
    (
        "amazon-beauty",
        "ratings_Beauty.csv",
        5,
        lambda line: line.rsplit(",", 1)[0],
        "expected 'user,item,rating,timestamp' (2014) or 'item,user,rating,timestamp' (2018) lines",
    ),
    (
        "amazon-beauty",
        "Toys_and_Games.csv",
        9,
        lambda line: line.replace(",1", ",x1"),
        "expected 'user,item,rating,timestamp' (2014) or 'item,user,rating,timestamp' (2018) lines",
    ),
    (
        "amazon-beauty",
        "Beauty_and_Personal_Care.jsonl",
        3,
        lambda line: line.replace('"timestamp": ', '"timestamp": "soon", "x": '),
        "timestamp to be unix milliseconds",
    ),
    (
        "steam",
        "steam_reviews.json",
        4,
        lambda line: line.replace("'Good'", "__import__('os').getcwd()"),
        "expected one JSON object or Python dict",
    ),
    (
        "steam",
        "steam_reviews.json",
        6,
        lambda line: line.replace("'date': '2017-", "'date': '17-"),
        "expected date to be a date YYYY-MM-DD",
    ),
    (
        "yelp",
        "yelp_academic_dataset_review.json",
        5,
        lambda line: line.replace('"date": "2019', '"date": "19'),
        "expected date to be a date YYYY-MM-DD HH:MM:SS",
    ),
    ("ml-20m", "ratings.csv", 4, lambda line: line.replace(",", ",x", 1), "expected 'userId,movieId,rating,timestamp'"),
    ("ml-20m", "ratings.csv", 12, lambda line: line + ",5", "expected 'userId,movieId,rating,timestamp'"),
]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "name, filename, lineno, corrupt, expected", with_line, ids=[f"{c[1]}:{c[2]}" for c in with_line]
)
def test_malformed_line_is_one_error_naming_file_and_line(tmp_path, name, filename, lineno, corrupt, expected, gz):
    folder = {"amazon-beauty": "amazon", "ml-20m": "ml-20m"}.get(name, name)
    lines = (FIXTURES / folder / filename).read_text(encoding="utf-8").split("\n")
    lines[lineno - 1] = corrupt(lines[lineno - 1].rstrip("\r")) + ("\r" if lines[lineno - 1].endswith("\r") else "")
    path = tmp_path / (filename + (".gz" if gz else ""))
    data = "\n".join(lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError) as e:
        prep.prepare(name, source=path, out=tmp_path / "out")
    message = str(e.value)
    assert message.startswith(f"{path}:{lineno}: ") and expected in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # nothing written


def test_python_literals_are_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    touch = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    line = "{'username': " + touch + ", 'product_id': '1', 'date': '2017-01-01'}\n"
    path = tmp_path / "steam_reviews.json"
    path.write_text(line)
    with pytest.raises(DataError, match=r"steam_reviews\.json:1: expected one JSON object or Python dict per line"):
        prep.prepare("steam", source=path, out=tmp_path / "out")
    assert not marker.exists()


def test_source_is_required_where_no_download_exists():
    with pytest.raises(DataError, match=r"steam: --source is required .* download https://cseweb\.ucsd\.edu/"):
        prep.prepare("steam")


def test_missing_and_truncated_sources(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.json\.gz: not found \(expected steam_reviews\.json\.gz\)"):
        prep.prepare("steam", source=tmp_path / "nothere.json.gz")
    truncated = tmp_path / "reviews_Beauty_5.json.gz"
    truncated.write_bytes(gzip.compress((AMAZON / "reviews_Beauty_5.json").read_bytes())[:-200])
    with pytest.raises(DataError, match=r"reviews_Beauty_5\.json\.gz: cannot be read to the end .*truncated"):
        prep.prepare("amazon-beauty", source=truncated, out=tmp_path / "out")
    with pytest.raises(DataError, match=r"ml-20m\.zip: the archive has no ratings\.csv"):
        with zipfile.ZipFile(tmp_path / "ml-20m.zip", "w") as zf:
            zf.writestr("ml-20m/tags.csv", "userId,movieId,tag,timestamp\n")
        prep.prepare("ml-20m", source=tmp_path / "ml-20m.zip", out=tmp_path / "out")


def test_ids_with_tabs_are_quoted_in_the_mapping(tmp_path):
    lines = (FIXTURES / "steam" / "steam_reviews.json").read_text(encoding="utf-8").replace("Wodan", "Wo\\tdan")
    path = tmp_path / "steam_reviews.json"
    path.write_text(lines, encoding="utf-8")
    prep.prepare("steam", source=path, out=tmp_path / "out")
    assert "Wo\tdan" in mapping(tmp_path / "out", "steam", "user").values()


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "seqrec.data.prepare", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=120, check=False)


def test_cli_out_and_one_line_error(tmp_path):
    ok = run_cli(
        ["yelp", "--source", str(FIXTURES / "yelp"), "--out", str(tmp_path / "y"), "--min-user", "3"], tmp_path
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith(f"-> {tmp_path / 'y'}") and (tmp_path / "y" / "yelp.items.tsv").is_file()
    bad = tmp_path / "ratings.csv"
    bad.write_text("userId,movieId,rating,timestamp\n1,2,3.5,100\n1,2\n")
    proc = run_cli(["ml-20m", "--source", str(bad), "--out", str(tmp_path / "m")], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}:3: expected 'userId,movieId,rating,timestamp' lines after the header, got '1,2'"
    ]


# ---------------------------------------------------------------------------------------------------- k-core


def naive_k_core(pairs: list[tuple[int, int]], k_user: int, k_item: int) -> list[bool]:
    keep = [True] * len(pairs)
    changed = True
    while changed:
        changed = False
        users: dict = {}
        items: dict = {}
        for (u, i), kept in zip(pairs, keep):
            if kept:
                users[u] = users.get(u, 0) + 1
                items[i] = items.get(i, 0) + 1
        for n, (u, i) in enumerate(pairs):
            if keep[n] and (users[u] < k_user or items[i] < k_item):
                keep[n] = False
                changed = True
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_k_core_matches_the_definition(seed):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 40, 600)
    items = np.minimum(rng.zipf(1.6, 600), 60) - 1
    keep = k_core(users, items, 5, 4, iterate=True)
    assert keep.tolist() == naive_k_core(list(zip(users.tolist(), items.tolist())), 5, 4)
    assert keep.any() and not keep.all()
    u, i = users[keep], items[keep]
    assert np.bincount(u)[np.unique(u)].min() >= 5 and np.bincount(i)[np.unique(i)].min() >= 4


def test_read_prepared_matches_the_general_reader(tmp_path):
    prep.prepare("steam", source=FIXTURES / "steam" / "steam_reviews.json", out=tmp_path / "out")
    fast = read_prepared(tmp_path / "out" / "interactions.tsv")
    general = read_interactions(tmp_path / "out" / "interactions.tsv", "generic")
    assert all(np.array_equal(a, b) and a.dtype == np.int64 for a, b in zip(fast, general))
    bad = tmp_path / "bad.tsv"
    bad.write_text("user\titem\ttimestamp\n1\t2\t3\n1\tx\t4\n")
    with pytest.raises(DataError, match=r"bad\.tsv:3: expected 'user<TAB>item<TAB>timestamp' with integer ids"):
        read_prepared(bad)


@pytest.mark.parametrize("span", [10**6, 2**40])  # the combined-key sort, and lexsort beyond 32 bits of time
def test_chronological_order_is_stable_by_user_then_time(span):
    rng = np.random.default_rng(0)
    users = rng.integers(0, 50, 2000)
    times = rng.integers(0, 40, 2000) * (span // 40) - 5  # many ties, a negative time
    order = _chronological_order(users, times)
    assert np.array_equal(order, np.lexsort((times, users)))
