"""How long the bundled synthetic dataset takes to make (target: well under a second at the defaults).

    python bench/bench_synthetic.py [--repeats 5]

Times `seqrec.data.synthetic.generate` (the interactions alone) and the `dataset=synthetic` factory
(`seqrec.data.dataset.synthetic`: generation, leave-one-out split and validation) at the config's defaults, 2,000
users x 1,000 items, in this process after one warm-up call each. Prints the median wall and CPU seconds
(`time.process_time`, steadier on a shared machine) and writes bench/results/synthetic.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's seqrec, not another installed copy

TARGET_SECONDS = 1.0


def timed(make, repeats: int) -> dict:
    make()  # warm-up: imports, first-touch allocations
    wall, cpu = [], []
    for _ in range(repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        make()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return {"wall_s_median": statistics.median(wall), "cpu_s_median": statistics.median(cpu), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "synthetic.json"))
    args = parser.parse_args()
    from seqrec.data.dataset import synthetic
    from seqrec.data.synthetic import generate

    rows = {
        "generate (interactions)": timed(lambda: generate(seed=0), args.repeats),
        "dataset=synthetic (+ split, validate)": timed(lambda: synthetic(seed=0), args.repeats),
    }
    print(f"{'what':40s} {'wall s':>8s} {'cpu s':>8s}   (median of {args.repeats}, target < {TARGET_SECONDS} s)")
    for name, row in rows.items():
        verdict = "ok" if row["wall_s_median"] < TARGET_SECONDS else "SLOWER THAN THE TARGET"
        print(f"{name:40s} {row['wall_s_median']:8.3f} {row['cpu_s_median']:8.3f}   {verdict}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join(sys.argv), "target_seconds": TARGET_SECONDS, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
