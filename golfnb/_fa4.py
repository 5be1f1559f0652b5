"""FlashAttention-4 (the CuTe-DSL kernels of the `flash-attn-4` package) as two opaque custom ops.

The package ships its kernels behind a `torch.autograd.Function` whose Python body torch.compile cannot
trace (it JIT-compiles CuTe DSL on first use), so a compiled model would break its graph at every
attention call. Here the forward and the backward are each a `torch.library` custom op with a fake
implementation: the compiled graph keeps the norms, rotary and projections around attention fused, and
sees attention as two kernels with known output shapes.

Layout is FlashAttention's: q [B, T, H, D], k / v [B, T, Hk, D] with H a multiple of Hk (GQA handled by the
kernels themselves, no expansion of K/V). The forward returns the output and the log-sum-exp [B, H, T]
(fp32) that the backward needs.

Only imported when `attn_backend=fa4`; golfnb never downloads kernels (install `flash-attn-4` yourself, or
`scripts/make_fa4_bundle.sh` for an offline machine; `docs/performance.md` says what was measured with it).
"""
from __future__ import annotations

import torch

__all__ = ["fa4_attention", "kernels"]


def kernels():
    """(forward, backward) of the installed package: `fwd(q, k, v, causal) -> (out, lse)` and
    `bwd(dout, q, k, v, out, lse, causal) -> (dq, dk, dv)`. Tests swap this function for a reference."""
    try:
        from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError("attn_backend=fa4 needs the flash-attn-4 package (flash_attn.cute); install it or "
                           f"set attn_backend=auto ({e})") from e

    def fwd(q, k, v, causal):
        # return_lse: inside a custom op no input requires grad, and FA4 would then skip the log-sum-exp
        out, lse, *_ = _flash_attn_fwd(q, k, v, causal=causal, return_lse=True)
        return out, lse

    def bwd(dout, q, k, v, out, lse, causal):
        dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, causal=causal)[:3]
        return dq, dk, dv

    return fwd, bwd


@torch.library.custom_op("golfnb::fa4_fwd", mutates_args=())
def _fa4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = kernels()[0](q, k, v, causal)
    return out, lse


@_fa4_fwd.register_fake
def _fa4_fwd_fake(q, k, v, causal):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("golfnb::fa4_bwd", mutates_args=())
def _fa4_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = kernels()[1](dout.contiguous(), q, k, v, out, lse, causal)
    return dq, dk, dv


@_fa4_bwd.register_fake
def _fa4_bwd_fake(dout, q, k, v, out, lse, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal = causal


def _backward(ctx, dout, dlse):
    # dlse: the log-sum-exp is an internal output; nothing downstream differentiates it
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _fa4_bwd(dout, q, k, v, out, lse, ctx.causal)
    return dq, dk, dv, None


_fa4_fwd.register_autograd(_backward, setup_context=_setup)


def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Causal attention through FlashAttention-4, differentiable in q, k and v; [B, T, H, D] out."""
    if q.dtype not in (torch.bfloat16, torch.float16) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attn_backend=fa4 takes bf16/fp16 q, k, v of one dtype (got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}); run under bf16 autocast or pick attn_backend=sdpa_cudnn")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")
    return _fa4_fwd(q, k, v, causal)[0]
