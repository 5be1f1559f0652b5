#!/usr/bin/env bash
# Attention backends on ONE GPU at pr1514's training shape (48 x 2048 tokens, 8 query / 4 KV heads, head_dim 64,
# causal, bf16): forward and forward + backward per backend (median of 20 after a 5 s spin), TFLOP/s on the
# causal FLOP count, and each backend's output and gradients against cuDNN SDPA's. Backends: every one of
# BACKENDS (default "sdpa_cudnn fa4 fa3 sdpa_flash") that can run here.
#   OUT=/tmp/out scripts/gpu_attention_check.sh        # -> $OUT/attention.log
set -u
OUT=${OUT:-$PWD/out}
STAGES=attention
. scripts/gpu_env.sh
BACKENDS=${BACKENDS:-sdpa_cudnn fa4 fa3 sdpa_flash} timeout "${ATTN_TIMEOUT:-300}" python3 - > "$OUT/attention.log" 2>&1 <<'PY'
import os, time
import torch
from golfnb.attention import attention, available_backends

B, T, H, Hk, D = int(os.environ.get("B", 48)), 2048, 8, 4, 64
g = torch.Generator(device="cuda").manual_seed(0)
q0, k0, v0 = (torch.randn(B, T, h, D, device="cuda", generator=g, dtype=torch.bfloat16) for h in (H, Hk, Hk))
do = torch.randn(B, T, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
flop_fwd = 4 * B * H * T * T * D / 2  # QK^T and PV, causal half
avail = available_backends("cuda")
names = [b for b in os.environ["BACKENDS"].split() if b in avail]
print(f"shape B={B} T={T} H={H} Hk={Hk} D={D}; available: {', '.join(avail)}; timing: {', '.join(names)}")

from golfnb.bench import median_ms as timed

def run(name):
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    def fwd():
        with torch.no_grad():
            attention(q, k, v, backend=name)
    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        attention(q, k, v, backend=name).backward(do)
    return q, k, v, fwd, fwd_bwd

ref = None
for i, name in enumerate(names):
    t0 = time.time()
    q, k, v, fwd, fwd_bwd = run(name)
    try:
        fwd_bwd(); torch.cuda.synchronize()
    except Exception as e:  # one backend failing must not hide the others' figures
        print(f"{name}: FAILED {type(e).__name__}: {e}"); continue
    first = time.time() - t0
    if i == 0:  # clocks up before the first timing
        t_end = time.time() + 5
        while time.time() < t_end:
            fwd_bwd(); torch.cuda.synchronize()
    f, fb = timed(fwd), timed(fwd_bwd)
    out = attention(q, k, v, backend=name).float()
    fwd_bwd()
    grads = [t.grad.float() for t in (q, k, v)]
    line = (f"{name}: first call (incl. compile) {first:.1f} s; fwd ms:{f:.3f} ({flop_fwd / f / 1e9:.0f} TFLOP/s) "
            f"fwd+bwd ms:{fb:.3f} bwd ms:{fb - f:.3f} ({2.5 * flop_fwd / (fb - f) / 1e9:.0f} TFLOP/s)")
    if ref is None:
        ref = (out, grads)
    else:
        rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
        line += (f" | vs {names[0]}: out {rel(out, ref[0]):.2e} dq {rel(grads[0], ref[1][0]):.2e} "
                 f"dk {rel(grads[1], ref[1][1]):.2e} dv {rel(grads[2], ref[1][2]):.2e}")
    print(line, flush=True)
PY
stamp "attention check (rc=$?)"
grep -h "ms:\|FAILED\|Error" "$OUT/attention.log" | tee -a "$OUT/timeline.txt"
