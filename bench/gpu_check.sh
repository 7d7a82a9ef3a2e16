#!/usr/bin/env bash
# The GPU check: every GPU figure in one prepared run, under 8 minutes on one GPU, results as JSON.
#
#   bash bench/gpu_check.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else bench/results/gpu_check)
#
# Steps, each with its own time limit so that one hang cannot eat the budget: the environment (seqrec.doctor),
# the GPU tests (pytest -m gpu: AMP paths, NCCL workers, the GPU kernel plug-ins against their references, Triton
# compiled for real), then bench/bench_gpu.py (epoch and evaluation seconds of the four variants, their ratios, and
# the minutes the headline model needs to reach its quality). Needs the ML-1M files in ../shared/data (or
# SEQREC_DATA). Writes OUT_DIR/gpu_check.json, with every step's log beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results/gpu_check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
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
step install 120 python -m pip install -q -e . triton
step doctor 60 python -m seqrec.doctor --no-smoke
step gpu_tests 150 python -m pytest -q -m gpu -p no:cacheprovider tests
step bench 270 python bench/bench_gpu.py --out "$out/bench_gpu.json"

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
