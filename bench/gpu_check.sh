#!/usr/bin/env bash
# The GPU check: every GPU figure in one prepared run, under 8 minutes on one GPU, results as JSON.
#
#   bash bench/gpu_check.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else bench/results/gpu_check)
#
# Steps, each with its own time limit so that one hang cannot eat the budget (limits sum to 460 s of the 480):
#   install   60 s  the working tree as the package (the tree is also on PYTHONPATH, should pip be offline)
#   doctor    40 s  the environment (seqrec.doctor)
#   gpu_tests 170 s pytest -m gpu: AMP paths, NCCL workers, the GPU plug-ins against their references (Triton
#                   compiled for real, FlashAttention forced), TiSASRec's sort-free sums, a step under
#                   set_sync_debug_mode("error") for both models and three losses, two strict deterministic
#                   runs per model compared bit for bit
#   bench     190 s bench/bench_gpu.py within a 180 s budget, cases in order of priority (SASRec ML-1M epoch and
#                   evaluation; the four variants; deterministic off; trainer.compile on; the quality run) with
#                   those that no longer fit listed as skipped
# Needs the ML-1M files in ../shared/data (or SEQREC_DATA) for the bench. Writes OUT_DIR/gpu_check.json, with every
# step's log beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results/gpu_check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

step() { # step NAME SECONDS COMMAND...: run it under a time limit, keep its log and its exit status
    local name=$1 limit=$2
    shift 2
    local t0
    t0=$(date +%s)
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0))}" >>"$out/steps.jsonl"
    echo "== $name: rc=$rc in $(($(date +%s) - t0)) s"
    tail -n 15 "$out/$name.log"
}

# a fresh device machine has the working tree, not the installed package
step install 60 python -m pip install -q -e . triton
step doctor 40 python -m seqrec.doctor --no-smoke
step gpu_tests 170 python -m pytest -q -m gpu -p no:cacheprovider --durations=15 tests
step bench 190 python bench/bench_gpu.py --budget-s 180 --timeout-s 120 --out "$out/bench_gpu.json"

python - "$out" "$start" <<'PY'
import json
import sys
import time
from pathlib import Path

out = Path(sys.argv[1])
steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines() if x.strip()]
bench = out / "bench_gpu.json"
result = {
    "steps": steps,
    "total_seconds": round(time.time() - float(sys.argv[2]), 1),
    "bench": json.loads(bench.read_text()) if bench.is_file() else None,
}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
print(f"wrote {out / 'gpu_check.json'} ({result['total_seconds']} s)")
PY
