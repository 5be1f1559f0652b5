"""FlashAttention-4 (the CuTe-DSL kernels of the `flash-attn-4` package) as two opaque custom ops.

The package ships its kernels behind a `torch.autograd.Function` whose Python body torch.compile cannot
trace (it JIT-compiles CuTe DSL on first use), so a compiled model would break its graph at every
attention call. Here the forward and the backward are each a `torch.library` custom op with a fake
implementation: the compiled graph keeps the norms, rotary and projections around attention fused, and
sees attention as two kernels with known output shapes.

Layout is FlashAttention's: q [B, T, H, D], k / v [B, T, Hk, D] with H a multiple of Hk (GQA handled by the
kernels themselves, no expansion of K/V). The forward returns the output and the log-sum-exp [B, H, T]
(fp32) that the backward needs.

Kernel configuration: FA4 picks its tiles from the head dimension alone. Two environment variables override
that choice for a sweep or a tuned default, each a comma-separated list of NAME=INT (booleans as 0/1):

  GOLFNB_FA4_FWD  tile_m, tile_n, mma_pv_is_rs, intra_wg_overlap, pack_gqa  (the forward's keyword requests)
  GOLFNB_FA4_BWD  fields of FA4's backward config (tile_m, tile_n, num_stages_Q, num_stages_dO, num_stages_PdS,
                  SdP_swapAB, dKV_swapAB, dQ_swapAB, AtomLayoutMSdP, AtomLayoutNdKV, AtomLayoutMdQ, dQ_single_wg),
                  replaced in the config FA4 would select; plus expand_kv=1, which runs the backward on K/V
                  repeated per query head (no GQA accumulation inside the kernel) and sums the K/V gradients
                  over each head group here.

Unset, FA4's own choice runs. A name FA4 does not know, or a value that is not an integer, fails before any
kernel runs; a combination FA4's validator rejects fails at the first call with FA4's message.

Only imported when `attn_backend=fa4`; golfnb never downloads kernels (install `flash-attn-4` yourself, or
`scripts/make_fa4_bundle.sh` for an offline machine; `docs/performance.md` says what was measured with it).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch

__all__ = ["fa4_attention", "kernels", "check_options", "parse_options", "fwd_options", "bwd_options", "FWD_KEYS",
           "BWD_KEYS"]

FWD_KEYS = ("tile_m", "tile_n", "mma_pv_is_rs", "intra_wg_overlap", "pack_gqa")
BWD_KEYS = ("tile_m", "tile_n", "num_stages_Q", "num_stages_dO", "num_stages_PdS", "SdP_swapAB", "dKV_swapAB",
            "dQ_swapAB", "AtomLayoutMSdP", "AtomLayoutNdKV", "AtomLayoutMdQ", "dQ_single_wg", "expand_kv")
_BOOL_KEYS = {"mma_pv_is_rs", "intra_wg_overlap", "pack_gqa", "SdP_swapAB", "dKV_swapAB", "dQ_swapAB",
              "dQ_single_wg", "expand_kv"}


@functools.lru_cache(maxsize=16)
def parse_options(text: str, keys: tuple[str, ...], var: str) -> tuple[tuple[str, int | bool], ...]:
    """`"tile_m=128,pack_gqa=0"` -> (("tile_m", 128), ("pack_gqa", False)); unknown names and non-integers raise."""
    out: dict[str, int | bool] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in keys:
            raise ValueError(f"{var}={text!r}: {item!r} is not NAME=INT with NAME one of {', '.join(keys)}")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{var}={text!r}: {name} wants an integer (0/1 for a switch), got {value.strip()!r}") \
                from None
        if name in _BOOL_KEYS and number not in (0, 1):
            raise ValueError(f"{var}={text!r}: {name} is a switch, set it to 0 or 1")
        out[name] = bool(number) if name in _BOOL_KEYS else number
    return tuple(out.items())


def fwd_options() -> dict[str, int | bool]:
    """The forward's requests from GOLFNB_FA4_FWD (empty: FA4 decides)."""
    return dict(parse_options(os.environ.get("GOLFNB_FA4_FWD", ""), FWD_KEYS, "GOLFNB_FA4_FWD"))


def bwd_options() -> dict[str, int | bool]:
    """The backward's config fields from GOLFNB_FA4_BWD (empty: FA4 decides)."""
    return dict(parse_options(os.environ.get("GOLFNB_FA4_BWD", ""), BWD_KEYS, "GOLFNB_FA4_BWD"))


def check_options() -> dict[str, dict[str, int | bool]]:
    """Parse both variables now (ValueError saying what to change) and return what they set."""
    fwd = fwd_options()
    _fwd_kwargs(fwd)
    return {"fwd": fwd, "bwd": bwd_options()}


def _fwd_kwargs(opts: dict[str, int | bool]) -> dict:
    kw = {k: v for k, v in opts.items() if k not in ("tile_m", "tile_n")}
    if "tile_m" in opts or "tile_n" in opts:
        if not ("tile_m" in opts and "tile_n" in opts):
            raise ValueError("GOLFNB_FA4_FWD: set tile_m and tile_n together (FA4 takes the pair)")
        kw["tile_mn"] = (opts["tile_m"], opts["tile_n"])
    return kw


def _device_arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _bwd_config(q: torch.Tensor, k: torch.Tensor, causal: bool, fields: dict[str, int | bool]):
    """FA4's own backward config for this call with `fields` replaced (None when nothing is replaced)."""
    if not fields:
        return None
    from flash_attn.cute.config import BwdHeuristicInputs, select_bwd_config

    B, T, H, D = q.shape
    inputs = BwdHeuristicInputs(device_arch=_device_arch(q.device), head_dim=D, head_dim_v=D, num_heads=H,
                                num_heads_kv=k.shape[2], dtype=str(q.dtype), batch_size=B, max_seqlen_q=T,
                                max_seqlen_k=k.shape[1], total_q=B * T, total_k=B * k.shape[1], causal=causal)
    return dataclasses.replace(select_bwd_config(inputs), **fields)


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
        out, lse, *_ = _flash_attn_fwd(q, k, v, causal=causal, return_lse=True, **_fwd_kwargs(fwd_options()))
        return out, lse

    def bwd(dout, q, k, v, out, lse, causal):
        fields = bwd_options()
        fields.pop("expand_kv", None)  # handled by the caller (_fa4_bwd)
        cfg = _bwd_config(q, k, causal, fields)
        kw = {} if cfg is None else {"config": cfg}
        dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, causal=causal, **kw)[:3]
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
    group = q.shape[2] // k.shape[2]
    if group > 1 and bwd_options().get("expand_kv"):
        # every query head gets its own K/V copy, so the kernel writes dK/dV per head without accumulating
        # across a group; the group sum happens here, in fp32, as the kernel's GQA path does it
        ke, ve = (t.repeat_interleave(group, dim=2) for t in (k, v))
        dq, dke, dve = kernels()[1](dout.contiguous(), q, ke, ve, out, lse, causal)
        B, T, Hk, D = k.shape
        fold = lambda t: t.reshape(B, T, Hk, group, D).sum(3, dtype=torch.float32).to(k.dtype)  # noqa: E731
        return dq, fold(dke), fold(dve)
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
