"""The standard sequential-recommendation benchmarks beyond ML-1M: ML-20M (BERT4Rec), Amazon Beauty / Sports / Toys
5-core (S3Rec), Steam (SASRec) and Yelp (S3Rec). Each reads its downloaded file into `Raw` interactions and runs the
shared pipeline with the preprocessing of the paper that made the benchmark standard (see docs/DATASETS.md)."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqrec.data import readers
from seqrec.data.prepare import common, sources
from seqrec.data.prepare.common import Filters, Raw
from seqrec.data.prepare.sources import CsvLayout, RecordFormat, Source
from seqrec.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Benchmark:
    name: str
    read: Callable[[Path, dict], tuple[Raw, Source, str, dict]]  # (source, options) -> (raw, file, format, titles)
    filters: Filters
    expected: str  # what --source should be, for messages
    url: str  # where users download it (documented; fetched only for ML-20M)
    convention: str  # whose preprocessing this is
    citation: str
    licence: str


# ------------------------------------------------------------------------------------------------------- ML-20M

ML20M_RATINGS = CsvLayout(("userId", "movieId", "rating", "timestamp"), "userId", "movieId", "timestamp", True, True)


def read_ml20m(path: Path, options: dict) -> tuple[Raw, Source, str, dict]:
    """ratings.csv (`userId,movieId,rating,timestamp`, header) from ml-20m.zip, its folder or the file itself;
    titles from movies.csv beside it when present."""
    source = sources.locate(path, ("ratings.csv",), "ml-20m.zip, its ratings.csv, or a folder holding it")
    _check_header(source, "userId,movieId,rating,timestamp")
    users, items, times = sources.read_csv(source, ML20M_RATINGS)
    titles = _ml20m_titles(source)
    return Raw(users, items, times), source, "MovieLens ratings.csv", titles


def _check_header(source: Source, header: str) -> None:
    lineno, line = sources.first_line(source)
    if line.strip().decode("utf-8", "replace") != header:
        raise DataError(f"{source.label}:{lineno}: expected the header {header!r}, got {sources.show_line(line)!r}")


def _ml20m_titles(ratings: Source) -> dict:
    """{movieId: title} from movies.csv in the same archive folder or folder; {} when absent."""
    if ratings.member is not None:
        movies = Source(ratings.path, ratings.member[: -len("ratings.csv")] + "movies.csv")
        try:
            with sources.open_binary(movies) as f:
                data = f.read()
        except KeyError:  # no such member
            return {}
    else:
        path = ratings.path.parent / "movies.csv"
        if not path.is_file():
            return {}
        movies, data = Source(path), path.read_bytes()
    return readers.parse_titles(data, movies.label)


# ------------------------------------------------------------------------------------------------------- Amazon

AMAZON_RECORDS = (
    RecordFormat(
        "Amazon 2014/2018 reviews (JSON or Python-literal lines)", "reviewerID", "asin", "unixReviewTime", "unix"
    ),
    RecordFormat("Amazon Reviews 2023 (JSON lines)", "user_id", "parent_asin", "timestamp", "unix_ms"),
)
AMAZON_RATINGS_CSV = CsvLayout(
    ("first", "second", "rating", "timestamp"),
    "first",
    "second",
    "timestamp",
    header=False,
    integer_ids=False,
    shown="'user,item,rating,timestamp' (2014) or 'item,user,rating,timestamp' (2018)",
)
_ASIN = re.compile(r"^[0-9A-Z]{10}$")


def read_amazon(path: Path, options: dict) -> tuple[Raw, Source, str, dict]:
    """A review dump (one JSON object or Python dict per line, 2014/2018/2023) or a ratings-only CSV
    (2014 `user,item,rating,timestamp`; 2018 `item,user,rating,timestamp`; 2023 with a header), gzipped or not."""
    source = sources.locate(path, (), "a reviews_<Category>_5.json.gz, <Category>_5.json.gz or ratings CSV file")
    first = sources.first_line(source)[1]
    if first.startswith(b"{"):
        users, items, times, fmt = sources.read_records(source, AMAZON_RECORDS)
        return Raw(_objects(users), _objects(items), times), source, fmt.name, {}
    if first.split(b",")[:2] == [b"user_id", b"parent_asin"]:
        columns = tuple(c.strip().decode() for c in first.split(b","))
        layout = CsvLayout(columns, "user_id", "parent_asin", "timestamp", True, False)
        users, items, stamps = sources.read_csv(source, layout)
        return Raw(users, items, np.floor_divide(stamps, 1000)), source, "Amazon Reviews 2023 CSV (ms timestamps)", {}
    first_col, second_col, times = sources.read_csv(source, AMAZON_RATINGS_CSV)
    order = _amazon_csv_order(source, first_col, second_col, options.get("csv_order", "auto"))
    if order == "user-item":
        return Raw(first_col, second_col, times), source, "Amazon 2014 ratings CSV (user,item,rating,timestamp)", {}
    return Raw(second_col, first_col, times), source, "Amazon 2018 ratings CSV (item,user,rating,timestamp)", {}


def _amazon_csv_order(source: Source, first_col: np.ndarray, second_col: np.ndarray, order: str) -> str:
    """The 2014 ratings files put the user first, the 2018 ones the item: told by --csv-order, else by the file
    name (2014: ratings_<Category>.csv) or by which column holds only 10-character ASINs."""
    if order != "auto":
        return order
    if source.path.name.startswith("ratings_"):
        return "user-item"
    first_asin = all(_ASIN.match(x) for x in np.unique(first_col))
    second_asin = all(_ASIN.match(x) for x in np.unique(second_col))
    if first_asin != second_asin:
        return "item-user" if first_asin else "user-item"
    raise DataError(
        f"{source.label}: cannot tell whether the columns are user,item (2014 files) or item,user (2018 files); "
        "pass --csv-order user-item or --csv-order item-user"
    )


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


# ---------------------------------------------------------------------------------------------------- Steam, Yelp

STEAM_RECORDS = (RecordFormat("Steam reviews (Python-literal lines)", "username", "product_id", "date", "%Y-%m-%d"),)
YELP_RECORDS = (RecordFormat("Yelp reviews (JSON lines)", "user_id", "business_id", "date", "%Y-%m-%d %H:%M:%S"),)


def read_steam(path: Path, options: dict) -> tuple[Raw, Source, str, dict]:
    source = sources.locate(path, ("steam_reviews.json.gz",), "steam_reviews.json.gz")
    users, items, times, fmt = sources.read_records(source, STEAM_RECORDS)
    return Raw(_objects(users), _objects(items), times), source, fmt.name, {}


def read_yelp(path: Path, options: dict) -> tuple[Raw, Source, str, dict]:
    expected = "yelp_academic_dataset_review.json, the Yelp dataset tar, or a folder holding the review file"
    source = sources.locate(path, ("yelp_academic_dataset_review.json",), expected)
    users, items, times, fmt = sources.read_records(source, YELP_RECORDS)
    return Raw(_objects(users), _objects(items), times), source, fmt.name, {}


# -------------------------------------------------------------------------------------------------------- registry

S3REC = "Zhou et al. 2020, S3-Rec (CIKM), and the works that reuse its data (CoSeRec, ICLRec, DuoRec, ...)"
AMAZON_CITATION = (
    "R. He and J. McAuley. 2016. Ups and Downs: Modeling the Visual Evolution of Fashion Trends with One-Class "
    "Collaborative Filtering. WWW. J. McAuley et al. 2015. Image-based Recommendations on Styles and Substitutes. "
    "SIGIR."
)
AMAZON_LICENCE = "Amazon review data: for research use; do not redistribute."


def _amazon(category: str) -> dict:
    return dict(
        read=read_amazon,
        filters=Filters(min_user=5, min_item=5, iterate=True),
        expected=f"reviews_{category}_5.json.gz",
        url=f"http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_{category}_5.json.gz",
        convention=S3REC,
        citation=AMAZON_CITATION,
        licence=AMAZON_LICENCE,
    )


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark(
            name="ml-20m",
            read=read_ml20m,
            filters=Filters(min_user=5, min_item=0, iterate=False),
            expected="ml-20m.zip, its ratings.csv, or a folder holding it",
            url="https://files.grouplens.org/datasets/movielens/ml-20m.zip",
            convention="Sun et al. 2019, BERT4Rec (CIKM): users with at least 5 ratings, no item filter",
            citation="F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and Context. "
            "ACM TiiS 5(4):19.",
            licence="MovieLens data: GroupLens licence, no redistribution and no commercial use.",
        ),
        Benchmark(name="amazon-beauty", **_amazon("Beauty")),
        Benchmark(name="amazon-sports", **_amazon("Sports_and_Outdoors")),
        Benchmark(name="amazon-toys", **_amazon("Toys_and_Games")),
        Benchmark(
            name="steam",
            read=read_steam,
            filters=Filters(min_user=5, min_item=5, iterate=False),
            expected="steam_reviews.json.gz",
            url="https://cseweb.ucsd.edu/~jmcauley/datasets.html#steam_data (file steam_reviews.json.gz)",
            convention="Kang and McAuley 2018, SASRec (ICDM): users and items with < 5 reviews removed in one pass",
            citation="W.-C. Kang and J. McAuley. 2018. Self-Attentive Sequential Recommendation. ICDM.",
            licence="Steam review data (UCSD): for research use; do not redistribute.",
        ),
        Benchmark(
            name="yelp",
            read=read_yelp,
            filters=Filters(
                min_user=5,
                min_item=5,
                iterate=True,
                since=int(np.datetime64("2019-01-01", "s").astype(np.int64)),
                until=int(np.datetime64("2020-01-01", "s").astype(np.int64)),
            ),
            expected="yelp_academic_dataset_review.json (or the Yelp dataset tar)",
            url="https://www.yelp.com/dataset (accept the terms; the archive holds yelp_academic_dataset_review.json)",
            convention=S3REC + ": reviews of 2019 only, then 5-core",
            citation="Yelp Open Dataset, https://www.yelp.com/dataset.",
            licence="Yelp Dataset Terms of Use: academic/non-commercial use, no redistribution.",
        ),
    )
}


def prepare(name: str, source: str | Path | None, out: Path, options: dict) -> dict:
    """Read `source`, apply the benchmark's preprocessing (with any overrides in `options`), write `out/`.

    Args:
        options: min_user, min_item, iterate, since, until (unix seconds or None), csv_order; None = the default.

    Returns:
        The metadata written to meta.json.
    """
    bench = BENCHMARKS[name]
    if source is None:
        if name != "ml-20m":
            raise DataError(
                f"{name}: --source is required (this dataset cannot be downloaded automatically); "
                f"download {bench.url} and pass the file: `python -m seqrec.data.prepare {name} --source PATH`"
            )
        source = common.download(bench.url, out / Path(bench.url).name, name)
    filters = dataclasses.replace(
        bench.filters, **{k: v for k, v in options.items() if k in _FILTER_KEYS and v is not None}
    )
    for key in ("min_user", "min_item"):
        if getattr(filters, key) < 0:
            raise DataError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(filters, key)}")
    raw, file, file_format, titles = bench.read(Path(source), options)
    log.info("%s: read %d interactions from %s", name, len(raw.times), file.label)
    users, items, times, user_ids, item_ids = common.run_pipeline(raw, filters, file.label)

    meta = {
        "name": name,
        "users": len(user_ids),
        "items": len(item_ids),
        "interactions": len(users),
        "read": len(raw.times),
        "timestamps": True,
        "first_timestamp": int(times.min()),
        "last_timestamp": int(times.max()),
        "filters": dataclasses.asdict(filters),
        "preprocessing": filters.describe(),
        "convention": bench.convention,
        "source": file.label,
        "source_format": file_format,
        "source_sha256": common.sha256(file.path),
        "titles": 0,
    }
    out.mkdir(parents=True, exist_ok=True)
    if titles:
        one_line = {i: " ".join(str(t).split()) for i, t in titles.items()}  # no tab or newline inside a TSV field
        rows = [f"{k}\t{one_line[i]}\n" for k, i in enumerate(item_ids, 1) if i in one_line]
        common.write_atomic(out / "titles.tsv", "item\ttitle\n" + "".join(rows))
        meta["titles"] = len(rows)
    common.write_prepared(out, name, (users, items, times), user_ids, item_ids, meta, _readme(meta, bench))
    return meta


_FILTER_KEYS = {f.name for f in dataclasses.fields(Filters)}


def _readme(meta: dict, bench: Benchmark) -> str:
    name = meta["name"]
    titles = ", `titles.tsv` (`item<TAB>title`)" if meta["titles"] else ""
    return (
        f"# {name} (prepared by `python -m seqrec.data.prepare {name}`)\n\n"
        f"- {meta['users']:,} users, {meta['items']:,} items, {meta['interactions']:,} interactions "
        f"(of {meta['read']:,} read), timestamps in unix seconds\n"
        f"- preprocessing: {meta['preprocessing']}\n"
        f"- convention: {bench.convention}\n"
        f"- source: `{meta['source']}` ({meta['source_format']}; sha256 `{meta['source_sha256']}`)\n"
        "- files: `interactions.tsv` (`user<TAB>item<TAB>timestamp`, dense ids: users 1..U in the order of their "
        "sorted original ids, items 1..I in order of first appearance; chronological per user), "
        f"`{name}.users.tsv` and `{name}.items.tsv` (`dense id<TAB>original id`){titles}, `meta.json`\n\n"
        f"{bench.licence} Do not commit these files.\n"
        f"Cite: {bench.citation}\n"
    )
