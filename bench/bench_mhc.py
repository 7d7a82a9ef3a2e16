"""Epoch time and peak RSS of SASRec with residual=plain vs residual=mhc on ML-1M's shape (issue 4).

    python bench/bench_mhc.py [--epochs 1] [--steps 0] [--norm-first true] [--threads 1]

An epoch is ceil(6040 / 128) = 48 steps of forward + BCE loss (one uniform negative per position) + backward +
Adam, on batches identical for both variants (users drawn with replacement as in SASRec, left-padded to maxlen 200).
Time: both models in one process, alternating step by step (the 2 cores are shared with other jobs, so both must
see the same load); epoch time = 48 x the median (and the mean) step. `--steps N` times N batches instead of 48.
Peak RSS (ru_maxrss, whole process incl. data) comes from a fresh subprocess per variant. Writes
bench/results/mhc.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m.txt"
OUT = Path(__file__).resolve().parent / "results" / "mhc.json"


def load_train_sequences(path: Path) -> tuple[list[list[int]], int]:
    """User histories minus the last two items (validation, test), as the SASRec split."""
    users: dict[int, list[int]] = {}
    for line in path.read_text().splitlines():
        u, i = line.split()
        users.setdefault(int(u), []).append(int(i))
    num_items = max(max(s) for s in users.values())
    return [s[:-2] if len(s) >= 3 else s for s in users.values()], num_items


def make_batches(seqs, num_items, steps, batch_size, maxlen, seed):
    """(seq, pos, neg) int64 (B, maxlen) batches: input = history[:-1], target = history[1:], right-aligned."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        users = torch.randint(len(seqs), (batch_size,), generator=g).tolist()
        seq = torch.zeros(batch_size, maxlen, dtype=torch.long)
        pos = torch.zeros_like(seq)
        for row, u in enumerate(users):
            hist = torch.tensor(seqs[u][-(maxlen + 1) :])
            n = len(hist) - 1
            seq[row, maxlen - n :], pos[row, maxlen - n :] = hist[:-1], hist[1:]
        neg = torch.randint(1, num_items + 1, seq.shape, generator=g) * (pos != 0)
        batches.append((seq, pos, neg))
    return batches


def bce_loss(model, seq, pos, neg):
    h = model(seq)  # (B, L, D)
    w = model.item_weight
    pos_logit, neg_logit = (h * w[pos]).sum(-1), (h * w[neg]).sum(-1)
    target = pos != 0
    loss = F.softplus(-pos_logit) + F.softplus(neg_logit)
    return (loss * target).sum() / target.sum()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(variant: str, num_items: int, args):
    from seqrec.models.sasrec import SASRec
    from seqrec.nn.residual import MHC, Plain

    torch.manual_seed(0)
    residual = Plain() if variant == "plain" else MHC(expansion_rate=args.streams)
    model = SASRec(
        num_items=num_items,
        maxlen=args.maxlen,
        hidden_units=50,
        num_blocks=2,
        num_heads=args.heads,
        dropout_rate=0.2,
        norm_first=args.norm_first,
        residual=residual,
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))

    def step(batch):
        opt.zero_grad(set_to_none=True)
        bce_loss(model, *batch).backward()
        opt.step()

    return model, step


def setup(args):
    torch.set_num_threads(args.threads)
    seqs, num_items = load_train_sequences(DATA)
    steps = math.ceil(len(seqs) / args.batch_size)
    timed = min(steps, args.steps) if args.steps else steps
    return num_items, steps, make_batches(seqs, num_items, timed, args.batch_size, args.maxlen, seed=1)


def peak_rss(args) -> dict:
    """Child process, one variant: peak RSS over 3 training steps (memory peaks within a step)."""
    num_items, _, batches = setup(args)
    model, step = build(args.variant, num_items, args)
    rss_before = current_rss_mib()
    for batch in (batches * 3)[:3]:
        step(batch)
    return {
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_training_mib": rss_before,
        "params": sum(p.numel() for p in model.parameters()),
    }


def interleaved_times(args) -> dict[str, list[float]]:
    """Both variants in this process, alternating step by step so that background load hits both alike."""
    num_items, steps, batches = setup(args)
    models = {v: build(v, num_items, args)[1] for v in ("plain", "mhc")}
    for step in models.values():
        step(batches[0])  # warm-up (allocator, Adam state)
    times = {v: [] for v in models}
    for _ in range(args.epochs):
        for batch in batches:
            for variant, step in models.items():
                t0 = time.perf_counter()
                step(batch)
                times[variant].append(time.perf_counter() - t0)
    return {v: [statistics.median(t) * steps, sum(t) / len(t) * steps] for v, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=1, help="timed passes over the batches")
    p.add_argument("--steps", type=int, default=0, help="time only this many batches per pass (0: a full epoch)")
    p.add_argument("--streams", type=int, default=4, help="mHC expansion rate n")
    p.add_argument("--maxlen", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--heads", type=int, default=2, help="conf/model/sasrec.yaml default")
    p.add_argument("--norm-first", type=lambda s: s.lower() == "true", default=True)
    p.add_argument("--threads", type=int, default=1, help="1: OpenMP's 2-thread kernels stall on shared cores")
    p.add_argument("--variant", choices=["plain", "mhc"], help=argparse.SUPPRESS)  # child process: peak RSS
    args = p.parse_args()
    if not DATA.exists():
        print(f"skipped: {DATA} not found")
        return
    if args.variant:
        print(json.dumps(peak_rss(args)))
        return

    child = [sys.executable, __file__, *sys.argv[1:]]
    memory = {}
    for variant in ("plain", "mhc"):
        out = subprocess.run(child + ["--variant", variant], capture_output=True, text=True, check=True)
        memory[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    epoch = interleaved_times(args)
    summary = {
        v: {"epoch_s_from_median_step": epoch[v][0], "epoch_s_from_mean_step": epoch[v][1], **memory[v]}
        for v in ("plain", "mhc")
    }
    plain, mhc = summary["plain"], summary["mhc"]
    ratios = {
        "epoch_time_median": mhc["epoch_s_from_median_step"] / plain["epoch_s_from_median_step"],
        "epoch_time_mean": mhc["epoch_s_from_mean_step"] / plain["epoch_s_from_mean_step"],
        "peak_rss": mhc["peak_rss_mib"] / plain["peak_rss_mib"],
    }
    steps = math.ceil(6040 / args.batch_size)
    print(
        f"SASRec on ML-1M's shape: B={args.batch_size} L={args.maxlen} D=50 blocks=2 heads={args.heads} "
        f"norm_first={args.norm_first} n={args.streams}, epoch = {steps} steps, {args.threads} thread(s), "
        f"{args.epochs} x {args.steps or steps} interleaved steps per variant"
    )
    print(f"{'variant':9} {'epoch s (median step)':>22} {'epoch s (mean step)':>20} {'peak RSS MiB':>13} {'params':>8}")
    for variant, s in summary.items():
        print(
            f"{variant:9} {s['epoch_s_from_median_step']:22.2f} {s['epoch_s_from_mean_step']:20.2f} "
            f"{s['peak_rss_mib']:13.0f} {s['params']:8d}"
        )
    print(
        f"{'mhc/plain':9} {ratios['epoch_time_median']:22.3f} {ratios['epoch_time_mean']:20.3f} "
        f"{ratios['peak_rss']:13.3f}"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "config": {k: v for k, v in vars(args).items() if k != "variant"},
                "torch": torch.__version__,
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "summary": summary,
                "ratios": ratios,
            },
            indent=2,
        )
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
