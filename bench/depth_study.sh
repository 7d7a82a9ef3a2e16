#!/usr/bin/env bash
# The depth question for mHC: plain against mHC at 2, 4 and 8 blocks, 3 seeds each, on ML-1M (SASRec) and on the
# timestamped half of ML-1M (TiSASRec); every run full-ranking, validation-selected, trained to the end of its
# annealed schedule (conf/experiment/depth_*.yaml). Then one table, mean ± 95 % CI over seeds, per depth.
#
#   bash bench/depth_study.sh [--device cuda|cpu] [--parallel N] [--seeds 1,2,3] [--depths "2 4 8"] [--out DIR]
#
# 36 runs. On 2 CPU cores a hidden-64 run takes tens of minutes (8 blocks: the longest); on one GPU, run several at
# once (--parallel 4). Finished runs are kept, unfinished ones continue: rerunning the command resumes the study.
set -euo pipefail
cd "$(dirname "$0")/.."
device=auto parallel=2 seeds=1,2,3 depths="2 4 8" out=outputs/depth_study
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --parallel) parallel=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    --depths) depths=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "error: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
experiments=depth_ml1m_sasrec_plain,depth_ml1m_sasrec_mhc,depth_half_tisasrec_plain,depth_half_tisasrec_mhc
for blocks in $depths; do
  python bench/reproduce.py --experiments "$experiments" --seeds "$seeds" --device "$device" --parallel "$parallel" \
    --out "$out/blocks$blocks" "model.num_blocks=$blocks"
done
python -m seqrec.results "$out" --metrics test/ndcg@10,test/hr@10,val/ndcg@10,train_seconds
