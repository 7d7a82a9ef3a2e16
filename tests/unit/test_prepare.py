"""`python -m seqrec.data.prepare ml-1m`: SASRec preprocessing from a zip or ratings.dat, atomic outputs, read back
with `prepared()`, clear one-line errors (offline, bad zip, missing source)."""

import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from seqrec.data import prepare as prep
from seqrec.data.dataset import prepared
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
    with pytest.raises(DataError, match="unknown dataset 'ml-20m': prepare knows ml-1m"):
        prep.prepare("ml-20m")


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
