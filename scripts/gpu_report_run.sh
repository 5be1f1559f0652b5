#!/usr/bin/env bash
# A report run (default preset pr1514) on ONE offline GPU machine, from the repository checkout plus a bundle made by
# scripts/make_offline_bundle.sh (and optional wheels in .whl/ for packages the machine lacks).
# Builds sp8192 shards from the bundled text (once per machine), then runs the chosen stages and leaves results
# under $OUT after every stage:
#   train      train with a short clock; KILL_AT_STEP=N kills it (SIGKILL) once a checkpoint exists and step N is
#              logged, then resumes it with empty compiler caches, so only golfnb's persisted compile cache helps
#   warmstart  a second, fresh run of the same config for WARM_SECONDS (30) of clock with empty Inductor/Triton caches: its
#              start-up is warm only through golfnb's persisted compile cache (~/.cache/golfnb), as on a new machine
#   quantize   Hessians + GPTQ + the artifact (COMPRESSOR, brotli by default)
#   roundtrip  the plain eval of the unquantized final model and of the dequantized artifact
#   eval       METHODS on the artifact (scoring forward compiled on CUDA: eval_compile=auto)
#   eager      the same METHODS again with eval_compile=off, in a copy of the run, for the speed comparison
#              (EAGER_SETS="--eval-set max_val_tokens=N" shortens it)
#   OUT=/tmp/out RUN=runs/<id> TRAIN_SECONDS=92 scripts/gpu_report_run.sh
#   STAGES=train,quantize,roundtrip KILL_AT_STEP=60 TRAIN_SECONDS=160 scripts/gpu_report_run.sh
#   NPROC=8 TRAIN_SECONDS=600 METHODS=plain,sliding,ttt+tilt scripts/gpu_report_run.sh   # the challenge's scale
# A run directory saved by an earlier call (run.tgz + artifact.part* copied into $BUNDLE/) is restored first,
# so the eval stages can run on a fresh machine.
set -u
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
L=$(mktemp -d)  # logs, bundled into $OUT/logs.tgz after every stage (few files travel back)
BUNDLE=${BUNDLE:-.carry}
RUN=${RUN:-runs/gpu_pr1514}
TRAIN_SECONDS=${TRAIN_SECONDS:-92}
PRESET=${PRESET:-pr1514}
NPROC=${NPROC:-1}            # GPUs for training (torchrun when > 1)
COMPRESSOR=${COMPRESSOR:-brotli}  # brotli needs its wheel in .whl/ on machines without it; zstd is slower and larger
METHODS=${METHODS:-}         # eval methods, comma-separated (default: the config's passes), e.g. plain,sliding,ttt+tilt
STAGES=${STAGES:-train,quantize,eval}
KILL_AT_STEP=${KILL_AT_STEP:-0}
VOCAB=${VOCAB:-8192}
export PYTHONUNBUFFERED=1
t0=$(date +%s); stamp() { echo "[t+$(( $(date +%s) - t0 ))s] $*" | tee -a "$L/timeline.txt"; }
has() { [[ ",$STAGES," == *",$1,"* ]]; }
. scripts/gpu_pythonpath.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$L/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$L/gpu.txt" 2>&1
stamp "start"
D=/tmp/golfnb-data
if [ ! -f $D/datasets/fineweb10B_sp${VOCAB}/fineweb_val_000000.bin ]; then
  mkdir -p $D/tokenizers; cp "$BUNDLE"/*.model $D/tokenizers/
  xz -dc -T0 "$BUNDLE"/wiki_text.jsonl.xz > /tmp/wiki.jsonl
  xz -dc "$BUNDLE"/val_docs.jsonl.xz > /tmp/val_docs.jsonl
  python3 -m golfnb.data.cli build --input /tmp/wiki.jsonl --val-input /tmp/val_docs.jsonl \
    --tokenizer $D/tokenizers/fineweb_${VOCAB}_bpe.model --out $D/datasets/fineweb10B_sp${VOCAB} > "$L/build.log" 2>&1
  stamp "shards built (rc=$?)"
fi
if [ ! -f "$RUN/config.json" ] && [ -f "$BUNDLE/run.tgz" ]; then
  tar xzf "$BUNDLE/run.tgz"; mkdir -p "$RUN/artifacts"
  cat "$BUNDLE"/artifact.part* > "$RUN/artifacts/model.gnb" 2>/dev/null
  stamp "run directory restored from $BUNDLE"
fi
save() { tar czf "$OUT/run.tgz" --exclude='*.pt' --exclude='artifacts' --exclude='checkpoints' --exclude='cache' \
           "$RUN" 2>/dev/null; tar czf "$OUT/logs.tgz" -C "$L" . 2>/dev/null; }
tar czf "$OUT/logs.tgz" -C "$L" .

if [ "$NPROC" -gt 1 ]; then TRAIN="python3 -m torch.distributed.run --standalone --nproc_per_node $NPROC -m golfnb.train"
else TRAIN="python3 -m golfnb.train"; fi
last_step() { python3 -c "import json,sys
s=0
for line in open(sys.argv[1]):
    r=json.loads(line); s=max(s, r.get('step', 0)) if r.get('kind') == 'train' else s
print(s)" "$RUN/metrics.jsonl" 2>/dev/null || echo 0; }
SETS="--set max_wallclock_seconds=$TRAIN_SECONDS --set warmup_steps=2 --set val_loss_every=0 --set train_log_every=5
    --set compressor=$COMPRESSOR ${EXTRA_SETS:-}"
if has train; then
  date +%s.%N > "$L/launch_first.txt"
  # its own session, so that a kill reaches torchrun's workers too
  setsid $TRAIN --preset "$PRESET" --data-dir $D --run-dir "$RUN" $SETS > "$L/train_stdout.log" 2>&1 &
  pid=$!
  if [ "$KILL_AT_STEP" -gt 0 ]; then
    while kill -0 $pid 2>/dev/null; do
      if [ -f "$RUN/checkpoints/LATEST" ] && [ "$(last_step)" -ge "$KILL_AT_STEP" ]; then
        kill -9 -- -$pid; stamp "SIGKILL at logged step $(last_step), checkpoint $(cat $RUN/checkpoints/LATEST)"; break
      fi
      sleep 0.5
    done
  fi
  wait $pid; stamp "trained (rc=$?)"; save
  if [ "$KILL_AT_STEP" -gt 0 ]; then
    date +%s.%N > "$L/launch_resume.txt"
    # empty Inductor/Triton/golfnb caches: a resume on another machine has only the run directory
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) GOLFNB_CACHE_DIR=$(mktemp -d) \
      $TRAIN --resume "$RUN" > "$L/resume_stdout.log" 2>&1
    stamp "resumed (rc=$?)"; save
  fi
fi
if has warmstart; then
  W="${RUN}_warmstart"; rm -rf "$W"
  date +%s.%N > "$L/launch_warmstart.txt"
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) \
    $TRAIN --preset "$PRESET" --data-dir $D --run-dir "$W" $SETS --set max_wallclock_seconds=${WARM_SECONDS:-30} \
    > "$L/warmstart_stdout.log" 2>&1
  stamp "warm start run (rc=$?)"; cp "$W/train.log" "$L/warmstart_train.log"; cp "$W/metrics.jsonl" "$L/warmstart_metrics.jsonl"
  save
fi
if has quantize; then
  python3 -m golfnb.headless --run-dir "$RUN" --stages quantize > "$L/quantize.log" 2>&1
  stamp "quantized (rc=$?)"; save
  if [ -f "$RUN/artifacts/model.gnb" ]; then split -b 15000000 -d "$RUN/artifacts/model.gnb" "$OUT/artifact.part"; fi
fi
if has roundtrip; then
  python3 -m golfnb.headless --run-dir "$RUN" --stages eval --methods plain --source final > "$L/roundtrip_final.log" 2>&1
  cp "$RUN/evals/plain.json" "$L/plain_final.json" 2>/dev/null
  python3 -m golfnb.headless --run-dir "$RUN" --stages eval --methods plain > "$L/roundtrip_artifact.log" 2>&1
  stamp "roundtrip evaluated (rc=$?)"; save
fi
if has eval; then
  python3 -m golfnb.headless --run-dir "$RUN" --stages eval ${METHODS:+--methods $METHODS} > "$L/eval.log" 2>&1
  stamp "evaluated (rc=$?)"; save
fi
if has eager; then
  E=/tmp/eager_run; rm -rf $E; cp -r "$RUN" $E; rm -rf $E/evals
  python3 -m golfnb.headless --run-dir $E --stages eval ${METHODS:+--methods $METHODS} --eval-set eval_compile=off \
    ${EAGER_SETS:-} > "$L/eval_eager.log" 2>&1
  stamp "evaluated eagerly (rc=$?)"; cp -r $E/evals "$L/evals_eager" 2>/dev/null; save
fi
ls -la "$OUT"
