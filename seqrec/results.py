"""Results tables from run directories: the runs that differ only in `seed` become one row, mean ± std over seeds.

    python -m seqrec.results DIR [DIR ...] [--metrics test/ndcg@10,test/hr@10] [--format md|csv]

A row is named after the folder that holds its seeds and nothing else (`<row>/seed1`, `<row>/seed2`, ... as
`bench/reproduce.py` lays them out), otherwise after its overrides. Columns:
the number of seeds, each metric as mean ± std (sample std, n - 1), the epochs to the best validation score, the
epochs run, minutes of training, and how many runs stopped at `trainer.time_limit_min` instead of converging.
Unfinished runs (no results.json) are left out and counted on stderr. A run's overrides are read from its run.json
(the legacy .hydra/overrides.yaml for runs made before it), as `seqrec.compare` describes; nothing is instantiated.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter

from seqrec.compare import CompareError, Run, find_runs, format_table

DEFAULT_METRICS = ("test/ndcg@10", "test/hr@10")


# overrides that do not make a different setting (beyond compare.IGNORED_OVERRIDES, dropped when runs are read):
# the seed, and the time budget a run may get per machine (the table's "time-limited" column says which it stopped)
NOT_A_SETTING = ("seed", "trainer.time_limit_min")


def group_by_setting(runs: list[Run]) -> dict[str, list[Run]]:
    """{row name: runs}, runs grouped by their overrides without NOT_A_SETTING, in first-seen order."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        key = tuple(sorted((k, v) for k, v in run.overrides.items() if k not in NOT_A_SETTING))
        groups.setdefault(key, []).append(run)
    runs_per_parent = Counter(r.path.parent for r in runs)
    named = {}
    for key, members in groups.items():
        parents = {r.path.parent for r in members}
        # a folder holding exactly this setting's seeds names the row; otherwise its overrides do
        only_these = len(parents) == 1 and runs_per_parent[next(iter(parents))] == len(members)
        name = next(iter(parents)).name if only_these else " ".join(f"{k}={v}" for k, v in key)
        while name in named:
            name += "'"
        named[name] = members
    return named


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(members: list[Run], metrics: list[str]) -> dict:
    """One row's numbers: {metric: (mean, std)} plus seeds, epochs and time (means over the finished runs)."""
    done = [r.results for r in members if r.results]
    row = {"seeds": len(done)}
    for m in metrics:
        values = [float(r[m]) for r in done if m in r]
        row[m] = mean_std(values) if values else None
    for key in ("best_epoch", "epochs_run"):
        row[key] = statistics.fmean(r[key] for r in done) if done else None
    row["train_min"] = statistics.fmean(r["train_seconds"] / 60 for r in done) if done else None
    row["time_limited"] = sum(bool(r.get("time_limited")) for r in done)
    return row


def results_table(paths: list[str], metrics: list[str], fmt: str = "md") -> tuple[str, dict[str, dict], int]:
    """(table text, {row name: summary}, number of unfinished runs left out)."""
    runs = find_runs(paths)
    groups = group_by_setting(runs)
    summaries = {name: summarise(members, metrics) for name, members in groups.items()}
    unfinished = sum(not r.results for r in runs)
    header = ["row", "seeds", *metrics, "best epoch", "epochs run", "train min", "time-limited"]
    rows = []
    for name, s in summaries.items():
        if not s["seeds"]:
            continue
        cells = [f"{s[m][0]:.4f} ± {s[m][1]:.4f}" if s[m] else "" for m in metrics]
        rows.append(
            [name, s["seeds"], *cells, f"{s['best_epoch']:.0f}", f"{s['epochs_run']:.0f}", f"{s['train_min']:.1f}"]
            + [f"{s['time_limited']}/{s['seeds']}"]
        )
    return format_table(header, rows, fmt), summaries, unfinished


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqrec.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="folders holding run directories")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated results.json keys")
    parser.add_argument("--format", choices=("md", "csv"), default="md")
    args = parser.parse_args(argv)
    try:
        text, _, unfinished = results_table(args.paths, [m for m in args.metrics.split(",") if m], args.format)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(text, end="")
    if unfinished:
        print(f"left out {unfinished} unfinished run(s) (no results.json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
