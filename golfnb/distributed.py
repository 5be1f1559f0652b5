"""Process-group set-up and the few collectives the rest of golfnb needs.

The same training code runs as one CPU process (tests, notebooks), one GPU, or eight GPUs under torchrun.
Whether it is distributed is decided from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK), and
only when `init_distributed` is called: importing this module reads nothing and touches no device.

Backends: NCCL for CUDA, gloo for CPU. The helpers below are no-ops in a single process, so callers never
branch on `world_size`. The optimizer (golfnb.optim) does its own gradient communication; there is no torch
DDP wrapper anywhere, which is what lets Parallel Muon reduce-scatter the banks instead of all-reducing them.

World sizes must divide 8 because the records' batch is fixed per step across 8 GPUs and a smaller world
makes it up with `grad_accum_steps = 8 // world_size` micro-steps (golfnb.config.grad_accum_for).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

from golfnb.config import ConfigError

__all__ = [
    "DistContext",
    "init_distributed",
    "single_process_context",
    "is_initialized",
    "all_reduce_sum_",
    "all_reduce_max",
    "broadcast_object",
    "barrier",
    "destroy",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits. `enabled` is True only when a process group with world_size > 1 is live."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # "nccl" | "gloo" | None (single process)
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def single_process_context(device: str | torch.device = "cpu") -> DistContext:
    """A context for one process with no process group (tests, notebooks, single-GPU runs)."""
    return DistContext(device=torch.device(device))


def _env_int(env: Mapping[str, str], key: str) -> int:
    raw = env[key]
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {key}={raw!r} is not an integer; launch with torchrun "
                          f"or unset RANK/WORLD_SIZE/LOCAL_RANK for a single process") from None


def _pick_device(device_pref: str, local_rank: int) -> torch.device:
    if device_pref not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device_pref={device_pref!r} must be one of auto, cpu, cuda")
    if device_pref == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    if device_pref == "cuda" and not has_cuda:
        raise ConfigError("device='cuda' was asked for but torch sees no CUDA device; "
                          "use device='cpu' (or 'auto') on this machine")
    if not has_cuda:
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise ConfigError(f"LOCAL_RANK={local_rank} but only {n} CUDA device(s) are visible; "
                          f"launch at most {n} processes per node (torchrun --nproc_per_node={n})")
    return torch.device("cuda", local_rank)


def init_distributed(device_pref: str = "auto", environ: Mapping[str, str] | None = None,
                     timeout_s: float = 1800.0) -> DistContext:
    """Decide single vs multi-process from the environment and start the process group if needed.

    * No WORLD_SIZE in the environment (or WORLD_SIZE=1): one process, no process group.
    * Otherwise RANK, WORLD_SIZE and LOCAL_RANK (as torchrun sets them) must all be present; the world size
      must divide 8; the backend is NCCL on CUDA and gloo on CPU. MASTER_ADDR/MASTER_PORT come from the
      environment too (torchrun sets them).

    Calling it again when a group is already live returns the matching context without re-initialising.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        device = _pick_device(device_pref, 0)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistContext(device=device)

    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in env]
    if missing:
        raise ConfigError(f"WORLD_SIZE is set but {', '.join(missing)} is not; launch with torchrun "
                          f"(which sets RANK, WORLD_SIZE, LOCAL_RANK) or unset WORLD_SIZE")
    rank, world, local_rank = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE"), _env_int(env, "LOCAL_RANK")
    if world < 1 or 8 % world != 0:
        raise ConfigError(f"world size {world} does not divide 8; run with 1, 2, 4 or 8 processes "
                          f"(torchrun --nproc_per_node=1|2|4|8) so grad_accum_steps = 8 // world_size is whole")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}")

    device = _pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1:
        return DistContext(rank=0, world_size=1, local_rank=local_rank, device=device)

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run a single process")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = dict(backend=backend, rank=rank, world_size=world,
                                      timeout=datetime.timedelta(seconds=timeout_s))
        if backend == "nccl":
            kwargs["device_id"] = device  # binds the communicator eagerly to this rank's GPU
        dist.init_process_group(**kwargs)
    else:
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise ConfigError(f"a process group is already live with rank {dist.get_rank()} of "
                              f"{dist.get_world_size()}, but the environment says {rank} of {world}")
        backend = dist.get_backend()
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend,
                       enabled=True)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (no-op in a single process). Returns `t`."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(value: float | torch.Tensor, device: torch.device | None = None) -> float:
    """The maximum of a scalar over ranks, as a Python float (the records' wall-clock stop agreement)."""
    if not is_initialized():
        return float(value)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
    t = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(1).clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (pickled; for small things such as run names and configs)."""
    if not is_initialized():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def destroy() -> None:
    """Tear the process group down (safe to call when none is live)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

