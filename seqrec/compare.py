"""Compare runs from their directories alone (no W&B): the runs ranked by a metric, each setting's mean ± 95 %
confidence interval over its seeds, and PNG plots.

    python -m seqrec.compare outputs/sweeps/stage2_2025-01-01_10-00-00 [more sweep or run dirs ...]
        [--metric val/ndcg@10] [--format md|csv] [--out DIR] [--no-plots]

Columns: the overrides that differ between runs, the best validation and the test metrics (a run still going shows
its best validation epoch so far), epochs and time. Runs are read and grouped as `seqrec.results` describes; runs
evaluated under different protocols are ranked within their protocol, each row says which, and a line above the
table says not to compare across them. When a setting ran with several seeds, a second table gives its mean ± 95 %
CI. Plots go to `--out` (default `<dir>/compare/` for one directory, else `./compare/`): `learning_curves.png`
(train/loss and the metric per epoch, one line per run, a setting's seeds in one colour) and
`<metric>_vs_<param>.png` per swept setting (the mean over seeds, its 95 % interval as error bars).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pandas as pd

from seqrec.results import (
    NOT_A_SETTING,
    mean_ci_cell,
    protocols_note,
    render,
    runs_frame,
    summarise,
    summary_table,
    swept_keys,
    unrecorded_note,
)
from seqrec.run_dirs import CompareError, Run, find_runs, is_run_dir, number
from seqrec.stats import mean_ci


def metric_columns(metric: str) -> list[str]:
    """The chosen metric, then NDCG and HR at its cut-off on validation and test (e.g. val/ndcg@10 ... test/hr@10)."""
    m = re.fullmatch(r"(\w+)/(\w+)@(\d+)", metric)
    if not m:
        return [metric]
    names = [f"{split}/{name}@{m.group(3)}" for split in ("val", "test") for name in (m.group(2), "ndcg", "hr")]
    return list(dict.fromkeys([metric, *names]))


def check_metric(runs: list[Run], metric: str) -> None:
    if not any(number(r.metrics(metric).get(metric)) is not None for r in runs):
        keys = {k for r in runs for k in [*r.results, *(k for h in r.history for k in h)] if "/" in k and "@" in k}
        raise CompareError(f"--metric {metric}: no run has it; available: {', '.join(sorted(keys)) or 'none yet'}")


def runs_table(frame: pd.DataFrame, keys: list[str], metric: str, fmt: str) -> pd.DataFrame:
    """The runs as printed, numbered in the frame's order."""
    several = frame["protocol"].nunique() > 1
    table = frame[[*(["protocol"] if several else []), *keys, *metric_columns(metric), "best_epoch", "epochs"]]
    table = table.assign(minutes=frame["minutes"], status=frame["status"])
    table.insert(0, "#", range(1, len(frame) + 1))
    if fmt == "md":
        table = table.assign(**{m: table[m].map(_four) for m in metric_columns(metric)})
        table["minutes"] = table["minutes"].map(lambda v: "" if math.isnan(v) else f"{v:.1f}")
    if fmt == "csv" or frame["dir"].map(lambda p: p.parent).nunique() > 1 or len(frame) == 1:
        root = Path(os.path.commonpath([str(p) for p in frame["dir"]]))  # (one sweep: its overrides name the runs)
        table["dir"] = [str(p.relative_to(root)) if p != root else p.name for p in frame["dir"]]
    return table


def _four(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.4f}"


def compare(
    paths: list[str], metric: str = "val/ndcg@10", fmt: str = "md", out: str | None = None, plots: bool = True
) -> tuple[str, str, list[Path]]:
    """Build the tables (also written to `<out>/runs.<md|csv>`) and the plots.

    Returns:
        (table text, one line naming the best run or setting and its swept overrides, files written).
    """
    runs = find_runs(paths)
    check_metric(runs, metric)
    swept, common = swept_keys(runs)
    shown, metrics = swept + sorted(common) if fmt == "csv" else swept, metric_columns(metric)  # CSV: every override
    frame = runs_frame(runs, shown, metrics)
    several = frame["protocol"].nunique() > 1
    ranking = {**({"protocol": True} if several else {}), metric: False}  # {column: ascending}: within each protocol
    frame = frame.sort_values([*ranking, "dir"], ascending=[*ranking.values(), True], ignore_index=True)
    text = render(runs_table(frame, shown, metric, fmt), fmt)
    summary = summarise(frame, metrics).sort_values(list(ranking), ascending=list(ranking.values()), ignore_index=True)
    seeded = "seed" in swept and (summary["seeds"] > 1).any()  # some setting ran with several seeds
    if fmt == "md":
        if common:
            text = "common overrides: " + " ".join(f"{k}={v}" for k, v in common.items()) + "\n\n" + text
        if seeded:
            text += "\nper setting, over its seeds:\n\n" + render(summary_table(summary, metrics, fmt), fmt)
        text = protocols_note(runs) + text + unrecorded_note(runs)
    one_folder = len(paths) == 1 and not is_run_dir(Path(paths[0]))
    out_dir = Path(out) if out else (Path(paths[0]) / "compare" if one_folder else Path("compare"))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"runs.{fmt}"]
    written[0].write_text(text)
    keys = swept if len(runs) > 1 else []
    if plots:
        labels = {r.path: _label(r, keys) or r.path.name for r in runs}
        # the seeds of a setting drawn as one bundle when some setting was run with several seeds
        settings = {r.path: _label(r, [k for k in keys if k != "seed"]) for r in runs}
        bundled = "seed" in keys and len(set(settings.values())) < len(runs) and all(settings.values())
        written.append(plot_learning_curves(list(frame["run"]), metric, labels, out_dir, settings if bundled else None))
        written.extend(plot_metric_vs_params(frame, metric, [k for k in keys if k not in NOT_A_SETTING], out_dir))
    # a row picked by a test metric is a reading of the table, not a model selection: the line says so
    caveat = "" if metric.startswith("val") else f" ({metric} is not a validation metric: select on validation)"
    if seeded:
        best = summary.iloc[0]
        cell = mean_ci_cell(best[metric], best[f"{metric} ci95"])
        return text, f"best by {metric} (mean over {best['seeds']} seeds): {best['row']}  ({cell}){caveat}", written
    best = frame.iloc[0]
    chosen = " ".join(f"{k}={best['run'].setting(k)}" for k in keys) or "(no swept overrides)"
    return text, f"best by {metric}: {chosen}  ({metric}={_four(best[metric])}, {best['dir']}){caveat}", written


# --------------------------------------------------------------------------------------------- plots
def line_styles(runs: list[Run], labels: dict[Path, str], groups: dict[Path, str] | None) -> dict[Path, dict]:
    """matplotlib keyword arguments per run: its own label, or with `groups` the group's colour, a line style per
    seed within the group, and the group's label on its first run only (one legend entry per setting)."""
    if not groups:
        return {r.path: {"label": labels[r.path]} for r in runs}
    names, seen, styles = list(dict.fromkeys(groups[r.path] for r in runs)), Counter(), {}
    for r in runs:
        group, k = groups[r.path], seen[groups[r.path]]
        seen[group] += 1
        styles[r.path] = {"color": f"C{names.index(group) % 10}", "linestyle": ["-", "--", ":", "-."][k % 4]}
        styles[r.path]["label"] = group if k == 0 else "_nolegend_"
    return styles


def _label(run: Run, keys: list[str]) -> str:
    """`k=v,...` of the keys that have a value for this run (a SASRec run has no model.time_span: left out)."""
    return ",".join(f"{k}={v}" for k in keys if (v := run.setting(k)) != "")


def plot_learning_curves(
    runs: list[Run], metric: str, labels: dict[Path, str], out: Path, groups: dict[Path, str] | None = None
) -> Path:
    """One line per run. With `groups` (a run's setting without its seed), the seeds of one setting share a colour
    and differ in line style, and the legend names each setting once: a 4-setting x 3-seed comparison reads as four
    bundles instead of twelve colours from a cycle of ten."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = line_styles(runs, labels, groups)
    for r in runs:
        for ax, key, marker in ((ax_loss, "train/loss", {}), (ax_metric, metric, {"marker": "o", "markersize": 3})):
            points = [(h["epoch"], h[key]) for h in r.history if number(h.get(key)) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), **marker, **styles[r.path])
    for ax, title, ylabel in ((ax_loss, "train/loss", "loss"), (ax_metric, metric, metric)):
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, names = ax_loss.get_legend_handles_labels()
    if not handles:
        handles, names = ax_metric.get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(3, len(names)), fontsize=8, frameon=False)
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.14 + 0.05 * math.ceil(len(names) / 3), wspace=0.2)
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long run labels would otherwise be cut at the edges
    plt.close(fig)
    return path


def plot_metric_vs_params(frame: pd.DataFrame, metric: str, keys: list[str], out: Path) -> list[Path]:
    """One PNG per swept setting: the metric against its values, one line per combination of the other settings,
    each point the mean over that setting's seeds with its 95 % interval as an error bar."""
    plt = _pyplot()
    paths = []
    for key in keys:
        others = [k for k in keys if k != key]
        numeric = all(isinstance(_parse(v), (int, float)) for v in frame[key])
        order = sorted(set(frame[key]), key=_parse if numeric else str)
        fig, ax = plt.subplots(figsize=(6, 4))
        lines = frame.groupby(others, sort=True) if others else [((), frame)]
        for name, members in lines:
            stats = {v: mean_ci(g[metric].dropna()) for v, g in members.groupby(key) if g[metric].notna().any()}
            points = sorted((_parse(v) if numeric else order.index(v), mean, 0.0 if math.isnan(half) else half)
                            for v, (mean, _, half) in stats.items())  # fmt: skip
            label = ", ".join(f"{k}={v}" for k, v in zip(others, name, strict=True) if v != "") or None
            if points:
                ax.errorbar(*zip(*points, strict=True), marker="o", capsize=3, label=label)
        values = [_parse(v) for v in order]
        if not numeric:
            ax.set_xticks(range(len(order)), order, rotation=20)
        elif len(order) > 2 and min(values) > 0 and max(values) / min(values) >= 8:
            ax.set_xscale("log")
            ax.set_xticks(values, order)
        ax.set(xlabel=key, ylabel=metric, title=f"{metric} vs {key}")
        ax.grid(alpha=0.3)
        if others and len(lines) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{_safe(metric)}_vs_{_safe(key)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CompareError(
            "plots need matplotlib (pip install -e '.[plots]'); use --no-plots for tables only"
        ) from None
    return plt


def _parse(v: str):
    """A setting's text as a number where it is one (int, then float), else the text."""
    for kind in (int, float):
        try:
            return kind(v)
        except (TypeError, ValueError):
            pass
    return v


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@=-]+", "_", s).replace("/", "_")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqrec.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="sweep directories (outputs/sweeps/...) and/or run directories")
    parser.add_argument("--metric", default="val/ndcg@10", help="sort key, a results.json key (default: val/ndcg@10)")
    parser.add_argument("--format", choices=("md", "csv"), default="md", help="table format (default: md)")
    parser.add_argument("--out", help="folder for runs.md/runs.csv and the PNGs (default: <dir>/compare or ./compare)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    try:
        text, best, written = compare(args.paths, args.metric, args.format, args.out, plots=not args.no_plots)
        print(text, end="", flush=True)
        print(best, file=sys.stderr)
        print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
