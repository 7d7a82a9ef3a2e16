"""Results tables from run directories: the runs that differ only in `seed` become one row, mean ± 95 % confidence
interval over seeds; `--paired A B` tests whether two rows differ.

    python -m seqrec.results DIR [DIR ...] [--metrics test/ndcg@10,test/hr@10] [--format md|csv] [--paired A B]

A row is named after the folder that holds its seeds and nothing else (`<row>/seed1`, `<row>/seed2`, ... as
`bench/reproduce.py` lays them out), otherwise after its overrides. Columns: the number of seeds, each metric as
mean ± half-width of the 95 % confidence interval of the mean (Student t with n - 1 degrees of freedom: t * s / √n,
s the sample standard deviation; one seed has no interval), the epochs to the best validation score, the epochs
run, minutes of training, and how many runs stopped at `trainer.time_limit_min` instead of converging. Runs are
grouped by their evaluation protocol too (results.json["protocol"], see `seqrec.fingerprint`): rows under different
protocols get a `protocol` column and a header line saying they must not be compared. Unfinished runs (no
results.json) are left out and counted on stderr. A run's overrides are read from its run.json (the legacy
.hydra/overrides.yaml for runs made before it), as `seqrec.compare` describes; nothing is instantiated.

`--paired A B`: a paired t-test over seeds (the runs of A and B with the same seed, so the same initial draws and
sampled negatives): mean difference B - A, its 95 % interval and the two-sided p-value. Results hold only per-seed
means, not per-user metrics, so the pairing is over seeds, never over users.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter

import numpy as np
import pandas as pd

from seqrec.compare import CompareError, Run, find_runs, format_table, protocols_note

DEFAULT_METRICS = ("test/ndcg@10", "test/hr@10")
CONFIDENCE = 0.95

# overrides that do not make a different setting (beyond compare.IGNORED_OVERRIDES, dropped when runs are read):
# the seed, and the time budget a run may get per machine (the table's "time-limited" column says which it stopped)
NOT_A_SETTING = ("seed", "trainer.time_limit_min")


# --------------------------------------------------------------------------------------------- Student t
def student_t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with `df` degrees of freedom: Simpson's rule on the density from 0 to |x| (no
    SciPy; error below 1e-9 for the |x| < 1000 that confidence intervals and p-values need)."""
    a = abs(float(x))
    if a == 0.0:
        return 0.5
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    # substitution u = atan(t): the density's heavy tail becomes a smooth bounded integrand on [0, atan(a)]
    u = np.linspace(0.0, math.atan(a), 4001)
    t = np.tan(u)
    f = np.exp(log_norm - (df + 1) / 2 * np.log1p(t * t / df)) / np.cos(u) ** 2
    h = u[1] - u[0]
    area = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + math.copysign(area, x)


def student_t_quantile(p: float, df: int) -> float:
    """x with P(T <= x) = p, for 0.5 <= p < 1, by bisection on `student_t_cdf`."""
    low, high = 0.0, 1e6
    for _ in range(80):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def mean_ci(values) -> tuple[float, float, float]:
    """(mean, sample standard deviation, half-width of the CONFIDENCE interval of the mean); std and half-width are
    NaN for one value."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return float(values.mean()), math.nan, math.nan
    std = float(values.std(ddof=1))
    return float(values.mean()), std, student_t_quantile((1 + CONFIDENCE) / 2, n - 1) * std / math.sqrt(n)


def paired_t_test(a, b) -> dict:
    """Paired t-test of b - a: {n, mean_diff, ci (half-width), t, p (two-sided)}; t and p are NaN for n < 2 or
    for identical differences (zero spread)."""
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    mean, std, half = mean_ci(diff)
    n = len(diff)
    t = mean / (std / math.sqrt(n)) if n > 1 and std > 0 else math.nan
    p = 2 * (1 - student_t_cdf(abs(t), n - 1)) if not math.isnan(t) else math.nan
    return {"n": n, "mean_diff": mean, "ci": half, "t": t, "p": p}


# --------------------------------------------------------------------------------------------- runs -> frame
def group_by_setting(runs: list[Run]) -> dict[str, list[Run]]:
    """{row name: runs}, runs grouped by their overrides without NOT_A_SETTING and by their protocol, in first-seen
    order."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        key = tuple(sorted((k, v) for k, v in run.overrides.items() if k not in NOT_A_SETTING))
        groups.setdefault((key, run.protocol_id), []).append(run)
    runs_per_parent = Counter(r.path.parent for r in runs)
    named = {}
    for (key, _), members in groups.items():
        parents = {r.path.parent for r in members}
        # a folder holding exactly this setting's seeds names the row; otherwise its overrides do
        only_these = len(parents) == 1 and runs_per_parent[next(iter(parents))] == len(members)
        name = next(iter(parents)).name if only_these else " ".join(f"{k}={v}" for k, v in key)
        while name in named:
            name += "'"
        named[name] = members
    return named


def runs_frame(groups: dict[str, list[Run]], metrics: list[str]) -> pd.DataFrame:
    """One row per finished run: row, seed, protocol, the metrics, best_epoch, epochs_run, train_min, time_limited."""
    records = []
    for name, members in groups.items():
        for run in members:
            r = run.results
            if not r:
                continue
            records.append(
                {
                    "row": name,
                    "seed": run.setting("seed") or str(run.path.name),
                    "protocol": run.protocol_id,
                    **{m: float(r[m]) if m in r else math.nan for m in metrics},
                    "best_epoch": r.get("best_epoch"),
                    "epochs_run": r.get("epochs_run"),
                    "train_min": r.get("train_seconds", math.nan) / 60,
                    "time_limited": bool(r.get("time_limited")),
                }
            )
    columns = ["row", "seed", "protocol", *metrics, "best_epoch", "epochs_run", "train_min", "time_limited"]
    return pd.DataFrame.from_records(records, columns=columns)


def summarise(frame: pd.DataFrame, metrics: list[str]) -> dict[str, dict]:
    """{row: {"seeds", "protocol", metric: (mean, std, ci half-width) or None, best_epoch, epochs_run, train_min,
    time_limited}}, rows in first-seen order."""
    out = {}
    for name, runs in frame.groupby("row", sort=False):
        row = {"seeds": len(runs), "protocol": runs["protocol"].iloc[0]}
        for m in metrics:
            values = runs[m].dropna()
            row[m] = mean_ci(values) if len(values) else None
        row.update({k: float(runs[k].mean()) for k in ("best_epoch", "epochs_run", "train_min")})
        row["time_limited"] = int(runs["time_limited"].sum())
        out[name] = row
    return out


def results_table(paths: list[str], metrics: list[str], fmt: str = "md") -> tuple[str, dict[str, dict], int]:
    """(table text, {row name: summary}, number of unfinished runs left out)."""
    runs = find_runs(paths)
    groups = group_by_setting(runs)
    summaries = summarise(runs_frame(groups, metrics), metrics)
    unfinished = sum(not r.results for r in runs)
    ids = list(dict.fromkeys(s["protocol"] for s in summaries.values()))
    several = len(ids) > 1
    header = ["row", *(["protocol"] if several else []), "seeds"]
    header += [f"{m} (mean ± 95% CI)" if fmt == "md" else m for m in metrics]
    header += ["best epoch", "epochs run", "train min", "time-limited"]
    rows = []
    for name, s in summaries.items():
        cells = [_mean_ci_cell(s[m]) for m in metrics]
        rows.append(
            [name, *([s["protocol"]] if several else []), s["seeds"], *cells]
            + [f"{s['best_epoch']:.0f}", f"{s['epochs_run']:.0f}", f"{s['train_min']:.1f}"]
            + [f"{s['time_limited']}/{s['seeds']}"]
        )
    text = format_table(header, rows, fmt)
    if fmt == "md":
        text = protocols_note(runs) + text
    return text, summaries, unfinished


def _mean_ci_cell(stats: tuple | None) -> str:
    if stats is None:
        return ""
    mean, _, half = stats
    return f"{mean:.4f}" if math.isnan(half) else f"{mean:.4f} ± {half:.4f}"


def paired_comparison(paths: list[str], metric: str, first: str, second: str) -> str:
    """One line: the paired t-test over seeds of `second` - `first` on `metric` (see the module docstring)."""
    groups = group_by_setting(find_runs(paths))
    frame = runs_frame(groups, [metric])
    for name in (first, second):
        if name not in groups:
            raise CompareError(f"--paired {name}: no such row; rows: {', '.join(groups)}")
    protocols = set(frame.loc[frame["row"].isin([first, second]), "protocol"])
    if len(protocols) > 1:
        raise CompareError(f"--paired {first} {second}: the rows were evaluated under different protocols")
    wide = frame.pivot_table(index="seed", columns="row", values=metric).dropna()
    if first not in wide or second not in wide or len(wide) < 2:
        raise CompareError(f"--paired {first} {second}: fewer than 2 seeds finished in both rows")
    test = paired_t_test(wide[first], wide[second])
    return (
        f"{metric}: {second} - {first} = {test['mean_diff']:+.4f} ± {test['ci']:.4f} (95% CI), "
        f"paired over {test['n']} seeds ({', '.join(map(str, wide.index))}), t = {test['t']:.3f}, p = {test['p']:.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqrec.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="folders holding run directories")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated results.json keys")
    parser.add_argument("--format", choices=("md", "csv"), default="md")
    parser.add_argument("--paired", nargs=2, metavar=("A", "B"), help="paired t-test over seeds of row B - row A")
    args = parser.parse_args(argv)
    metrics = [m for m in args.metrics.split(",") if m]
    try:
        text, _, unfinished = results_table(args.paths, metrics, args.format)
        paired = [paired_comparison(args.paths, m, *args.paired) for m in metrics] if args.paired else []
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(text, end="")
    for line in paired:
        print(line)
    if unfinished:
        print(f"left out {unfinished} unfinished run(s) (no results.json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
