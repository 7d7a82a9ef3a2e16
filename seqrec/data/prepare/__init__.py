"""Prepare a benchmark under `data/`: `python -m seqrec.data.prepare NAME [--source FILE] [--out data/NAME]`.

NAME is ml-1m (downloaded when --source is not given), ml-20m (likewise), amazon-beauty, amazon-sports,
amazon-toys, steam or yelp (these need --source: their licences require a manual download). Each writes
`interactions.tsv` (`user<TAB>item<TAB>timestamp`, chronological per user) with `meta.json` and `README.md`;
the benchmarks beyond ML-1M write dense integer ids plus `<NAME>.users.tsv` / `<NAME>.items.tsv` mapping them
back to the original ids. Read the result with `dataset=file dataset.path=data/NAME/interactions.tsv` or
`seqrec.data.dataset.prepared(name=NAME)`. docs/DATASETS.md lists sources, preprocessing and the papers' counts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from seqrec.data.prepare import benchmarks, ml1m
from seqrec.errors import DataError, SeqrecError

NAMES = ("ml-1m", *benchmarks.BENCHMARKS)


def prepare(
    name: str,
    source: str | Path | None = None,
    root: str | Path = "data",
    out: str | Path | None = None,
    **options,
) -> dict:
    """Build the dataset folder `out` (default `root/name`) from `source` (a download when None and allowed).

    Args:
        name: one of `NAMES`.
        options: overrides of the benchmark's preprocessing: min_user, min_item, iterate (bool), since, until
            (unix seconds), csv_order ("auto" | "user-item" | "item-user"); not for ml-1m.

    Returns:
        The metadata written to meta.json (counts, preprocessing, source and its sha256).
    """
    if name not in NAMES:
        raise DataError(f"unknown dataset {name!r}: prepare knows {', '.join(NAMES)}")
    out = Path(out) if out is not None else Path(root) / name
    if name == "ml-1m":
        given = sorted(k for k, v in options.items() if v is not None and k != "csv_order")
        if given:
            raise DataError(
                f"ml-1m: its preprocessing is fixed (SASRec's); options {', '.join(given)} are not accepted"
            )
        return ml1m.prepare(source, out, name)
    return benchmarks.prepare(name, source, out, options)


def _date(text: str) -> int:
    """`YYYY-MM-DD[ HH:MM:SS]` (UTC) -> unix seconds, for --since/--until."""
    try:
        return int(np.datetime64(text.replace(" ", "T"), "s").astype(np.int64))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD[ HH:MM:SS], got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m seqrec.data.prepare",
        description="Prepare a benchmark dataset with its papers' preprocessing (see docs/DATASETS.md).",
    )
    parser.add_argument("name", choices=NAMES, help="dataset to prepare")
    parser.add_argument(
        "--source", default=None, help="the downloaded file, archive or folder (ml-1m/ml-20m: default downloads)"
    )
    parser.add_argument("--root", default="data", help="data folder (default: data); output in ROOT/NAME")
    parser.add_argument("--out", default=None, help="output folder (default: ROOT/NAME)")
    rules = parser.add_argument_group("override the benchmark's preprocessing (recorded in meta.json)")
    rules.add_argument("--min-user", type=int, default=None, help="remove users with fewer interactions")
    rules.add_argument("--min-item", type=int, default=None, help="remove items with fewer interactions")
    rules.add_argument(
        "--iterate",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="repeat the filter until it holds (k-core), or apply it once (--no-iterate)",
    )
    rules.add_argument("--since", type=_date, default=None, help="keep interactions at or after this UTC date")
    rules.add_argument("--until", type=_date, default=None, help="keep interactions before this UTC date")
    rules.add_argument(
        "--csv-order",
        choices=("auto", "user-item", "item-user"),
        default=None,
        help="Amazon ratings-only CSV column order (2014: user-item, 2018: item-user)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = {k: getattr(args, k) for k in ("min_user", "min_item", "iterate", "since", "until", "csv_order")}
    try:
        meta = prepare(args.name, args.source, args.root, args.out, **options)
    except SeqrecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(args.root) / args.name
    print(
        f"{args.name}: {meta['users']:,} users, {meta['items']:,} items, {meta['interactions']:,} interactions -> {out}"
    )
    return 0
