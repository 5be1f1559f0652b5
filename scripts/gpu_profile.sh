#!/usr/bin/env bash
# Where a step's time goes, on ONE GPU: one optimizer step per phase under the profiler (kernel tables, time per
# category, every kernel in JSON) plus the generated source of each phase's SOURCES slowest Inductor kernels per
# call (profile_<phase>_sources.py), read from a fresh Inductor cache directory. Synthetic tokens, no compile cache.
#   OUT=/tmp/out PRESET=pr1514 SOURCES=12 scripts/gpu_profile.sh
#   EXTRA_ARGS="--set mlp_backend=torch" scripts/gpu_profile.sh     # any bench arguments
set -u
OUT=${OUT:-$PWD/out}
STAGES=profile
PRESET=${PRESET:-pr1514}
SOURCES=${SOURCES:-12}
STEPS=${STEPS:-4}
. scripts/gpu_env.sh
mkdir -p "$OUT/profile"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/golfnb-inductor-profile}
GOLFNB_COMPILE_CACHE=off python3 -m golfnb.bench --preset "$PRESET" --steps "$STEPS" --data synthetic \
  --profile "$OUT/profile" --kernel-sources "$SOURCES" --json "$OUT/profile/bench.json" ${EXTRA_ARGS:-} \
  > "$OUT/profile/bench.log" 2>&1
stamp "profile (rc=$?)"
