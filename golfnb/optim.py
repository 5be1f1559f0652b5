"""Optimizers of the record stacks: Muon (with MuonEq-R), its two distributed forms, the AdamW groups, the
wall-clock LR schedule, Muon momentum warm-up, and the EMA of the weights.

Reading order:

1. `zeropower_via_newtonschulz5`: the quintic Newton-Schulz orthogonalisation (modded-nanogpt's
   coefficients), batched over leading dimensions.
2. `Muon`: the readable reference. One loop over parameters; a 3-D parameter (a bank, #399) is treated as a
   stack of independent matrices, so the maths per slice is exactly that of a 2-D parameter.
3. `RoundRobinMuon` (the unbanked DDP stacks #1394 ... #1514): matrix i is orthogonalised only by
   rank i mod W (batched by shape on that rank), the results meet in one flat bf16 all-reduce.
4. `ParallelMuon` (#399/#549 ... #1533): banks padded to a multiple of W on their leading axis,
   gradients reduce-scattered, each rank runs momentum + Newton-Schulz on its shard only, updates all-gathered.
   Unlike the records, the momentum shards live in `optimizer.state`, so saving and restoring optimizer state
   (resume, or undoing the compile warm-up) covers them.
   Both run with any world size, one included (then without communication); the bundle always uses them.
5. `OptimizerBundle` / `build_optimizers`: the parameter groups of the records built from `model.param_roles()`,
   gradient averaging across ranks (golfnb uses no torch DDP), gradient clipping, per-step LR and momentum,
   and a complete, world-size independent `state_dict`.
6. `lr_multiplier`, `muon_momentum_at`, `EMA`.

All three Muon forms compute the update with the same `muon_direction` (momentum, Nesterov, MuonEq-R,
Newton-Schulz, shape scale; the update is bf16 in all of them) and apply p <- p (1 - lr wd) - lr O; tests
check them against each other and against a plain loop written in the test.

Per-step values (learning rate, momentum) are Python floats used only in eager code. The one function that
may be compiled (Newton-Schulz) takes nothing but the tensor, so changing them never recompiles.
"""
from __future__ import annotations

import copy
import functools
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from golfnb.config import ConfigError, Hyperparameters
from golfnb.distributed import DistContext, single_process_context

__all__ = [
    "NS5_COEFFS",
    "zeropower_via_newtonschulz5",
    "compiled_newtonschulz5",
    "muon_scale",
    "muon_direction",
    "apply_muon_update",
    "Muon",
    "RoundRobinMuon",
    "ParallelMuon",
    "OptimizerBundle",
    "build_optimizers",
    "lr_multiplier",
    "muon_momentum_at",
    "EMA",
]

NSFn = Callable[[Tensor, int], Tensor]

# =========================================================================== Newton-Schulz

# Quintic iteration coefficients tuned in modded-nanogpt (Keller Jordan): they push every singular value of
# the normalised input into roughly [0.7, 1.2] in five steps rather than converging to exactly 1, which is
# all Muon needs and is far cheaper than an SVD.
NS5_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximate the orthogonal factor U V^T of G = U S V^T (batched over leading dims).

    Computed in bf16 as the records do (`dtype` exists so tests can take bf16 rounding, which depends on the
    matmul kernel, out of comparisons between batched and per-matrix forms). The iteration works on the
    wide orientation (rows <= cols) so X X^T is the small Gram matrix; each matrix is first scaled to unit
    Frobenius norm, which bounds its spectral norm by 1 (the iteration's domain).
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    a, b, c = NS5_COEFFS
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


@functools.lru_cache(maxsize=None)
def compiled_newtonschulz5() -> NSFn:
    """`zeropower_via_newtonschulz5` under torch.compile (built on first call, never at import).

    Shapes are static (one graph per batch shape: four per model, measured 10-50 % faster than eager on an
    H200); `steps` is a Python int and so part of the graph, which is fine since it never changes during a
    run. No fullgraph: past dynamo's recompile limit, new shapes fall back to eager instead of failing.
    """
    return torch.compile(zeropower_via_newtonschulz5, dynamic=False)


# =========================================================================== shared Muon maths


def muon_scale(shape: Sequence[int]) -> float:
    """sqrt(max(1, rows/cols)): keeps the update RMS comparable for tall matrices (2.0 for a 2048x512 W_up)."""
    rows, cols = shape[-2], shape[-1]
    return math.sqrt(max(1.0, rows / cols))


def muon_direction(grad: Tensor, buf: Tensor, momentum: float, nesterov: bool, row_normalize: bool,
                   ns_steps: int, ns_fn: NSFn = zeropower_via_newtonschulz5) -> Tensor:
    """Advance the momentum buffer `buf` in place with `grad`; return the scaled orthogonalised update.

    Works on a matrix or a stack of matrices (leading dims batched); every slice gets the same maths.
    The update is bf16 in every form (the records communicate it in bf16), so all forms apply the same numbers.
    """
    g = grad if grad.dtype == buf.dtype else grad.to(buf.dtype)
    buf.mul_(momentum).add_(g)  # no dampening
    u = g.add(buf, alpha=momentum) if nesterov else buf
    if row_normalize:
        # MuonEq-R (#1217, arXiv:2603.28254): equalise the rows (output units) before orthogonalising.
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    o = ns_fn(u, ns_steps)
    return (o * muon_scale(o.shape)).to(torch.bfloat16)


def apply_muon_update(p: Tensor, update: Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay scaled by the scheduled lr, then the step: p <- p(1 - lr wd) - lr O."""
    if weight_decay != 0.0:
        p.mul_(1.0 - lr * weight_decay)
    p.add_(update.to(p.dtype), alpha=-lr)


def _check_matrix_params(params: Sequence[Tensor], who: str) -> None:
    for p in params:
        if p.ndim not in (2, 3):
            raise ValueError(
                f"{who} got a parameter of shape {tuple(p.shape)}; Muon is for 2-D matrices or 3-D banks of "
                f"matrices. Give 1-D parameters (norm gains, scales) and embeddings to AdamW instead")


# =========================================================================== the readable reference


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz (Keller Jordan, modded-nanogpt), with optional MuonEq-R.

    For each matrix W with gradient G (already averaged over ranks):
        M <- mu M + G;  U <- G + mu M (Nesterov) or M;  U <- U / ||U_row|| (MuonEq-R);
        O <- NS5(U) * sqrt(max(1, rows/cols));  W <- W (1 - lr wd) - lr O
    A 3-D parameter is a bank: a stack of independent matrices along axis 0, each treated as above.

    When not to use it: 1-D parameters (gains, scales, biases) have no matrix structure to orthogonalise;
    embedding and unembedding tables are lookups whose rows see very different gradient traffic, and the
    records train them with AdamW. Use AdamW for all of those (OptimizerBundle does).

    Momentum buffers are fp32 by default (`momentum_dtype`); the banked records keep bf16 shards.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, row_normalize: bool = False, weight_decay: float = 0.0,
                 ns_steps: int = 5, *, momentum_dtype: torch.dtype = torch.float32,
                 ns_fn: NSFn | None = None):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, row_normalize=row_normalize,
                        weight_decay=weight_decay, ns_steps=ns_steps)
        super().__init__(params, defaults)
        _check_matrix_params([p for g in self.param_groups for p in g["params"]], type(self).__name__)
        self.momentum_dtype = momentum_dtype
        self.ns_fn: NSFn = ns_fn or zeropower_via_newtonschulz5

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(p.shape, dtype=self.momentum_dtype, device=p.device)
        return state["momentum_buffer"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                o = muon_direction(p.grad, self._momentum_buffer(p), group["momentum"], group["nesterov"],
                                   group["row_normalize"], group["ns_steps"], self.ns_fn)
                apply_muon_update(p, o, group["lr"], group["weight_decay"])
        return loss

    # ---- full (world-size independent) momentum state, used by OptimizerBundle.state_dict
    def params_in_order(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def export_momentum(self) -> list[Tensor | None]:
        """One full momentum tensor per parameter (None where no step was taken yet). Collective in
        the distributed subclasses: every rank must call it."""
        return [self.state[p]["momentum_buffer"].clone() if "momentum_buffer" in self.state[p] else None
                for p in self.params_in_order()]

    def import_momentum(self, buffers: Sequence[Tensor | None]) -> None:
        """Inverse of export_momentum; None clears the state (equivalent to a zero buffer)."""
        params = self.params_in_order()
        _check_len(buffers, params)
        for p, b in zip(params, buffers):
            self.state.pop(p, None)
            if b is not None:
                _check_shape(b, p.shape)
                self._momentum_buffer(p).copy_(b)


def _check_len(buffers: Sequence[Any], params: Sequence[Tensor]) -> None:
    if len(buffers) != len(params):
        raise ValueError(f"momentum state holds {len(buffers)} tensors but this optimizer has {len(params)} "
                         f"parameters; load state saved from the same model configuration")


def _check_shape(b: Tensor, shape: Sequence[int]) -> None:
    if tuple(b.shape) != tuple(shape):
        raise ValueError(f"momentum of shape {tuple(b.shape)} does not fit a parameter of shape "
                         f"{tuple(shape)}; load state saved from the same model configuration")


# =========================================================================== collectives with fallbacks


class _Comm:
    """The collectives the distributed Muon forms need, with a gloo-safe fallback.

    `native=True` uses reduce_scatter_tensor / all_gather_into_tensor (NCCL; recent gloo has them too);
    `native=False` emulates both with all_reduce(SUM) on a zero-padded full buffer. Averaging is always
    SUM followed by a division by W, so both forms compute identical numbers (ReduceOp.AVG is NCCL-only).
    """

    def __init__(self, rank: int, world_size: int, native: bool, group: Any = None):
        self.rank, self.world_size, self.native, self.group = rank, world_size, native, group

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: Tensor, async_op: bool = False) -> Any:
        if not self.active:
            return None
        return dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)

    def reduce_scatter_sum(self, out: Tensor, full: Tensor) -> Any:
        """Async. `out` is this rank's slot of the sum. Fallback: `out` must be a view of `full` at that slot."""
        if not self.active:
            if out.data_ptr() != full.data_ptr():
                out.copy_(full)
            return None
        if self.native:
            return dist.reduce_scatter_tensor(out, full, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return dist.all_reduce(full, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    def all_gather(self, full: Tensor, shard: Tensor) -> Any:
        """Async. Fills `full` with every rank's shard. Fallback: zero the other slots, then sum."""
        if not self.active:
            if full.data_ptr() != shard.data_ptr():
                full.copy_(shard)
            return None
        if self.native:
            return dist.all_gather_into_tensor(full, shard, group=self.group, async_op=True)
        s = shard.shape[0]
        full.zero_()
        full[self.rank * s:(self.rank + 1) * s].copy_(shard)
        return dist.all_reduce(full, op=dist.ReduceOp.SUM, group=self.group, async_op=True)


def _wait(handle: Any) -> None:
    if handle is not None:
        handle.wait()


# =========================================================================== round robin


class RoundRobinMuon(Muon):
    """Muon for 2-D matrices whose gradients are replicated (already averaged), with the work split across
    ranks (the #1394 lineage) and batched by shape.

    Matrix i (in parameter order) is orthogonalised only on rank i mod W, which alone holds its momentum.
    A rank's matrices of one shape are stacked so that Newton-Schulz runs once per shape rather than once
    per matrix: with ~66 small matrices the per-matrix loop is bound by kernel-launch overhead (measured
    36-45 ms per step on one H200 for the 11-layer stack, against about 3 ms batched). Each rank writes
    its bf16 updates into a flat buffer sized for all matrices (zeros elsewhere); one all_reduce(SUM) gives
    every rank every update (adding zeros is exact) and every rank applies weight decay and the update to
    all matrices with foreach ops, so the replicas stay identical. With world_size 1 this is simply the
    batched single-process form of `Muon`.

    A shape group's momentum buffers are views of one stacked tensor, so the batched maths updates them in
    place while `state[p]["momentum_buffer"]` still names each matrix's own buffer.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], *, rank: int = 0, world_size: int = 1,
                 process_group: Any = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        for p in self.params_in_order():
            if p.ndim != 2:
                raise ValueError(f"RoundRobinMuon takes 2-D matrices only, got shape {tuple(p.shape)}; "
                                 f"give 3-D banks to ParallelMuon")
        self.rank, self.world_size = rank, world_size
        self._comm = _Comm(rank, world_size, native=False, group=process_group)
        self._params = self.params_in_order()
        self._offsets: list[int] = []
        total = 0
        for p in self._params:
            self._offsets.append(total)
            total += p.numel()
        dev = self._params[0].device if self._params else torch.device("cpu")
        self._flat = torch.zeros(total, dtype=torch.bfloat16, device=dev)
        self._views = [self._flat[o:o + p.numel()].view(p.shape) for o, p in zip(self._offsets, self._params)]
        # This rank's matrices, batched per (param group, shape), momentum stacked per batch.
        self._batches: list[tuple[dict, list[int], Tensor]] = []
        self._members: list[tuple[dict, list[int]]] = []  # every matrix, per param group (for the update)
        i = 0
        for group in self.param_groups:
            by_shape: dict[tuple[int, ...], list[int]] = {}
            everyone: list[int] = []
            for p in group["params"]:
                if self.owns(i):
                    by_shape.setdefault(tuple(p.shape), []).append(i)
                everyone.append(i)
                i += 1
            self._members.append((group, everyone))
            for shape, idxs in by_shape.items():
                mom = torch.zeros((len(idxs),) + shape, dtype=self.momentum_dtype, device=dev)
                for j, k in enumerate(idxs):
                    self.state[self._params[k]]["momentum_buffer"] = mom[j]
                self._batches.append((group, idxs, mom))

    def owns(self, index: int) -> bool:
        return index % self.world_size == self.rank

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params
        if self.world_size > 1:
            self._flat.zero_()  # other ranks' slots must add zeros
        for group, idxs, mom in self._batches:
            live = [j for j, k in enumerate(idxs) if params[k].grad is not None]
            if not live:
                continue
            G = torch.stack([params[idxs[j]].grad for j in live])
            args = (group["momentum"], group["nesterov"], group["row_normalize"], group["ns_steps"], self.ns_fn)
            if len(live) == len(idxs):
                o = muon_direction(G, mom, *args)
            else:  # some matrices got no gradient this step: leave their momentum alone, as Muon does
                buf = mom[live]
                o = muon_direction(G, buf, *args)
                mom[live] = buf
            torch._foreach_copy_([self._views[idxs[j]] for j in live], list(o.unbind(0)))
        self._comm.all_reduce_sum(self._flat)
        converted: dict[torch.dtype, Tensor] = {torch.bfloat16: self._flat}
        for group, everyone in self._members:
            ks = [k for k in everyone if params[k].grad is not None]
            if not ks:
                continue
            ps = [params[k] for k in ks]
            ups = []
            for k, p in zip(ks, ps):
                flat = converted.get(p.dtype)
                if flat is None:
                    flat = converted[p.dtype] = self._flat.to(p.dtype)
                ups.append(flat[self._offsets[k]:self._offsets[k] + p.numel()].view(p.shape))
            lr, wd = group["lr"], group["weight_decay"]
            if wd != 0.0:
                torch._foreach_mul_(ps, 1.0 - lr * wd)
            torch._foreach_add_(ps, ups, alpha=-lr)
        return loss

    def export_momentum(self) -> list[Tensor | None]:
        # Owners write their buffers into a zero fp32 flat buffer; a SUM makes it whole on every rank.
        flat = torch.zeros(self._flat.numel(), dtype=self.momentum_dtype, device=self._flat.device)
        for i, p in enumerate(self._params):
            if self.owns(i):
                flat[self._offsets[i]:self._offsets[i] + p.numel()].copy_(
                    self.state[p]["momentum_buffer"].reshape(-1))
        self._comm.all_reduce_sum(flat)
        return [flat[o:o + p.numel()].view(p.shape).clone() for o, p in zip(self._offsets, self._params)]

    def import_momentum(self, buffers: Sequence[Tensor | None]) -> None:
        _check_len(buffers, self._params)
        for i, (p, b) in enumerate(zip(self._params, buffers)):
            if not self.owns(i):
                continue
            buf = self.state[p]["momentum_buffer"]  # a view into its batch: write in place
            if b is None:
                buf.zero_()
            else:
                _check_shape(b, p.shape)
                buf.copy_(b)


# =========================================================================== Parallel Muon on banks


@dataclass
class _BankBuffers:
    padded: int  # leading size rounded up to a multiple of W
    shard: int  # slices per rank
    # Communication buffers (None with world_size 1, where the gradient is used in place):
    grad_full: Tensor | None  # [padded, r, c] comm dtype; padding rows stay zero
    grad_shard: Tensor | None  # [shard, r, c]: this rank's averaged slices (a view of grad_full in the fallback)
    upd_full: Tensor | None  # [padded, r, c] bf16: every rank's updates after the all-gather
    upd_shard: Tensor | None  # [shard, r, c] bf16: this rank's updates
    reduce_handle: Any = None
    gather_handle: Any = None
    active: bool = False  # had a gradient this step
    reduced: bool = False


class ParallelMuon(Muon):
    """Muon on 3-D parameter banks, sharded over ranks (Parallel Muon, #399).

    Each bank [B, r, c] is padded to B' = W * ceil(B/W) slices. The step has three phases that
    OptimizerBundle interleaves with the AdamW step:
      1. `launch_grad_reduce()`: copy each bank's local gradient into its padded buffer and start an async
         reduce-scatter (largest bank first), so rank k receives the averaged slices [k s, (k+1) s).
      2. (the bundle all-reduces the replicated gradients and steps AdamW meanwhile; for a global-norm clip
         it calls `wait_grad_reduce()`, `shard_sq_norm()` and `scale_shards_()`.)
      3. `step()`: per bank, momentum / Nesterov / row-norm / batched NS5 on the owned shard only, then an
         async all-gather of the bf16 updates; while it flies the previous bank gets WD + its update.
    `step()` alone (right after backward) runs all three, like any optimizer.
    Momentum shards live in `self.state[p]["momentum_buffer"]` (shape [s, r, c]) so `state_dict` sees them.
    Padding slices have zero gradient, so their momentum and update stay exactly zero.

    With world_size 1 there is no communication and no copy: the gradient is used in place and the update
    applied straight from Newton-Schulz, i.e. exactly `Muon` on banks.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], *, rank: int = 0, world_size: int = 1,
                 native_collectives: bool = False, comm_dtype: torch.dtype = torch.float32,
                 process_group: Any = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        for p in self.params_in_order():
            if p.ndim != 3:
                raise ValueError(f"ParallelMuon takes 3-D banks only, got shape {tuple(p.shape)}; "
                                 f"give 2-D matrices to Muon / RoundRobinMuon")
        self.rank, self.world_size = rank, world_size
        self.comm_dtype = comm_dtype
        self._comm = _Comm(rank, world_size, native=native_collectives, group=process_group)
        self._bufs: dict[Tensor, _BankBuffers] = {}
        for p in self.params_in_order():
            B, r, c = p.shape
            s = -(-B // world_size)
            padded = s * world_size
            if self._comm.active:
                grad_full = torch.zeros((padded, r, c), dtype=comm_dtype, device=p.device)
                lo = rank * s
                grad_shard = torch.zeros((s, r, c), dtype=comm_dtype, device=p.device) if self._comm.native \
                    else grad_full[lo:lo + s]
                upd_full = torch.zeros((padded, r, c), dtype=torch.bfloat16, device=p.device)
                upd_shard = torch.zeros((s, r, c), dtype=torch.bfloat16, device=p.device)
                self._bufs[p] = _BankBuffers(padded, s, grad_full, grad_shard, upd_full, upd_shard)
            else:
                self._bufs[p] = _BankBuffers(padded, s, None, None, None, None)
            self.state[p]["momentum_buffer"] = torch.zeros((s, r, c), dtype=self.momentum_dtype, device=p.device)
        # Largest bank first: its communication is the longest, so it should start first (#399).
        self._order = sorted(self.params_in_order(), key=lambda q: -q.numel())
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._launched = False

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            bb = self._bufs[p]
            state["momentum_buffer"] = torch.zeros((bb.shard,) + tuple(p.shape[1:]), dtype=self.momentum_dtype,
                                                   device=p.device)
        return state["momentum_buffer"]

    # ---- phase 1
    @torch.no_grad()
    def launch_grad_reduce(self) -> None:
        self._launched = True
        for p in self._order:
            bb = self._bufs[p]
            bb.active = p.grad is not None
            bb.reduced = False
            if not bb.active:
                continue
            if not self._comm.active:
                bb.grad_shard = p.grad  # one rank: the whole bank is the shard, used in place
                bb.reduced = True
                continue
            B = p.shape[0]
            bb.grad_full[:B].copy_(p.grad)
            if bb.padded > B:
                bb.grad_full[B:].zero_()  # the fallback's all-reduce left other ranks' sums here
            bb.reduce_handle = self._comm.reduce_scatter_sum(bb.grad_shard, bb.grad_full)

    def _finish_reduce(self, p: Tensor) -> None:
        bb = self._bufs[p]
        if bb.reduced or not bb.active:
            return
        _wait(bb.reduce_handle)
        bb.reduce_handle = None
        bb.grad_shard.div_(self.world_size)
        bb.reduced = True

    @torch.no_grad()
    def wait_grad_reduce(self) -> None:
        for p in self._order:
            self._finish_reduce(p)

    def _active_shards(self) -> list[Tensor]:
        return [self._bufs[p].grad_shard for p in self._order if self._bufs[p].active]

    def shard_sq_norm(self) -> Tensor:
        """Sum of squares of this rank's averaged gradient slices (fp32, 0-D). Padding contributes 0."""
        sq = self._active_shards()
        dev = self._order[0].device if self._order else torch.device("cpu")
        if not sq:
            return torch.zeros((), dtype=torch.float32, device=dev)
        return torch.stack(torch._foreach_norm(sq, 2, dtype=torch.float32)).square().sum()

    def scale_shards_(self, coef: Tensor) -> None:
        sh = self._active_shards()
        if sh:
            torch._foreach_mul_(sh, coef)

    # ---- phase 3
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._launched:  # used on its own, like Muon: step() right after backward
            self.launch_grad_reduce()
        pending: Tensor | None = None
        for p in self._order:
            bb = self._bufs[p]
            if not bb.active:
                continue
            self._finish_reduce(p)
            g = self._group_of[p]
            o = muon_direction(bb.grad_shard, self._momentum_buffer(p), g["momentum"], g["nesterov"],
                               g["row_normalize"], g["ns_steps"], self.ns_fn)
            if not self._comm.active:
                apply_muon_update(p, o, g["lr"], g["weight_decay"])
                bb.grad_shard = None  # do not keep the gradient alive past zero_grad
                continue
            bb.upd_shard.copy_(o)
            bb.gather_handle = self._comm.all_gather(bb.upd_full, bb.upd_shard)
            if pending is not None:
                self._apply(pending)
            pending = p
        if pending is not None:
            self._apply(pending)
        for p in self._order:
            self._bufs[p].active = False
        self._launched = False
        return loss

    def _apply(self, p: Tensor) -> None:
        bb = self._bufs[p]
        _wait(bb.gather_handle)
        bb.gather_handle = None
        g = self._group_of[p]
        apply_muon_update(p, bb.upd_full[:p.shape[0]], g["lr"], g["weight_decay"])

    # ---- full momentum (collective)
    def export_momentum(self) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for p in self.params_in_order():
            bb = self._bufs[p]
            shard = self._momentum_buffer(p)
            full = torch.zeros((bb.padded,) + tuple(p.shape[1:]), dtype=shard.dtype, device=p.device)
            _wait(self._comm.all_gather(full, shard))
            out.append(full[:p.shape[0]].clone())
        return out

    def import_momentum(self, buffers: Sequence[Tensor | None]) -> None:
        params = self.params_in_order()
        _check_len(buffers, params)
        for p, b in zip(params, buffers):
            mom = self._momentum_buffer(p)
            mom.zero_()
            if b is None:
                continue
            _check_shape(b, p.shape)
            bb = self._bufs[p]
            lo = self.rank * bb.shard
            hi = min(lo + bb.shard, p.shape[0])
            if hi > lo:
                mom[:hi - lo].copy_(b[lo:hi])


# =========================================================================== schedule


def muon_momentum_at(cfg: Hyperparameters, step: int) -> float:
    """Muon momentum warm-up by step: linear from muon_momentum_warmup_start to muon_momentum."""
    n = cfg.muon_momentum_warmup_steps
    f = 1.0 if n <= 0 else min(max(step, 0) / n, 1.0)
    return (1.0 - f) * cfg.muon_momentum_warmup_start + f * cfg.muon_momentum


def lr_multiplier(cfg: Hyperparameters, step: int, elapsed_s: float, avg_step_s: float | None = None) -> float:
    """LR scale for every group. No warm-up; a linear warm-down to min_lr at the end.

    * `warmdown_frac` form (SP8192 records): frac = elapsed / training_cap_seconds, or step / iterations when
      there is no clock (max_wallclock_seconds = 0); 1 before 1 - warmdown_frac, then
      max((1 - frac) / warmdown_frac, min_lr).
    * `warmdown_iters` form (older stacks; used when warmdown_iters > 0): without a clock, the last
      warmdown_iters steps decay linearly; with a clock, the warm-down length in seconds is
      warmdown_iters * avg_step_s (avg_step_s defaults to elapsed / step) and the multiplier is
      remaining_time / that length once the remaining time falls below it.
    """
    cap = cfg.training_cap_seconds
    if cfg.warmdown_iters > 0:
        wd_iters = cfg.warmdown_iters
        if cap <= 0:
            start = max(cfg.iterations - wd_iters, 0)
            if step < start:
                return 1.0
            return max((cfg.iterations - step) / wd_iters, cfg.min_lr)
        if avg_step_s is None:
            avg_step_s = elapsed_s / max(step, 1)
        warmdown_s = wd_iters * avg_step_s
        remaining = max(cap - elapsed_s, 0.0)
        if remaining > warmdown_s:
            return 1.0
        return max(remaining / max(warmdown_s, 1e-9), cfg.min_lr)
    frac = elapsed_s / cap if cap > 0 else step / cfg.iterations
    wf = cfg.warmdown_frac
    if wf <= 0.0 or frac < 1.0 - wf:
        return 1.0
    return max((1.0 - frac) / wf, cfg.min_lr)


# =========================================================================== the bundle

ROLES = ("matrix", "embed", "head", "scalar")


@dataclass
class _AdamGroupSpec:
    name: str
    base_lr: float
    weight_decay: float
    names: list[str] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)


def _sq_norm(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float32)).square().sum()


class OptimizerBundle:
    """Everything that turns averaged-or-not local gradients into a parameter update, for one model.

    Built by `build_optimizers(model, cfg, dist)`. Per training step:

        loss.backward()  (every micro-step; the loop scales the loss by 1/grad_accum)
        bundle.step(step, lr_scale)   # communicate, clip, AdamW + Muon
        bundle.zero_grad()

    Groups: role "matrix" -> Muon (lr matrix_lr, wd muon_wd); "embed" -> AdamW
    (tied_embed_lr, or embed_lr for an untied input embedding; wd embed_wd); "scalar" -> AdamW (scalar_lr,
    adam_wd); "head" -> AdamW (head_lr, no weight decay, as the records' plain Adam).

    Distributed (no torch DDP): replicated gradients (everything but banks) are averaged with flat,
    coalesced all-reduces; banks go through Parallel Muon's reduce-scatter. One process: nothing to do.

    Options (keyword-only; the defaults are what training uses):
      compile_ns: torch.compile the Newton-Schulz function (default: on CUDA unless compile_mode is none).
      ns_fn: a Newton-Schulz function to use instead (tests pass a float64 one).
      momentum_dtype: Muon momentum buffers; fp32 by default (the banked records keep bf16 shards, which
        loses low bits of a 0.99-momentum sum).
      bank_comm_dtype: dtype of the bank gradients' reduce-scatter; fp32 by default, bf16 halves the traffic
        as the banked records do.
      native_collectives: reduce_scatter_tensor / all_gather_into_tensor (default on NCCL) or their
        all_reduce emulation (default on gloo); same numbers either way.
      fused_adam: fused AdamW (default on CUDA).
      bucket_bytes: size of the flat buffers the replicated gradients are all-reduced in.
    """

    def __init__(self, model: nn.Module, cfg: Hyperparameters, dist_ctx: DistContext | None = None, *,
                 compile_ns: bool | None = None, ns_fn: NSFn | None = None,
                 momentum_dtype: torch.dtype = torch.float32, bank_comm_dtype: torch.dtype = torch.float32,
                 native_collectives: bool | None = None, fused_adam: bool | None = None,
                 bucket_bytes: int = 64 << 20):
        self.cfg = cfg
        self.dist = dist_ctx or single_process_context()
        W, rank = self.dist.world_size, self.dist.rank
        if W > 1 and not self.dist.enabled:
            raise ValueError("DistContext says world_size > 1 but enabled=False; build it with init_distributed")
        if not hasattr(model, "param_roles"):
            raise TypeError(f"{type(model).__name__} has no param_roles(); the model must map every parameter "
                            f"name to one of {ROLES}")
        roles: Mapping[str, str] = model.param_roles()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        names = {n for n, _ in named}
        missing = sorted(names - set(roles))
        if missing:
            raise ValueError(f"param_roles() gives no role for {missing[:5]}; every trainable parameter needs "
                             f"one of {ROLES}")
        bad = {n: r for n, r in roles.items() if n in names and r not in ROLES}
        if bad:
            raise ValueError(f"unknown roles {bad}; use one of {ROLES}")
        if cfg.grad_clip_mode not in ("global", "per_rank"):
            raise ConfigError(f"grad_clip_mode={cfg.grad_clip_mode!r} must be 'global' or 'per_rank'")

        # ---- groups
        embed_lr = cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr
        specs = {
            "embed": _AdamGroupSpec("embed", embed_lr, cfg.embed_wd),
            "scalar": _AdamGroupSpec("scalar", cfg.scalar_lr, cfg.adam_wd),
            "head": _AdamGroupSpec("head", cfg.head_lr, 0.0),
        }
        self.matrix_names: list[str] = []
        self.bank_names: list[str] = []
        matrices: list[Tensor] = []
        banks: list[Tensor] = []
        for n, p in named:
            role = roles[n]
            if role == "matrix":
                if p.ndim == 3:
                    self.bank_names.append(n)
                    banks.append(p)
                elif p.ndim == 2:
                    self.matrix_names.append(n)
                    matrices.append(p)
                else:
                    raise ValueError(f"{n} has role 'matrix' but shape {tuple(p.shape)}; matrices are 2-D "
                                     f"(or 3-D banks). Give it the 'scalar' role instead")
            else:
                specs[role].names.append(n)
                specs[role].params.append(p)
        if cfg.bank_params and matrices and not banks:
            raise ConfigError("cfg.bank_params=True but the model has only 2-D matrices; build the model from "
                              "the same config (or set bank_params=False)")
        if not cfg.bank_params and banks:
            raise ConfigError(f"the model has 3-D banks ({self.bank_names[0]}, ...) but cfg.bank_params=False; "
                              f"build the model from the same config (or set bank_params=True)")
        self.adam_specs = [s for s in specs.values() if s.params]

        device = named[0][1].device if named else torch.device("cpu")
        self.device = device
        if fused_adam is None:
            fused_adam = device.type == "cuda"
        adam_groups = [dict(params=s.params, lr=s.base_lr, base_lr=s.base_lr, weight_decay=s.weight_decay,
                            name=s.name) for s in self.adam_specs]
        self.adam: torch.optim.AdamW | None = None
        if adam_groups:
            self.adam = torch.optim.AdamW(adam_groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                          fused=True if fused_adam else None)

        if ns_fn is None:
            if compile_ns is None:
                compile_ns = cfg.compile_mode != "none" and device.type == "cuda"
            ns_fn = compiled_newtonschulz5() if compile_ns else zeropower_via_newtonschulz5
        muon_kw = dict(lr=cfg.matrix_lr, momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov,
                       row_normalize=cfg.muon_row_normalize, weight_decay=cfg.muon_wd,
                       ns_steps=cfg.muon_backend_steps, momentum_dtype=momentum_dtype, ns_fn=ns_fn)
        if native_collectives is None:
            native_collectives = self.dist.backend == "nccl"
        # The fast forms for any world size (with W = 1 they do no communication): 2-D matrices batched by
        # shape and split round-robin across ranks, banks sharded on their leading axis. `Muon` is the
        # readable reference they are tested against.
        self.muon: RoundRobinMuon | None = None
        self.parallel: ParallelMuon | None = None
        if matrices:
            self.muon = RoundRobinMuon(matrices, rank=rank, world_size=W, **muon_kw)
        if banks:
            self.parallel = ParallelMuon(banks, rank=rank, world_size=W, native_collectives=native_collectives,
                                         comm_dtype=bank_comm_dtype, **muon_kw)

        # Replicated gradients (averaged by all-reduce) = every trainable parameter except the banks.
        bank_ids = {id(p) for p in banks}
        self._replicated = [p for _, p in named if id(p) not in bank_ids]
        self._all = [p for _, p in named]
        self._bucket_bytes = bucket_bytes
        self._comm = _Comm(rank, W, native=native_collectives)
        self.last_grad_norm: Tensor | None = None
        self.lr_scale = 1.0
        self.momentum = muon_momentum_at(cfg, 0)

    # ------------------------------------------------------------------ per-step values
    def set_hyperparameters(self, step: int, lr_scale: float) -> None:
        """Scheduled lr of every group and Muon's warm-up momentum (plain floats: nothing recompiles)."""
        self.lr_scale = float(lr_scale)
        self.momentum = muon_momentum_at(self.cfg, step)
        if self.adam is not None:
            for g in self.adam.param_groups:
                g["lr"] = g["base_lr"] * self.lr_scale
        for opt in (self.muon, self.parallel):
            if opt is not None:
                for g in opt.param_groups:
                    g["lr"] = self.cfg.matrix_lr * self.lr_scale
                    g["momentum"] = self.momentum

    def current_lrs(self) -> dict[str, float]:
        out = {}
        if self.adam is not None:
            out.update({g["name"]: g["lr"] for g in self.adam.param_groups})
        for opt in (self.muon, self.parallel):
            if opt is not None:
                out["matrix"] = opt.param_groups[0]["lr"]
        return out

    # ------------------------------------------------------------------ communication
    def _average_replicated(self) -> None:
        """Average replicated grads over ranks: flat per-dtype buckets, all started before any is waited on."""
        if not self._comm.active:
            return
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in self._replicated:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        pending = []
        for grads in by_dtype.values():
            bucket: list[Tensor] = []
            size = 0
            for g in grads:
                bucket.append(g)
                size += g.numel() * g.element_size()
                if size >= self._bucket_bytes:
                    pending.append(self._launch_bucket(bucket))
                    bucket, size = [], 0
            if bucket:
                pending.append(self._launch_bucket(bucket))
        W = self.dist.world_size
        for handle, flat, bucket in pending:
            _wait(handle)
            flat.div_(W)
            torch._foreach_copy_(bucket, torch._utils._unflatten_dense_tensors(flat, bucket))

    def _launch_bucket(self, bucket: list[Tensor]) -> tuple[Any, Tensor, list[Tensor]]:
        flat = torch._utils._flatten_dense_tensors(bucket)
        return self._comm.all_reduce_sum(flat, async_op=True), flat, bucket

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, step: int, lr_scale: float) -> None:
        """One optimizer step: schedule values, gradient communication, clipping, AdamW, Muon.

        Clipping (grad_clip_norm > 0), two orders:
          * "global": the L2 norm of the *averaged* gradient over all parameters (what the DDP stacks clip,
            #1394 ... #1514). With banks it is assembled from the replicated grads' norm (identical on every
            rank) plus the all-reduced sum of squares of each rank's bank shards.
          * "per_rank": each rank clips its *local* gradient before any communication, as the banked SP8192
            records do (#1523/#1530/#1533 call clip_grad_norm_ before their reduce-scatter); the averaged
            gradient can then have a norm below the threshold even when no rank's did, and each rank's
            contribution is weighted by its own clip factor.
        With one process the two are the same.
        """
        self.set_hyperparameters(step, lr_scale)
        clip = self.cfg.grad_clip_norm
        W = self.dist.world_size
        self.last_grad_norm = None
        if clip > 0 and (self.cfg.grad_clip_mode == "per_rank" or W == 1):
            grads = [p.grad for p in self._all if p.grad is not None]
            norm = _sq_norm(grads, self.device).sqrt()
            self._scale(grads, norm, clip)
            self.last_grad_norm = norm
        if self.parallel is not None:
            self.parallel.launch_grad_reduce()
        self._average_replicated()
        if clip > 0 and self.cfg.grad_clip_mode == "global" and W > 1:
            grads = [p.grad for p in self._replicated if p.grad is not None]
            sq = _sq_norm(grads, self.device)
            if self.parallel is not None:
                self.parallel.wait_grad_reduce()
                shard_sq = self.parallel.shard_sq_norm()
                self._comm.all_reduce_sum(shard_sq)
                sq = sq + shard_sq
            norm = sq.sqrt()
            coef = self._scale(grads, norm, clip)
            if self.parallel is not None:
                self.parallel.scale_shards_(coef)
            self.last_grad_norm = norm
        if self.adam is not None:
            self.adam.step()
        if self.muon is not None:
            self.muon.step()
        if self.parallel is not None:
            self.parallel.step()

    @staticmethod
    def _scale(grads: list[Tensor], norm: Tensor, max_norm: float) -> Tensor:
        # Same factor as torch.nn.utils.clip_grad_norm_, kept as a tensor (no host sync).
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        if grads:
            torch._foreach_mul_(grads, coef)
        return coef

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._all:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """A detached copy of every optimizer state tensor: AdamW moments and steps, and every Muon momentum
        buffer as a FULL tensor keyed by parameter name (sharded / round-robin buffers are gathered), so the
        result does not depend on the world size. Collective: every rank must call it (all get the same)."""
        muon: dict[str, Tensor] = {}
        for opt, names in ((self.muon, self.matrix_names), (self.parallel, self.bank_names)):
            if opt is None:
                continue
            for n, b in zip(names, opt.export_momentum()):
                if b is not None:
                    muon[n] = b
        return {
            "format": "golfnb.optim.v1",
            "adam": copy.deepcopy(self.adam.state_dict()) if self.adam is not None else None,
            "muon_momentum": muon,
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore `state_dict()` output (from any world size). Muon parameters absent from it get their
        momentum cleared, which is what restoring a step-0 snapshot after the compile warm-up needs."""
        if sd.get("format") != "golfnb.optim.v1":
            raise ValueError(f"not a golfnb optimizer state (format={sd.get('format')!r})")
        if (sd["adam"] is None) != (self.adam is None):
            raise ValueError("saved optimizer state and this model disagree on whether there are AdamW groups; "
                             "load state saved from the same model configuration")
        if self.adam is not None:
            saved_names = [g.get("name") for g in sd["adam"]["param_groups"]]
            mine = [g["name"] for g in self.adam.param_groups]
            if saved_names != mine:
                raise ValueError(f"saved AdamW groups {saved_names} differ from this model's {mine}")
            # torch's load_state_dict adopts the given tensors when dtype and device already match, so
            # training on would silently rewrite the caller's snapshot (e.g. the pre-warm-up one): copy it.
            self.adam.load_state_dict(copy.deepcopy(sd["adam"]))
            # The config, not the checkpoint, owns the hyperparameters (a resume may change them).
            for g, s in zip(self.adam.param_groups, self.adam_specs):
                g["base_lr"], g["lr"], g["weight_decay"] = s.base_lr, s.base_lr, s.weight_decay
                g["betas"], g["eps"] = (self.cfg.beta1, self.cfg.beta2), self.cfg.adam_eps
        mom: Mapping[str, Tensor] = sd["muon_momentum"]
        known = set(self.matrix_names) | set(self.bank_names)
        unknown = sorted(set(mom) - known)
        if unknown:
            raise ValueError(f"saved Muon momentum for parameters this model does not have: {unknown[:5]}")
        for opt, names in ((self.muon, self.matrix_names), (self.parallel, self.bank_names)):
            if opt is not None:
                opt.import_momentum([mom.get(n) for n in names])


def build_optimizers(model: nn.Module, cfg: Hyperparameters, dist_ctx: DistContext | None = None,
                     **kwargs: Any) -> OptimizerBundle:
    """The optimizers of the records for `model` (see OptimizerBundle for the keyword options)."""
    return OptimizerBundle(model, cfg, dist_ctx, **kwargs)


# =========================================================================== EMA


class EMA:
    """fp32 exponential moving average of a model's floating-point state.

    `update(model)` after every optimizer step: ema <- d ema + (1 - d) theta. `copy_to(model)` casts back to
    each tensor's own dtype (a bf16 embedding comes back bf16). Non-float entries are not tracked.

    The model's tensors are looked up once per model object (calling `state_dict()` every step costs about a
    millisecond for the 11-layer stacks, seconds over a run); parameters are held as Parameter objects, so
    `.to()` / `.data` swaps are followed, and buffers are re-resolved by name at every call.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in [0, 1)")
        self.decay = float(decay)
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {k: v.detach().to(torch.float32, copy=True)
                                              for k, v in model.state_dict().items() if v.is_floating_point()}
        self._bound: Any = None  # weak reference to the model the lookups below belong to
        self._lookups: list[Tensor | str] = []

    def _live(self, model: nn.Module) -> list[Tensor]:
        if self._bound is None or self._bound() is not model:
            lookups: list[Tensor | str] = []
            for k in self.shadow:
                try:
                    lookups.append(model.get_parameter(k))
                except AttributeError:
                    try:
                        model.get_buffer(k)
                    except AttributeError:
                        raise KeyError(f"EMA tracks {k!r} which this model does not have") from None
                    lookups.append(k)
            self._lookups, self._bound = lookups, weakref.ref(model)
        return [model.get_buffer(x) if isinstance(x, str) else x for x in self._lookups]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay
        shadow = list(self.shadow.values())
        live = [t if t.dtype == torch.float32 else t.float() for t in self._live(model)]
        torch._foreach_mul_(shadow, d)
        torch._foreach_add_(shadow, live, alpha=1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for t, s in zip(self._live(model), self.shadow.values()):
            t.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        shadow = sd["shadow"]
        if set(shadow) != set(self.shadow):
            raise ValueError("EMA state keys differ from this model's; load state saved from the same model")
        self.decay = float(sd["decay"])
        with torch.no_grad():
            for k, v in shadow.items():
                self.shadow[k].copy_(v)
