"""Compare runs from their directories alone (no W&B): a table sorted by a metric, plus PNG plots.

    python -m seqrec.compare outputs/sweeps/stage2_2025-01-01_10-00-00 [more sweep or run dirs ...]
        [--metric val/ndcg@10] [--format md|csv] [--out DIR] [--no-plots]

A run directory is one that holds its record (`run.json`, or `.hydra/overrides.yaml` for runs made before
run.json existed) and `metrics.jsonl` or `results.json`; sweep directories are searched for them. Columns: the
overrides that differ between runs, the best validation and the test metrics (from `results.json`; a run still
going shows its best validation epoch so far from `metrics.jsonl`), epochs and time. Plots go to `--out` (default
`<dir>/compare/` for one directory, else `./compare/`): `learning_curves.png` (train/loss and the metric per epoch,
one line per run) and `<metric>_vs_<param>.png` for each swept parameter.

Where a run's settings come from: `run.json`, written once when the run first launched and never rewritten, gives
its config, overrides and config-group choices. Runs made before it existed fall back to `results.json["config"]`
and then to `.hydra/overrides.yaml`, `.hydra/hydra.yaml` and `.hydra/config.yaml`, which a later command in the same
directory (even a refused one) may have rewritten. Every file is read as data (JSON, or YAML through OmegaConf's safe
loader); nothing a run directory names is imported or instantiated.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from seqrec.errors import SeqrecError
from seqrec.fingerprint import describe, differing_fields

RECORD = "run.json"  # a run's authoritative record: config, overrides and choices as of its first launch
LEGACY_OVERRIDES = Path(".hydra") / "overrides.yaml"  # the record of runs made before run.json
RUN_MARKERS = ("results.json", "metrics.jsonl")
# overrides that do not change the experiment (as hydra.job.config.override_dirname.exclude_keys in conf/train.yaml)
IGNORED_OVERRIDES = {
    "logger",
    "trainer.progress",
    "trainer.num_workers",
    "trainer.resume",
    "trainer.log_every_steps",
    "trainer.checkpoint_every_min",
    "sweep_name",
}


UNRECORDED = "unrecorded"  # the protocol of runs made before results.json recorded it


class CompareError(SeqrecError):
    """A user error: reported as one line, exit status 1."""


@dataclass
class Run:
    path: Path
    overrides: dict[str, str]
    results: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    _composed: tuple | None = field(default=None, repr=False)  # (group choices, config), read on first need

    def setting(self, key: str) -> str:
        """The run's value of `key`: its override, else what its config resolved to (so a run that left
        sampler.history at its default reads `last`, not blank), else "" when the run directory cannot tell."""
        if key in self.overrides:
            return self.overrides[key]
        if self._composed is None:
            self._composed = read_settings(self.path)
        choices, config = self._composed
        if key in choices:
            return _fmt_setting(choices[key])
        if isinstance(config, dict):  # a recorded config: already resolved, read as plain data
            value = _lookup(config, key)
            return "" if value is None else _fmt_setting(value)
        try:
            from omegaconf import OmegaConf

            value = OmegaConf.select(config, key, default=None) if config is not None else None
            return (
                ""
                if value is None
                else _fmt_setting(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
            )
        except Exception:  # noqa: BLE001 - ${hydra:...} and ${now:...} only resolve inside Hydra
            return ""

    @property
    def finished(self) -> bool:
        return bool(self.results)

    @property
    def protocol(self) -> dict | None:
        """results.json["protocol"] (seqrec.fingerprint), None for runs unfinished or made before it existed."""
        protocol = self.results.get("protocol")
        return protocol if isinstance(protocol, dict) and "id" in protocol else None

    @property
    def protocol_id(self) -> str:
        return self.protocol["id"] if self.protocol else UNRECORDED

    def metrics(self, metric: str) -> dict:
        """results.json if the run finished, else the epoch of metrics.jsonl with the best `metric` so far."""
        return self.results if self.results else self.best_record(metric)

    def best_record(self, metric: str) -> dict:
        """The metrics.jsonl record with the best `metric` (validation metrics only appear on eval epochs)."""
        evaluated = [r for r in self.history if _num(r.get(metric)) is not None]
        return max(evaluated, key=lambda r: r[metric]) if evaluated else {}


# --------------------------------------------------------------------------------------------- discovery
def is_run_dir(path: Path) -> bool:
    has_record = (path / RECORD).is_file() or (path / LEGACY_OVERRIDES).is_file()
    return has_record and any((path / m).is_file() for m in RUN_MARKERS)


def _candidate_runs(folder: Path) -> set[Path]:
    """Folders under `folder` holding a run record (run.json, or a legacy .hydra/overrides.yaml)."""
    return {p.parent for p in folder.rglob(RECORD)} | {p.parent.parent for p in folder.rglob(str(LEGACY_OVERRIDES))}


def find_runs(paths: list[str]) -> list[Run]:
    """Every run directory given or under the given directories, each read once (sorted by path)."""
    found: dict[Path, None] = {}
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise CompareError(f"{p}: no such directory")
        if not path.is_dir():
            raise CompareError(f"{p}: not a directory (give a run or sweep directory)")
        if is_run_dir(path):
            found[path.resolve()] = None
            continue
        candidates = _candidate_runs(path)
        runs = sorted(c for c in candidates if is_run_dir(c))
        for c in sorted(candidates - set(runs)):
            print(
                f"note: {c}: no metrics.jsonl or results.json (failed before its first epoch?); skipped",
                file=sys.stderr,
            )
        if not runs:
            raise CompareError(
                f"{p}: no run directories found (a run directory holds run.json, or .hydra/overrides.yaml for "
                "older runs, and metrics.jsonl or results.json)"
            )
        found.update((r.resolve(), None) for r in runs)
    return [read_run(p) for p in found]


def read_run(path: Path) -> Run:
    overrides = {}
    for line in read_overrides(path):
        key, _, value = line.partition("=")
        key = key.lstrip("+~")
        if key not in IGNORED_OVERRIDES and not key.startswith("hydra"):
            overrides[key] = value
    results = read_json(path / "results.json") if (path / "results.json").is_file() else {}
    history = []
    lines = (path / "metrics.jsonl").read_text().splitlines() if (path / "metrics.jsonl").is_file() else []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                history.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines):  # a half-written last line (a run killed mid-write) is skipped
                    raise CompareError(f"{path / 'metrics.jsonl'}:{i}: not valid JSON") from None
    return Run(path, overrides, results, history)


# --------------------------------------------------------------------------------------------- run records
def read_json(file: Path) -> dict:
    """A JSON object from `file`, or CompareError naming the file."""
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompareError(f"{file}: not readable as JSON ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(value, dict):
        raise CompareError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def read_record(path: Path) -> dict | None:
    """The run's `run.json`, checked to have the fields tools read; None for a run made before run.json existed."""
    file = path / RECORD
    if not file.is_file():
        return None
    record = read_json(file)
    for key, kind in (("config", dict), ("overrides", list), ("choices", dict)):
        if not isinstance(record.get(key), kind):
            raise CompareError(f"{file}: expected '{key}' to be a JSON {kind.__name__.replace('dict', 'object')}")
    if not all(isinstance(o, str) for o in record["overrides"]):
        raise CompareError(f"{file}: expected 'overrides' to be a list of strings")
    return record


def read_overrides(path: Path) -> list[str]:
    """The run's command-line overrides: run.json["overrides"], else the legacy .hydra/overrides.yaml."""
    record = read_record(path)
    if record is not None:
        return record["overrides"]
    return _read_overrides(path / LEGACY_OVERRIDES) if (path / LEGACY_OVERRIDES).is_file() else []


def read_config(path: Path) -> tuple[object, Path | None]:
    """(the run's config, the file it came from): run.json["config"] (plain dict), else results.json["config"],
    else the legacy `.hydra/config.yaml` (a DictConfig, unresolved); (None, None) if the directory has none."""
    record = read_record(path)
    if record is not None:
        return record["config"], path / RECORD
    results = path / "results.json"
    config = read_json(results).get("config") if results.is_file() else None
    if isinstance(config, dict):
        return config, results
    legacy = path / ".hydra" / "config.yaml"
    if legacy.is_file():
        from omegaconf import OmegaConf

        try:
            return OmegaConf.load(legacy), legacy  # YAML as data: OmegaConf parses with a safe loader
        except Exception as e:  # noqa: BLE001 - yaml and omegaconf raise several types
            raise CompareError(f"{legacy}: not readable YAML ({str(e).splitlines()[0][:160]})") from None
    return None, None


def read_settings(path: Path) -> tuple[dict, object]:
    """({config group: choice}, config) for labelling a run: the config is a plain dict when recorded (run.json,
    results.json), a DictConfig from a legacy .hydra/config.yaml; empty / None when the directory does not say (a
    legacy run copied without its .hydra folder, or an unreadable file: labels then use overrides)."""
    from omegaconf import OmegaConf

    record = read_record(path)
    if record is not None:
        return dict(record["choices"]), record["config"]
    choices, config = {}, None
    try:
        if (path / ".hydra" / "hydra.yaml").is_file():
            choices = OmegaConf.select(OmegaConf.load(path / ".hydra" / "hydra.yaml"), "hydra.runtime.choices") or {}
        config, _ = read_config(path)
    except Exception:  # noqa: BLE001 - labels fall back to the overrides alone
        pass
    return dict(choices), config


def _lookup(config: dict, key: str):
    """config["a"]["b"] for key "a.b"; None where a level is missing."""
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _fmt_setting(v) -> str:
    """A config value as Hydra writes it in an override (true, null, [1,2])."""
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    if isinstance(v, list):
        return "[" + ",".join(_fmt_setting(x) for x in v) + "]"
    return str(v)


def _read_overrides(path: Path) -> list[str]:
    """`.hydra/overrides.yaml` is a YAML list of strings; read it without a YAML dependency when it is simple."""
    try:
        from omegaconf import OmegaConf

        return [str(x) for x in OmegaConf.to_container(OmegaConf.load(path))]
    except Exception:  # noqa: BLE001 - fall back to the plain "- item" form
        return [ln[2:].strip().strip("'\"") for ln in path.read_text().splitlines() if ln.startswith("- ")]


# --------------------------------------------------------------------------------------------- table
def swept_keys(runs: list[Run]) -> tuple[list[str], dict[str, str]]:
    """(override keys whose value differs between runs, {key: value} of overrides shared by all runs)."""
    keys = sorted({k for r in runs for k in r.overrides})
    varying = [k for k in keys if len({r.setting(k) for r in runs}) > 1]
    common = {k: runs[0].setting(k) for k in keys if k not in varying}
    if len(runs) == 1:
        return keys, {}
    return varying, common


def metric_columns(metric: str) -> list[str]:
    """The chosen metric, then NDCG and HR at its cut-off on validation and test (e.g. val/ndcg@10 ... test/hr@10)."""
    m = re.fullmatch(r"(\w+)/(\w+)@(\d+)", metric)
    if not m:
        return [metric]
    k = m.group(3)
    cols = [metric]
    for split in ("val", "test"):
        for name in (m.group(2), "ndcg", "hr"):
            key = f"{split}/{name}@{k}"
            if key not in cols:
                cols.append(key)
    return cols


def build_table(
    runs: list[Run], metric: str, all_overrides: bool = False
) -> tuple[list[str], list[list], dict[str, str], list[Run]]:
    """(header, rows sorted by `metric` best first, common overrides, runs in row order); the override columns are
    the swept keys, plus the common ones with `all_overrides`."""
    if not any(_num(r.metrics(metric).get(metric)) is not None for r in runs):
        known = sorted(
            {k for r in runs for k in list(r.results) + [k for h in r.history for k in h] if "/" in k and "@" in k}
        )
        available = ", ".join(known) or "none (no evaluation yet)"
        raise CompareError(f"--metric {metric}: no run has it; available: {available}")
    keys, common = swept_keys(runs)
    if all_overrides:
        keys, common = keys + sorted(common), {}
    metrics = metric_columns(metric)
    runs = sorted(
        runs,
        key=lambda r: (
            _num(r.metrics(metric).get(metric)) is None,
            -(_num(r.metrics(metric).get(metric)) or 0.0),
            str(r.path),
        ),
    )
    root = _common_parent([r.path for r in runs])
    several = len(protocol_ids(runs)) > 1  # then each row says its protocol, and compare() heads the table
    header = ["#", *(["protocol"] if several else []), *keys, *metrics, "best_epoch", "epochs", "minutes", "status"]
    header.append("dir")
    rows = []
    for i, r in enumerate(runs, 1):
        values = r.metrics(metric)
        epochs = r.results.get("epochs_run", r.history[-1].get("epoch") if r.history else None)
        seconds = (
            (r.results.get("train_seconds", 0) + r.results.get("eval_seconds", 0))
            if r.finished
            else (r.history[-1].get("train/seconds") if r.history else None)
        )
        minutes = f"{seconds / 60:.1f}" if _num(seconds) is not None else None
        status = "done" if r.finished else ("running/failed" if r.history else "no epochs")
        rel = str(r.path.relative_to(root)) if root and r.path != root else r.path.name
        rows.append(
            [
                i,
                *([r.protocol_id if r.finished else ""] if several else []),
                *[r.setting(k) for k in keys],
                *[values.get(m) for m in metrics],
                values.get("best_epoch", values.get("epoch")),
                epochs,
                minutes,
                status,
                rel,
            ]
        )
    return header, rows, common, runs


def protocol_ids(runs: list[Run]) -> list[str]:
    """The distinct evaluation protocols of the finished runs, in first-seen order."""
    return list(dict.fromkeys(r.protocol_id for r in runs if r.finished))


def protocols_note(runs: list[Run]) -> str:
    """A header line for a table whose runs were evaluated under several protocols, else ""."""
    ids = protocol_ids(runs)
    if len(ids) < 2:
        return ""
    protocols = {r.protocol_id: r.protocol for r in runs if r.finished}
    differ = ", ".join(differing_fields(list(protocols.values()))[:6]) or "fields not recorded"
    listed = "; ".join(describe(protocols[i]) for i in ids)
    return f"{len(ids)} protocols: {listed}; they differ in {differ}: do not compare rows across them\n\n"


def _common_parent(paths: list[Path]) -> Path | None:
    parts = [p.parts for p in paths]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return Path(*common) if common else None


def format_table(header: list[str], rows: list[list], fmt: str) -> str:
    cells = [[_fmt(v) for v in row] for row in rows]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(cells)
        return buf.getvalue()
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header)]  # rows may be none yet
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=False)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)]) + "\n"


# --------------------------------------------------------------------------------------------- plots
def line_styles(runs: list[Run], labels: dict[Path, str], groups: dict[Path, str] | None) -> dict[Path, dict]:
    """matplotlib keyword arguments per run: its own label, or with `groups` the group's colour, a line style per
    seed within the group, and the group's label on its first run only."""
    if not groups:
        return {r.path: {"label": labels[r.path]} for r in runs}
    names = list(dict.fromkeys(groups[r.path] for r in runs))
    seen: dict[str, int] = {}
    styles = {}
    for r in runs:
        group = groups[r.path]
        k = seen[group] = seen.get(group, -1) + 1
        styles[r.path] = {
            "color": f"C{names.index(group) % 10}",
            "linestyle": ["-", "--", ":", "-."][k % 4],
            "label": group if k == 0 else "_nolegend_",  # one legend entry per setting
        }
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
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = line_styles(runs, labels, groups)
    for r in runs:
        style = styles[r.path]
        loss = [(h["epoch"], h["train/loss"]) for h in r.history if _num(h.get("train/loss")) is not None]
        val = [(h["epoch"], h[metric]) for h in r.history if _num(h.get(metric)) is not None]
        if loss:
            ax_loss.plot(*zip(*loss, strict=False), **style)
        if val:
            ax_metric.plot(*zip(*val, strict=False), marker="o", markersize=3, **style)
    ax_loss.set(title="train/loss", xlabel="epoch", ylabel="loss")
    ax_metric.set(title=metric, xlabel="epoch", ylabel=metric)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_metric):
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


def plot_metric_vs_params(runs: list[Run], metric: str, keys: list[str], out: Path) -> list[Path]:
    """One PNG per swept parameter: the metric against its values, one line per combination of the others."""
    plt = _pyplot()
    paths = []
    for key in keys:
        others = [k for k in keys if k != key]
        values = [r.setting(key) for r in runs]
        numeric = all(_num(_parse(v)) is not None for v in values)
        order = sorted(set(values), key=lambda v: _num(_parse(v)) if numeric else v)
        fig, ax = plt.subplots(figsize=(6, 4))
        groups: dict[str, list[Run]] = {}
        for r in runs:
            groups.setdefault(", ".join(f"{k}={r.setting(k)}" for k in others), []).append(r)
        for name, members in sorted(groups.items()):
            pts = []
            for r in members:
                y = _num(r.metrics(metric).get(metric))
                if y is not None:
                    v = r.setting(key)
                    pts.append((_parse(v) if numeric else order.index(v), y))
            pts.sort(key=lambda p: p[0])
            if pts:
                ax.plot(*zip(*pts, strict=False), marker="o", label=name or None)
        if not numeric:
            ax.set_xticks(range(len(order)), order, rotation=20)
        elif (
            len(order) > 2
            and all(_num(_parse(v)) > 0 for v in order)
            and max(_num(_parse(v)) for v in order) / min(_num(_parse(v)) for v in order) >= 8
        ):
            ax.set_xscale("log")
            ax.set_xticks([_num(_parse(v)) for v in order], order)
        ax.set(xlabel=key, ylabel=metric, title=f"{metric} vs {key}")
        ax.grid(alpha=0.3)
        if any(groups) and len(groups) > 1:
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
            "plots need matplotlib (pip install matplotlib, or pip install -e '.[plots]'); "
            "use --no-plots for the table only"
        ) from None
    return plt


# --------------------------------------------------------------------------------------------- helpers
def _num(v):
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    return None


def _parse(v: str):
    try:
        return int(v)
    except (TypeError, ValueError):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@=-]+", "_", s).replace("/", "_")


def compare(
    paths: list[str], metric: str = "val/ndcg@10", fmt: str = "md", out: str | None = None, plots: bool = True
) -> tuple[str, str, list[Path]]:
    """Build the table (also written to `<out>/runs.<md|csv>`) and the plots.

    Returns:
        (table text, one line naming the best run and its swept overrides, files written).
    """
    runs = find_runs(paths)
    header, rows, common, runs = build_table(runs, metric, all_overrides=fmt == "csv")
    if fmt == "md" and len({r.path.parent for r in runs}) == 1 and len(runs) > 1:
        header, rows = header[:-1], [row[:-1] for row in rows]  # one sweep: dir = the overrides already shown
    text = format_table(header, rows, fmt)
    if common and fmt == "md":
        text = "common overrides: " + " ".join(f"{k}={v}" for k, v in common.items()) + "\n\n" + text
    if fmt == "md":
        text = protocols_note(runs) + text
    out_dir = (
        Path(out)
        if out
        else (Path(paths[0]) / "compare" if len(paths) == 1 and not is_run_dir(Path(paths[0])) else Path("compare"))
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    table_path = out_dir / f"runs.{fmt}"
    table_path.write_text(text)
    written = [table_path]
    keys, _ = swept_keys(runs)
    keys = keys if len(runs) > 1 else []
    if plots:
        labels = {r.path: _label(r, keys) or r.path.name for r in runs}
        # the seeds of a setting drawn as one bundle when some setting was run with several seeds
        settings = {r.path: _label(r, [k for k in keys if k != "seed"]) for r in runs}
        bundled = "seed" in keys and len(set(settings.values())) < len(runs) and all(settings.values())
        written.append(plot_learning_curves(runs, metric, labels, out_dir, settings if bundled else None))
        written.extend(plot_metric_vs_params(runs, metric, keys, out_dir))
    best = runs[0]
    chosen = " ".join(f"{k}={best.setting(k)}" for k in keys) or "(no swept overrides)"
    best_line = f"best by {metric}: {chosen}  ({metric}={_fmt(best.metrics(metric).get(metric))}, {best.path})"
    return text, best_line, written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqrec.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="sweep directories (outputs/sweeps/...) and/or run directories")
    parser.add_argument("--metric", default="val/ndcg@10", help="sort key, a results.json key (default: val/ndcg@10)")
    parser.add_argument("--format", choices=("md", "csv"), default="md", help="table format (default: md)")
    parser.add_argument("--out", help="folder for runs.md/runs.csv and the PNGs (default: <dir>/compare or ./compare)")
    parser.add_argument("--no-plots", action="store_true", help="table only")
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
