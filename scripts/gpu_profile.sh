#!/usr/bin/env bash
# Where a step's time goes, on ONE GPU: one optimizer step per phase under the profiler (kernel tables, time per
# category, every kernel in JSON) plus the generated source of each phase's SOURCES slowest Inductor kernels per
# call (profile_<phase>_sources.py), read from a fresh Inductor cache directory. Synthetic tokens, no compile cache.
#   OUT=/tmp/out PRESET=pr1514 SOURCES=12 scripts/gpu_profile.sh
#   NAME=limit24 EXTRA_ARGS="--set compile_fusion_io_limit=24" scripts/gpu_profile.sh   # an arm: any bench arguments
# Several arms in one call: export TRITON_CACHE_DIR=/tmp/triton-shared first, so that later arms reuse the
# compiled kernels they share with earlier ones (the sources are still read from each arm's own Inductor cache).
set -u
OUT=${OUT:-$PWD/out}
STAGES=profile
PRESET=${PRESET:-pr1514}
SOURCES=${SOURCES:-12}
STEPS=${STEPS:-4}
. scripts/gpu_env.sh
NAME=${NAME:-profile}  # the folder under $OUT, so that several arms can run in one call
mkdir -p "$OUT/$NAME"
# a fresh cache per arm: its kernels are then exactly the ones this arm compiled
export TORCHINDUCTOR_CACHE_DIR=/tmp/golfnb-inductor-$NAME
GOLFNB_COMPILE_CACHE=off python3 -m golfnb.bench --preset "$PRESET" --steps "$STEPS" --data synthetic \
  --profile "$OUT/$NAME" --kernel-sources "$SOURCES" --json "$OUT/$NAME/bench.json" ${EXTRA_ARGS:-} \
  > "$OUT/$NAME/bench.log" 2>&1
stamp "profile $NAME ${EXTRA_ARGS:-} (rc=$?)"
