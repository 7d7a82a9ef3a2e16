"""Results tables from run directories: the runs of one setting become one row, mean ± 95 % confidence interval over
its seeds; `--paired A B` tests whether two rows differ, over seeds or over test users.

    python -m seqrec.results DIR [DIR ...] [--metrics test/ndcg@10,test/hr@10] [--format md|csv]
        [--paired A B [--over seeds|users] [--assume-same-protocol]]

Runs are read by `seqrec.run_dirs` (as data) into a DataFrame, one row per run (`runs_frame`). A setting is a run's
values of the config keys that differ between the runs, except `seed` and `trainer.time_limit_min`. A table row is
one setting under one evaluation protocol (results.json["protocol"], `seqrec.fingerprint`), named after the folder
holding its seeds and nothing else (`<row>/seed1`, ... as `bench/reproduce.py` lays them out), else after its
settings. Columns: the number of seeds n; each metric as mean ± half-width of the 95 % confidence interval of the
mean (Student t, n - 1 degrees of freedom: t * s / sqrt(n), s the sample std; one seed has none); epochs to the best
validation score, epochs run, training minutes, runs stopped by the time limit. Rows under different protocols get
a `protocol` column and a line above the table saying not to compare them; runs older than the protocol record get
a line below it saying nothing was checked. Unfinished runs are left out and counted on stderr.

`--paired A B` tests row B - row A and says which pairing it used:
- `--over seeds` (default): a paired t-test over the seeds both rows finished (equal seeds: the same initial draws
  and sampled negatives). Whether the difference survives training randomness; 3 seeds see only large effects.
  Rows under different protocols are refused; `--assume-same-protocol` lets runs made before results.json recorded
  the protocol pair with runs under one recorded protocol, and the line counts the runs it did not check.
- `--over users`: each test user's metric from the ranks the evaluator wrote (`test_ranks.npy`,
  `seqrec.eval.user_ranks`), averaged over the seeds both rows finished (as over seeds: a seed only one row has
  would weigh that row's side with a training draw the other side lacks; the line names any it left out), users
  matched by index under one recorded protocol; a paired t-test over users and the Wilcoxon signed-rank test.
  Whether these trained models differ on this test set, not whether another training draw would. Runs older than
  test_ranks.npy can only be paired over seeds.
Both print the mean difference, its 95 % interval and two-sided p-values.
"""

from __future__ import annotations

import argparse
import functools
import math
import numbers
import os
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from seqrec.errors import SeqrecError
from seqrec.eval.user_ranks import FILE as RANKS_FILE
from seqrec.eval.user_ranks import read_test_ranks
from seqrec.fingerprint import describe, differing_fields
from seqrec.run_dirs import UNRECORDED, CompareError, Run, find_runs, number
from seqrec.stats import mean_ci, paired_t_test, wilcoxon_signed_rank

DEFAULT_METRICS = ("test/ndcg@10", "test/hr@10")
NOT_A_SETTING = ("seed", "trainer.time_limit_min")  # the time limit: the budget a machine gave, see "time-limited"


# --------------------------------------------------------------------------------------------- runs -> frame
def swept_keys(runs: list[Run]) -> tuple[list[str], dict[str, str]]:
    """(override keys whose value differs between runs, {key: value} of overrides shared by all runs); for one run,
    all its overrides and no common ones."""
    keys = sorted({k for r in runs for k in r.overrides})
    if len(runs) == 1:
        return keys, {}
    varying = [k for k in keys if len({r.setting(k) for r in runs}) > 1]
    return varying, {k: runs[0].setting(k) for k in keys if k not in varying}


def runs_frame(runs: list[Run], keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """One row per run, in `runs` order: `run` (the Run), `dir`, the settings `keys`, `seed`, `row` (see
    `row_names`), `protocol` (None while running), `metrics` (results.json; for a run still going, its epoch with the
    best metrics[0] so far), best_epoch, epochs, minutes (training + evaluation), train_min, status, time_limited."""
    records = []
    for r in runs:
        values, last = r.metrics(metrics[0]), (r.history[-1] if r.history else {})
        seconds = r.results.get("train_seconds", 0) + r.results.get("eval_seconds", 0) if r.finished else None
        records.append(
            {
                "run": r,
                "dir": r.path,
                **{k: r.setting(k) for k in keys},
                "seed": r.setting("seed") or r.path.name,
                "protocol": r.protocol_id if r.finished else None,
                **{m: number(values.get(m)) for m in metrics},
                "best_epoch": values.get("best_epoch", values.get("epoch")),
                "epochs": r.results.get("epochs_run", last.get("epoch")),
                "minutes": _per_minute(seconds if r.finished else last.get("train/seconds")),
                "train_min": _per_minute(r.results.get("train_seconds")),
                "status": "done" if r.finished else ("running/failed" if r.history else "no epochs"),
                "time_limited": bool(r.results.get("time_limited")),
            }
        )
    columns = ["run", "dir", *dict.fromkeys([*keys, "seed"]), "protocol", *metrics, "best_epoch", "epochs"]
    frame = pd.DataFrame.from_records(records, columns=columns + ["minutes", "train_min", "status", "time_limited"])
    frame[metrics] = frame[metrics].astype(float)
    frame[["best_epoch", "epochs"]] = frame[["best_epoch", "epochs"]].astype("Int64")
    frame["row"] = row_names(frame, [k for k in keys if k not in NOT_A_SETTING])
    return frame


def row_names(frame: pd.DataFrame, setting_keys: list[str]) -> pd.Series:
    """Each run's setting, named after the folder that holds exactly that setting's runs (with its parents up to
    their common folder when two such folders share a name), else `k=v ...`."""
    label = frame[setting_keys].apply(lambda s: " ".join(f"{k}={v}" for k, v in s.items() if v != ""), axis=1)
    label = label if setting_keys else pd.Series("", index=frame.index)
    parent = frame["dir"].map(lambda p: p.parent)
    folders = {}
    for setting, members in frame.groupby(label, sort=False):
        own = set(parent[members.index])
        folders[setting] = own.pop() if len(own) == 1 and (label[parent.isin(own)] == setting).all() else None
    named = [f for f in folders.values() if f is not None]
    clash = Counter(f.name for f in named)
    root = Path(os.path.commonpath(named)) if len(named) > 1 else None
    names = {s: f.name if clash[f.name] == 1 else str(f.relative_to(root)) for s, f in folders.items() if f}
    return label.map(lambda s: names.get(s) or s or "all runs")


def _per_minute(seconds) -> float:
    return number(seconds) / 60 if number(seconds) is not None else math.nan


# --------------------------------------------------------------------------------------------- seeds -> rows
def summarise(frame: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per (row, protocol) of the finished runs, in first-seen order: row, protocol, seeds (n), per metric
    its mean `<m>` and the half-width of its 95 % interval `<m> ci95` (NaN for one seed), the means of best_epoch,
    epochs and train_min, and time_limited (a count)."""
    out = []
    for (name, protocol), runs in frame[frame["status"] == "done"].groupby(["row", "protocol"], sort=False):
        row = {"row": name, "protocol": protocol, "seeds": len(runs)}
        for m in metrics:
            row[m], _, row[f"{m} ci95"] = mean_ci(runs[m].dropna())
        row |= {k: runs[k].astype(float).mean() for k in ("best_epoch", "epochs", "train_min")}
        out.append(row | {"time_limited": int(runs["time_limited"].sum())})
    columns = ["row", "protocol", "seeds", *[c for m in metrics for c in (m, f"{m} ci95")]]
    return pd.DataFrame(out, columns=columns + ["best_epoch", "epochs", "train_min", "time_limited"])


def summary_table(summary: pd.DataFrame, metrics: list[str], fmt: str) -> pd.DataFrame:
    """The summary as printed: Markdown cells `mean ± ci`, CSV a number per column."""
    several = summary["protocol"].nunique() > 1
    table = summary.drop(columns=[] if several else ["protocol"])
    if fmt == "md":
        for m in metrics:
            table[m] = [mean_ci_cell(mean, half) for mean, half in zip(table[m], table.pop(f"{m} ci95"), strict=True)]
        table = table.rename(columns={m: f"{m} (mean ± 95% CI)" for m in metrics})
        table[["best_epoch", "epochs"]] = table[["best_epoch", "epochs"]].map(lambda v: f"{v:.0f}")
        table["train_min"] = table["train_min"].map(lambda v: f"{v:.1f}")
        table["time_limited"] = [f"{k}/{n}" for k, n in zip(table["time_limited"], table["seeds"], strict=True)]
    names = {"best_epoch": "best epoch", "epochs": "epochs run", "train_min": "train min"}
    return table.rename(columns={**names, "time_limited": "time-limited"})


def mean_ci_cell(mean: float, half: float) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.4f}" if math.isnan(half) else f"{mean:.4f} ± {half:.4f}"


def results_table(paths: list[str], metrics: list[str], fmt: str = "md") -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """(table text, the summary, the runs frame)."""
    runs = find_runs(paths)
    frame = runs_frame(runs, swept_keys(runs)[0], metrics)
    summary = summarise(frame, metrics)
    text = render(summary_table(summary, metrics, fmt), fmt)
    if fmt == "md":
        text = protocols_note(runs) + text + unrecorded_note(runs)
    return text, summary, frame


# --------------------------------------------------------------------------------------------- protocols, output
def protocols_note(runs: list[Run]) -> str:
    """A line above a table whose runs were evaluated under several protocols, else ""."""
    protocols = {r.protocol_id: r.protocol for r in runs if r.finished}
    if len(protocols) < 2:
        return ""
    differ = ", ".join(differing_fields(list(protocols.values()))[:6]) or "fields not recorded"
    listed = "; ".join(describe(p) if p else UNRECORDED for p in protocols.values())
    return f"{len(protocols)} protocols: {listed}; they differ in {differ}: do not compare rows across them\n\n"


def unrecorded_note(runs: list[Run]) -> str:
    """A line below a table holding runs made before results.json recorded the protocol, else ""."""
    finished = [r for r in runs if r.finished]
    if old := sum(r.protocol is None for r in finished):
        return (
            f"\n{old} of {len(finished)} runs predate the protocol record: not checked to share data and evaluation\n"
        )
    return ""


def render(table: pd.DataFrame, fmt: str) -> str:
    """CSV, or a Markdown table of the frame's cells (pandas' to_markdown needs tabulate, not a dependency)."""
    if fmt == "csv":
        return table.to_csv(index=False, lineterminator="\n")
    header = [str(c) for c in table.columns]
    cells = [["" if v is None or v is pd.NA or v != v else str(v) for v in row] for row in table.itertuples(False)]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(header)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)]) + "\n"


# --------------------------------------------------------------------------------------------- stability
# What each run's metrics.jsonl says about how its training went, one column each (NaN where a run logs no such
# number, e.g. the mHC gains of a plain residual).
STABILITY = ("final loss", "loss rise", "val drop", "fwd gain", "bwd gain")
STABILITY_HELP = (
    "final loss: train/loss of the last epoch; loss rise: the largest rise of the epoch loss above its lowest value "
    "so far (0 when it never went up); val drop: the best validation metric (the first val/ key of --metrics, else "
    "val/ndcg@10) minus the last; fwd/bwd gain: the largest mHC composite forward/backward gain logged (1 = the "
    "product of the H_res matrices neither amplifies nor damps)"
)


def stability_columns(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The STABILITY numbers of each run in `frame` (indexed like it), read from its history."""

    def series(run: Run, key: str) -> list[float]:
        return [float(h[key]) for h in run.history if number(h.get(key)) is not None]

    def of(run: Run) -> dict[str, float]:
        loss, val = np.asarray(series(run, "train/loss")), series(run, metric)
        fwd, bwd = series(run, "mhc/composite_fwd_gain"), series(run, "mhc/composite_bwd_gain")
        return {
            "final loss": loss[-1] if len(loss) else math.nan,
            "loss rise": float(np.max(loss - np.minimum.accumulate(loss))) if len(loss) else math.nan,
            "val drop": max(val) - val[-1] if val else math.nan,
            "fwd gain": max(fwd, default=math.nan),
            "bwd gain": max(bwd, default=math.nan),
        }

    return pd.DataFrame([of(r) for r in frame["run"]], index=frame.index, columns=list(STABILITY))


def stability_table(frame: pd.DataFrame, metric: str, fmt: str) -> str:
    """Per row, mean ± 95 % CI over its finished seeds of each STABILITY number."""
    columns = list(STABILITY)
    summary = summarise(frame.drop(columns=columns, errors="ignore").join(stability_columns(frame, metric)), columns)
    table = summary_table(summary, columns, fmt)
    keep = [c for c in table.columns if c in ("row", "protocol", "seeds") or c.split(" (")[0] in columns]
    return render(table[keep], fmt)


# --------------------------------------------------------------------------------------------- paired tests
def paired_rows(frame: pd.DataFrame, first: str, second: str, assume_same: bool = False) -> pd.DataFrame:
    """The finished runs of rows `first` and `second`, refused unless both exist under one protocol.

    `assume_same`: runs that predate the protocol record may pair with runs under one recorded protocol (the caller
    says so in its output); two different recorded protocols are refused all the same.
    """
    done = frame[frame["status"] == "done"]
    for name in (first, second):
        if name not in set(done["row"]):
            rows = ", ".join(done["row"].unique())
            raise CompareError(f"--paired {name}: no such row with finished runs; rows: {rows}")
    pair = done[done["row"].isin([first, second])]
    recorded = pair.loc[pair["protocol"] != UNRECORDED, "protocol"]
    mixed = recorded.nunique() == 1 and len(recorded) < len(pair)
    if recorded.nunique() > 1 or (mixed and not assume_same):
        hint = " (runs that predate the protocol record: --assume-same-protocol)" if mixed else ""
        raise CompareError(f"--paired {first} {second}: the rows were evaluated under different protocols{hint}")
    return pair


def paired_over_seeds(frame: pd.DataFrame, metric: str, first: str, second: str, assume_same: bool = False) -> str:
    """One line: the paired t-test over seeds of `second` - `first` on `metric`; with `assume_same`, it ends by
    counting the runs whose protocol was assumed rather than checked."""
    pair = paired_rows(frame, first, second, assume_same)
    wide = pair.pivot_table(index="seed", columns="row", values=metric).dropna()
    if first not in wide or second not in wide or len(wide) < 2:
        raise CompareError(f"--paired {first} {second}: fewer than 2 seeds finished in both rows")
    test = paired_t_test(wide[first], wide[second])
    used = pair[pair["seed"].isin(wide.index)]
    unchecked = int((used["protocol"] == UNRECORDED).sum())
    mixed = 0 < unchecked < len(used)  # rows all older than the record pair as before, under the table's own note
    assumed = f"; protocol assumed equal for {unchecked} of {len(used)} runs (not recorded)" if mixed else ""
    return (
        f"{metric}: {second} - {first} = {test['mean_diff']:+.4f} ± {test['ci']:.4f} (95% CI), "
        f"paired over {test['n']} seeds ({', '.join(map(str, wide.index))}), t = {test['t']:.3f}, p = {test['p']:.4f}"
        f"{assumed}"
    )


def paired_over_users(frame: pd.DataFrame, metric: str, first: str, second: str) -> str:
    """One line: `second` - `first` on each test user's `metric` averaged over the seeds both rows finished, the
    paired t-test over users and the Wilcoxon signed-rank p-value; it names the seeds it left out."""
    if not re.fullmatch(r"test/(ndcg|hr|mrr)@\d+", metric):
        raise CompareError(f"--over users: {metric}: expected test/ndcg@k, test/hr@k or test/mrr@k (test ranks only)")
    pair = paired_rows(frame, first, second, assume_same=True)  # unrecorded runs get the message below, not the flag
    if (pair["protocol"] == UNRECORDED).any():
        raise CompareError(
            f"--paired {first} {second} --over users: some runs predate the protocol record, so their test users "
            "cannot be matched (--over seeds with --assume-same-protocol can pair them)"
        )
    seeds_of = {name: set(pair.loc[pair["row"] == name, "seed"]) for name in (first, second)}
    shared = sorted(seeds_of[first] & seeds_of[second], key=_seed_order)
    if not shared:
        raise CompareError(f"--paired {first} {second} --over users: no seed finished in both rows")
    per_row = {}
    for name in (first, second):
        runs = pair.loc[(pair["row"] == name) & pair["seed"].isin(shared), "run"]
        per_seed = pd.concat([user_metric(run, metric) for run in runs], axis=1)  # (users, seeds)
        if per_seed.isna().any().any():
            raise CompareError(f"--over users: the seeds of {name} ranked different test users")
        per_row[name] = per_seed.mean(axis=1)
    a, b = per_row[first], per_row[second]
    if not a.index.equals(b.index):
        raise CompareError(f"--paired {first} {second} --over users: the rows ranked different test users")
    test = paired_t_test(a, b)
    only_one = {name: sorted(seeds_of[name] - set(shared), key=_seed_order) for name in (first, second)}
    left_out = [f"{name} {_seeds(extra)}" for name, extra in only_one.items() if extra]
    left = f"; left out, not finished in both rows: {'; '.join(left_out)}" if left_out else ""
    return (
        f"{metric}: {second} - {first} = {test['mean_diff']:+.4f} ± {test['ci']:.4f} (95% CI), paired over "
        f"{test['n']} users (each user's value averaged over {_seeds(shared)} of both rows{left}), "
        f"t = {test['t']:.3f}, p = {test['p']:.3g}; Wilcoxon signed-rank p = {wilcoxon_signed_rank(b - a):.3g}"
    )


def _seed_order(seed) -> tuple:
    """Seeds are config ints, or a folder name where a run recorded none: numbers first, in order."""
    return (0, int(seed), "") if isinstance(seed, numbers.Integral) else (1, 0, str(seed))


def _seeds(seeds: list) -> str:
    """'seed 1' or 'seeds 1, 2, 3'."""
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def user_metric(run: Run, metric: str) -> pd.Series:
    """The run's test `metric` per user (indexed by user) from its test_ranks.npy, which must reproduce the run's
    results.json value (else the file is not this run's)."""
    import torch

    from seqrec.eval.metrics import metric_values

    file = run.path / RANKS_FILE
    if not file.is_file():
        raise CompareError(f"{file}: missing (the run predates per-user ranks); pair over seeds instead")
    records = read_test_ranks(run.path)
    values = metric_values(torch.from_numpy(records["rank"]), [int(metric.split("@")[1])])[metric[len("test/") :]]
    values = values.numpy()
    if metric not in run.results or abs(values.mean() - run.results[metric]) > 1e-6:
        raise CompareError(f"{file}: gives {metric} {values.mean():.6f}, not the run's results.json value")
    return pd.Series(values, index=records["user"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqrec.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="folders holding run directories")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated results.json keys")
    parser.add_argument("--format", choices=("md", "csv"), default="md")
    parser.add_argument("--paired", nargs=2, metavar=("A", "B"), help="a paired test of row B - row A")
    parser.add_argument("--over", choices=("seeds", "users"), default="seeds", help="what --paired pairs")
    parser.add_argument(
        "--assume-same-protocol",
        action="store_true",
        help="--over seeds: pair runs that predate the protocol record with recorded ones (the line says how many)",
    )
    parser.add_argument("--stability", action="store_true", help=f"also a training-stability table: {STABILITY_HELP}")
    args = parser.parse_args(argv)
    metrics = [m for m in args.metrics.split(",") if m]
    try:
        text, _, frame = results_table(args.paths, metrics, args.format)
        if args.over == "users":
            test = paired_over_users
        else:
            test = functools.partial(paired_over_seeds, assume_same=args.assume_same_protocol)
        paired = [test(frame, m, *args.paired) for m in metrics] if args.paired else []
    except SeqrecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(text, end="")
    for line in paired:
        print(line)
    if args.stability:
        validation = next((m for m in metrics if m.startswith("val")), "val/ndcg@10")
        print("\ntraining stability (" + validation + "):\n" + stability_table(frame, validation, args.format), end="")
    if unfinished := int((frame["status"] != "done").sum()):
        print(f"left out {unfinished} unfinished run(s) (no results.json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
