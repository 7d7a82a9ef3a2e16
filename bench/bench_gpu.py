"""The GPU figures, measured through `train.py` itself: epoch and evaluation seconds of the four variants, what
strict determinism and `trainer.compile` cost or save, and the minutes the headline model needs to reach its
full-ranking quality.

    python bench/bench_gpu.py [--data ../shared/data] [--out bench/results/gpu.json] [--skip-quality] [--budget-s S]
    python bench/bench_gpu.py --smoke          # a few seconds on the CPU with the bundled data: checks the plumbing

Cases, in order of priority (a case that no longer fits in --budget-s is skipped and listed under "skipped"):
SASRec on ML-1M (the headline epoch and evaluation); SASRec, TiSASRec, each with mHC (the variant ratios); SASRec
and TiSASRec with trainer.deterministic=false (the price of bitwise reproducibility); SASRec and TiSASRec with
trainer.compile=true and sampler.length_buckets=4 (compilation falls in the dropped first epoch; not in --smoke,
where inductor would compile C++ for minutes); the quality run.

Each case is one real run (`python train.py ... hardware=1gpu`) in its own process; the numbers are read back from
the run's `metrics.jsonl` (cumulative `train/seconds` per epoch) and `results.json` (`eval_seconds`: one validation
plus the test, `train_seconds`, metrics). The first epoch (warm-up: CUDA context, kernel compilation, allocator
growth) is dropped and the median of the remaining epochs is reported. Ratios are taken between cases of one run of
this script, on the same data: GPUs drift less than these 2-core CPUs, but a table of one sitting is still the only
fair comparison.

Settings: the SASRec paper's (maxlen 200, hidden 50, 2 blocks, 1 head, dropout 0.2, batch 128, BCE), bf16 autocast.
SASRec's absolute figures use the SASRec ML-1M file; the variant ratios use the timestamped half of ML-1M (users
1-2,999 with timestamps), since TiSASRec needs timestamps. The quality case is the experiment
`ml1m_half_tisasrec_mhc_recipe` (TiSASRec + mHC, full CE, hidden 256, 20 annealed epochs) on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAPER = [
    "model.maxlen=200",
    "model.hidden_units=50",
    "model.num_blocks=2",
    "model.num_heads=1",
    "model.dropout_rate=0.2",
    "loss=bce",
    "trainer.progress=false",
]
VARIANTS = {
    "sasrec": ["model=sasrec", "residual=plain"],
    "tisasrec": ["model=tisasrec", "residual=plain"],
    "sasrec_mhc": ["model=sasrec", "residual=mhc"],
    "tisasrec_mhc": ["model=tisasrec", "residual=mhc"],
}
NONDETERMINISTIC = ["trainer.deterministic=false"]
COMPILED = ["trainer.compile=true", "sampler.length_buckets=4"]
MIN_CASE_S = 20  # a case is not started with less budget left (startup, data, four short epochs)
MIN_COMPILE_CASE_S = 60  # compilation of the forward, loss and backward comes on top
# the figures the GPU work is held to (one H200, bf16), as (case or ratio, limit)
TARGETS = {
    "sasrec_ml1m.epoch_s": 0.25,
    "sasrec_ml1m.eval_s": 0.2,
    "ratio.sasrec_mhc/sasrec": 1.2,
    "ratio.tisasrec_mhc/tisasrec": 1.2,
    "ratio.tisasrec/sasrec": 1.5,
    "ratio.tisasrec_mhc/sasrec": 1.8,
}


def data_overrides(data: Path, timed: bool) -> list[str]:
    if timed:
        path = data / "ml-1m" / "ratings_users0001-2999.dat"
        return ["dataset=file", f"dataset.path={path}", "dataset.min_item_interactions=5"]
    return ["dataset=file", f"dataset.path={data / 'ml-1m.txt'}"]


def train(overrides: list[str], run_dir: Path, timeout_s: float) -> dict:
    """One `train.py` run; returns its per-epoch seconds, evaluation seconds and results."""
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail), "command": " ".join(cmd)}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    cumulative = [x["train/seconds"] for x in lines if "train/seconds" in x]
    epochs = [b - a for a, b in zip([0.0] + cumulative[:-1], cumulative, strict=True)]
    results = json.loads((run_dir / "results.json").read_text())
    timed = epochs[1:] or epochs
    return {
        "epoch_s": statistics.median(timed),
        "epochs_s": [round(e, 4) for e in epochs],
        "eval_s": results["eval_seconds"],
        "train_s": results["train_seconds"],
        "wall_s": round(wall, 2),
        "test/ndcg@10": results.get("test/ndcg@10"),
        "test/hr@10": results.get("test/hr@10"),
        "command": " ".join(cmd),
    }


def machine() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": "cpu"}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability(0))
    return info


def cases_in_order(args) -> dict[str, list[str]]:
    """Case name -> train.py overrides, the most wanted first."""
    if args.smoke:  # the bundled data, two short epochs on the CPU: the plumbing, not a figure
        base = ["hardware=cpu", "dataset.num_users=300", "model.maxlen=30", "model.hidden_units=32"]
        ml1m = half = []
    else:
        base, ml1m, half = ["hardware=1gpu", *PAPER], data_overrides(args.data, False), data_overrides(args.data, True)
    cases = {"sasrec_ml1m": base + ml1m + VARIANTS["sasrec"]}
    cases |= {name: base + half + over for name, over in VARIANTS.items()}
    for model in ("sasrec", "tisasrec"):
        cases[f"{model}_nondeterministic"] = base + half + VARIANTS[model] + NONDETERMINISTIC
    if not args.smoke:
        for model in ("sasrec", "tisasrec"):
            cases[f"{model}_compiled"] = base + half + VARIANTS[model] + COMPILED
    return cases


def measure(args) -> dict:
    out: dict = {"machine": machine(), "cases": {}, "skipped": {}, "targets": {}}
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    epochs = [f"trainer.num_epochs={args.epochs}", f"trainer.eval_every={args.epochs}"]
    deadline = time.monotonic() + args.budget_s

    def fits(name: str) -> float:
        """Seconds this case may run (0: skip it), within the budget and the per-run limit."""
        left = deadline - time.monotonic()
        return min(args.timeout_s, left) if left >= (MIN_COMPILE_CASE_S if "compiled" in name else MIN_CASE_S) else 0

    for name, overrides in cases_in_order(args).items():
        if not (limit := fits(name)):
            out["skipped"][name] = "budget"
            print(f"{name:<24} skipped: the budget of {args.budget_s:.0f} s is spent", flush=True)
            continue
        result = train(overrides + epochs, work / name, limit)
        out["cases"][name] = result
        shown = f"{result['epoch_s']:.3f} s/epoch, eval {result['eval_s']:.3f} s" if "error" not in result else result
        print(f"{name:<24} {shown}", flush=True)
    if not args.skip_quality and not args.smoke:
        quality = ["experiment=ml1m_half_tisasrec_mhc_recipe", "hardware=1gpu", "seed=1", "trainer.progress=false"]
        if limit := fits("quality"):
            result = train(quality, work / "quality", limit)
            out["cases"]["quality_tisasrec_mhc_recipe"] = result
            if "error" not in result:
                result["minutes"] = round(result["wall_s"] / 60, 2)
                print(f"quality        {result['minutes']} min, test NDCG@10 {result['test/ndcg@10']:.4f}", flush=True)
        else:
            out["skipped"]["quality_tisasrec_mhc_recipe"] = "budget"
    ok = {k: v for k, v in out["cases"].items() if "error" not in v}
    figures = {f"{name}.{field}": ok[name][field] for name in ok for field in ("epoch_s", "eval_s")}
    for a, b in (
        ("sasrec_mhc", "sasrec"),
        ("tisasrec_mhc", "tisasrec"),
        ("tisasrec", "sasrec"),
        ("tisasrec_mhc", "sasrec"),
    ):
        if a in ok and b in ok:
            figures[f"ratio.{a}/{b}"] = round(ok[a]["epoch_s"] / ok[b]["epoch_s"], 3)
    for model in ("sasrec", "tisasrec"):  # > 1: what determinism costs; < 1: what compile saves
        for variant in ("nondeterministic", "compiled"):
            a, b = model, f"{model}_{variant}"
            if a in ok and b in ok:
                figures[f"ratio.{a}/{b}"] = round(ok[a]["epoch_s"] / ok[b]["epoch_s"], 3)
    out["figures"] = figures
    for key, limit in TARGETS.items():
        value = figures.get(key)
        out["targets"][key] = {"value": value, "limit": limit, "met": value is not None and value <= limit}
    quality = ok.get("quality_tisasrec_mhc_recipe")
    if quality:
        out["targets"]["quality: test ndcg@10 (>= 0.19), minutes"] = {
            "value": quality["test/ndcg@10"],
            "minutes": quality["minutes"],
            "met": quality["test/ndcg@10"] >= 0.19,
        }
    return out


def table(result: dict) -> str:
    rows = ["| figure | value | target | met |", "|---|---|---|---|"]
    for key, t in result["targets"].items():
        value = "n/a" if t["value"] is None else f"{t['value']:.4g}"
        limit = f"<= {t['limit']}" if "limit" in t else f"{t['minutes']} min"
        rows.append(f"| {key} | {value} | {limit} | {'yes' if t['met'] else 'NO'} |")
    others = {k: v for k, v in result.get("figures", {}).items() if k not in result["targets"] and "ratio" in k}
    rows += ["", "| other ratio (epoch seconds) | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in others.items()]
    rows += [f"skipped (budget): {', '.join(result['skipped'])}"] if result.get("skipped") else []
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("SEQREC_DATA", REPO.parent / "shared" / "data")))
    p.add_argument("--epochs", type=int, default=4, help="epochs per speed case (the first is dropped)")
    p.add_argument("--timeout-s", type=float, default=300, help="per run")
    p.add_argument("--budget-s", type=float, default=3600, help="all runs together: later cases are skipped")
    p.add_argument("--skip-quality", action="store_true", help="skip the time-to-quality run")
    p.add_argument("--smoke", action="store_true", help="CPU, bundled data, 2 epochs: checks the script")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs = 2
    elif not (args.data / "ml-1m.txt").is_file():
        print(f"bench_gpu: {args.data / 'ml-1m.txt'} not found (set --data or SEQREC_DATA)", file=sys.stderr)
        return 1
    result = measure(args)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all("error" not in c for c in result["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
