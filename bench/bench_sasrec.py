"""SASRec speed on ML-1M at the paper's settings: seconds per epoch, evaluation seconds, peak RSS, FLOP rate.

    python bench/bench_sasrec.py [--data ../shared/data/ml-1m.txt] [--epochs 3] [--quality-epochs 0]

Each case runs in its own process (clean peak RSS) through the product's own objects (config composition,
sampler, model, loss, Trainer.train_epoch, Evaluator). Prints a table and writes bench/results/sasrec.json.
Paper settings: maxlen 200, hidden 50, 2 blocks, 1 head, batch 128, dropout 0.2, BCE with 1 negative.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ml-1m.txt"
PAPER = [
    "model.maxlen=200",
    "model.hidden_units=50",
    "model.num_blocks=2",
    "model.num_heads=1",
    "model.dropout_rate=0.2",
    "sampler.batch_size=128",
    "loss=bce",
    "trainer.device=cpu",
    "trainer.progress=false",
    "trainer.num_workers=1",
]
CASES = {
    # name: (extra overrides, use torch's native dropout instead of ours)
    "seqrec": ([], False),
    "seqrec, native dropout": ([], True),
    "seqrec, no length bucketing": (["sampler.bucket_by_length=false"], False),
}


def build(data_path: str, overrides: list[str], out_dir: str):
    """The run's components as train.py builds them (seqrec/compose.py), with the sampled protocol reported too."""
    from hydra import compose, initialize_config_dir

    import seqrec.launch  # noqa: F401  (config resolvers)
    from seqrec.compose import build as build_components

    paths = [f"dataset.path={data_path}", f"trainer.output_dir={out_dir}", f"logger.output_dir={out_dir}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=PAPER + overrides + ["dataset=file", "eval.also_sampled=true", *paths])
    parts = build_components(cfg)
    return parts.data, parts.model, parts.sampler, parts.trainer, parts.evaluator


def use_native_dropout() -> None:
    """Swap our cheap-mask dropout for torch's (the 'before' measurement)."""
    import torch.nn.functional as F

    import seqrec.nn.attention as attention
    import seqrec.nn.ffn as dropout

    dropout.dropout = lambda x, p, training: F.dropout(x, p, training)
    attention.attention = lambda q, k, v, ctx, p, training: F.scaled_dot_product_attention(
        q, k, v, attn_mask=ctx.attn_mask, dropout_p=p if training else 0.0
    )


def epoch_flops(sampler, dim: int, blocks: int) -> float:
    """Multiply-add FLOPs (x2) of one epoch, forward + backward (= 3x forward), over the real batch shapes."""
    total = 0.0
    for users in sampler.global_batches(0):
        w = sampler.make_batch(users, __import__("numpy").random.default_rng(0)).seq.shape
        cells = w[0] * w[1]
        linear = 2 * cells * 6 * dim * dim  # qkv (3d²) + out (d²) + FFN (2d²) per position
        attention = 2 * 2 * w[0] * w[1] * w[1] * dim  # QKᵀ and AV over the (trimmed) window
        total += blocks * (linear + attention) + 2 * cells * 2 * dim  # + positive/negative logits
    return 3 * total


def matmul_rate() -> float:
    """GFLOP/s of this machine on the model's typical matmul shapes (median of 5)."""
    import torch

    a, w = torch.randn(25600, 50), torch.randn(50, 150)
    q, k = torch.randn(128, 150, 50), torch.randn(128, 50, 150)
    rates = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            a @ w
            q @ k
        rates.append(10 * (2 * 25600 * 50 * 150 + 2 * 128 * 150 * 150 * 50) / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


def run_case(args) -> dict:
    import tempfile

    import torch

    extra, native = CASES[args.case]
    if native:
        use_native_dropout()
    with tempfile.TemporaryDirectory() as out:
        data, model, sampler, trainer, evaluator = build(args.data, extra, out)
        epoch_seconds = []
        for _ in range(args.epochs):
            start = time.perf_counter()
            trainer.train_epoch()
            trainer.progress.finish_epoch()
            epoch_seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        val = evaluator.evaluate(model, "valid")
        evaluator.evaluate(model, "test")
        eval_seconds = time.perf_counter() - start
        quality = None
        if args.quality_epochs:
            for _ in range(args.epochs, args.quality_epochs):
                trainer.train_epoch()
                trainer.progress.finish_epoch()
            quality = evaluator.evaluate(model, "valid")["val/ndcg@10"]
        flops = epoch_flops(sampler, model.dim, len(model.blocks))
        return {
            "case": args.case,
            "epoch_seconds": epoch_seconds,
            "epoch_seconds_median": statistics.median(epoch_seconds),
            "eval_seconds_full_and_sampled_valid_and_test": eval_seconds,
            "val_ndcg@10_after_bench_epochs": val["val/ndcg@10"],
            "val_ndcg@10_after_quality_epochs": quality,
            "quality_epochs": args.quality_epochs,
            "epoch_gflop": flops / 1e9,
            "achieved_gflops": flops / 1e9 / statistics.median(epoch_seconds),
            "matmul_gflops": matmul_rate(),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "threads": torch.get_num_threads(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quality-epochs", type=int, default=0, help="also train to this epoch and report val NDCG@10")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "sasrec.json"))
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    if not Path(args.data).exists():
        print(f"skipped: {args.data} not found (needs ../shared/data/ml-1m.txt)")
        return
    rows = []
    for case in args.cases:
        cmd = [
            sys.executable,
            __file__,
            "--case",
            case,
            "--data",
            args.data,
            "--epochs",
            str(args.epochs),
            "--quality-epochs",
            str(args.quality_epochs),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{case:32s} epoch {r['epoch_seconds_median']:6.2f} s"
            f"   eval {r['eval_seconds_full_and_sampled_valid_and_test']:5.2f} s"
            f"   RSS {r['peak_rss_gib']:.2f} GiB   {r['achieved_gflops']:5.1f} of {r['matmul_gflops']:5.1f} GFLOP/s",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
