"""Prepare a dataset under `data/`: `python -m seqrec.data.prepare ml-1m [--source ZIP_OR_RATINGS_DAT] [--root data]`.

ML-1M follows SASRec's preprocessing: every rating is an interaction, each user's ratings sorted by timestamp
(stable: file order breaks ties), items with fewer than 5 ratings removed in one pass (6,040 users, 3,416 items,
999,611 interactions on the full file). Unlike SASRec's ml-1m.txt the timestamps are kept, for TiSASRec.
Writes `ROOT/ml-1m/{interactions.tsv, titles.tsv, meta.json, README.md}`, each atomically; read with
`seqrec.data.dataset.prepared(name="ml-1m")`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from seqrec.data import readers
from seqrec.errors import DataError, SeqrecError

log = logging.getLogger(__name__)

DATASETS = {
    "ml-1m": {
        "url": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        "ratings": "ratings.dat",
        "movies": "movies.dat",
        "min_item_interactions": 5,
        "citation": "F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and Context. "
        "ACM TiiS 5(4):19.",
    },
}


def prepare(name: str, source: str | Path | None = None, root: str | Path = "data") -> dict:
    """Build `root/name/` from the official archive (downloaded when `source` is None) or a local copy.

    Args:
        name: a key of `DATASETS` ("ml-1m").
        source: the dataset's zip, its ratings file, or a folder holding the ratings file; None downloads.
        root: the data folder.

    Returns:
        The metadata written to meta.json (counts, source and its sha256).
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: prepare knows {', '.join(DATASETS)}")
    spec = DATASETS[name]
    out = Path(root) / name
    if source is None:
        source = _download(spec["url"], out / Path(spec["url"]).name, name)
    source = Path(source)
    ratings, movies, digest = _load_source(source, spec)
    src_name = f"{source}:{spec['ratings']}" if zipfile.is_zipfile(source) else str(source)

    users, items, times = readers.parse_interactions(ratings, src_name, "dat")
    order = np.lexsort((times, users))  # stable: same-second ratings keep their file order
    users, items, times = users[order], items[order], times[order]
    k = spec["min_item_interactions"]
    _, inverse, counts = np.unique(items, return_inverse=True, return_counts=True)
    keep = counts[inverse.reshape(-1)] >= k  # one pass, as SASRec
    users, items, times = users[keep], items[keep], times[keep]
    if len(users) == 0:
        raise DataError(f"{src_name}: no ratings left after removing items with < {k} ratings")

    out.mkdir(parents=True, exist_ok=True)
    lines = "".join(map("{}\t{}\t{}\n".format, users.tolist(), items.tolist(), times.tolist()))
    _write_atomic(out / "interactions.tsv", "user\titem\ttimestamp\n" + lines)
    n_titles = 0
    if movies is not None:
        titles = _parse_titles(movies, f"{source}:{spec['movies']}")
        kept = set(np.unique(items).tolist())
        rows = [f"{i}\t{t}\n" for i, t in titles.items() if i in kept]
        n_titles = len(rows)
        _write_atomic(out / "titles.tsv", "item\ttitle\n" + "".join(rows))

    meta = {
        "name": name,
        "users": len(np.unique(users)),
        "items": len(np.unique(items)),
        "interactions": len(users),
        "titles": n_titles,
        "timestamps": True,
        "first_timestamp": int(times.min()),
        "last_timestamp": int(times.max()),
        "min_item_interactions": k,
        "source": str(source),
        "source_sha256": digest,
        "preprocessing": "every rating is an interaction; per user sorted by timestamp (stable); "
        f"items with < {k} ratings removed in one pass",
    }
    _write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    _write_atomic(out / "README.md", _readme(meta, spec))
    log.debug(
        "%s: %d users, %d items, %d interactions -> %s", name, meta["users"], meta["items"], len(users), out
    )
    return meta


def _load_source(source: Path, spec: dict) -> tuple[bytes, bytes | None, str]:
    """(ratings bytes, movies bytes or None, sha256 of the source file) from a zip, a ratings file or a folder."""
    if not source.exists():
        raise DataError(
            f"{source}: not found (expected ml-1m.zip, its {spec['ratings']}, or a folder holding it)"
        )
    if source.is_dir():
        ratings_path = source / spec["ratings"]
        if not ratings_path.is_file():
            raise DataError(f"{source}: folder has no {spec['ratings']}")
        source = ratings_path
    digest = _sha256(source)
    if zipfile.is_zipfile(source):
        try:
            with zipfile.ZipFile(source) as zf:
                names = zf.namelist()
                ratings_name = _member(names, spec["ratings"])
                if ratings_name is None:
                    raise DataError(
                        f"{source}: the zip has no {spec['ratings']} (members: {', '.join(names[:5])})"
                    )
                movies_name = _member(names, spec["movies"])
                ratings = zf.read(ratings_name)
                movies = zf.read(movies_name) if movies_name else None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
            raise DataError(f"{source}: cannot read the zip ({e}); download it again") from None
        return ratings, movies, digest
    if source.suffix.lower() == ".zip":
        raise DataError(f"{source}: not a valid zip file (truncated download?); download it again")
    movies_path = source.parent / spec["movies"]
    movies = movies_path.read_bytes() if movies_path.is_file() else None
    return source.read_bytes(), movies, digest


def _member(names: list[str], basename: str) -> str | None:
    found = [n for n in names if n.rsplit("/", 1)[-1] == basename and not n.startswith("__MACOSX")]
    return min(found, key=len) if found else None


def _parse_titles(data: bytes, source: str) -> dict:
    """movies.dat bytes -> {MovieID: title} (latin-1, `::`), tabs replaced for the TSV."""
    return {k: v.replace("\t", " ") for k, v in readers.parse_titles(data, source).items()}


def _download(url: str, dest: Path, name: str) -> Path:
    """Download `url` to `dest` (kept for later runs); a clear DataError when offline."""
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _readme(meta: dict, spec: dict) -> str:
    return (
        f"# {meta['name']} (prepared by `python -m seqrec.data.prepare {meta['name']}`)\n\n"
        f"- {meta['users']:,} users, {meta['items']:,} items, {meta['interactions']:,} interactions, timestamps kept\n"
        f"- {meta['preprocessing']}\n"
        f"- source: `{meta['source']}` (sha256 `{meta['source_sha256']}`)\n"
        "- files: `interactions.tsv` (`user<TAB>item<TAB>timestamp`, original ids, chronological per user), "
        "`titles.tsv` (`item<TAB>title`), `meta.json`\n\n"
        "MovieLens data: GroupLens licence, no redistribution and no commercial use; do not commit these files.\n"
        f"Cite: {spec['citation']}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m seqrec.data.prepare", description="Prepare a dataset under --root (default: data/)."
    )
    parser.add_argument("name", choices=sorted(DATASETS), help="dataset to prepare")
    parser.add_argument(
        "--source", default=None, help="local zip, ratings file or folder (default: download)"
    )
    parser.add_argument("--root", default="data", help="data folder (default: data)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        meta = prepare(args.name, args.source, args.root)
    except SeqrecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.name}: {meta['users']:,} users, {meta['items']:,} items, {meta['interactions']:,} interactions "
        f"-> {Path(args.root) / args.name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
