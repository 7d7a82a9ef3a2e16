#!/usr/bin/env bash
# The depth question for mHC: plain against mHC at 2, 4 and 8 blocks, 3 seeds each, on ML-1M (SASRec) and on the
# timestamped half of ML-1M (TiSASRec); every run full-ranking, validation-selected, trained to the end of its
# annealed schedule (conf/experiment/depth_*.yaml). Then the report: one table (mean ± 95 % CI over seeds), per
# depth and data set the paired difference mHC - plain over seeds and over test users, the training-stability
# table (loss rises, validation drops, mHC gains) and a plot of test NDCG@10 against depth (<out>/compare/).
#
#   bash bench/depth_study.sh [--device cuda|cpu] [--parallel N] [--seeds 1,2,3] [--depths "2 4 8"]
#                             [--data ml1m,half] [--out DIR] [--report-only] [-- OVERRIDE ...]
#
# Overrides after "--" go to every run, e.g. a follow-up with deeper stacks and a longer budget in its own folder:
#   bash bench/depth_study.sh --device cuda --depths "8 16" --out outputs/depth_long -- trainer.num_epochs=60
#
# 36 runs. On 2 CPU cores (--parallel 2, one thread each) a hidden-64 SASRec run takes 9-30 minutes (8 blocks with
# mHC: the longest); on one GPU, run several at once (--parallel 4). Finished runs are kept, unfinished ones continue
# from their last checkpoint (written every epoch and every 5 minutes): rerunning the command resumes the study.
set -euo pipefail
cd "$(dirname "$0")/.."
device=auto parallel=2 seeds=1,2,3 depths="2 4 8" data=ml1m,half out=outputs/depth_study report_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --parallel) parallel=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    --depths) depths=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --report-only) report_only=1; shift ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
pairs=()  # "plain mhc" experiment names per data set
for d in ${data//,/ }; do
  case "$d" in
    ml1m) pairs+=("depth_ml1m_sasrec_plain depth_ml1m_sasrec_mhc") ;;
    half) pairs+=("depth_half_tisasrec_plain depth_half_tisasrec_mhc") ;;
    *) echo "error: --data takes ml1m and/or half, got '$d'" >&2; exit 2 ;;
  esac
done
if [ "$report_only" = 0 ]; then
  for pair in "${pairs[@]}"; do
    for blocks in $depths; do
      python bench/reproduce.py --experiments "${pair// /,}" --seeds "$seeds" --device "$device" \
        --parallel "$parallel" --out "$out/blocks$blocks" "model.num_blocks=$blocks" "trainer.checkpoint_every_min=5" "$@"
    done
  done
fi
python -m seqrec.results "$out" --metrics test/ndcg@10,test/hr@10,val/ndcg@10 --stability
for pair in "${pairs[@]}"; do
  read -r plain mhc <<< "$pair"
  for blocks in $depths; do
    [ -d "$out/blocks$blocks/$plain" ] && [ -d "$out/blocks$blocks/$mhc" ] || continue
    echo "== $blocks blocks: $mhc - $plain"
    for over in seeds users; do
      # a depth with fewer than 2 paired seeds says so (on stderr) and the report goes on
      { python -m seqrec.results "$out/blocks$blocks" --metrics test/ndcg@10,test/hr@10 --paired "$plain" "$mhc" \
        --over "$over" || true; } | sed -n '/^test/p'
    done
  done
done
python -m seqrec.compare "$out"/blocks* --metric test/ndcg@10 --out "$out/compare" > /dev/null
echo "plots: $out/compare/"
