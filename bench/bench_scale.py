"""How loading, training and evaluation grow with the data: users 10^4..10^6, items 10^4..10^6, rows 10^6..10^8.

    python bench/bench_scale.py --quick          # two small points, < 3 min on 2 CPU cores
    python bench/bench_scale.py                  # measures up to --max-rows, extrapolates the rest

Each point runs in its own process (clean peak RSS): synthetic rows with power-law item popularity
(`seqrec.data.synthetic.power_law_interactions`) are written as a `user item timestamp` file, loaded with
`dataset=file` twice (first load, then from the processed cache in a private temporary cache dir), and the default
SASRec (`model=sasrec residual=plain`) takes a few training steps and one full-ranking validation pass, through
the product's own objects. Epoch seconds are steps per epoch x measured seconds per step. Points above --max-rows
are not run: their figures come from a power law fitted to the measured points (value = a * rows^b), and the
table marks them "extrapolated". Prints a table, writes bench/results/scale.json and docs/img/scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's seqrec, not another installed copy
# (users, items, rows): rows grow 10x per step with users and items (about 100 rows per user)
FULL_GRID = [
    (10_000, 10_000, 1_000_000),
    (30_000, 30_000, 3_000_000),
    (100_000, 100_000, 10_000_000),
    (300_000, 300_000, 30_000_000),
    (1_000_000, 1_000_000, 100_000_000),
]
QUICK_GRID = [(10_000, 10_000, 1_000_000), (20_000, 20_000, 2_000_000)]
METRICS = ("load_first_s", "load_cached_s", "peak_rss_gib", "step_s", "epoch_s", "eval_s")
STEPS = 5


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


def compose(path: Path, out: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import seqrec.launch  # noqa: F401  (config resolvers)

    overrides = ["model=sasrec", "residual=plain", "dataset=file", f"dataset.path={path}", "trainer.device=cpu"]
    overrides += ["trainer.progress=false", f"trainer.output_dir={out}", f"logger.output_dir={out}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def run_point(users: int, items: int, rows: int) -> dict:
    """Measure one grid point in this process."""
    from hydra.utils import instantiate

    from seqrec.run import build as build_node

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SEQREC_CACHE"] = str(Path(tmp) / "cache")
        path = Path(tmp) / "interactions.txt"
        write_file(path, users, items, rows)
        cfg = compose(path, str(Path(tmp) / "out"))
        start = time.perf_counter()
        instantiate(cfg.dataset)
        load_first = time.perf_counter() - start
        start = time.perf_counter()
        data = instantiate(cfg.dataset)
        load_cached = time.perf_counter() - start

        model = build_node(cfg.model, num_items=data.num_items)
        loss = instantiate(cfg.loss)
        sampler = build_node(
            cfg.sampler, data=data, num_negatives=loss.num_negatives, shared_negatives=loss.shared_negatives
        )
        evaluator = build_node(cfg.eval, data=data)
        trainer = build_node(
            cfg.trainer, model=model, sampler=sampler, evaluator=evaluator, loss=loss, logger=build_node(cfg.logger)
        )
        model.train()
        batches = iter(sampler.epoch(0))
        trainer.train_step(next(batches))  # warm-up
        start = time.perf_counter()
        for _ in range(STEPS):
            trainer.train_step(next(batches))
        step = (time.perf_counter() - start) / STEPS
        start = time.perf_counter()
        evaluator.evaluate(model, "valid")
        evaluate = time.perf_counter() - start
        return {
            "users": users,
            "items": items,
            "rows": rows,
            "file_mb": path.stat().st_size / 1e6,
            "load_first_s": load_first,
            "load_cached_s": load_cached,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "step_s": step,
            "epoch_s": step * trainer.steps_per_epoch,
            "steps_per_epoch": trainer.steps_per_epoch,
            "eval_s": evaluate,
            "extrapolated": False,
        }


def fit(rows: list[dict], metric: str) -> tuple[float, float]:
    """(a, b) of value = a * rows^b, least squares in log-log space."""
    x = np.log([r["rows"] for r in rows])
    y = np.log([max(r[metric], 1e-9) for r in rows])
    b, log_a = np.polyfit(x, y, 1)
    return float(np.exp(log_a)), float(b)


def extrapolate(measured: list[dict], grid: list[tuple]) -> tuple[list[dict], dict]:
    exponents = {m: fit(measured, m) for m in METRICS} if len(measured) >= 2 else {}
    done = {r["rows"] for r in measured}
    out = list(measured)
    for users, items, rows in grid:
        if rows in done or not exponents:
            continue
        row = {"users": users, "items": items, "rows": rows, "extrapolated": True}
        row.update({m: a * rows**b for m, (a, b) in exponents.items()})
        out.append(row)
    return sorted(out, key=lambda r: r["rows"]), {m: b for m, (a, b) in exponents.items()}


def print_table(rows: list[dict], exponents: dict) -> None:
    print(
        f"{'users':>9} {'items':>9} {'rows':>11} {'load s':>7} {'cached s':>8} {'RSS GiB':>7} "
        f"{'step s':>7} {'epoch s':>9} {'eval s':>8}"
    )
    for r in rows:
        print(
            f"{r['users']:>9,} {r['items']:>9,} {r['rows']:>11,} {r['load_first_s']:>7.2f} {r['load_cached_s']:>8.2f} "
            f"{r['peak_rss_gib']:>7.2f} {r['step_s']:>7.3f} {r['epoch_s']:>9.0f} {r['eval_s']:>8.1f}"
            + ("  extrapolated" if r["extrapolated"] else "")
        )
    if exponents:
        print("growth exponent b (value ~ rows^b): " + ", ".join(f"{m} {b:.2f}" for m, b in exponents.items()))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for metric in ("load_first_s", "load_cached_s", "epoch_s", "eval_s"):
        for extrapolated, style in ((False, "o-"), (True, "x--")):
            points = [r for r in rows if r["extrapolated"] == extrapolated]
            if points:
                label = metric if not extrapolated else None
                ax.loglog([r["rows"] for r in points], [r[metric] for r in points], style, label=label)
    ax.set_xlabel("interactions (rows); users = items = rows / 100")
    ax.set_ylabel("seconds (x / dashed: extrapolated)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small points (< 3 min on 2 cores)")
    parser.add_argument("--max-rows", type=float, default=1e7, help="run points up to this many rows")
    parser.add_argument("--point", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "scaling.png"))
    args = parser.parse_args()
    if args.point:
        print(json.dumps(run_point(*args.point)))
        return
    grid = QUICK_GRID if args.quick else FULL_GRID
    measured = []
    for users, items, rows in grid:
        if rows > args.max_rows:
            continue
        cmd = [sys.executable, __file__, "--point", str(users), str(items), str(rows)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
        measured.append(json.loads(out.strip().splitlines()[-1]))
        print(f"measured {rows:,} rows", flush=True)
    table, exponents = extrapolate(measured, grid)
    print_table(table, exponents)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "rows": table, "exponents": exponents}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    plot(table, Path(args.plot))
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
