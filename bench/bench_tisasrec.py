"""Epoch time and peak RSS of TiSASRec vs SASRec on data of ML-1M's shape.

    python bench/bench_tisasrec.py                      # SASRec + TiSASRec at time_span 100, 256, 512
    python bench/bench_tisasrec.py --spans 100 --trim   # bucket users by length, trim padding (the sampler's way)
    python bench/bench_tisasrec.py --profile            # also print a torch.profiler table of one step per model

The item sequences and their lengths are ML-1M's (../shared/data/ml-1m.txt, 6,040 users, 3,416 items, training
part = all but the last 2 items); the timestamps are synthetic (gaps drawn from a seeded mix of minutes and days),
since the full ML-1M timestamps are not available offline. One epoch = every user with >= 2 training items once, in
batches of 128, with the forward pass, BCE with one negative per position, backward and an Adam step: the same
batches (same order, same negatives) for every model. The two models alternate step by step in one process, so that both
see the same machine load (the machines are shared); peak RSS (ru_maxrss) comes from a separate subprocess per
model that trains on the epoch's largest batches. Writes bench/results/tisasrec.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from seqrec.models.sasrec import SASRec
from seqrec.models.tisasrec import TiSASRec

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ml-1m.txt"
OUT = ROOT / "bench" / "results" / "tisasrec.json"


def load_sequences(path: Path, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """ML-1M's training sequences (all but the last 2 items) with synthetic timestamps."""
    pairs = np.loadtxt(path, dtype=np.int64)
    users, starts = np.unique(pairs[:, 0], return_index=True)
    bounds = list(starts[1:]) + [len(pairs)]
    rng = np.random.default_rng(seed)
    seqs, times = [], []
    for a, b in zip(starts, bounds):
        items = pairs[a:b, 1][:-2]
        short = rng.random(len(items)) < 0.6  # bursts of minutes between sessions days apart
        gaps = np.where(short, rng.exponential(600, len(items)), rng.exponential(2 * 86400, len(items)))
        seqs.append(items)
        times.append(1_000_000_000 + np.cumsum(gaps.astype(np.int64) + 1))
    return seqs, times, int(pairs[:, 1].max())


def make_batches(seqs, times, num_items, maxlen, batch_size, trim, seed=0):
    """One epoch of (seq, pos, neg, times, time_scale) tensors, left-padded (and trimmed if `trim`)."""
    rng = np.random.default_rng(seed)
    users = rng.permutation([u for u, s in enumerate(seqs) if len(s) >= 2])
    if trim:  # like the sampler's bucket_by_length: similar lengths share a batch
        users = users[np.argsort([-min(len(seqs[u]) - 1, maxlen) for u in users], kind="stable")]
    batches = []
    for i in range(0, len(users), batch_size):
        chunk = users[i : i + batch_size]
        width = max(min(len(seqs[u]) - 1, maxlen) for u in chunk) if trim else maxlen
        seq, pos, tim = (np.zeros((len(chunk), width), np.int64) for _ in range(3))
        scale = np.ones(len(chunk), np.int64)
        for r, u in enumerate(chunk):
            n = min(len(seqs[u]) - 1, width)
            seq[r, width - n :] = seqs[u][-n - 1 : -1]
            pos[r, width - n :] = seqs[u][-n:]
            tim[r, width - n :] = times[u][-n - 1 : -1]
            gaps = np.diff(times[u])
            scale[r] = gaps[gaps > 0].min() if (gaps > 0).any() else 1
        neg = rng.integers(1, num_items + 1, pos.shape) * (pos != 0)  # uniform; history exclusion does not change cost
        batches.append(tuple(torch.from_numpy(a) for a in (seq, pos, neg, tim, scale)))
    if trim:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def build(model: str, num_items: int, args, span: int):
    kw = dict(
        num_items=num_items,
        maxlen=args.maxlen,
        hidden_units=args.hidden,
        num_blocks=args.blocks,
        num_heads=args.heads,
        dropout_rate=0.2,
    )
    return SASRec(**kw) if model == "sasrec" else TiSASRec(time_unit=args.time_unit, time_span=span, **kw)


def step(model, opt, batch):
    seq, pos, neg, times, scale = batch
    h = model(seq, times, scale)  # (B, L, D)
    pos_logit, neg_logit = model.head.score_one(h, pos), model.head.score_one(h, neg)
    mask = pos != 0
    loss = (F.softplus(-pos_logit) + F.softplus(neg_logit))[mask].mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def peak_rss(model_name: str, span: int, args) -> dict:
    """Peak RSS of a process that trains `model_name` on the epoch's largest batches (run in a fresh subprocess)."""
    torch.manual_seed(0)
    seqs, times, num_items = load_sequences(DATA)
    batches = make_batches(seqs, times, num_items, args.maxlen, args.batch_size, args.trim)
    model = build(model_name, num_items, args, span).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    for b in sorted(batches, key=lambda b: -b[0].numel())[:3]:
        step(model, opt, b)
    return dict(peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # Linux: KiB


def epoch_times(span: int, args) -> dict:
    """One epoch for SASRec and TiSASRec(span), alternating step by step so both see the same machine load."""
    torch.manual_seed(0)
    seqs, times, num_items = load_sequences(DATA)
    batches = make_batches(seqs, times, num_items, args.maxlen, args.batch_size, args.trim)
    models = {name: build(name, num_items, args, span).train() for name in ("sasrec", "tisasrec")}
    opts = {n: torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.9, 0.98)) for n, m in models.items()}
    for name in models:  # warm-up: allocator and kernels
        step(models[name], opts[name], batches[0])
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in models:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(models[name], opts[name], batches[1])
            print(name, prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    steps = len(batches) if args.max_steps <= 0 else min(args.max_steps, len(batches))
    seconds, losses = dict.fromkeys(models, 0.0), {}
    for b in batches[:steps]:
        for name in models:
            start = time.perf_counter()
            losses[name] = step(models[name], opts[name], b)
            seconds[name] += time.perf_counter() - start
    scale = len(batches) / steps  # extrapolated when --max-steps cuts the epoch
    return {name: dict(epoch_seconds=seconds[name] * scale, last_loss=losses[name]) for name in models} | dict(
        steps=len(batches), timed_steps=steps
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spans", type=int, nargs="+", default=[100, 256, 512])
    p.add_argument("--maxlen", type=int, default=200)
    p.add_argument("--hidden", type=int, default=50)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--time-unit", default="hour")
    p.add_argument("--trim", action="store_true", help="bucket by length and trim padding, as the sampler does")
    p.add_argument("--max-steps", type=int, default=0, help="time only this many steps and extrapolate (0 = all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "SPAN"), help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:  # child process: one model's peak RSS
        print(json.dumps(peak_rss(args.one[0], int(args.one[1]), args)))
        return
    child = [
        sys.executable,
        __file__,
        "--maxlen",
        str(args.maxlen),
        "--hidden",
        str(args.hidden),
        "--blocks",
        str(args.blocks),
        "--heads",
        str(args.heads),
        "--batch-size",
        str(args.batch_size),
        "--time-unit",
        args.time_unit,
        "--threads",
        str(args.threads),
    ] + ["--trim"] * args.trim

    def rss(model: str, span: int) -> float:
        out = subprocess.run(child + ["--one", model, str(span)], check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])["peak_rss_gib"]

    rows = [dict(model="sasrec", time_span=None, peak_rss_gib=rss("sasrec", 0))]
    print(f"{'model':9s} {'span':>5s} {'SASRec s':>9s} {'TiSASRec s':>10s} {'ratio':>6s} {'RSS GiB':>8s}", flush=True)
    for span in args.spans:
        t = epoch_times(span, args)
        row = dict(
            model="tisasrec",
            time_span=span,
            epoch_seconds=t["tisasrec"]["epoch_seconds"],
            sasrec_epoch_seconds=t["sasrec"]["epoch_seconds"],
            steps=t["steps"],
            timed_steps=t["timed_steps"],
            peak_rss_gib=rss("tisasrec", span),
        )
        row["ratio"] = row["epoch_seconds"] / row["sasrec_epoch_seconds"]
        rows.append(row)
        print(
            f"{'tisasrec':9s} {span:5d} {row['sasrec_epoch_seconds']:9.1f} {row['epoch_seconds']:10.1f} "
            f"{row['ratio']:6.2f} {row['peak_rss_gib']:8.2f}",
            flush=True,
        )
    print(f"sasrec peak RSS {rows[0]['peak_rss_gib']:.2f} GiB")
    setting = {k: getattr(args, k) for k in ("maxlen", "hidden", "blocks", "heads", "batch_size", "time_unit", "trim")}
    setting["load_average_after"] = os.getloadavg()
    setting.update(
        torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.processor() or platform.machine()
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results["trim" if args.trim else "full_window"] = dict(setting=setting, rows=rows)
    OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
