"""A compile cache that golfnb persists between runs, so a second start-up skips most of torch.compile.

Inductor already keeps a local cache (under /tmp by default), but a spot instance, a fresh container or the
next machine of a resumed run starts without it. After the compile warm-up the trainer therefore asks PyTorch
for every compiled artifact of the process (`torch.compiler.save_cache_artifacts`: Inductor graphs, AOT
autograd entries, Triton kernels) and writes them, atomically, to two places:

* `<run_dir>/cache/compile.bin`: travels with the run directory, so a resume on another machine starts warm;
* `<cache root>/compile/<key>.bin`: shared by later runs of the same stack on this machine.

At start-up `load` feeds the first file found back to PyTorch (`torch.compiler.load_cache_artifacts`) before
anything is compiled. Dynamo still traces the model; code generation and kernel compilation become cache hits.

The key covers what decides the compiled graphs: the PyTorch version, the device model, the world size, the
golfnb sources and the config without the fields that only steer the schedule, the data or the evals. A key
that is too narrow only costs a cold compile: the artifacts are looked up by their own hashes on load, so a
stale file can never change what runs.

The eval passes' compiled scoring forward (golfnb.evals.common.scoring_forward) has a cache of its own
(`purpose="eval"`: `<run_dir>/cache/compile_eval.bin` and `<cache root>/compile/eval-<key>.bin`), keyed by the
model's shape and the eval shapes only, so re-scoring an artifact, or another run's artifact of the same stack,
with other eval settings starts warm.

The cache root is `$GOLFNB_CACHE_DIR` (default `~/.cache/golfnb`); `GOLFNB_COMPILE_CACHE=off` disables it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from golfnb.config import Hyperparameters
from golfnb.io import atomic_write_bytes, cache_dir

__all__ = ["CacheState", "cache_root", "cache_key", "load", "save", "RUN_CACHE_RELPATH", "RUN_EVAL_CACHE_RELPATH",
           "PURPOSES"]

RUN_CACHE_RELPATH = Path("cache") / "compile.bin"
RUN_EVAL_CACHE_RELPATH = Path("cache") / "compile_eval.bin"
PURPOSES = ("train", "eval")

# Fields that never reach a compiled graph: identity, data location, schedule lengths, logging, and the
# quantization / eval stages (those compile their own functions, if at all, after training).
_NOT_IN_GRAPH = {"seed", "run_id", "data_path", "tokenizer_path", "train_shards", "iterations",
                 "max_wallclock_seconds", "gptq_reserve_seconds", "val_loss_every", "train_log_every",
                 "warmup_steps", "checkpoint_every_seconds", "val_batch_tokens", "max_val_tokens",
                 "attn_bits", "mlp_bits", "embed_bits", "matrix_clip_sigmas", "embed_clip_sigmas",
                 "passthrough_max_numel", "compressor", "byte_shuffle", "prune_to_fit", "prune_workers", "bytes_limit",
                 "final_eval", "sliding_eval", "allow_illegal"}
_NOT_IN_GRAPH_PREFIXES = ("eval_", "ttt_", "slot_", "ngram_", "gptq_")
# What shapes the eval graphs besides the model: the window length and the batch rows of sliding, TTT and
# SLOT scoring. The optimizer, the schedule and the training loss never reach the scoring forward.
_EVAL_GRAPH_FIELDS = ("eval_seq_len", "eval_batch_seqs", "ttt_chunk_tokens", "ttt_batch_seqs")
_EVAL_NOT_IN_GRAPH = {"matrix_lr", "scalar_lr", "tied_embed_lr", "embed_lr", "head_lr", "muon_momentum",
                      "muon_momentum_warmup_start", "muon_momentum_warmup_steps", "muon_backend_steps",
                      "muon_nesterov", "muon_row_normalize", "muon_wd", "embed_wd", "adam_wd", "beta1", "beta2",
                      "adam_eps", "grad_clip_norm", "grad_clip_mode", "ema_decay", "enable_looping_at", "loader",
                      "train_batch_tokens", "grad_accum_steps", "warmdown_frac", "warmdown_iters", "min_lr",
                      # the training loss and the training MLP: without autograd the scoring forward runs the plain MLP
                      "ce_backend", "mlp_backend", "compile_fusion_io_limit",
                      "compile_mix_order_reduction"}


@dataclass(frozen=True)
class CacheState:
    """What `load` found: `source` is the file fed to PyTorch (None: cold start), `artifacts` how many entries."""

    key: str
    source: Path | None
    artifacts: int
    error: str | None = None

    @property
    def warm(self) -> bool:
        return self.source is not None and self.error is None

    def describe(self) -> str:
        if self.error:
            return f"compile_cache:cold key:{self.key} (could not load {self.source}: {self.error})"
        if self.source is None:
            return f"compile_cache:cold key:{self.key}"
        return f"compile_cache:warm key:{self.key} artifacts:{self.artifacts} from:{self.source}"


def cache_root(environ: dict[str, str] | None = None) -> Path | None:
    """The shared cache folder, or None when `GOLFNB_COMPILE_CACHE` is off/0/false."""
    env = os.environ if environ is None else environ
    if env.get("GOLFNB_COMPILE_CACHE", "").strip().lower() in ("off", "0", "false", "no"):
        return None
    return cache_dir(env) / "compile"


def _device_name(device: Any) -> str:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(dev)
        return f"{torch.cuda.get_device_name(dev)}/sm{major}{minor}"
    return dev.type


def _check_purpose(purpose: str) -> None:
    if purpose not in PURPOSES:
        raise ValueError(f"compile cache purpose {purpose!r} must be one of {PURPOSES}")


def cache_key(cfg: Hyperparameters, device: Any, world_size: int, purpose: str = "train") -> str:
    """Which file holds the artifacts. train: every config field that can reach the training graphs; eval: the
    model's fields and the eval shapes (the eval forward has no collectives, so not the world size)."""
    import torch

    from golfnb.provenance import code_hash

    _check_purpose(purpose)
    cfg_dict = cfg.to_dict()
    fields = {k: v for k, v in cfg_dict.items() if k not in _NOT_IN_GRAPH and not k.startswith(_NOT_IN_GRAPH_PREFIXES)}
    if purpose == "eval":
        fields = {k: v for k, v in fields.items() if k not in _EVAL_NOT_IN_GRAPH and k != "compile_mode"}
        fields.update({k: cfg_dict[k] for k in _EVAL_GRAPH_FIELDS if k in cfg_dict})
        world_size = 1
    ident = json.dumps({"torch": torch.__version__, "device": _device_name(device), "world_size": world_size,
                        "code": code_hash(), "cfg": fields, "purpose": purpose}, sort_keys=True, default=str)
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def _count(info: Any) -> int:
    arts = getattr(info, "artifacts", None) or {}
    return sum(len(v) for v in arts.values())


def _locations(key: str, run_dir: str | Path | None, purpose: str = "train") -> list[Path]:
    """The run's own file first (it travels with the run), then the machine's shared one."""
    rel, name = (RUN_CACHE_RELPATH, f"{key}.bin") if purpose == "train" else (RUN_EVAL_CACHE_RELPATH,
                                                                               f"eval-{key}.bin")
    out = [] if run_dir is None else [Path(run_dir) / rel]
    root = cache_root()
    return out + ([] if root is None else [root / name])


def load(cfg: Hyperparameters, device: Any, world_size: int, run_dir: str | Path | None = None,
         purpose: str = "train") -> CacheState:
    """Feed the persisted artifacts (the run's own first, then the shared ones) to PyTorch; call before the
    first compiled call. A missing, unreadable or incompatible file means a cold start, never an error."""
    import torch

    key = cache_key(cfg, device, world_size, purpose)
    for path in _locations(key, run_dir, purpose):
        if not path.is_file():
            continue
        try:
            info = torch.compiler.load_cache_artifacts(path.read_bytes())
        except Exception as e:  # another PyTorch build or a truncated file: compile from scratch
            return CacheState(key, path, 0, f"{type(e).__name__}: {e}")
        if info is None:  # PyTorch logs the reason (e.g. a checksum mismatch) and loads nothing
            return CacheState(key, path, 0, "PyTorch loaded no artifacts from it")
        return CacheState(key, path, _count(info))
    return CacheState(key, None, 0)


def save(cfg: Hyperparameters, device: Any, world_size: int, run_dir: str | Path | None = None,
         state: CacheState | None = None, purpose: str = "train") -> list[Path]:
    """Persist the compiled artifacts (call on one rank, after the warm-up); returns the files written.

    Cold start (`state` None or cold): every artifact compiled so far in this process is written to the run's
    file and the shared one. Warm start: the file that was loaded is complete for this key, so it is only
    copied to whichever of the two places lacks it (a process that loaded artifacts need not re-record them).
    PyTorch records cache hits too, so a fresh save (`state` None) after a warm start is complete as well."""
    import torch

    targets = _locations(cache_key(cfg, device, world_size, purpose), run_dir, purpose)
    if state is not None and state.warm and state.source is not None:
        blob = state.source.read_bytes()
        targets = [t for t in targets if not t.is_file()]
    else:
        got = torch.compiler.save_cache_artifacts()
        if got is None:
            return []
        blob = got[0]
    written = []
    for path in targets:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, blob)
            written.append(path)
        except OSError:  # a read-only home or a full disk must not fail a training run
            continue
    return written
