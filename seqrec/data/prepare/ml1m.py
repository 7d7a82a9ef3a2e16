"""`python -m seqrec.data.prepare ml-1m [--source ZIP_OR_RATINGS_DAT] [--root data]`.

ML-1M follows SASRec's preprocessing: every rating is an interaction, each user's ratings sorted by timestamp
(stable: file order breaks ties), items with fewer than 5 ratings removed in one pass (6,040 users, 3,416 items,
999,611 interactions on the full file). Unlike SASRec's ml-1m.txt the timestamps are kept, for TiSASRec.
Writes `ROOT/ml-1m/{interactions.tsv, titles.tsv, meta.json, README.md}`, each atomically; read with
`seqrec.data.dataset.prepared(name="ml-1m")`.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np

from seqrec.data import readers
from seqrec.data.prepare.common import download, sha256, write_atomic
from seqrec.errors import DataError

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


def prepare(source: str | Path | None, out: Path, name: str = "ml-1m") -> dict:
    """Build `out/` from the official archive (downloaded when `source` is None) or a local copy.

    Args:
        source: the dataset's zip, its ratings file, or a folder holding the ratings file; None downloads.
        out: the dataset's folder (`data/ml-1m` by default).

    Returns:
        The metadata written to meta.json (counts, source and its sha256).
    """
    spec = DATASETS[name]
    if source is None:
        source = download(spec["url"], out / Path(spec["url"]).name, name)
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
    write_atomic(out / "interactions.tsv", "user\titem\ttimestamp\n" + lines)
    n_titles = 0
    if movies is not None:
        titles = _parse_titles(movies, f"{source}:{spec['movies']}")
        kept = set(np.unique(items).tolist())
        rows = [f"{i}\t{t}\n" for i, t in titles.items() if i in kept]
        n_titles = len(rows)
        write_atomic(out / "titles.tsv", "item\ttitle\n" + "".join(rows))

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
    write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    write_atomic(out / "README.md", _readme(meta, spec))
    log.debug("%s: %d users, %d items, %d interactions -> %s", name, meta["users"], meta["items"], len(users), out)
    return meta


def _load_source(source: Path, spec: dict) -> tuple[bytes, bytes | None, str]:
    """(ratings bytes, movies bytes or None, sha256 of the source file) from a zip, a ratings file or a folder."""
    if not source.exists():
        raise DataError(f"{source}: not found (expected ml-1m.zip, its {spec['ratings']}, or a folder holding it)")
    if source.is_dir():
        ratings_path = source / spec["ratings"]
        if not ratings_path.is_file():
            raise DataError(f"{source}: folder has no {spec['ratings']}")
        source = ratings_path
    digest = sha256(source)
    if zipfile.is_zipfile(source):
        try:
            with zipfile.ZipFile(source) as zf:
                names = zf.namelist()
                ratings_name = _member(names, spec["ratings"])
                if ratings_name is None:
                    raise DataError(f"{source}: the zip has no {spec['ratings']} (members: {', '.join(names[:5])})")
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
