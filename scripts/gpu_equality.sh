#!/usr/bin/env bash
# Same model at equal steps: pr1514 trained twice, schedule by step (ITERS steps, no clock, looping from step
# ITERS/2), seed 1337, the same shards, one arm per path, both arms at once on the one GPU (their compiles overlap
# on the host CPUs; timings from this script are not measurements):
#   plain  ce_backend=torch mlp_backend=torch merge_qkv=false (the reference paths: cuBLAS + Inductor only)
#   fast   ce_backend=auto mlp_backend=auto merge_qkv=true (the fused Triton cross-entropy and MLP on CUDA, one
#          q/k/v GEMM)
# FAST_EXTRA adds --set options to the fast arm only (e.g. "--set attn_backend=fa4" where FlashAttention-4 is
# installed; the plain arm then keeps cuDNN SDPA, resolved by auto).
# BATCH sets train_batch_tokens (default: the record's 786,432; a smaller one shortens the check; two arms at the
# record batch need ~80 GB together). DEADLINE (seconds, default 0 = none) stops both arms when reached, and the
# logs written so far are still copied to $OUT.
#   OUT=/tmp/out ITERS=200 BATCH=393216 DEADLINE=400 scripts/gpu_equality.sh
set -u
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
ITERS=${ITERS:-200}
BATCH=${BATCH:-786432}
DEADLINE=${DEADLINE:-0}
t0=$(date +%s); stamp() { echo "[t+$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/timeline.txt"; }
# build the shards once, before the arms start (gpu_report_run.sh builds them when missing)
OUT="$OUT/report_data" RUN="runs/eq_data" STAGES=none scripts/gpu_report_run.sh > "$OUT/data.txt" 2>&1
stamp "data ready (rc=$?)"
for ARM in plain fast; do
  case "$ARM" in
    plain) SETS="--set ce_backend=torch --set mlp_backend=torch --set merge_qkv=false" ;;
    fast) SETS="--set ce_backend=auto --set mlp_backend=auto --set merge_qkv=true ${FAST_EXTRA:-}" ;;
  esac
  OUT="$OUT/report_$ARM" RUN="runs/eq_$ARM" TRAIN_SECONDS=0 STAGES=train \
    EXTRA_SETS="--set iterations=$ITERS --set seed=1337 --set train_batch_tokens=$BATCH $SETS" \
    setsid scripts/gpu_report_run.sh > "$OUT/train_$ARM.txt" 2>&1 &
  pids="${pids:-} $!"
done
alive() { for p in $pids; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while alive; do
  if [ "$DEADLINE" -gt 0 ] && [ $(( $(date +%s) - t0 )) -ge "$DEADLINE" ]; then
    for p in $pids; do kill -9 -- "-$p" 2>/dev/null; done
    pkill -9 -f "golfnb.train" 2>/dev/null  # the trainers run in sessions of their own
    stamp "DEADLINE ${DEADLINE}s reached: arms killed"; break
  fi
  sleep 5
done
wait
stamp "both arms done"
for ARM in plain fast; do
  cp "runs/eq_$ARM/train.log" "$OUT/train_$ARM.log" 2>/dev/null
  cp "runs/eq_$ARM/metrics.jsonl" "$OUT/train_${ARM}_metrics.jsonl" 2>/dev/null
  grep -h "val_bpb" "runs/eq_$ARM/train.log" | tail -3 | sed "s/^/$ARM: /" | tee -a "$OUT/timeline.txt"
done
rm -rf "$OUT"/report_*
