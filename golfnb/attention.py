"""Causal attention behind one function, with interchangeable backends.

Layout everywhere is the FlashAttention one: q [B, T, H, D], k and v [B, T, Hk, D] with H a multiple of Hk
(grouped-query attention: query head h reads KV head h // (H // Hk)). Backends:

- ``fa3``: FlashAttention-3 (`flash_attn_interface.flash_attn_func`), what the records ran on H100. Used only
  if the package is already installed; golfnb never downloads kernels.
- ``fa4``: FlashAttention-4 (the CuTe-DSL kernels of the `flash-attn-4` package, Hopper and Blackwell), wrapped
  as two opaque custom ops (`golfnb._fa4`) so that torch.compile keeps its graph whole. Used only if installed
  and asked for: on one H100 it made pr1514's step 2.3 % faster than cuDNN SDPA, but ``auto`` keeps cuDNN until
  the 200-step equal-steps check has been run with it (docs/performance.md).
- ``fa2``: FlashAttention-2 (`flash_attn.flash_attn_func`, the `flash-attn` package, extra ``[flash]``); native
  GQA like FA3. Never picked by ``auto``: it has not been timed against cuDNN SDPA on H100, so ask for it
  explicitly (``attn_backend=fa2``) and compare with `golfnb bench`.
- ``sdpa_cudnn`` / ``sdpa_flash`` / ``sdpa_efficient``: PyTorch SDPA pinned to one kernel. On one H100 with
  PyTorch 2.11 the cuDNN kernel measured 2.6 ms against 3.9 ms for flash (fwd+bwd, 48 x 2048 tokens, 8 query /
  4 KV heads, head_dim 64), so ``auto`` prefers it when FA3 is absent.
- ``sdpa``: PyTorch SDPA with its own kernel choice (the fast CPU path).
- ``math``: an explicit softmax(q k^T / sqrt(D)) v in fp32, the reference every other backend is tested against.

``auto`` resolves once per device (``resolve_backend``); the trainer logs the resolved name.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

__all__ = ["attention", "resolve_backend", "available_backends", "backend_options", "BACKENDS"]

BACKENDS = ("fa3", "fa4", "fa2", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa", "math")


@functools.lru_cache(maxsize=None)
def _fa3_available() -> bool:
    return importlib.util.find_spec("flash_attn_interface") is not None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package
        return False


@functools.lru_cache(maxsize=None)
def _fa4_available() -> bool:
    return _has_module("flash_attn.cute")


@functools.lru_cache(maxsize=None)
def _fa2_available() -> bool:
    # flash-attn-4 installs `flash_attn` too (a namespace holding only `cute`): ask for FA2's own module
    return _has_module("flash_attn.flash_attn_interface")


def _sdpa_backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "sdpa_cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None),
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[name]


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on `device` (a cheap capability test, not a benchmark)."""
    dev = torch.device(device)
    out = ["math", "sdpa"]
    if dev.type == "cuda" and torch.cuda.is_available():
        out += ["sdpa_flash", "sdpa_efficient"]
        if _sdpa_backend_enum("sdpa_cudnn") is not None and torch.backends.cudnn.is_available():
            out.append("sdpa_cudnn")
        major, _ = torch.cuda.get_device_capability(dev)
        if _fa3_available() and major == 9:
            out.append("fa3")
        if _fa4_available() and major in (9, 10):
            out.append("fa4")
        if _fa2_available() and major >= 8:
            out.append("fa2")
    return out


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Turn ``auto`` into a concrete backend for `device`; check an explicit choice can run there."""
    dev = torch.device(device)
    avail = available_backends(dev)
    if name == "auto":
        if dev.type != "cuda":
            return "sdpa"
        for cand in ("fa3", "sdpa_cudnn", "sdpa_flash"):
            if cand in avail:
                return cand
        return "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; use one of auto, {', '.join(BACKENDS)}")
    if name not in avail:
        raise ValueError(f"attention backend {name!r} cannot run on {dev} (available: {', '.join(avail)}); "
                         f"set attn_backend=auto")
    if name == "fa4":
        from golfnb._fa4 import check_options

        check_options()  # a bad GOLFNB_FA4_FWD / _BWD fails here, not in the first compiled step
    return name


def backend_options(backend: str) -> dict[str, dict[str, int | bool]]:
    """Kernel options a backend runs with beyond its name (for logs and manifests): the GOLFNB_FA4_FWD /
    GOLFNB_FA4_BWD overrides for fa4, nothing for the others. Empty dicts mean the library's own choice."""
    if backend != "fa4":
        return {}
    from golfnb._fa4 import check_options

    return check_options()


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    B, T, H, D = q.shape
    Hk = k.shape[2]
    g = H // Hk
    qf = q.float().transpose(1, 2)  # B H T D
    kf = k.float().repeat_interleave(g, dim=2).transpose(1, 2)
    vf = v.float().repeat_interleave(g, dim=2).transpose(1, 2)
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(D)
    if causal:
        Tk = k.shape[1]
        mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - T)
        scores = scores.masked_fill(~mask, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ vf
    return y.transpose(1, 2).to(q.dtype)


def _sdpa(q, k, v, causal: bool, backend: str) -> torch.Tensor:
    H, Hk = q.shape[2], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    native_gqa = backend in ("sdpa", "sdpa_cudnn", "sdpa_flash")
    if H != Hk and not native_gqa:
        # the memory-efficient kernel takes no GQA: expand K/V to the query heads
        kt = kt.repeat_interleave(H // Hk, dim=1)
        vt = vt.repeat_interleave(H // Hk, dim=1)
    ctx = nullcontext()
    if backend != "sdpa":
        from torch.nn.attention import sdpa_kernel

        ctx = sdpa_kernel([_sdpa_backend_enum(backend)])
    with ctx:
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal,
                                           enable_gqa=(H != Hk and native_gqa))
    return y.transpose(1, 2)


def _fa3(q, k, v, causal: bool) -> torch.Tensor:
    from flash_attn_interface import flash_attn_func  # optional accelerator, imported only if installed

    out = flash_attn_func(q, k, v, causal=causal)
    return out[0] if isinstance(out, tuple) else out


def _fa2(q, k, v, causal: bool) -> torch.Tensor:
    from flash_attn import flash_attn_func  # optional accelerator, imported only if installed

    return flash_attn_func(q, k, v, causal=causal)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              backend: str = "sdpa") -> torch.Tensor:
    """Scaled dot-product attention, scale 1/sqrt(D); q [B,T,H,D], k/v [B,T,Hk,D] -> [B,T,H,D].

    `backend` must be concrete (see `resolve_backend`); the model resolves ``auto`` once.
    """
    if backend == "math":
        return _math_attention(q, k, v, causal)
    if backend == "fa3":
        return _fa3(q, k, v, causal)
    if backend == "fa4":
        from golfnb._fa4 import fa4_attention  # registers its custom ops on first use

        return fa4_attention(q, k, v, causal)
    if backend == "fa2":
        return _fa2(q, k, v, causal)
    return _sdpa(q, k, v, causal, backend)
