"""First and cached load of a large interaction file with `dataset=file`, this checkout against another one.

    python bench/bench_load.py --baseline /path/to/older/checkout [--rows 20e6] [--repeats 3]

The file (ML-20M's shape by default: 138,000 users, 27,000 items, 20M `user item timestamp` rows, written as
`bench/bench_scale.py`'s `write_file` does) is made once under --file. Each load runs in a fresh process with an
empty processed cache, the two checkouts taking turns, so the machine's load hits both alike; the figures are
medians over --repeats. CPU seconds (`time.process_time`: every thread of the process) are the fairer figure on a
shared machine. Each process also hashes every array of the built dataset: equal digests mean the two checkouts
build identical datasets. Prints a table, writes bench/results/load.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(repo: str, path: str) -> dict:
    """Load `path` twice with `repo`'s seqrec (first: parse + build + cache write; then from the cache)."""
    sys.path.insert(0, repo)
    import numpy as np

    from seqrec.data import dataset

    out = {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SEQREC_CACHE"] = cache
        for what in ("first", "cached"):
            wall, cpu = time.perf_counter(), time.process_time()
            data = dataset.from_file(path=path)
            out[f"{what}_wall_s"] = time.perf_counter() - wall
            out[f"{what}_cpu_s"] = time.process_time() - cpu
            out[f"{what}_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    digests = {}
    for f in fields(data):
        value = getattr(data, f.name)
        if isinstance(value, np.ndarray):
            digests[f.name] = f"{value.dtype}:{value.shape}:" + hashlib.sha256(np.ascontiguousarray(value)).hexdigest()
    out["digests"] = digests
    out["seqrec"] = dataset.__file__
    return out


def make_file(path: Path, users: int, items: int, rows: int) -> None:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    from bench_scale import write_file

    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, users, items, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="another checkout of seqrec to compare with (e.g. a git worktree)")
    parser.add_argument("--rows", type=float, default=20e6)
    parser.add_argument("--users", type=int, default=138_000)
    parser.add_argument("--items", type=int, default=27_000)
    parser.add_argument("--file", default=str(Path(tempfile.gettempdir()) / "seqrec_bench_load" / "ml20m_shape.txt"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "load.json"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    path = Path(args.file)
    if not path.is_file():
        make_file(path, args.users, args.items, int(args.rows))
    checkouts = {"this": str(REPO)} | ({"baseline": str(Path(args.baseline).resolve())} if args.baseline else {})
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for repeat in range(args.repeats):
        for name, repo in reversed(checkouts.items()) if repeat % 2 else checkouts.items():
            cmd = [sys.executable, __file__, "--child", repo, str(path)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=tempfile.gettempdir())
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(
                f"repeat {repeat} {name:8s} "
                + json.dumps({k: round(v, 2) for k, v in runs[name][-1].items() if isinstance(v, float)}),
                flush=True,
            )
    keys = ("first_wall_s", "first_cpu_s", "first_peak_rss_gib", "cached_wall_s", "cached_cpu_s")
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    print(f"\n{'checkout':10s} " + " ".join(f"{k:>18s}" for k in keys))
    for name, row in summary.items():
        print(f"{name:10s} " + " ".join(f"{row[k]:>18.2f}" for k in keys))
    same = None
    if "baseline" in runs:
        same = runs["this"][0]["digests"] == runs["baseline"][0]["digests"]
        print(f"identical arrays (sha256 of every SeqData array): {same}")
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")
    record = {
        "command": " ".join(sys.argv),
        "file": str(path),
        "rows": int(args.rows),
        "cpus": os.cpu_count(),
        "load_average_at_end": load,
        "median": summary,
        "runs": {name: [{k: v for k, v in r.items() if k != "digests"} for r in rs] for name, rs in runs.items()},
        "identical_arrays": same,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
