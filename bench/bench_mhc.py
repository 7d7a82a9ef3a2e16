"""Epoch time and peak RSS of SASRec with residual=plain vs residual=mhc on ML-1M.

    python bench/bench_mhc.py [--epochs 3] [--steps 0] [--norm-first true] [--threads 1] [--device cpu]
                              [--kernels auto|reference] [--hidden 50] [--model sasrec|tisasrec]
                              [--compare OLD_CHECKOUT [--settings sasrec:post,sasrec:pre,tisasrec:post]]

`--compare /path/to/older/checkout` times the older checkout and this one in one run: one warm process per
checkout, epochs alternating between them, each epoch interleaving plain and mHC step by step; the table gives
both trees' epoch times and mHC/plain ratios (medians, and the median of the per-epoch ratios), in wall and in CPU
seconds (`time.process_time`, steadier than wall time on a shared machine), and new/old per variant. `--settings`
times several settings (model and Pre/Post-LN) one after another in the same run, each with its own pair of
processes; without it, the one given by --model and --norm-first.

`--model tisasrec` compares TiSASRec + mHC with TiSASRec (the product default against its plain residual) on the
timestamped ML-1M users 1-2,999 (`--data` to change), with the TiSASRec paper's time settings.

Measures what `python train.py dataset=file dataset.path=ml-1m.txt` runs: the product's TrainSampler
(bucket_by_length=true: users of similar length batched together, each batch trimmed to its longest sequence),
BCE with one negative per position weighted by the batch's `loss_weight`, Adam(lr 1e-3, betas 0.9/0.98),
deterministic kernels as train.py sets them, and the same number of intra-op threads for both variants (default 1:
on the 2 shared cores of the dev machine a second OpenMP thread stalls whenever the other core is busy, which
penalises mHC's many small ops far more than plain's few large ones; `--threads 0` keeps torch's default, what
train.py uses). An epoch is the sampler's 48 batches of ML-1M (6,040 users, batch 128).
Time: both models in one process, alternating step by step (and which one goes first) over identical batches, so
that background load on the shared cores hits both alike; per variant the epoch time is the sum of its steps, and
the figure is the median over `--epochs` epochs (each with the sampler's batches of that epoch).
`--steps N` times only the first N batches of each epoch.
Peak RSS (ru_maxrss, whole process incl. data) comes from a fresh subprocess per variant that trains one full
epoch (so it meets the widest, untrimmed batches); with `--device cuda` also the peak of allocated GPU memory, and
steps are timed with a device synchronisation. Prints a table and writes bench/results/mhc.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ml-1m.txt"
DATA_TIMED = ROOT.parent / "shared" / "data" / "ml-1m" / "ratings_users0001-2999.dat"  # ML-1M users 1-2,999, timed
OUT = Path(__file__).resolve().parent / "results" / "mhc.json"
VARIANTS = ("plain", "mhc")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def setup(args):
    """The product's data path: SeqData from the file, TrainSampler with length buckets; deterministic kernels."""
    sys.path.append(str(ROOT))  # appended: a PYTHONPATH checkout (e.g. an older seqrec to compare with) wins
    from seqrec.data.dataset import from_file
    from seqrec.train.sampler import TrainSampler

    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # the kernels switch (a checkout from before it has only its own default)
        from seqrec import kernels
    except ImportError:
        pass
    else:
        kernels.use(args.kernels)
    if args.device == "cpu" and args.reuse_memory:  # as train.py on a CPU (an older checkout may lack it)
        try:
            from seqrec.utils.memory import reuse_freed_memory
        except ImportError:
            print("this seqrec has no seqrec.utils.memory: glibc's default thresholds")
        else:
            reuse_freed_memory()
    if args.device == "cuda":  # as the trainer on a GPU: TF32 off is torch's default, deterministic kernels on
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)  # as train.py (trainer.deterministic=true)
    torch.utils.deterministic.fill_uninitialized_memory = False
    data = from_file(path=str(args.data), format="sasrec" if args.model == "sasrec" else "auto")
    sampler = TrainSampler(data, batch_size=args.batch_size, maxlen=args.maxlen, num_negatives=1, seed=0)
    return data, sampler


def build(variant: str, num_items: int, args):
    from seqrec.models.sasrec import SASRec
    from seqrec.models.tisasrec import TiSASRec
    from seqrec.nn.residual import MHC, Plain
    from seqrec.train.losses import BCE

    torch.manual_seed(0)
    residual = Plain() if variant == "plain" else MHC(expansion_rate=args.streams)
    shape = dict(maxlen=args.maxlen, hidden_units=args.hidden, num_blocks=2, num_heads=args.heads, dropout_rate=0.2)
    if args.model == "sasrec":
        model = SASRec(num_items=num_items, **shape, norm_first=args.norm_first, residual=residual)
    else:  # the TiSASRec paper's time settings, as bench/reproduce.py's TiSASRec rows
        model = TiSASRec(
            num_items=num_items, **shape, norm_first=args.norm_first, residual=residual, time_unit="personal",
            time_span=256,
        )  # fmt: skip
    model = model.to(args.device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    loss_fn = BCE(num_negatives=1)

    def step(batch):  # Trainer.train_step without clipping and the lr schedule (bf16, so no GradScaler)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.amp):
            loss = loss_fn(model(batch.seq, batch.times, batch.time_scale), model.head, batch.pos, batch.neg)
            loss = loss * batch.loss_weight
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, step


def epoch_batches(sampler, epoch: int, steps: int, device: str) -> list:
    batches = list(sampler.epoch(epoch))
    return [b.to(torch.device(device)) for b in (batches[:steps] if steps else batches)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_rss(args) -> dict:
    """Child process, one variant: peak RSS over one full training epoch (memory peaks at the widest batch)."""
    data, sampler = setup(args)
    batches = epoch_batches(sampler, 0, 0, args.device)
    model, step = build(args.variant, data.num_items, args)
    rss_before = current_rss_mib()
    for batch in batches:
        step(batch)
    memory = {
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_training_mib": rss_before,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if args.device == "cuda":
        memory["peak_gpu_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return memory


def warmed_up_steps(args) -> tuple:
    """The sampler and each variant's training step, warmed up (allocator, Adam state) on the widest and the
    narrowest batch; also the warm-up seconds per variant."""
    data, sampler = setup(args)
    steps = {v: build(v, data.num_items, args)[1] for v in VARIANTS}
    warm = epoch_batches(sampler, 0, 0, args.device)
    warmup_s = {}
    for variant, step in steps.items():
        t0 = time.perf_counter()
        for batch in (max(warm, key=lambda b: b.seq.shape[1]), min(warm, key=lambda b: b.seq.shape[1])):
            step(batch)
        warmup_s[variant] = time.perf_counter() - t0
        print(f"{variant}: warm-up (2 steps) {warmup_s[variant]:.1f} s", file=sys.stderr, flush=True)
    return sampler, steps, warmup_s


def timed_epoch(sampler, steps, epoch: int, args) -> tuple[dict[str, float], dict[str, float], list[int]]:
    """One epoch, both variants alternating step by step over identical batches: wall seconds and CPU seconds
    (`time.process_time`, all threads of this process) per variant, and the batch widths."""
    total, cpu = dict.fromkeys(VARIANTS, 0.0), dict.fromkeys(VARIANTS, 0.0)
    widths = []
    for i, batch in enumerate(epoch_batches(sampler, epoch, args.steps, args.device)):
        widths.append(batch.seq.shape[1])
        for variant in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
            sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            steps[variant](batch)
            sync(args.device)
            total[variant] += time.perf_counter() - t0
            cpu[variant] += time.process_time() - c0
    return total, cpu, widths


def interleaved_times(args) -> tuple[dict[str, list[float]], dict[str, list[float]], list[int], dict[str, float]]:
    """Per variant, the wall and CPU seconds of each timed epoch (both variants in this process), the batch widths,
    and the warm-up seconds."""
    sampler, steps, warmup_s = warmed_up_steps(args)
    seconds, cpu_seconds = {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}
    widths = []
    for epoch in range(args.epochs):
        total, cpu, epoch_widths = timed_epoch(sampler, steps, epoch + 1, args)
        widths += epoch_widths
        for variant in VARIANTS:
            seconds[variant].append(total[variant])
            cpu_seconds[variant].append(cpu[variant])
        ratio, cpu_ratio = total["mhc"] / total["plain"], cpu["mhc"] / cpu["plain"]
        print(
            f"epoch {epoch + 1}: plain {total['plain']:.2f} s, mhc {total['mhc']:.2f} s, ratio {ratio:.3f}; "
            f"CPU s ratio {cpu_ratio:.3f}"
        )
    return seconds, cpu_seconds, widths, warmup_s


def serve(args) -> None:
    """Child of --compare: warm up, then time the epoch named by each line on stdin, answering one JSON line."""
    sampler, steps, _ = warmed_up_steps(args)
    print(json.dumps({"seqrec": sys.modules["seqrec"].__file__}), flush=True)
    for line in sys.stdin:
        total, cpu, widths = timed_epoch(sampler, steps, int(line), args)
        print(json.dumps({"seconds": total, "cpu_seconds": cpu, "mean_width": statistics.mean(widths)}), flush=True)


SETTINGS = {"sasrec:post": ("sasrec", False), "sasrec:pre": ("sasrec", True), "tisasrec:post": ("tisasrec", False),
            "tisasrec:pre": ("tisasrec", True)}  # fmt: skip


def child_argv(args, model: str, norm_first: bool) -> list[str]:
    """The command line of a --compare child serving one setting (the parent's options, this model and norm)."""
    data = args.data if args.data_given else (DATA if model == "sasrec" else DATA_TIMED)
    options = {"--epochs": args.epochs, "--steps": args.steps, "--streams": args.streams, "--maxlen": args.maxlen,
               "--hidden": args.hidden, "--batch-size": args.batch_size, "--heads": args.heads,
               "--norm-first": str(norm_first).lower(), "--threads": args.threads, "--device": args.device,
               "--kernels": args.kernels, "--model": model, "--data": data,
               "--reuse-memory": str(args.reuse_memory).lower()}  # fmt: skip
    argv = [sys.executable, __file__, "--serve"] + [str(x) for item in options.items() for x in item]
    return argv + (["--amp"] if args.amp else [])


def compare_setting(args, trees: dict[str, Path], model: str, norm_first: bool) -> dict:
    """One setting, old and new tree: a warm child process per tree, epochs alternating between them (and which goes
    first), so that background load hits both alike. Returns per tree the per-epoch wall and CPU seconds."""
    servers = {}
    for name, tree in trees.items():
        env = dict(os.environ, PYTHONPATH=str(tree))
        servers[name] = subprocess.Popen(child_argv(args, model, norm_first), env=env, cwd=tree, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)  # fmt: skip
        print(f"{name}: {json.loads(servers[name].stdout.readline())['seqrec']}", flush=True)
    measured = {
        name: {"seconds": {v: [] for v in VARIANTS}, "cpu_seconds": {v: [] for v in VARIANTS}} for name in trees
    }
    for epoch in range(args.epochs):
        for name in list(trees) if epoch % 2 == 0 else list(trees)[::-1]:
            servers[name].stdin.write(f"{epoch + 1}\n")
            servers[name].stdin.flush()
            answer = json.loads(servers[name].stdout.readline())
            for key in ("seconds", "cpu_seconds"):
                for variant in VARIANTS:
                    measured[name][key][variant].append(answer[key][variant])
            (plain, mhc), (cpu_plain, cpu_mhc) = ([answer[k][v] for v in VARIANTS] for k in ("seconds", "cpu_seconds"))
            print(
                f"{model} norm_first={norm_first} epoch {epoch + 1} {name}: plain {plain:.2f} s, mhc {mhc:.2f} s, "
                f"ratio {mhc / plain:.3f}; CPU s {cpu_plain:.2f} / {cpu_mhc:.2f}, ratio {cpu_mhc / cpu_plain:.3f}",
                flush=True,
            )
    for server in servers.values():
        server.stdin.close()
        server.wait()
    return measured


def summarise(measured: dict) -> dict:
    """Medians per variant and the mhc/plain ratios (of the medians, and the median of per-epoch ratios)."""
    row = {}
    for key, short in (("seconds", ""), ("cpu_seconds", "cpu_")):
        seconds = measured[key]
        plain, mhc = (statistics.median(seconds[v]) for v in VARIANTS)
        per_epoch = [m / p for p, m in zip(seconds["plain"], seconds["mhc"], strict=True)]
        row |= {f"{short}plain_s": plain, f"{short}mhc_s": mhc, f"{short}ratio_of_medians": mhc / plain,
                f"{short}median_ratio": statistics.median(per_epoch), key: seconds}  # fmt: skip
    return row


def compare_trees(args) -> None:
    """Old checkout vs this one in one run, for each setting in turn (--settings; default: --model, --norm-first).
    Prints a table (wall and CPU seconds, ratios) and writes JSON."""
    trees = {"old": args.compare.resolve(), "new": ROOT}
    names = args.settings.split(",") if args.settings else [None]
    summary = {}
    for setting in names:
        model, norm_first = SETTINGS[setting] if setting else (args.model, args.norm_first)
        label = setting or f"{model}:{'pre' if norm_first else 'post'}"
        measured = compare_setting(args, trees, model, norm_first)
        summary[label] = {name: summarise(measured[name]) for name in trees}
    print(
        f"D={args.hidden}, n={args.streams}, {args.threads} thread(s), {args.epochs} epochs per tree alternating"
        f"{f', first {args.steps} steps' if args.steps else ''}; kernels={args.kernels}; medians; CPU = process_time"
    )
    print("med. ratio: the median of the per-epoch mhc/plain ratios (the robust figure on a shared machine)")
    header = ["setting", "tree", "plain s", "mhc s", "mhc/plain", "med. ratio", "plain CPU", "mhc CPU", "CPU ratio",
              "CPU med. r."]  # fmt: skip
    print(f"{header[0]:14} {header[1]:4} " + " ".join(f"{h:>11}" for h in header[2:]))
    for label, rows in summary.items():
        for name, row in rows.items():
            values = [row[k] for k in ("plain_s", "mhc_s", "ratio_of_medians", "median_ratio", "cpu_plain_s",
                                       "cpu_mhc_s", "cpu_ratio_of_medians", "cpu_median_ratio")]  # fmt: skip
            print(f"{label:14} {name:4} " + " ".join(f"{v:11.3f}" for v in values))
        changes = [f"{v} {rows['new'][f'{v}_s'] / rows['old'][f'{v}_s']:.3f}" for v in VARIANTS]
        cpu_changes = [f"{v} {rows['new'][f'cpu_{v}_s'] / rows['old'][f'cpu_{v}_s']:.3f}" for v in VARIANTS]
        print(f"{label:14} new/old wall: {', '.join(changes)}; CPU: {', '.join(cpu_changes)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "variant"}
    args.out.write_text(json.dumps({"config": config, "trees": {k: str(v) for k, v in trees.items()},
                                    "load_average_after": os.getloadavg(), "summary": summary}, indent=2))  # fmt: skip
    print(f"wrote {args.out}")


def true_false(text: str) -> bool:
    return text.lower() == "true"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (the median is reported)")
    p.add_argument("--steps", type=int, default=0, help="time only this many batches per epoch (0: all 48)")
    p.add_argument("--streams", type=int, default=4, help="mHC expansion rate n")
    p.add_argument("--maxlen", type=int, default=200)
    p.add_argument("--hidden", type=int, default=50, help="hidden units D (the issue's figure is at 50)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--heads", type=int, default=2, help="conf/model/sasrec.yaml default")
    p.add_argument("--norm-first", type=true_false, default=True)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for both variants; 0: torch's default")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast, as hardware=1gpu (trainer.amp=true)")
    p.add_argument("--kernels", choices=["auto", "reference"], default="auto", help="the top-level kernels setting")
    p.add_argument("--compare", type=Path, help="an older checkout: time it against this one in one run")
    p.add_argument(
        "--settings",
        help=f"with --compare: settings timed one after another, comma-separated from {', '.join(SETTINGS)}",
    )
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # child process of --compare
    p.add_argument("--model", choices=["sasrec", "tisasrec"], default="sasrec", help="tisasrec: needs timestamps")
    p.add_argument("--data", type=Path, default=None, help=f"default: {DATA} (sasrec), {DATA_TIMED} (tisasrec)")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process: peak RSS
    p.add_argument("--reuse-memory", type=true_false, default=True, help="glibc thresholds as seqrec.compose sets them")
    p.add_argument("--skip-rss", action="store_true", help="time only (no peak-RSS subprocesses)")
    p.add_argument("--out", type=Path, default=OUT, help="where to write the JSON")
    args = p.parse_args()
    args.data_given = args.data is not None
    if args.settings and (not args.compare or any(name not in SETTINGS for name in args.settings.split(","))):
        p.error(f"--settings needs --compare and names from {', '.join(SETTINGS)}")
    if args.data is None:
        args.data = DATA if args.model == "sasrec" else DATA_TIMED
    if not args.data.exists():
        print(f"skipped: {args.data} not found")
        return
    if args.variant:
        print(json.dumps(peak_rss(args)))
        return
    if args.serve:
        serve(args)
        return
    if args.compare:
        compare_trees(args)
        return

    memory = dict.fromkeys(VARIANTS, {})
    if not args.skip_rss:
        child = [sys.executable, __file__, *sys.argv[1:]]
        for variant in VARIANTS:
            out = subprocess.run(child + ["--variant", variant], capture_output=True, text=True, check=True)
            memory[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    seconds, cpu_seconds, widths, warmup_s = interleaved_times(args)
    summary = {
        v: {
            "epoch_s_median": statistics.median(seconds[v]),
            "epoch_s": seconds[v],
            "warmup_s": warmup_s[v],
            "epoch_cpu_s_median": statistics.median(cpu_seconds[v]),
            "epoch_cpu_s": cpu_seconds[v],
        }
        | memory[v]
        for v in VARIANTS
    }
    plain, mhc = summary["plain"], summary["mhc"]
    ratios = {
        "epoch_time_median": mhc["epoch_s_median"] / plain["epoch_s_median"],
        "epoch_time_per_epoch": [m / q for m, q in zip(mhc["epoch_s"], plain["epoch_s"], strict=True)],
        "epoch_cpu_time_median": mhc["epoch_cpu_s_median"] / plain["epoch_cpu_s_median"],
    }
    if not args.skip_rss:
        ratios["peak_rss"] = mhc["peak_rss_mib"] / plain["peak_rss_mib"]
        if args.device == "cuda":
            ratios["peak_gpu_allocated"] = mhc["peak_gpu_allocated_mib"] / plain["peak_gpu_allocated_mib"]
    threads = torch.get_num_threads()
    print(
        f"{args.model} on {args.data.name}: B={args.batch_size} maxlen={args.maxlen} (length-bucketed, trimmed: "
        "mean width "
        f"{statistics.mean(widths):.1f}) D={args.hidden} blocks=2 heads={args.heads} norm_first={args.norm_first} "
        f"n={args.streams}, {args.device}{' bf16 autocast' if args.amp else ''}, {threads} thread(s), "
        f"{args.epochs} x {len(widths) // args.epochs} interleaved steps per variant"
    )
    nan = float("nan")
    print(f"{'variant':9} {'epoch s (median)':>17} {'peak RSS MiB':>13} {'peak GPU MiB':>13} {'params':>8}")
    for variant, s in summary.items():
        rss, gpu, params = s.get("peak_rss_mib", nan), s.get("peak_gpu_allocated_mib", nan), s.get("params", 0)
        print(f"{variant:9} {s['epoch_s_median']:17.2f} {rss:13.0f} {gpu:13.0f} {params:8d}")
    rss, gpu = ratios.get("peak_rss", nan), ratios.get("peak_gpu_allocated", nan)
    print(f"{'mhc/plain':9} {ratios['epoch_time_median']:17.3f} {rss:13.3f} {gpu:13.3f}")
    print(f"CPU seconds (process_time) mhc/plain: {ratios['epoch_cpu_time_median']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "variant"}
                | {"torch_threads": threads},
                "torch": torch.__version__,
                "seqrec": sys.modules["seqrec"].__file__,  # which checkout was measured
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "load_average_after": os.getloadavg(),
                "mean_batch_width": statistics.mean(widths),
                "summary": summary,
                "ratios": ratios,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
