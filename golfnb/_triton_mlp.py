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
* the sign-mask pair (`up_act_signs`, `down_dact_signs`; tile option sign_mask): the forward writes a and the
  signs of h, eight to a byte, instead of h; the backward rebuilds the derivative from sqrt(a) = |leaky_relu(h)|
  and the sign. Measured on an H100: 15.6 % less peak memory in a pr1514 step, but 3.6 % slower (unpacking the
  bits costs the backward more than the forward saves), so it is off by default.

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

# H100 defaults, chosen by the block sweeps of scripts/gpu_mlp_check.sh (docs/performance.md): the flattened
# descriptor kernel at 128 x 256 x 64, 3 stages, its epilogue in two halves, was the fastest of seventeen tiles at
# pr1514's shapes (0.5 % of a training step over the 128 x 128 x 64 tile before it).
# GOLFNB_MLP_TILE="block_m,block_n,block_k,group_m,num_warps,num_stages[,tma[,split[,early_aux[,sign_mask]]]]"
# overrides them for experiments (like a tile passed in, it runs the pointer kernel unless it names tma).
# tma=0 picks _mm_act_kernel (pointer loads, one program per tile), tma=1 _mm_act_tma_kernel (descriptor loads
# and stores, persistent programs), tma=2 the same kernel with its tile and k loops flattened into one
# pipelined loop (the next tile's loads overlap this tile's epilogue), tma=3 the same kernel warp-specialized
# (loads and MMAs in their own warps). split (1 or 2) and early_aux (0 or 1) shape the descriptor kernels'
# epilogue (see _mm_act_tma_kernel); the pointer kernel ignores them. sign_mask=1 makes golfnb.fused_mlp keep a
# and the signs of h for the backward instead of h and a (up_act_signs / down_dact_signs). GPUs older than
# Hopper have no tensor memory accelerator; they run the pointer kernel with the same blocks.
TILE_KEYS = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages")
OPTION_KEYS = ("tma", "split", "early_aux", "sign_mask")  # optional seventh to tenth numbers of GOLFNB_MLP_TILE
_OPTION_VALUES = {"tma": (0, 1, 2, 3), "split": (1, 2), "early_aux": (0, 1), "sign_mask": (0, 1)}
DEFAULT_TILE = {"block_m": 128, "block_n": 256, "block_k": 64, "group_m": 8, "num_warps": 8, "num_stages": 3,
                "tma": 2, "split": 2, "early_aux": 0, "sign_mask": 0}
SMEM_BYTES = 160 * 1024  # the staged A and B tiles; the H100 has 227 KB per block and the epilogue needs some


def check_tile(tile: dict, where: str) -> dict:
    """`tile` if its keys and option values are known; else a ValueError naming `where` and what to change."""
    unknown = sorted(set(tile) - set(TILE_KEYS) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown tile keys {unknown}; known: {', '.join(TILE_KEYS + OPTION_KEYS)}")
    for key, allowed in _OPTION_VALUES.items():
        if key in tile and tile[key] not in allowed:
            raise ValueError(f"{where}: {key}={tile[key]} is not one of {allowed} (tma: 0 pointer loads, 1 "
                             f"descriptor loads with persistent programs, 2 the same with flattened loops, 3 the "
                             f"same warp-specialized; split: epilogue halves; early_aux: load h before the k "
                             f"loop; sign_mask: keep the signs of h instead of h)")
    return tile


def _env_tile() -> dict:
    raw = os.environ.get("GOLFNB_MLP_TILE", "").strip()
    if not raw:
        return {}
    parts = raw.split(",")
    if not len(TILE_KEYS) <= len(parts) <= len(TILE_KEYS) + len(OPTION_KEYS) or \
            not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"GOLFNB_MLP_TILE={raw!r}: want six integers {','.join(TILE_KEYS)} and optionally "
                         f"{', '.join(OPTION_KEYS)}, e.g. 256,128,64,8,8,3 or 128,128,64,8,8,4,2 or "
                         f"128,128,64,8,8,4,2,2,1")
    # six numbers: the pointer kernel
    tile = {"tma": 0, **dict(zip(TILE_KEYS + OPTION_KEYS, (int(p) for p in parts)))}
    return check_tile(tile, f"GOLFNB_MLP_TILE={raw!r}")


@triton.jit
def _pack_signs(pos, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] booleans -> [BLOCK_M, BLOCK_N / 8] bytes, bit j of byte c = column 8c + j."""
    bits = tl.reshape(pos.to(tl.int32), (BLOCK_M, BLOCK_N // 8, 8))
    return tl.sum(bits << tl.arange(0, 8)[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _unpack_signs(packed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bits = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, BLOCK_N)) != 0


@triton.jit
def _dact_from_mask(acc, a, positive, slope):
    """dh from d a = acc, a = leaky_relu(h)^2 and sign(h): sqrt(a) = |leaky_relu(h)|, so the derivative
    2 leaky_relu(h) leaky_relu'(h) is 2 sqrt(a) where h > 0 and -2 s sqrt(a) elsewhere (a = 0 at h = 0)."""
    r = tl.sqrt_rn(a.to(tl.float32))
    return acc * tl.where(positive, 2.0 * r, (-2.0 * slope) * r)


@triton.jit
def _mm_act_kernel(a_ptr, b_ptr, out_ptr, aux_ptr, mask_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on, stride_mask, slope,
                   BACKWARD: tl.constexpr, EVEN_MN: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                   SIGN_MASK: tl.constexpr,
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
    if SIGN_MASK:  # bytes of 8 columns; a tile's bytes are columns pid_n * BLOCK_N / 8 onwards
        offs_b = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        b_off = offs_m[:, None] * stride_mask + offs_b[None, :]
        b_ok = (offs_m[:, None] < M) & (offs_b[None, :] < tl.cdiv(N, 8))
    if BACKWARD:
        if EVEN_MN:
            h = tl.load(aux_ptr + o_off).to(tl.float32)
        else:
            h = tl.load(aux_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
        if SIGN_MASK:  # aux holds a, mask_ptr the signs of h
            positive = _unpack_signs(tl.load(mask_ptr + b_off, mask=b_ok, other=0), BLOCK_M, BLOCK_N)
            dh = _dact_from_mask(acc, h, positive, slope)
        else:
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
        if SIGN_MASK:  # h itself is not written, only its signs
            tl.store(mask_ptr + b_off, _pack_signs(hf > 0, BLOCK_M, BLOCK_N), mask=b_ok)
        elif EVEN_MN:
            tl.store(out_ptr + o_off, hb)
        else:
            tl.store(out_ptr + o_off, hb, mask=mask)
        if EVEN_MN:
            tl.store(aux_ptr + o_off, act)
        else:
            tl.store(aux_ptr + o_off, act, mask=mask)


@triton.jit
def _epilogue(acc, h, out_desc, aux_desc, mask_ptr, stride_mask, M, N, off_m, off_n, slope, BACKWARD: tl.constexpr,
              SIGN_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    if SIGN_MASK:
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_b = off_n // 8 + tl.arange(0, BLOCK_N // 8)
        b_ptrs = mask_ptr + offs_m[:, None] * stride_mask + offs_b[None, :]
        b_ok = (offs_m < M)[:, None] & (offs_b < tl.cdiv(N, 8))[None, :]
    if BACKWARD:
        if SIGN_MASK:  # h is a here, the signs come from the mask
            positive = _unpack_signs(tl.load(b_ptrs, mask=b_ok, other=0), BLOCK_M, BLOCK_N)
            dh = _dact_from_mask(acc, h, positive, slope)
        else:
            hf = h.to(tl.float32)
            dh = acc * tl.where(hf > 0, 2.0 * hf, (2.0 * slope * slope) * hf)
        out_desc.store([off_m, off_n], dh.to(out_desc.dtype))
    else:
        hb = acc.to(out_desc.dtype)
        hf = hb.to(tl.float32)
        r = tl.where(hf > 0, hf, slope * hf)
        if SIGN_MASK:
            tl.store(b_ptrs, _pack_signs(hf > 0, BLOCK_M, BLOCK_N), mask=b_ok)
        else:
            out_desc.store([off_m, off_n], hb)
        aux_desc.store([off_m, off_n], (r * r).to(aux_desc.dtype))


@triton.jit
def _mm_act_tma_kernel(a_desc, b_desc, out_desc, aux_desc, mask_ptr, M, N, K, stride_mask, slope,
                       BACKWARD: tl.constexpr, B_NK: tl.constexpr, UPCAST: tl.constexpr, SIGN_MASK: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       NUM_PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                       SPLIT: tl.constexpr, EARLY_AUX: tl.constexpr):
    """The same GEMM and epilogues with tensor-memory-accelerator loads and stores (descriptors built on the
    host) and a persistent schedule: NUM_PROGRAMS programs walk the tiles. B_NK: B is given as [N, K] (the up
    weight as stored) and transposed in registers. FLATTEN lets the compiler turn the tile loop and the k loop into
    one software-pipelined loop, so the loads of a program's next tile are in flight during this tile's epilogue:
    with K = 512 (8 k steps) and two [M, N] outputs per tile, the epilogue is a large part of each tile's time.
    WARP_SPECIALIZE asks the compiler to give the loads and the MMAs their own warps (no flattening then).
    SPLIT = 2 runs the epilogue on two [BLOCK_M, BLOCK_N / 2] halves (the out/aux descriptors have that block),
    so each half's stores leave while the other half is computed and less shared memory stages them.
    EARLY_AUX (backward) loads this tile's h before the k loop, so its latency hides behind the MMAs."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    HALF: tl.constexpr = BLOCK_N // SPLIT
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        first_m = (tile // per_group) * GROUP_M
        group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
        off_m = (first_m + (tile % per_group) % group_rows) * BLOCK_M
        off_n = ((tile % per_group) // group_rows) * BLOCK_N
        if BACKWARD and EARLY_AUX:
            h0 = aux_desc.load([off_m, off_n])
            if SPLIT == 2:
                h1 = aux_desc.load([off_m, off_n + HALF])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):
            a = a_desc.load([off_m, k * BLOCK_K])
            if B_NK:
                b = tl.trans(b_desc.load([off_n, k * BLOCK_K]))
            else:
                b = b_desc.load([k * BLOCK_K, off_n])
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
            else:
                acc = tl.dot(a, b, acc)
        if BACKWARD and not EARLY_AUX:
            h0 = aux_desc.load([off_m, off_n])
            if SPLIT == 2:
                h1 = aux_desc.load([off_m, off_n + HALF])
        if not BACKWARD:
            h0 = acc  # unused: the forward epilogue reads no h
            h1 = acc
        if SPLIT == 2:
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
            _epilogue(acc0, h0, out_desc, aux_desc, mask_ptr, stride_mask, M, N, off_m, off_n, slope, BACKWARD,
                      SIGN_MASK, BLOCK_M, HALF)
            _epilogue(acc1, h1, out_desc, aux_desc, mask_ptr, stride_mask, M, N, off_m, off_n + HALF, slope, BACKWARD,
                      SIGN_MASK, BLOCK_M, HALF)
        else:
            _epilogue(acc, h0, out_desc, aux_desc, mask_ptr, stride_mask, M, N, off_m, off_n, slope, BACKWARD,
                      SIGN_MASK, BLOCK_M, BLOCK_N)


def _launch_tma(a: torch.Tensor, b: torch.Tensor, b_nk: bool, out: torch.Tensor, aux: torch.Tensor, slope: float,
                backward: bool, t: dict, signs: torch.Tensor | None) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = a.shape
    N = out.shape[1]
    bm, bn, bk = t["block_m"], t["block_n"], t["block_k"]
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    programs = min(tiles, _num_sms(a.device))
    split = t["split"]
    b_desc = TensorDescriptor.from_tensor(b, [bn, bk] if b_nk else [bk, bn])
    _mm_act_tma_kernel[(programs,)](
        TensorDescriptor.from_tensor(a, [bm, bk]), b_desc, TensorDescriptor.from_tensor(out, [bm, bn // split]),
        TensorDescriptor.from_tensor(aux, [bm, bn // split]), out if signs is None else signs, M, N, K,
        0 if signs is None else signs.stride(0), float(slope),
        BACKWARD=backward, B_NK=b_nk, UPCAST=_INTERPRETED and a.dtype != torch.float32, SIGN_MASK=signs is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=t["group_m"], NUM_PROGRAMS=programs, FLATTEN=t["tma"] == 2,
        WARP_SPECIALIZE=t["tma"] == 3, SPLIT=split, EARLY_AUX=bool(t["early_aux"]),
        num_warps=t["num_warps"], num_stages=t["num_stages"])


def _descriptor_ok(shapes: list, element_size: int) -> bool:
    """Whether contiguous 2-D tensors of these shapes can have tensor descriptors: every row a multiple of 16
    bytes (a hidden width of 164 bf16 values is not; such shapes run the pointer kernel)."""
    return all((shape[1] * element_size) % 16 == 0 for shape in shapes)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs, so that the persistent loop is exercised


def resolve_tile(tile: dict | None = None) -> dict:
    """The tile a launch uses: `tile`, else GOLFNB_MLP_TILE, else DEFAULT_TILE. An explicit tile that does not
    name `tma` runs the pointer kernel (tma=0), not the default's descriptor kernel."""
    if tile:
        return {**DEFAULT_TILE, "tma": 0, **check_tile(dict(tile), "tile")}
    return {**DEFAULT_TILE, **_env_tile()}


def kernel_variant(tile: dict, device: torch.device) -> int:
    """The tile's tma option where the device can run it: 0 (the pointer kernel) on CUDA GPUs before Hopper
    (compute capability 9), whose Triton lowering of descriptor loads was never measured here."""
    tma = int(tile.get("tma", 0))
    if tma and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return 0
    return tma


def fit_tile(tile: dict, element_size: int) -> dict:
    """The tile with fewer pipeline stages, then a shallower k step, until its staged A and B tiles fit in
    SMEM_BYTES. The defaults are sized for bf16; fp32 operands (tests, the smoke model) need half the depth."""
    t = dict(tile)
    while t["num_stages"] * (t["block_m"] + t["block_n"]) * t["block_k"] * element_size > SMEM_BYTES and \
            (t["num_stages"] > 2 or t["block_k"] > 16):
        if t["num_stages"] > 2:
            t["num_stages"] -= 1
        else:
            t["block_k"] //= 2
    return t


def _launch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, aux: torch.Tensor, slope: float, backward: bool,
            tile: dict | None, signs: torch.Tensor | None = None) -> None:
    """One GEMM launch. signs (uint8 [M, ceil(N / 8)]): the sign-mask mode, where the forward writes the signs of h
    there instead of h to `out` (`out` is then only a placeholder) and the backward reads them, `aux` being a."""
    t = resolve_tile(tile)
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    t = fit_tile(t, a.element_size())
    bm, bn = t["block_m"], t["block_n"]
    # descriptors need a unit last stride: the up weight's transpose is read as the [N, K] weight itself
    b_nk = b.stride(0) == 1 and b.stride(1) != 1
    if kernel_variant(t, a.device) and _descriptor_ok(
            [a.shape, b.shape[::-1] if b_nk else b.shape, out.shape], a.element_size()):
        _launch_tma(a.contiguous(), b.t() if b_nk else b.contiguous(), b_nk, out, aux, slope, backward, t, signs)
        return
    bk = t["block_k"]
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _mm_act_kernel[grid](
        a, b, out, aux, out if signs is None else signs, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), 0 if signs is None else signs.stride(0),
        float(slope), BACKWARD=backward, EVEN_MN=(M % bm == 0 and N % bn == 0), EVEN_K=K % bk == 0,
        UPCAST=_INTERPRETED and a.dtype != torch.float32, SIGN_MASK=signs is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=t["group_m"], num_warps=t["num_warps"],
        num_stages=t["num_stages"])


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


def up_act_signs(x: torch.Tensor, w_up: torch.Tensor, slope: float, tile: dict | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, signs): a = leaky_relu(x @ w_up^T, slope)^2 as `up_act` computes it, and the signs of h packed eight
    columns to a byte (uint8 [M, ceil(hidden / 8)], bit j of byte c is h[:, 8c + j] > 0) instead of h itself:
    the backward needs only |leaky_relu(h)| = sqrt(a) and the sign, so h is never written (1/16 of its bytes)."""
    b = w_up.t()
    _check("up_act_signs", x, b)
    a = torch.empty(x.shape[0], b.shape[1], dtype=x.dtype, device=x.device)
    signs = torch.empty(a.shape[0], triton.cdiv(a.shape[1], 8), dtype=torch.uint8, device=x.device)
    _launch(x, b, a, a, slope, False, tile, signs)  # `out` is a placeholder in this mode
    return a, signs


def down_dact_signs(dy: torch.Tensor, w_down: torch.Tensor, a: torch.Tensor, signs: torch.Tensor, slope: float,
                    tile: dict | None = None) -> torch.Tensor:
    """dh = (dy @ w_down) * (2 sqrt(a) where h > 0, else -2 slope sqrt(a)), from up_act_signs' a and signs: the
    activation's derivative 2 leaky_relu(h) leaky_relu'(h) without h."""
    _check("down_dact_signs", dy, w_down)
    shape = (dy.shape[0], w_down.shape[1])
    if a.shape != shape or signs.shape != (shape[0], triton.cdiv(shape[1], 8)) or signs.dtype != torch.uint8:
        raise ValueError(f"down_dact_signs: a must be {list(shape)} and signs uint8 "
                         f"[{shape[0]}, {triton.cdiv(shape[1], 8)}]; got {tuple(a.shape)} and "
                         f"{signs.dtype} {tuple(signs.shape)}")
    a = a.contiguous()
    signs = signs.contiguous()
    dh = torch.empty(shape, dtype=dy.dtype, device=dy.device)
    _launch(dy, w_down, dh, a, slope, True, tile, signs)
    return dh
