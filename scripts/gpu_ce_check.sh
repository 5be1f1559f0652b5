#!/usr/bin/env bash
# The fused soft-capped cross-entropy on ONE GPU, both arms on the same machine (ratios only count that way):
#   sweep  the kernel alone (gradient in place) at pr1514's [98,304 x 8,192] bf16 logits, per block size, warp
#          count and math (fast=0: correctly rounded divisions): ms and effective bandwidth (one read + one write)
#   op     the LM head + CE alone at pr1514's micro-step shape, ce_backend torch vs triton (python -m golfnb.bench --ce-only)
#   test   tests/test_fused_ce.py and the CE benchmark test on CUDA (compiled kernel, pr1514 shapes)
#   bench  the training benchmark (both phases) with ce_backend=torch, then =triton, synthetic tokens
#   train  a short pr1514 run per arm, same seed and data, schedule by step (ITERS steps, no clock), then the final
#          val_bpb of each: the fused path must train the same model (delegates to scripts/gpu_report_run.sh)
#   OUT=/tmp/out STAGES=op,test,bench scripts/gpu_ce_check.sh
#   OUT=/tmp/out STAGES=train ITERS=80 scripts/gpu_ce_check.sh
set -u
OUT=${OUT:-$PWD/out}
STAGES=${STAGES:-op,test,bench}
PRESET=${PRESET:-pr1514}
STEPS=${STEPS:-8}
ITERS=${ITERS:-80}
. scripts/gpu_env.sh
if has sweep; then
  python3 - > "$OUT/sweep.log" 2>&1 <<'PY'
import torch
from golfnb import _triton_ce
from golfnb.bench import median_ms
N, V = 98304, 8192
g = torch.Generator(device="cuda").manual_seed(0)
z0 = (torch.randn(N, V, device="cuda", generator=g) * 3).bfloat16()
t = torch.randint(0, V, (N,), device="cuda", generator=g)
z = z0.clone()
ref, _ = _triton_ce.softcap_ce(z0, t, 30.0, False, fast=False)
for block, warps, fast in [(8192, 16, False), (8192, 8, False), (2048, 4, False), (8192, 8, True), (8192, 16, True),
                           (8192, 32, True), (4096, 8, True), (2048, 4, True), (2048, 8, True)]:
    out = []
    m = median_ms(lambda: out.append(_triton_ce.softcap_ce(z, t, 30.0, True, block=block, num_warps=warps,
                                                           inplace=True, fast=fast)[0]),
                  reps=10, warmup=2, setup=lambda: z.copy_(z0))  # the kernel overwrites z with its gradient
    loss = out[-1]
    err = (loss - ref).abs().max().item()
    print(f"sweep block:{block} num_warps:{warps} fast:{int(fast)} ms:{m:.3f} GB_s:{2 * N * V * 2 / m / 1e6:.0f} max_loss_diff:{err:.2e}")
PY
  stamp "kernel sweep (rc=$?)"
fi
if has op; then
  python3 -m golfnb.bench --preset "$PRESET" --ce-only --steps 20 --json "$OUT/ce_op.json" > "$OUT/ce_op.log" 2>&1
  stamp "op bench (rc=$?)"
fi
if has test; then
  python3 -m pytest tests/test_fused_ce.py "tests/test_bench.py::test_ce_bench_times_each_backend_on_the_same_inputs" \
    -q -p no:cacheprovider > "$OUT/pytest.log" 2>&1
  stamp "tests (rc=$?)"
fi
if has bench; then
  bench_arms ce_backend bench torch triton
fi
if has train; then
  for arm in torch triton; do
    OUT="/tmp/ce_report_$arm" RUN="runs/ce_$arm" PRESET="$PRESET" TRAIN_SECONDS=0 STAGES=train \
      EXTRA_SETS="--set iterations=$ITERS --set ce_backend=$arm --set seed=1337" scripts/gpu_report_run.sh \
      > "$OUT/train_$arm.txt" 2>&1
    stamp "train ce_backend=$arm (rc=$?)"
    # flat in $OUT, next to the other results
    cp "runs/ce_$arm/train.log" "$OUT/train_${arm}.log" 2>/dev/null
    cp "runs/ce_$arm/metrics.jsonl" "$OUT/train_${arm}_metrics.jsonl" 2>/dev/null
  done
fi
