"""Triton kernels of the fused LeakyReLU^2 MLP (imported only when that path runs).

One GEMM kernel, C = A @ B with A [M, K] and B [K, N] bf16 (any strides), accumulated in fp32, and two
epilogues that replace the element-wise passes around the MLP's activation:

* forward (`up_act`): A = x, B = W_up^T. Writes h = bf16(acc) (the pre-activation, kept for the backward) and
  a = bf16(leaky_relu(h, s)^2) computed from that bf16 h, exactly what the plain path computes from its bf16
  GEMM output. The plain path writes h, then reads it again to write a: one [M, N] read saved.
* backward (`down_dact`): A = dy, B = W_down ([d, hidden] row-major, i.e. the proj weight as stored). Reads h
  and writes dh = acc * 2 * leaky_relu(h) * leaky_relu'(h) = acc * (2h if h > 0 else 2 s^2 h). The plain path
  writes d a in bf16, then reads it and h to write dh: one [M, N] write and one read saved, and the product
  uses the fp32 accumulator instead of a bf16-rounded d a.

At pr1514's shapes (M = 98,304 tokens per micro-step, hidden 2,048, d 512) each saved pass is 402 MB, about
0.13 ms of an H100's bandwidth, per layer and micro-step. The tiles walk M in groups (GROUP_M tiles of A share
one column of B tiles) so B and the A tiles stay in L2.

Kept free of libdevice calls so that Triton's interpreter (TRITON_INTERPRET=1) runs it on CPU tensors, which
is how the CPU test suite checks it against the plain PyTorch formula.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1"

# H100 defaults, chosen by the block sweep of scripts/gpu_mlp_check.sh (docs/performance.md).
# GOLFNB_MLP_TILE="block_m,block_n,block_k,group_m,num_warps,num_stages" overrides them for experiments.
TILE_KEYS = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages")
DEFAULT_TILE = {"block_m": 256, "block_n": 128, "block_k": 64, "group_m": 8, "num_warps": 8, "num_stages": 3}
SMEM_BYTES = 200 * 1024  # of the H100's 227 KB per block: the staged A and B tiles must fit below it


def _env_tile() -> dict:
    raw = os.environ.get("GOLFNB_MLP_TILE", "").strip()
    if not raw:
        return {}
    parts = raw.split(",")
    if len(parts) != len(TILE_KEYS) or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"GOLFNB_MLP_TILE={raw!r}: want six integers {','.join(TILE_KEYS)}, e.g. 128,256,64,8,8,3")
    return dict(zip(TILE_KEYS, (int(p) for p in parts)))


@triton.jit
def _mm_act_kernel(a_ptr, b_ptr, out_ptr, aux_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on, slope,
                   BACKWARD: tl.constexpr, EVEN_MN: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_MN and EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        if UPCAST:  # Triton's CPU interpreter multiplies bf16 operands as raw bits; it gets fp32 copies
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    o_off = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if BACKWARD:
        if EVEN_MN:
            h = tl.load(aux_ptr + o_off).to(tl.float32)
        else:
            h = tl.load(aux_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
        dh = acc * tl.where(h > 0, 2.0 * h, (2.0 * slope * slope) * h)
        if EVEN_MN:
            tl.store(out_ptr + o_off, dh.to(out_ptr.dtype.element_ty))
        else:
            tl.store(out_ptr + o_off, dh.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        hb = acc.to(out_ptr.dtype.element_ty)
        hf = hb.to(tl.float32)  # the activation of the rounded h, as the plain path computes it
        r = tl.where(hf > 0, hf, slope * hf)
        act = (r * r).to(aux_ptr.dtype.element_ty)
        if EVEN_MN:
            tl.store(out_ptr + o_off, hb)
            tl.store(aux_ptr + o_off, act)
        else:
            tl.store(out_ptr + o_off, hb, mask=mask)
            tl.store(aux_ptr + o_off, act, mask=mask)


def _launch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, aux: torch.Tensor, slope: float, backward: bool,
            tile: dict | None) -> None:
    t = {**DEFAULT_TILE, **_env_tile(), **(tile or {})}
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    bm, bn, bk, gm = t["block_m"], t["block_n"], t["block_k"], t["group_m"]
    stages, esize = t["num_stages"], a.element_size()
    # the tiles are sized for bf16; fp32 operands (tests, the smoke model) need half the depth per stage
    while stages * (bm * bk + bk * bn) * esize > SMEM_BYTES and (stages > 2 or bk > 16):
        if stages > 2:
            stages -= 1
        else:
            bk //= 2
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _mm_act_kernel[grid](
        a, b, out, aux, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        float(slope), BACKWARD=backward, EVEN_MN=(M % bm == 0 and N % bn == 0), EVEN_K=K % bk == 0,
        UPCAST=_INTERPRETED and a.dtype != torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=t["num_warps"], num_stages=stages)


def _check(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"{name}: wants A [M, K] and B [K, N]; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"{name}: A and B must share a dtype, got {a.dtype} and {b.dtype}")


def up_act(x: torch.Tensor, w_up: torch.Tensor, slope: float, tile: dict | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, a) = (x @ w_up^T, leaky_relu(h, slope)^2) for x [M, d], w_up [hidden, d]; both [M, hidden] in x's dtype."""
    b = w_up.t()
    _check("up_act", x, b)
    h = torch.empty(x.shape[0], b.shape[1], dtype=x.dtype, device=x.device)
    a = torch.empty_like(h)
    _launch(x, b, h, a, slope, False, tile)
    return h, a


def down_dact(dy: torch.Tensor, w_down: torch.Tensor, h: torch.Tensor, slope: float, tile: dict | None = None
              ) -> torch.Tensor:
    """dh = (dy @ w_down) * d leaky_relu(h, slope)^2 / dh for dy [M, d], w_down [d, hidden], h [M, hidden]."""
    _check("down_dact", dy, w_down)
    if h.shape != (dy.shape[0], w_down.shape[1]):
        raise ValueError(f"down_dact: h must be [{dy.shape[0]}, {w_down.shape[1]}], got {tuple(h.shape)}")
    h = h.contiguous()  # the epilogue addresses h with dh's (contiguous) strides
    dh = torch.empty(h.shape, dtype=dy.dtype, device=dy.device)
    _launch(dy, w_down, dh, h, slope, True, tile)
    return dh
