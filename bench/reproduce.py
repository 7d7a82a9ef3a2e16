"""Run the experiments behind docs/RESULTS.md and print their tables.

    python bench/reproduce.py [--experiments all|NAME,NAME] [--seeds 1,2,3] [--device auto|cuda|cpu] [--parallel N]
                              [--time-limit-min M] [--data ../shared/data] [--out outputs/reproduce] [OVERRIDE ...]

Every experiment is a config, `conf/experiment/<name>.yaml`, whose header names the figure it produced and its run
directories under docs/results/. This script only runs `python train.py experiment=<name> seed=<k>` for every
(experiment, seed), in `<out>/<name>/seed<k>`; up to --parallel of them run at once (on one GPU they share it;
each process uses one CPU thread). A finished run (results.json present) is kept and not rerun; an unfinished one
continues from its last checkpoint (trainer.resume=auto); so does, once, a run killed by SIGKILL (the kernel's
out-of-memory killer, when the runs outgrow the memory), after another run has ended. --time-limit-min overrides
each experiment's own limit on training minutes (trainer.time_limit_min); runs that hit it are marked in the
table. --data is where the data files are (the experiments read it from $SEQREC_DATA). `--rows` is the older name
of `--experiments`. Afterwards the tables are printed with the published numbers beside ours (`python -m
seqrec.results <out>` prints them again).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS_DIR = REPO / "conf" / "experiment"
sys.path.insert(0, str(REPO))

from seqrec.results import results_table  # noqa: E402

# Published figures on ML-1M under the same protocol, for the table printed at the end.
PUBLISHED = {
    "ml1m_sasrec_bce_paper": "SASRec (Kang & McAuley 2018): sampled NDCG@10 0.5905, HR@10 0.8245",
    "ml1m_sasrec_ce_h256_all_cosine": "SASRec+ / SASRec+3000 (Klenitskiy & Vasilev 2023): full NDCG@10 0.1821 / "
    "0.1857, HR@10 0.3152 / 0.3159",
}


def experiment_names() -> list[str]:
    """Every experiment config, sorted by name."""
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def run_dir(name: str, seed: int, args) -> Path:
    return Path(args.out).resolve() / name / f"seed{seed}"


def command(name: str, seed: int, args) -> list[str]:
    """The train.py command line of one (experiment, seed); the experiment's config holds every setting."""
    limit = [] if args.time_limit_min is None else [f"trainer.time_limit_min={args.time_limit_min}"]
    device = [] if args.device is None else [f"trainer.device={args.device}"]
    return [
        sys.executable,
        str(REPO / "train.py"),
        f"experiment={name}",
        f"seed={seed}",
        *device,
        "trainer.progress=false",
        *limit,
        *args.extra,
        f"hydra.run.dir={run_dir(name, seed, args)}",
    ]


class Slots:
    """How many runs are going and how many have ended, for a run that must wait for another to end."""

    def __init__(self):
        self.changed = threading.Condition()
        self.running = self.ended = 0

    def start(self) -> None:
        with self.changed:
            self.running += 1

    def end(self) -> None:
        with self.changed:
            self.running, self.ended = self.running - 1, self.ended + 1
            self.changed.notify_all()

    def wait_for_room(self) -> None:
        """Return once another run has ended, or at once when no other run is going (the caller has ended its own)."""
        with self.changed:
            ended = self.ended
            self.changed.wait_for(lambda: self.ended > ended or self.running == 0)


def run_one(name: str, seed: int, args, slots: Slots | None = None) -> tuple[str, int, int, float]:
    """Run (or continue) one (experiment, seed); returns (name, seed, exit status, seconds).

    A run killed by SIGKILL (most often the kernel's out-of-memory killer, when --parallel runs outgrow the memory)
    waits until another run ends and then continues once from its last checkpoint (trainer.resume=auto).
    """
    folder = run_dir(name, seed, args)
    if (folder / "results.json").is_file():
        return name, seed, 0, 0.0
    slots = slots or Slots()
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "SEQREC_DATA": str(Path(args.data).resolve()),
        "OMP_NUM_THREADS": "1",
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
        "WANDB_MODE": "disabled",
    }
    start = time.perf_counter()
    slots.start()
    try:
        for attempt in (1, 2):
            with open(folder / "stdout.log", "a") as log:
                code = subprocess.run(
                    command(name, seed, args), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
                ).returncode
            if code != -signal.SIGKILL or attempt == 2:
                break
            print(f"{name} seed {seed}: killed (SIGKILL: out of memory?); continues when another run ends", flush=True)
            slots.end()
            slots.wait_for_room()
            slots.start()
    finally:
        slots.end()
    return name, seed, code, time.perf_counter() - start


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = experiment_names()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--experiments", "--rows", dest="experiments", default="all", help=f"comma-separated, from: {', '.join(names)}"
    )
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--device", default=None, help="cpu | cuda | auto; default: as the experiment says")
    parser.add_argument("--parallel", type=int, default=len(names) * 3)
    parser.add_argument("--time-limit-min", type=float, default=None, help="per-run training limit, 0 = none")
    parser.add_argument("--data", default=os.environ.get("SEQREC_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--out", default=str(REPO / "outputs" / "reproduce"))
    parser.add_argument("extra", nargs="*", help="more overrides for every run (e.g. trainer.num_epochs=3)")
    args = parser.parse_args(argv)
    args.experiments = names if args.experiments == "all" else args.experiments.split(",")
    unknown = [n for n in args.experiments if n not in names]
    if unknown:
        parser.error(f"unknown experiments {unknown}; choose from {', '.join(names)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs = [(name, int(seed)) for name in args.experiments for seed in args.seeds.split(",")]
    print(f"{len(jobs)} runs, {args.parallel} at a time, into {args.out}", flush=True)
    failed = []
    slots = Slots()
    with ThreadPoolExecutor(args.parallel) as pool:
        for name, seed, code, seconds in pool.map(lambda j: run_one(*j, args, slots), jobs):
            print(f"{name} seed {seed}: exit {code} after {seconds:.0f} s", flush=True)
            if code:
                failed.append(f"{args.out}/{name}/seed{seed}/stdout.log")
    text, _, _ = results_table(
        [args.out], ["test/ndcg@10", "test/hr@10", "test_sampled/ndcg@10", "test_sampled/hr@10", "val/ndcg@10"]
    )
    print(text)
    for name in args.experiments:
        if name in PUBLISHED:
            print(f"{name}: published {PUBLISHED[name]}")
    if failed:
        print("failed runs, see: " + " ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
