"""Triton kernel of the fused soft-capped cross-entropy (imported only when that path runs).

One program per row of logits z [N, V] (bf16, the LM head's output). It computes, in fp32,

    c = softcap, th = tanh(z / c), zc = c * th                       (zc = z when softcap is 0)
    loss = logsumexp(zc) - zc[target]
    dz   = (softmax(zc) - onehot(target)) * (1 - th^2)              (d loss / d z, before any scaling)

and writes loss (fp32) and, when asked, dz (in z's dtype). The gradient is produced in the same pass as the
loss because training always needs it: the logits are read once (twice from L2 when V exceeds one block) and
the gradient written once, instead of the fp32 logits, their soft-cap and their gradient crossing memory
several times. Scaling by the upstream gradient is left to the caller, which applies it to the head GEMMs'
small outputs (see golfnb.fused_ce).

Kept free of libdevice calls so that Triton's interpreter (TRITON_INTERPRET=1) runs it on CPU tensors, which
is how the CPU test suite checks it against the plain PyTorch formula.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 8192  # columns held in registers at once; pr1514's whole 8192-token vocabulary is one block


LOG2E = tl.constexpr(1.4426950408889634)  # a global a kernel may read must be a constexpr instance


@triton.jit
def _tanh(x):
    # via exp(-2|x|): no overflow for any x, and no libdevice (the interpreter has none)
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _capped(z, softcap, FAST: tl.constexpr):
    """(softcap * tanh(z / softcap), tanh(z / softcap)). FAST: one exp2 and one approximate division per element
    instead of a correctly rounded division by softcap, an exp and another correctly rounded division (the kernel
    is bound by these per-element instructions, not by memory; the error stays at a few ulp of fp32)."""
    if FAST:
        e = tl.exp2(tl.abs(z) * (-2.0 * LOG2E / softcap))
        t = tl.fdiv(1.0 - e, 1.0 + e)
        th = tl.where(z < 0, -t, t)
    else:
        th = _tanh(z / softcap)
    return softcap * th, th


@triton.jit
def _load_capped(ptrs, mask, softcap, SOFTCAP: tl.constexpr, FAST: tl.constexpr):
    """Soft-capped fp32 logits (-inf outside the mask, so they vanish from max and sum) and their tanh (the
    gradient's 1 - tanh^2 factor; meaningless when SOFTCAP is off)."""
    z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if SOFTCAP:
        zc, th = _capped(z, softcap, FAST)
    else:
        zc, th = z, z
    return tl.where(mask, zc, float("-inf")), th


@triton.jit
def _softcap_ce_kernel(z_ptr, z_stride, t_ptr, loss_ptr, dz_ptr, dz_stride, V, softcap,
                       SOFTCAP: tl.constexpr, WITH_GRAD: tl.constexpr, BLOCK: tl.constexpr,
                       ONE_BLOCK: tl.constexpr, FAST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    target = tl.load(t_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    one = tl.arange(0, 1)

    if ONE_BLOCK:
        # the whole row in registers: one read of the logits
        mask = cols < V
        zc, th = _load_capped(z_row + cols, mask, softcap, SOFTCAP, FAST)
        m = tl.max(zc, 0)
        if FAST:
            # the exponentials of the sum are kept and reused for the softmax below: one exp2 per element, not two
            p = tl.exp2((zc - m) * LOG2E)
            s = tl.sum(p, 0)
        else:
            s = tl.sum(tl.exp(zc - m), 0)
        lse = m + tl.log(s)
        # an out-of-range target selects nothing and makes the loss NaN, which the trainer reports
        hit = cols == target
        zt = tl.sum(tl.where(hit, zc, 0.0), 0)
        ok = (target >= 0) & (target < V)
        loss = tl.where(ok, lse - zt, float("nan"))
        tl.store(loss_ptr + row + one, tl.zeros([1], tl.float32) + loss)
        if WITH_GRAD:
            if FAST:
                g = p * (1.0 / s) - tl.where(hit, 1.0, 0.0)
            else:
                g = tl.exp(zc - lse) - tl.where(hit, 1.0, 0.0)
            if SOFTCAP:
                g = g * (1.0 - th * th)
            tl.store(dz_ptr + row * dz_stride + cols, g.to(dz_ptr.dtype.element_ty), mask=mask)
    else:
        # pass 1: running max and sum of exponentials, one block of columns at a time
        m = tl.full([1], float("-inf"), tl.float32)
        s = tl.zeros([1], tl.float32)
        for off in range(0, V, BLOCK):
            c = off + cols
            z, _th = _load_capped(z_row + c, c < V, softcap, SOFTCAP, FAST)
            m_new = tl.maximum(m, tl.max(z, 0))  # every block holds a valid column, so m_new is finite
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        ok = (target >= 0) & (target < V)
        zt = tl.load(z_row + tl.where(ok, target, 0)).to(tl.float32)
        if SOFTCAP:
            zt, _th = _capped(zt, softcap, FAST)
        loss = tl.where(ok, lse - zt, float("nan"))
        tl.store(loss_ptr + row + one, loss)
        if WITH_GRAD:
            # pass 2: the row again (from L2 for rows of a few tens of KB), now writing the gradient
            for off in range(0, V, BLOCK):
                c = off + cols
                mask = c < V
                zc, th = _load_capped(z_row + c, mask, softcap, SOFTCAP, FAST)
                g = tl.exp(zc - lse) - tl.where(c == target, 1.0, 0.0)
                if SOFTCAP:
                    g = g * (1.0 - th * th)
                tl.store(dz_ptr + row * dz_stride + c, g.to(dz_ptr.dtype.element_ty), mask=mask)


def softcap_ce(z: torch.Tensor, targets: torch.Tensor, softcap: float, with_grad: bool,
               block: int | None = None, num_warps: int | None = None,
               inplace: bool = False, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (fp32 [N]) and, if `with_grad`, d loss / d z in z's dtype (else an empty tensor).

    `inplace` (with `with_grad`) writes the gradient over z itself and returns z as dz. That is safe because each
    program reads its row (or, past one block, each block and the target logit) before it writes there, and it
    halves the memory the head needs: the logits are dead once their gradient exists. `fast=False` keeps the
    correctly rounded divisions and separate exponentials (the first version; kept for comparison).
    """
    N, V = z.shape
    if inplace:
        if not (with_grad and z.is_contiguous()):
            raise ValueError("inplace needs with_grad=True and contiguous logits")
    elif z.stride(1) != 1:
        z = z.contiguous()
    loss = torch.empty(N, dtype=torch.float32, device=z.device)
    if inplace:
        dz = z
    else:
        dz = torch.empty_like(z, memory_format=torch.contiguous_format) if with_grad else z.new_empty(0)
    if N == 0:
        return loss, dz
    block = block or min(triton.next_power_of_2(V), MAX_BLOCK)
    if num_warps is None:
        # best of a sweep at [98,304 x 8,192] (docs/performance.md): the fast kernel keeps the row's exponentials
        # live, and at 16 warps it lost to 8
        num_warps = (8 if fast else 16) if block >= 8192 else 8 if block >= 2048 else 4
    _softcap_ce_kernel[(N,)](
        z, z.stride(0), targets, loss, dz, dz.stride(0) if with_grad else 0, V, float(softcap),
        SOFTCAP=softcap > 0, WITH_GRAD=with_grad, BLOCK=block, ONE_BLOCK=block >= V, FAST=fast, num_warps=num_warps)
    return loss, dz
