"""The training loss: LM head + soft-capped cross-entropy, plain or fused.

Plain path (`ce_backend=torch`, and always on CPU): z = h W^T in bf16, cast to fp32, soft-capped
c*tanh(z/c), F.cross_entropy. Under torch.compile Inductor fuses the soft-cap into the loss, but the fp32
logits and their gradient still cross memory several times: 29.4 ms of a 707.8 ms pr1514 step on one H200
(docs/performance.md, profile of 2026-12-04).

Fused path (`ce_backend=triton`): one Triton kernel reads the bf16 logits once and writes the per-token loss
and d loss / d z together (golfnb._triton_ce). The upstream gradient of each token's loss is a per-row scale,
so the backward applies it to the head GEMMs' small operands instead of to the [N, V] gradient:

    dL/dh = diag(g) dz W    = g[:, None] * (dz @ W)
    dL/dW = dz^T diag(g) h  = dz^T @ (g[:, None] * h)

which saves the full pass over the logits gradient that multiplying by g would cost. The kernel is an opaque
custom op to torch.compile (`golfnb::softcap_ce_grad_`, with a fake implementation for tracing) that writes
the gradient over the logits, so the head keeps one [N, V] bf16 buffer alive instead of two (1.5 GiB less per
pr1514 micro-step). The kernel alone, without autograd, is `golfnb._triton_ce.softcap_ce`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

CE_BACKENDS = ("auto", "triton", "torch")


def triton_interpreted() -> bool:
    """TRITON_INTERPRET=1: Triton runs kernels in its CPU interpreter (slow; how the CPU tests run the kernels)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else at import
        return False
    return True


def resolve_kernel_backend(field: str, name: str, device: torch.device | str) -> str:
    """A `<field>=auto|triton|torch` setting of one of golfnb's Triton kernels, resolved for `device`:
    `auto` -> `triton` on CUDA when Triton imports, else `torch`; an explicit `triton` must be able to run."""
    dev = torch.device(device)
    if name not in CE_BACKENDS:
        raise ValueError(f"{field} {name!r} is unknown; use one of {', '.join(CE_BACKENDS)}")
    if name == "auto":
        return "triton" if dev.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if dev.type != "cuda" and not triton_interpreted():
            raise ValueError(f"{field}=triton needs a CUDA device, not {dev} (or TRITON_INTERPRET=1 to run the "
                             f"kernel in Triton's slow CPU interpreter, for tests); set {field}=auto or torch")
        if not triton_available():
            raise ValueError(f"{field}=triton needs the triton package (it comes with PyTorch's CUDA wheels on "
                             f"Linux); install it or set {field}=auto or torch")
    return name


def resolve_ce_backend(name: str, device: torch.device | str) -> str:
    """The training loss's backend (config `ce_backend`), resolved for `device`."""
    return resolve_kernel_backend("ce_backend", name, device)


# ----------------------------------------------------------------------------------------- reference


def softcap_ce_reference(z: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:
    """Per-row loss of logits z [N, V] (any dtype, computed in fp32): the plain formula."""
    zf = z.float()
    if softcap > 0:
        zf = softcap * torch.tanh(zf / softcap)
    return F.cross_entropy(zf, targets, reduction="none")


# ----------------------------------------------------------------------------------------- fused op


@torch.library.custom_op("golfnb::softcap_ce_grad_", mutates_args=("z",))
def _softcap_ce_grad_inplace(z: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:
    """Per-row loss; z is overwritten by d loss / d z (the head's logits are not needed after)."""
    from golfnb import _triton_ce

    return _triton_ce.softcap_ce(z, targets, softcap, True, inplace=True)[0]


@_softcap_ce_grad_inplace.register_fake
def _softcap_ce_grad_inplace_fake(z, targets, softcap):
    return z.new_empty(z.shape[0], dtype=torch.float32)


class _HeadSoftcapCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, softcap):
        dz = h @ w.t()  # the logits, turned into their gradient in place by the kernel
        loss = _softcap_ce_grad_inplace(dz, targets, softcap)
        ctx.save_for_backward(h, w, dz)
        return loss

    @staticmethod
    def backward(ctx, g):
        h, w, dz = ctx.saved_tensors
        g = g.float()[:, None]
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = ((dz @ w).float() * g).to(h.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (dz.t() @ (h.float() * g).to(dz.dtype)).to(w.dtype)
        return grad_h, grad_w, None, None


def head_softcap_ce(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:
    """Per-token loss (fp32 [N]) of logits h W^T (h [N, d], w [V, d], same dtype), differentiable in h and w."""
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(f"head_softcap_ce wants h [N, d] and w [V, d]; got {tuple(h.shape)} and {tuple(w.shape)}")
    if h.dtype != w.dtype:
        raise ValueError(f"h and w must share a dtype (got {h.dtype} and {w.dtype}); cast w first")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"targets must be [N] = [{h.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32 or int64 token ids, got {targets.dtype}")
    return _HeadSoftcapCE.apply(h, w, targets, float(softcap))

