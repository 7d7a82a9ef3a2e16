"""Full-softmax CE training steps on ML-1M: our blocked softmax cross-entropy against torch's F.cross_entropy.

    python bench/bench_ce.py [--data ../shared/data/ml-1m.txt] [--batches 16] [--rounds 2] [--hidden 64]

One process, the product's own objects (config composition, sampler, SASRec, Trainer.train_step) at the
full-ranking rows' settings (hidden 64, 1 head, maxlen 200, batch 128, dropout 0.2, `loss=ce`). The same
batches go through each variant in turn, step by step, so machine noise hits all of them alike; the printed
ratio is per-step time against the F.cross_entropy baseline. Writes bench/results/ce.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_sasrec import DEFAULT_DATA, build  # noqa: E402

CE_ROW = ["loss=ce", "model=sasrec", "residual=plain", "model.num_heads=1"]


def baseline_loss():
    """What `loss=ce` did before: materialised logits through F.cross_entropy (log_softmax + one-hot backward)."""
    import torch.nn.functional as F

    from seqrec.train.losses import CrossEntropy

    class TorchCrossEntropy(CrossEntropy):
        def __call__(self, h, head, pos, neg=None):
            mask = pos != 0
            return F.cross_entropy(head.score_all(h[mask]), pos[mask] - 1)

    return TorchCrossEntropy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--batches", type=int, default=16, help="batches of epoch 0 to time (length-bucketed)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "ce.json"))
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"skipped: {args.data} not found (needs ../shared/data/ml-1m.txt)")
        return
    import numpy as np
    import torch

    from seqrec.train.losses import CrossEntropy

    variants = {  # name: (loss, autocast dtype)
        "F.cross_entropy (before)": (baseline_loss(), None),
        "blocked softmax CE": (CrossEntropy(), None),
        "blocked softmax CE, bf16 autocast": (CrossEntropy(), torch.bfloat16),
    }
    with tempfile.TemporaryDirectory() as out:
        _, _, sampler, trainer, _ = build(args.data, CE_ROW + [f"model.hidden_units={args.hidden}"], out)
        rng = np.random.default_rng(0)
        batches = [sampler.make_batch(users, rng) for users in list(sampler.global_batches(0))[: args.batches]]
        seconds = {name: [] for name in variants}
        for _ in range(args.rounds):
            for batch in batches:
                for name, (loss, amp_dtype) in variants.items():
                    trainer.loss, trainer.amp_dtype = loss, amp_dtype
                    start = time.perf_counter()
                    trainer.train_step(batch)
                    seconds[name].append(time.perf_counter() - start)
    base = sum(seconds["F.cross_entropy (before)"])
    rows = []
    for name, times in seconds.items():
        rows.append(
            {
                "variant": name,
                "step_seconds_median": statistics.median(times),
                "step_seconds_mean": sum(times) / len(times),
                "speedup_vs_before": base / sum(times),
            }
        )
        print(f"{name:36s} step {rows[-1]['step_seconds_mean']:.3f} s mean   x{rows[-1]['speedup_vs_before']:.2f}")
    print(f"{len(batches)} batches x {args.rounds} rounds, {torch.get_num_threads()} thread(s), hidden {args.hidden}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"command": " ".join(sys.argv), "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
