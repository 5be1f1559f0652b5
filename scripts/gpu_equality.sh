#!/usr/bin/env bash
# Same model at equal steps: one pr1514 training arm per call, schedule by step (ITERS steps, no clock, looping
# from step ITERS/2), seed 1337, the same shards; the final val_bpb of each arm is compared afterwards with
# scripts/compare_arms.py. Arms:
#   plain  ce_backend=torch mlp_backend=torch (the reference paths: cuBLAS + Inductor only)
#   fast   the defaults (auto: the fused Triton cross-entropy and MLP on CUDA)
#   OUT=/tmp/out ARM=plain ITERS=200 scripts/gpu_equality.sh
set -u
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
ARM=${ARM:?set ARM=plain or ARM=fast}
ITERS=${ITERS:-200}
case "$ARM" in
  plain) SETS="--set ce_backend=torch --set mlp_backend=torch" ;;
  fast) SETS="--set ce_backend=auto --set mlp_backend=auto" ;;
  *) echo "ARM=$ARM: use plain or fast" >&2; exit 2 ;;
esac
OUT="$OUT/report_$ARM" RUN="runs/eq_$ARM" TRAIN_SECONDS=0 STAGES=train \
  EXTRA_SETS="--set iterations=$ITERS --set seed=1337 $SETS" scripts/gpu_report_run.sh > "$OUT/train_$ARM.txt" 2>&1
echo "arm $ARM rc=$?" >> "$OUT/timeline.txt"
cp "runs/eq_$ARM/train.log" "$OUT/train_$ARM.log" 2>/dev/null
cp "runs/eq_$ARM/metrics.jsonl" "$OUT/train_${ARM}_metrics.jsonl" 2>/dev/null
tar xzf "$OUT/report_$ARM/logs.tgz" -O ./timeline.txt >> "$OUT/timeline.txt" 2>/dev/null
rm -rf "$OUT/report_$ARM"
