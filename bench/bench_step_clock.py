"""What preemption safety costs: the step clock's check, a mid-epoch last.pt, and skipping to batch k on resume.

    OMP_NUM_THREADS=1 python bench/bench_step_clock.py

Default config (`conf/train.yaml`: bundled synthetic data, TiSASRec + mHC) on the CPU, through the product's own
objects (seqrec.compose.build). Measures, as medians:
- the default model's training step (the yardstick);
- the clock per step in one process (`due` + `check`: a clock read, no collective);
- the check's all-reduce between 2 gloo processes (paid once per check, about every CHECK_EVERY_S under DDP);
- writing a mid-epoch last.pt (size, seconds);
- resuming at batch k: the sampler's epoch from batch k (window order + state) against building the k batches.
Prints a table, writes bench/results/step_clock.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's seqrec, not another installed copy


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def allreduce_worker(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    flags = torch.zeros(5, dtype=torch.int64)
    for _ in range(50):  # warm-up
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    times = []
    for _ in range(500):
        start = time.perf_counter()
        agreed = flags.clone()
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        agreed.tolist()
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(statistics.median(times)))
    dist.destroy_process_group()


def gloo_check_seconds() -> float:
    import torch.multiprocessing as mp

    from seqrec.train.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "median.json")
        mp.spawn(allreduce_worker, args=(free_port(), out), nprocs=2)
        return json.loads(Path(out).read_text())


def main() -> None:
    import numpy as np
    import torch
    from hydra import compose, initialize_config_dir

    import seqrec.launch  # noqa: F401  (config resolvers)
    from seqrec.compose import build

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        overrides = [f"trainer.output_dir={out}", f"logger.output_dir={out}", "trainer.device=cpu"]
        cfg = compose(config_name="train", overrides=overrides)
        parts = build(cfg)
        trainer, sampler = parts.trainer, parts.sampler
        p, k = trainer.progress, len(sampler) // 2  # stopped in the middle of the epoch
        p.epoch_loss = torch.zeros(())
        batches = sampler.epoch(0)
        for _ in range(2):  # warm-up
            trainer.train_step(next(batches))
        step_times = []
        for _ in range(k - 2):
            batch = next(batches)
            start = time.perf_counter()
            p.epoch_loss += trainer.train_step(batch)
            step_times.append(time.perf_counter() - start)
            p.sampler_state = batch.sampler_state
        p.epoch_batches = k
        step_s = statistics.median(step_times)

        clock, n = trainer.clock, 20_000
        start = time.perf_counter()
        for step in range(p.step, p.step + n):
            if clock.due(step):
                clock.check(step)
        clock_s = (time.perf_counter() - start) / n

        last = Path(out) / "checkpoints" / "last.pt"
        save_s = median_seconds(lambda: trainer._save("last.pt"), 7)
        size_mib = last.stat().st_size / 2**20
        parameters = sum(t.numel() for t in trainer.raw_model.parameters())

        state = p.sampler_state
        skip_s = median_seconds(lambda: next(sampler.epoch(0, k, state)), 5)

        def build_first_k():
            rng = np.random.default_rng([sampler.seed, 0, 0, 1])
            for windows in sampler.global_batches(0)[:k]:
                sampler.make_batch(windows, rng)

        replay_s = median_seconds(build_first_k, 5)
        steps_per_epoch = len(sampler)

    gloo_s = gloo_check_seconds()
    from seqrec.train.step_clock import CHECK_EVERY_S

    rows = [
        ("training step, default model (yardstick)", step_s * 1e3, "ms", ""),
        ("clock per step, 1 process (due + check)", clock_s * 1e6, "us", f"{clock_s / step_s:.2e} of a step"),
        ("check all-reduce, 2 gloo ranks", gloo_s * 1e6, "us", f"{gloo_s / CHECK_EVERY_S:.1e} of {CHECK_EVERY_S} s"),
        (f"mid-epoch last.pt write ({size_mib:.1f} MiB, {parameters:,} params)", save_s * 1e3, "ms", ""),
        (f"resume at batch {k}: first batch from batch {k}", skip_s * 1e3, "ms", "window order + 1 batch"),
        (f"resume at batch {k}: building batches 0..{k - 1} instead", replay_s * 1e3, "ms", "avoided"),
    ]
    print(f"{'what':58} {'median':>10}  unit  note")
    for what, value, unit, note in rows:
        print(f"{what:58} {value:10.3f}  {unit:4}  {note}")
    result = {
        "step_s": step_s,
        "clock_per_step_s": clock_s,
        "gloo_check_s": gloo_s,
        "check_every_s": CHECK_EVERY_S,
        "checkpoint_write_s": save_s,
        "checkpoint_mib": size_mib,
        "parameters": parameters,
        "steps_per_epoch": steps_per_epoch,
        "resume_first_batch_s": skip_s,
        "build_skipped_batches_s": replay_s,
        "skipped_batches": k,
        "threads": torch.get_num_threads(),
    }
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "step_clock.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
