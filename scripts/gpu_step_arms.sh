#!/usr/bin/env bash
# The training benchmark (pr1514, synthetic tokens, both phases) once per arm, all arms on one machine in one
# sitting, so that their ratios count. Each arm is a name and the --set options it adds:
#   ARMS="base: qkv:--set merge_qkv=true" OUT=/tmp/out scripts/gpu_step_arms.sh
# An arm may also set an environment variable for its run with env:NAME=VALUE (e.g. env:GOLFNB_MLP_TILE=...).
# STEPS timed steps per phase (default 5), WARMUP compile warm-up steps (default 4: enough to compile both
# graphs; the preset's 20 only matter for a real run's start). Writes OUT/bench_<name>.{json,log}.
set -u
OUT=${OUT:-$PWD/out}
STAGES=bench
PRESET=${PRESET:-pr1514}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-4}
. scripts/gpu_env.sh
IFS=';' read -ra arms <<< "${ARMS:?set ARMS, e.g. ARMS='base:;qkv:--set merge_qkv=true'}"
for arm in "${arms[@]}"; do
  name=${arm%%:*}; rest=${arm#*:}
  sets=(); envs=()
  for word in $rest; do
    case "$word" in env:*) envs+=("${word#env:}") ;; *) sets+=("$word") ;; esac
  done
  env "${envs[@]}" python3 -m golfnb.bench --preset "$PRESET" --steps "$STEPS" --data synthetic \
    --set warmup_steps="$WARMUP" "${sets[@]}" --json "$OUT/bench_$name.json" > "$OUT/bench_$name.log" 2>&1
  stamp "bench $name: ${rest:-defaults} (rc=$?)"
  grep -h "phase" "$OUT/bench_$name.log" | tail -2 | sed "s/^/  $name /" | tee -a "$OUT/timeline.txt"
done
