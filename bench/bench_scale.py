"""How loading, training and evaluation grow with the data, measured in CPU seconds so that a loaded machine does
not distort the growth.

    python bench/bench_scale.py                  # rows 10^6..2*10^7 measured, 5*10^7 and 10^8 extrapolated (~5 min CPU)
    python bench/bench_scale.py --quick          # two small points and a short catalogue sweep (~2 min CPU)

Two sweeps, each point in its own process with one thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)):

- rows: synthetic rows with power-law item popularity (`seqrec.data.synthetic.power_law_interactions`, users =
  items = rows / 100) are written as a `user item timestamp` file and loaded with `dataset=file` twice (first load,
  then from the processed cache in a private temporary cache dir). The default SASRec (`model=sasrec
  residual=plain`, BCE, batch 128, maxlen 200) then trains on 8 batches of the first epoch at evenly spaced
  quantiles of their target tokens, each timed --repeats times (median CPU seconds); the epoch is the step's cost
  interpolated in tokens through them and summed over every batch of the epoch. Full-ranking validation runs on a
  fixed sample of --eval-users users; its CPU seconds per user times the users give a whole validation pass.
- catalogue: the same 2,000 users and batches, with the model's catalogue (and the items negatives are drawn from)
  set to 10^4..10^6 items: the step's CPU seconds against the catalogue size. This is the dense path (the trainer's
  Adam updates every row of the item table at every step).

Growth exponents are least-squares slopes in log-log space: epoch CPU against tokens per epoch, the step against the
catalogue size, load and memory against rows. Grid points that were not run (above --max-rows) get their figures
from power laws fitted to the measured points and are marked "extrapolated", with the reason: the CPU budget, or
memory over 24 GB. Prints a table, writes bench/results/scale.json and docs/img/scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's seqrec, not another installed copy
# rows grow with users and items (about 100 rows per user); points above --max-rows are extrapolated
FULL_GRID = [
    (10_000, 10_000, 1_000_000),
    (20_000, 20_000, 2_000_000),
    (50_000, 50_000, 5_000_000),
    (100_000, 100_000, 10_000_000),
    (200_000, 200_000, 20_000_000),
    (500_000, 500_000, 50_000_000),
    (1_000_000, 1_000_000, 100_000_000),
]
QUICK_GRID = [(10_000, 10_000, 1_000_000), (20_000, 20_000, 2_000_000)]
FULL_CATALOGUE = [10_000, 30_000, 100_000, 300_000, 1_000_000]
QUICK_CATALOGUE = [10_000, 100_000]
MEMORY_GIB = 24  # the machine's memory: a point whose extrapolated peak RSS exceeds it cannot run there
SAMPLED_BATCHES = 8
# figures extrapolated for the points not run, and the quantity each grows with
ROW_METRICS = ("load_first_cpu_s", "load_cached_cpu_s", "peak_rss_gib", "epoch_cpu_s", "eval_cpu_s", "tokens")


def write_file(path: Path, users: int, items: int, rows: int) -> None:
    """`user item timestamp` lines, space separated, grouped by user."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from seqrec.data.synthetic import power_law_interactions

    columns = power_law_interactions(users, items, rows, seed=0)
    with open(path, "wb") as f:
        for start in range(0, rows, 2_000_000):
            text = [pa.array(c[start : start + 2_000_000]).cast(pa.string()) for c in columns]
            f.write(("\n".join(pc.binary_join_element_wise(*text, " ").to_pylist()) + "\n").encode())


def compose(overrides: list[str], out: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import seqrec.launch  # noqa: F401  (config resolvers)

    overrides = ["model=sasrec", "residual=plain", "trainer.device=cpu", "trainer.progress=false"] + overrides
    overrides += [f"trainer.output_dir={out}", f"logger.output_dir={out}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def cpu_timed(fn) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of fn()."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def step_costs(sampler, trainer, repeats: int) -> dict:
    """Median CPU seconds of a training step on SAMPLED_BATCHES batches of the first epoch, chosen at evenly spaced
    quantiles of their number of target tokens, with those token counts, every batch's token count, and the CPU
    seconds of building a batch."""
    rng = np.random.default_rng(0)
    batches = sampler.global_batches(0)
    tokens = np.array([sampler.window_len[w].sum() for w in batches])
    picks = np.argsort(tokens, kind="stable")[np.linspace(0, len(batches) - 1, SAMPLED_BATCHES).round().astype(int)]
    built = []
    build_cpu = 0.0
    for i in picks:
        cpu, _ = cpu_timed(lambda i=i: built.append(sampler.make_batch(batches[i], rng)))
        build_cpu += cpu
    trainer.model.train()
    trainer.train_step(built[-1])  # warm-up: allocations, optimizer state
    seconds = [[] for _ in built]
    for _ in range(repeats):  # the batches take turns, so a slow moment hits them alike
        for k, batch in enumerate(built):
            seconds[k].append(cpu_timed(lambda batch=batch: trainer.train_step(batch))[0])
    return {
        "step_cpu_s": [statistics.median(s) for s in seconds],
        "step_tokens": tokens[picks].tolist(),
        "build_cpu_s_per_batch": build_cpu / len(built),
        "epoch_tokens": tokens,  # (steps,) for `epoch_estimate`; not written out
    }


def epoch_estimate(costs: dict) -> float:
    """CPU seconds of an epoch: the step's CPU seconds as a piecewise-linear function of its target tokens, through
    the sampled batches (equal token counts averaged), summed over every batch of the epoch, plus building them.
    A step's cost is not linear in its tokens (attention is quadratic in the trimmed window length), hence the
    interpolation rather than a fitted line."""
    xs, inverse = np.unique(costs["step_tokens"], return_inverse=True)
    ys = np.bincount(inverse, weights=costs["step_cpu_s"]) / np.bincount(inverse)
    steps = costs["epoch_tokens"]
    return float(np.interp(steps, xs, ys).sum() + len(steps) * costs["build_cpu_s_per_batch"])


def run_point(users: int, items: int, rows: int, repeats: int, eval_users: int) -> dict:
    """Measure one grid point in this process."""
    import pyarrow.csv  # noqa: F401  (imported before the first load is timed: imports are not loading)
    from hydra.utils import instantiate

    import seqrec.data.cache  # noqa: F401
    import seqrec.data.dataset  # noqa: F401
    from seqrec.compose import build

    out: dict = {"users": users, "items": items, "rows": rows, "extrapolated": False}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SEQREC_CACHE"] = str(Path(tmp) / "cache")
        path = Path(tmp) / "interactions.txt"
        write_file(path, users, items, rows)
        out["file_mb"] = path.stat().st_size / 1e6
        cfg = compose(
            ["dataset=file", f"dataset.path={path}", f"eval.valid_users={eval_users}"], str(Path(tmp) / "out")
        )
        out["load_first_cpu_s"], out["load_first_wall_s"] = cpu_timed(lambda: instantiate(cfg.dataset))
        out["load_cached_cpu_s"], out["load_cached_wall_s"] = cpu_timed(lambda: instantiate(cfg.dataset))
        run = build(cfg)  # everything train.py builds (a third, cached load)
        costs = step_costs(run.sampler, run.trainer, repeats)
        out["epoch_cpu_s"] = epoch_estimate(costs)
        out |= {k: v for k, v in costs.items() if k != "epoch_tokens"}
        out["steps_per_epoch"] = run.trainer.steps_per_epoch
        out["tokens"] = int(run.sampler.window_len.sum())
        sample = len(run.evaluator.users("valid"))
        cpu, _ = cpu_timed(lambda: run.evaluator.evaluate(run.model, "valid"))
        out["eval_sample_users"] = sample
        out["eval_cpu_s"] = cpu / sample * len(run.data.eval_users("valid"))  # a whole validation pass
        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def catalogue_dataset(*, catalogue_items: int, **_):
    """A `dataset._target_` for the catalogue sweep: 2,000 users and their rows fixed (items 1..1,000 occur), the
    catalogue 1..catalogue_items. The other keys of the dataset node are ignored."""
    from seqrec.data.dataset import split_leave_one_out
    from seqrec.data.synthetic import power_law_interactions

    users, items, times = power_law_interactions(2000, 1000, 100_000, seed=0)
    order = np.lexsort((times, users))  # chronological within each user
    users, items, times = users[order], items[order], times[order]
    return split_leave_one_out("catalogue", users - 1, items, times, np.arange(2000), np.arange(catalogue_items + 1))


def run_catalogue(items: int, repeats: int) -> dict:
    """The step's CPU seconds with `items` in the catalogue, on fixed users and batches."""
    from seqrec.compose import build

    with tempfile.TemporaryDirectory() as tmp:
        overrides = ["dataset._target_=bench_scale.catalogue_dataset", f"+dataset.catalogue_items={items}"]
        run = build(compose(overrides, tmp))
        costs = step_costs(run.sampler, run.trainer, repeats)
    costs.pop("epoch_tokens")
    # the same batches at every catalogue size: their mean step is comparable across sizes
    return {"items": items, "step_cpu_s": float(np.mean(costs["step_cpu_s"])), "costs": costs}


# --------------------------------------------------------------------------- fits, table, plot


def fit(xs, ys) -> tuple[float, float]:
    """(a, b) of y = a * x^b, least squares in log-log space."""
    b, log_a = np.polyfit(np.log(np.asarray(xs, dtype=float)), np.log(np.maximum(np.asarray(ys, dtype=float), 1e-9)), 1)
    return float(np.exp(log_a)), float(b)


def table_cost(catalogue: list[dict], items: float) -> float:
    """CPU seconds a step spends on a catalogue of `items` beyond the smallest one measured (the dense optimizer's
    work on the whole item table): interpolated in log-log between measured sizes, along the two largest beyond."""
    xs = np.log([c["items"] for c in catalogue])
    excess = np.maximum([c["step_cpu_s"] - catalogue[0]["step_cpu_s"] for c in catalogue], 1e-6)
    if np.log(items) <= xs[-1]:
        return float(np.exp(np.interp(np.log(items), xs, np.log(excess))))
    slope = (np.log(excess[-1]) - np.log(excess[-2])) / (xs[-1] - xs[-2])
    return float(excess[-1] * (items / catalogue[-1]["items"]) ** slope)


def extrapolate(
    measured: list[dict], catalogue: list[dict], grid: list[tuple], max_rows: float
) -> tuple[list[dict], dict]:
    """Measured rows plus the grid points not run, from laws in rows fitted to the measured points.

    Loads, validation and tokens follow power laws in rows. The epoch does not: its steps grow with the users, and
    each step's dense optimizer work with the items, so the epoch is extrapolated as a power law of its token part
    (measured epoch minus steps x `table_cost`) plus steps x `table_cost` at the new catalogue size. Peak RSS is an
    affine fit in rows (a fixed process size plus what grows with the data), not a power law.
    """
    xs = [r["rows"] for r in measured]
    for r in measured:
        r["epoch_table_cpu_s"] = r["steps_per_epoch"] * table_cost(catalogue, r["items"])
    laws = {m: fit(xs, [r[m] for r in measured]) for m in ROW_METRICS + ("steps_per_epoch",)}
    token_part = fit(xs, [r["epoch_cpu_s"] - r["epoch_table_cpu_s"] for r in measured])
    rss_per_row, rss_base = np.polyfit(xs, [r["peak_rss_gib"] for r in measured], 1)
    done = set(xs)
    table = list(measured)
    for users, items, rows in grid:
        if rows in done:
            continue
        row = {"users": users, "items": items, "rows": rows, "extrapolated": True}
        row |= {m: a * rows**b for m, (a, b) in laws.items()}
        row["epoch_table_cpu_s"] = row["steps_per_epoch"] * table_cost(catalogue, items)
        row["epoch_cpu_s"] = token_part[0] * rows ** token_part[1] + row["epoch_table_cpu_s"]
        row["peak_rss_gib"] = rss_base + rss_per_row * rows
        reasons = []
        if rows > max_rows:
            reasons.append("over the CPU budget (--max-rows)")
        if row["peak_rss_gib"] > MEMORY_GIB:
            reasons.append(f"peak RSS {row['peak_rss_gib']:.0f} GiB > {MEMORY_GIB} GB")
        row["why_not_run"] = "; ".join(reasons)
        table.append(row)
    exponents = {f"{m}_vs_rows": b for m, (a, b) in laws.items()} | {"epoch_token_part_vs_rows": token_part[1]}
    return sorted(table, key=lambda r: r["rows"]), exponents


def print_table(rows: list[dict]) -> None:
    print(
        f"{'users':>9} {'items':>9} {'rows':>11} {'tokens/epoch':>13} {'load CPU s':>10} {'cached':>7} "
        f"{'RSS GiB':>7} {'epoch CPU s':>11} {'valid CPU s':>11}"
    )
    for r in rows:
        print(
            f"{r['users']:>9,} {r['items']:>9,} {r['rows']:>11,} {r['tokens']:>13,.0f} "
            f"{r['load_first_cpu_s']:>10.2f} {r['load_cached_cpu_s']:>7.2f} {r['peak_rss_gib']:>7.2f} "
            f"{r['epoch_cpu_s']:>11.0f} {r['eval_cpu_s']:>11.1f}"
            + (f"  extrapolated: {r['why_not_run']}" if r["extrapolated"] else "")
        )


def decorate(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot(rows: list[dict], catalogue: list[dict], exponents: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    names = {
        "epoch_cpu_s": "epoch (training)",
        "eval_cpu_s": "validation, every user",
        "load_first_cpu_s": "first load",
        "load_cached_cpu_s": "cached load",
    }
    for metric, label in names.items():
        measured = [r for r in rows if not r["extrapolated"]]
        line = left.loglog([r["rows"] for r in measured], [r[metric] for r in measured], "o-", label=label)[0]
        guessed = [measured[-1]] + [r for r in rows if r["extrapolated"]]
        left.loglog([r["rows"] for r in guessed], [r[metric] for r in guessed], "x--", color=line.get_color())
    fitted, reach = exponents["epoch_vs_tokens"], exponents["epoch_vs_tokens_with_extrapolated"]
    decorate(
        left,
        "interactions (rows); users = items = rows / 100",
        "CPU seconds, 1 thread (x, dashed: extrapolated)",
        f"epoch ~ tokens^{fitted:.2f} measured, ^{reach:.2f} to the last point",
    )
    if catalogue:
        xs, ys = [c["items"] for c in catalogue], [c["step_cpu_s"] for c in catalogue]
        right.loglog(xs, ys, "o-", label="training step (dense Adam)")
        overall, top = exponents["step_vs_items"], exponents["step_vs_items_top"]
        decorate(
            right,
            "items in the catalogue (2,000 users, the same batches)",
            "CPU seconds per step, 1 thread",
            f"step ~ items^{overall:.2f} overall, ^{top:.2f} between the largest two",
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def child(args: list[str]) -> dict:
    """Run one point in a fresh process with one thread; its JSON is the last line of its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(grid: list[tuple], args) -> tuple[list[dict], list[dict]]:
    """Every grid point up to --max-rows and every catalogue size, each in its own one-thread process."""
    common = ["--repeats", str(args.repeats), "--eval-users", str(args.eval_users)]
    measured = []
    for users, items, rows in grid:
        if rows <= args.max_rows:
            measured.append(child(["--point", str(users), str(items), str(rows), *common]))
            print(f"measured {rows:,} rows: epoch {measured[-1]['epoch_cpu_s']:.0f} s CPU", flush=True)
    catalogue = []
    for items in QUICK_CATALOGUE if args.quick else FULL_CATALOGUE:
        catalogue.append(child(["--catalogue-point", str(items), *common]))
        print(f"measured a step with {items:,} items: {catalogue[-1]['step_cpu_s']:.3f} s CPU", flush=True)
    return measured, catalogue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small points and two catalogue sizes")
    parser.add_argument("--max-rows", type=float, default=2e7, help="run grid points up to this many rows")
    parser.add_argument("--repeats", type=int, default=5, help="timings of each sampled batch (median)")
    parser.add_argument("--eval-users", type=int, default=2000, help="validation users timed per point")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "scaling.png"))
    parser.add_argument("--refit", metavar="JSON", help="fit and plot the measurements of an earlier run again")
    parser.add_argument("--point", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--catalogue-point", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point or args.catalogue_point:
        import torch

        torch.set_num_threads(1)
        if args.point:
            print(json.dumps(run_point(*args.point, args.repeats, args.eval_users)))
        else:
            print(json.dumps(run_catalogue(args.catalogue_point, args.repeats)))
        return

    start = time.process_time(), time.perf_counter()
    grid = QUICK_GRID if args.quick else FULL_GRID
    if args.refit:  # the measurements of an earlier run, fitted and plotted again
        earlier = json.loads(Path(args.refit).read_text())
        measured = [r for r in earlier["rows"] if not r["extrapolated"]]
        catalogue, measured_cpu = earlier["catalogue"], earlier.get("bench_cpu_s", 0.0)
    else:
        measured, catalogue = measure(grid, args)
        measured_cpu = None

    table, row_exponents = extrapolate(measured, catalogue, grid, args.max_rows)
    exponents = {
        "epoch_vs_tokens": fit([r["tokens"] for r in measured], [r["epoch_cpu_s"] for r in measured])[1],
        # measured and extrapolated points: the growth up to the largest grid point
        "epoch_vs_tokens_with_extrapolated": fit([r["tokens"] for r in table], [r["epoch_cpu_s"] for r in table])[1],
        "step_vs_items": fit([c["items"] for c in catalogue], [c["step_cpu_s"] for c in catalogue])[1],
        "step_vs_items_top": fit([c["items"] for c in catalogue[-2:]], [c["step_cpu_s"] for c in catalogue[-2:]])[1],
    } | row_exponents
    print_table(table)
    print("catalogue: " + ", ".join(f"{c['items']:,} items {c['step_cpu_s']:.3f} s" for c in catalogue))
    print("growth exponents b (value ~ x^b): " + ", ".join(f"{k} {v:.2f}" for k, v in exponents.items()))
    load = os.getloadavg()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_total = time.process_time() - start[0] + children.ru_utime + children.ru_stime
    if measured_cpu is not None:  # a refit: the measuring run's CPU is the bench's
        cpu_total = measured_cpu
    print(
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; this bench took {cpu_total:.0f} s CPU, "
        f"{time.perf_counter() - start[1]:.0f} s wall"
    )
    record = {
        "command": " ".join(sys.argv),
        "cpus": os.cpu_count(),
        "threads": 1,
        "load_average_at_end": load,
        "rows": table,
        "catalogue": catalogue,
        "exponents": exponents,
        "bench_cpu_s": cpu_total,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    plot(table, catalogue, exponents, Path(args.plot))
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
