"""The MLP of every record stack, y = W_down leaky_relu(W_up x, s)^2, plain or fused.

Plain path (`mlp_backend=torch`, and always without autograd, so GPTQ's input hooks on the two linears see
their inputs): two cuBLAS GEMMs and Inductor's element-wise kernels between them. In a pr1514 step those
element-wise passes cost 40.9 ms of 707.8 on one H200 (forward 16.6, backward 24.4: docs/performance.md,
profile of 2026-12-04), each at the memory bandwidth.

Fused path (`mlp_backend=triton`): the up GEMM writes h and the activation a in its epilogue, and the backward's
GEMM dy @ W_down multiplies by the activation's derivative in its epilogue (golfnb._triton_mlp), so the
activation never takes a pass of its own. The other three GEMMs (down forward, both weight gradients, the
input gradient) stay on cuBLAS. The kernels are opaque custom ops to torch.compile (`golfnb::mlp_up_act`,
`golfnb::mlp_down_dact`, with fake implementations for tracing). Built after #1530, which measured about 3 %
of a step from fusing this activation into its GEMMs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from golfnb.fused_ce import CE_BACKENDS, resolve_kernel_backend

MLP_BACKENDS = CE_BACKENDS


def resolve_mlp_backend(name: str, device: torch.device | str, activation: str = "leaky_relu2") -> str:
    """`auto` -> `triton` on CUDA when Triton imports, else `torch`; an explicit `triton` must be able to run.
    relu2 is leaky_relu2 with slope 0, so both activations have the fused path."""
    resolved = resolve_kernel_backend("mlp_backend", name, device)
    if activation not in ("leaky_relu2", "relu2"):
        if name == "triton":
            raise ValueError(f"no fused MLP for activation {activation!r}; set mlp_backend=auto or torch")
        return "torch"
    return resolved


# ----------------------------------------------------------------------------------------- reference


def mlp_reference(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float) -> torch.Tensor:
    """The plain formula (what the model computes with mlp_backend=torch)."""
    return F.linear(F.leaky_relu(F.linear(x, w_up), slope).square(), w_down)


# ----------------------------------------------------------------------------------------- fused ops


@torch.library.custom_op("golfnb::mlp_up_act", mutates_args=())
def _mlp_up_act(x: torch.Tensor, w_up: torch.Tensor, slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    from golfnb import _triton_mlp

    return _triton_mlp.up_act(x, w_up, slope)


@_mlp_up_act.register_fake
def _mlp_up_act_fake(x, w_up, slope):
    return x.new_empty(x.shape[0], w_up.shape[0]), x.new_empty(x.shape[0], w_up.shape[0])


@torch.library.custom_op("golfnb::mlp_down_dact", mutates_args=())
def _mlp_down_dact(dy: torch.Tensor, w_down: torch.Tensor, h: torch.Tensor, slope: float) -> torch.Tensor:
    from golfnb import _triton_mlp

    return _triton_mlp.down_dact(dy, w_down, h, slope)


@_mlp_down_dact.register_fake
def _mlp_down_dact_fake(dy, w_down, h, slope):
    return h.new_empty(h.shape)


@torch.library.custom_op("golfnb::mlp_up_act_signs", mutates_args=())
def _mlp_up_act_signs(x: torch.Tensor, w_up: torch.Tensor, slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    from golfnb import _triton_mlp

    return _triton_mlp.up_act_signs(x, w_up, slope)


@_mlp_up_act_signs.register_fake
def _mlp_up_act_signs_fake(x, w_up, slope):
    rows, hidden = x.shape[0], w_up.shape[0]
    return x.new_empty(rows, hidden), x.new_empty(rows, (hidden + 7) // 8, dtype=torch.uint8)


@torch.library.custom_op("golfnb::mlp_down_dact_signs", mutates_args=())
def _mlp_down_dact_signs(dy: torch.Tensor, w_down: torch.Tensor, a: torch.Tensor, signs: torch.Tensor,
                         slope: float) -> torch.Tensor:
    from golfnb import _triton_mlp

    return _triton_mlp.down_dact_signs(dy, w_down, a, signs, slope)


@_mlp_down_dact_signs.register_fake
def _mlp_down_dact_signs_fake(dy, w_down, a, signs, slope):
    return a.new_empty(a.shape)


def _keeps_signs() -> bool:
    """Whether the backward works from a and the signs of h (tile option sign_mask) rather than from h."""
    from golfnb import _triton_mlp

    return bool(_triton_mlp.resolve_tile()["sign_mask"])


class _FusedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_up, w_down, slope):
        ctx.signs = _keeps_signs()
        if ctx.signs:  # h is never written: a and one bit of h per element are what the backward needs
            a, keep = _mlp_up_act_signs(x, w_up, slope)
        else:
            keep, a = _mlp_up_act(x, w_up, slope)
        y = a @ w_down.t()
        ctx.save_for_backward(x, w_up, w_down, keep, a)
        ctx.slope = slope
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_up, w_down, keep, a = ctx.saved_tensors
        dy = dy.contiguous()
        if ctx.signs:
            dh = _mlp_down_dact_signs(dy, w_down, a, keep, ctx.slope)
        else:
            dh = _mlp_down_dact(dy, w_down, keep, ctx.slope)
        grad_x = dh @ w_up if ctx.needs_input_grad[0] else None
        grad_up = dh.t() @ x if ctx.needs_input_grad[1] else None
        grad_down = dy.t() @ a if ctx.needs_input_grad[2] else None
        return grad_x, grad_up, grad_down, None


def fused_mlp(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float) -> torch.Tensor:
    """leaky_relu(x W_up^T, slope)^2 W_down^T for x [..., d], w_up [hidden, d], w_down [d, hidden] (one dtype),
    differentiable in all three."""
    if w_up.dim() != 2 or w_down.dim() != 2 or x.shape[-1] != w_up.shape[1] or w_down.shape != w_up.shape[::-1]:
        raise ValueError(f"fused_mlp wants x [..., d], w_up [hidden, d], w_down [d, hidden]; got {tuple(x.shape)}, "
                         f"{tuple(w_up.shape)}, {tuple(w_down.shape)}")
    if not (x.dtype == w_up.dtype == w_down.dtype):
        raise ValueError(f"x, w_up and w_down must share a dtype (got {x.dtype}, {w_up.dtype}, {w_down.dtype}); "
                         f"cast the weights first")
    lead = x.shape[:-1]
    y = _FusedMLP.apply(x.reshape(-1, x.shape[-1]), w_up, w_down, float(slope))
    return y.view(*lead, y.shape[-1])
