#!/usr/bin/env bash
# A report run (default preset pr1514) on ONE offline GPU machine, from the repository checkout plus a bundle made by
# scripts/make_offline_bundle.sh (and optional wheels in .whl/ for packages the machine lacks).
# Builds sp8192 shards from the bundled text, trains with a short clock, quantizes, evaluates the
# quantized model (plain, sliding, TTT + tilt), and leaves results under $OUT after every stage.
#   OUT=/tmp/out RUN=runs/<id> TRAIN_SECONDS=92 scripts/gpu_report_run.sh
#   NPROC=8 TRAIN_SECONDS=600 METHODS=plain,sliding,ttt+tilt scripts/gpu_report_run.sh   # the challenge's scale
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
VOCAB=${VOCAB:-8192}
export PYTHONUNBUFFERED=1
t0=$(date +%s); stamp() { echo "[t+$(( $(date +%s) - t0 ))s] $*" | tee -a "$L/timeline.txt"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$L/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$L/gpu.txt" 2>&1
stamp "start"
D=/tmp/golfnb-data; mkdir -p $D/tokenizers
cp "$BUNDLE"/*.model $D/tokenizers/
xz -dc -T0 "$BUNDLE"/wiki_text.jsonl.xz > /tmp/wiki.jsonl
xz -dc "$BUNDLE"/val_docs.jsonl.xz > /tmp/val_docs.jsonl
python3 -m golfnb.data.cli build --input /tmp/wiki.jsonl --val-input /tmp/val_docs.jsonl \
  --tokenizer $D/tokenizers/fineweb_${VOCAB}_bpe.model --out $D/datasets/fineweb10B_sp${VOCAB} > "$L/build.log" 2>&1
stamp "shards built (rc=$?)"; tar czf "$OUT/logs.tgz" -C "$L" .
save() { tar czf "$OUT/run.tgz" --exclude='*.pt' --exclude='artifacts' --exclude='checkpoints' "$RUN" 2>/dev/null
        tar czf "$OUT/logs.tgz" -C "$L" . 2>/dev/null; }
SETS="--set max_wallclock_seconds=$TRAIN_SECONDS --set warmup_steps=2 --set val_loss_every=0 --set train_log_every=5
  --set compressor=$COMPRESSOR ${EXTRA_SETS:-}"
if [ "$NPROC" -gt 1 ]; then  # N GPUs: the trainer under torchrun (the headless runner is one process)
  python3 -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m golfnb.train --preset "$PRESET" \
    --data-dir $D --run-dir "$RUN" $SETS > "$L/train_stdout.log" 2>&1
else
  python3 -m golfnb.headless --preset "$PRESET" --data-dir $D --run-dir "$RUN" --stages train $SETS \
    > "$L/train_stdout.log" 2>&1
fi
stamp "trained (rc=$?)"; save
python3 -m golfnb.headless --run-dir "$RUN" --stages quantize > "$L/quantize.log" 2>&1
stamp "quantized (rc=$?)"; save
if [ -f "$RUN/artifacts/model.gnb" ]; then split -b 15000000 -d "$RUN/artifacts/model.gnb" "$OUT/artifact.part"; fi
python3 -m golfnb.headless --run-dir "$RUN" --stages eval ${METHODS:+--methods $METHODS} > "$L/eval.log" 2>&1
stamp "evaluated (rc=$?)"; save
ls -la "$OUT"
