#!/usr/bin/env bash
# The eval compile cache on one GPU: the sliding eval of PRESET (random weights, random tokens: only the timing
# matters) in three fresh processes: cold (empty Inductor and golfnb caches), warm (a new empty Inductor cache,
# golfnb's persisted eval file from the first), and eager (eval_compile=off) for the rate without compiling.
#   OUT=/tmp/out PRESET=pr1514 TOKENS=262144 scripts/gpu_eval_cache.sh
# TOK: the tokenizer the byte counts come from (default: .carry's sp8192 model; sp1024 for the smoke preset).
set -u
OUT=${OUT:-$PWD/out}
STAGES=none
PRESET=${PRESET:-pr1514}
TOKENS=${TOKENS:-262144}
TOK=${TOK:-.carry/fineweb_8192_bpe.model}
. scripts/gpu_env.sh
C=$(mktemp -d)
run() {  # name, eval_compile, inductor dir
  TORCHINDUCTOR_CACHE_DIR="$3" GOLFNB_CACHE_DIR="$C/golfnb" python3 - "$PRESET" "$TOKENS" "$TOK" "$2" \
    > "$OUT/eval_$1.log" 2>&1 <<'PY'
import json, sys, time
import torch
from golfnb.bpb import build_byte_luts
from golfnb.config import preset
from golfnb.evals.runner import run_method
from golfnb.legality import make_check_model
name, n, tok, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
cfg = preset(name, eval_compile=mode, eval_budget_seconds=0.0)
dev = "cuda" if torch.cuda.is_available() else "cpu"
t0 = time.perf_counter()
model = make_check_model(cfg, seed=0).to(dev)
stream = torch.randint(0, cfg.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(0))
luts = build_byte_luts(tok, cfg.vocab_size)
t1 = time.perf_counter()
res = run_method("sliding", model, stream, cfg, luts, log=print)
if dev == "cuda":
    torch.cuda.synchronize()
t2 = time.perf_counter()
print("SUMMARY " + json.dumps({"eval_compile": mode, "val_bpb": res["val_bpb"], "setup_s": round(t1 - t0, 2),
                               "eval_s": round(t2 - t1, 2), "tokens": n, "device": dev}))
PY
  stamp "eval $1 (rc=$?)"
  grep -h "SUMMARY\|eval_compile_cache" "$OUT/eval_$1.log" | sed "s/^/  $1 /" | tee -a "$OUT/timeline.txt"
}
run cold on "$C/inductor1"
run warm on "$C/inductor2"
run eager off "$C/inductor3"
rm -rf "$C"
