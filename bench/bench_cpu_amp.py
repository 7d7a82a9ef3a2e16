"""What `trainer.amp=true` (bfloat16 autocast) costs or saves on this CPU, against float32.

    OMP_NUM_THREADS=1 python bench/bench_cpu_amp.py [--steps 6]

On a CPU with bfloat16 kernels (x86 with AVX-512, Arm with bf16) autocast is cheap; without them (AVX2-only x86,
e.g. many AMD EPYC parts) oneDNN falls back to converting every operand, and the ML-1M recipes that set
`trainer.amp: true` run many times slower than in float32. The run's pre-flight check warns about it
(`seqrec.preflight.slow_settings`); this measures it. Cases, each timed as a median:
- a (6400 x 256) @ (256 x 256) matmul, a block's projection at the recipe's width;
- a (6400 x 256) @ (256 x 3417) matmul, full-catalog scores on ML-1M;
- a training step of SASRec at the hidden-256 recipe's shape (2 blocks, 4 heads, full softmax CE, batch 128,
  maxlen 200) on the bundled synthetic data, built by the product's own objects (seqrec.compose.build).
Prints a table, writes bench/results/cpu_amp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_step_clock import median_seconds

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's seqrec, not another installed copy

RECIPE_SHAPE = [
    "model=sasrec",
    "residual=plain",
    "loss=ce",
    "model.hidden_units=256",
    "model.num_heads=4",
    "model.num_blocks=2",
    "model.maxlen=200",
    "sampler.batch_size=128",
    "trainer.device=cpu",
]


def matmul_seconds(rows: int, inner: int, cols: int, amp: bool, repeats: int) -> float:
    import torch

    a, b = torch.randn(rows, inner), torch.randn(inner, cols)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            a @ b

    run()  # warm-up
    return median_seconds(run, repeats)


def train_step_seconds(amp: bool, steps: int) -> float:
    import torch
    from hydra import compose, initialize_config_dir

    import seqrec.launch  # noqa: F401  (config resolvers)
    from seqrec.compose import build

    with tempfile.TemporaryDirectory() as out, initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        overrides = [f"trainer.output_dir={out}", f"logger.output_dir={out}", f"trainer.amp={str(amp).lower()}"]
        cfg = compose(config_name="train", overrides=RECIPE_SHAPE + ["trainer.amp_dtype=bfloat16"] + overrides)
        trainer = build(cfg).trainer
        trainer.progress.epoch_loss = torch.zeros(())
        batches = trainer.sampler.epoch(0)
        trainer.train_step(next(batches))  # warm-up
        times = []
        for _ in range(steps):
            batch = next(batches)
            start = time.perf_counter()
            trainer.train_step(batch)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def main() -> None:
    import torch

    from seqrec.preflight import Machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps timed per case (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each matmul")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu_amp.json"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    cases = {
        "matmul 6400x256 @ 256x256": lambda amp: matmul_seconds(6400, 256, 256, amp, args.repeats),
        "matmul 6400x256 @ 256x3417": lambda amp: matmul_seconds(6400, 256, 3417, amp, args.repeats),
        "SASRec h256 training step": lambda amp: train_step_seconds(amp, args.steps),
    }
    rows = []
    for name, measure in cases.items():
        fp32, bf16 = measure(False), measure(True)
        rows.append({"case": name, "float32_s": fp32, "bf16_autocast_s": bf16, "bf16_over_fp32": bf16 / fp32})
    machine = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_kernels": Machine.probe().cpu_bf16,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(
        f"CPU {machine['cpu_capability']}, bfloat16 kernels: {machine['cpu_bf16_kernels']}, "
        f"{machine['threads']} thread(s), torch {machine['torch']}"
    )
    print(f"{'case':<30} {'float32 s':>10} {'bf16 autocast s':>16} {'bf16 / fp32':>12}")
    for r in rows:
        print(f"{r['case']:<30} {r['float32_s']:>10.4f} {r['bf16_autocast_s']:>16.4f} {r['bf16_over_fp32']:>11.1f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
