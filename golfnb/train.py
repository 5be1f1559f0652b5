"""Training: one code path for CPU, one GPU and N GPUs.

`train(cfg, run_dir)` is callable from a notebook cell; `python -m golfnb.train` is what torchrun launches:

    torchrun --standalone --nproc_per_node=8 -m golfnb.train --preset pr1514 --run-dir runs/x
    python -m golfnb.train --config runs/x/config.json --set seed=42 --run-dir runs/y
    python -m golfnb.train --resume runs/x

The loop follows the records: `grad_accum_steps = 8 // world_size` so one GPU sees the
eight-GPU batch; the learning-rate schedule and the depth-recurrence switch run on the fraction of the
wall-clock budget (600 s minus the GPTQ reserve) that has elapsed; every rank agrees on the stop through an
all-reduce(MAX). Compile warm-up steps (including the looped graph) run before the clock starts and leave no
trace: model weights, optimizer moments and momentum buffers, loader and RNG are restored afterwards (the
banked records leak warm-up momentum into training; golfnb does not).

Everything that can be checked before GPU time is spent is checked in `prepare` (config, world size, device,
tokenizer, run directory, and every shard the run will read: header, size, token ids below the vocab size and,
when the folder has a manifest, its sha256). The catalogue of bad inputs, where each is caught and what it
says, is docs/reliability.md.

Resuming (spot pre-emption). With `checkpoint_every_seconds` > 0 checkpoints are written at that interval
(measured on the training clock) and once more at the end of the loop; SIGTERM/SIGINT always writes one:

    checkpoints/step_000120/shared.pt     rank 0: model, optimizer (full Muon momentum), EMA, step, clock
    checkpoints/step_000120/rank<r>.pt    every rank: its loader position and RNG states
    checkpoints/step_000120/manifest.json rank 0, after every rank wrote: world size, step, sha256 per file
    checkpoints/LATEST                    "step_000120", replaced atomically after the manifest

Every file is written atomically and LATEST moves only after all ranks have written and the manifest lists
their hashes, so a process killed mid-checkpoint leaves the previous checkpoint usable. `--resume RUN_DIR`
runs the compile warm-up first (which restores everything it touches), then loads the checkpoint, and the
run continues exactly: on CPU its losses and final weights are bit-identical to an uninterrupted run. The
clock is restored too, so the LR schedule, the recurrence switch and the wall-clock cap see the time already
spent. train.log and metrics.jsonl are appended to; a `resume` record marks where the interrupted session's
records after the checkpoint stop counting.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from golfnb.config import ConfigError, Hyperparameters, diff_configs, resolve
from golfnb.distributed import barrier
from golfnb.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_bytes, \
    sha256_file, torch_load

__all__ = ["train", "prepare", "warmup", "compile_options", "compile_training_graph", "run_loop", "finish", "Trainer",
           "TrainingError", "NonFiniteLoss",
           "TrainingInterrupted", "main", "autocast_for", "load_final_model", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "verify_data", "CHECKPOINT_DIR", "RESUMABLE_FIELDS", "INTERRUPT_EXIT_CODE"]

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "golfnb-checkpoint/1"
FINAL_MODEL = "final_model.pt"
INTERRUPT_EXIT_CODE = 143  # 128 + SIGTERM: the run stopped on a signal after writing a checkpoint

# Fields a resumed run may change without changing what it computes: where the data lives (a pre-empted run
# often comes back on another machine; the shards are re-checked by name, size and hash), how often it logs,
# validates and checkpoints, how the same maths is compiled, and how many threads compress. Anything else is
# another run.
RESUMABLE_FIELDS = frozenset({"data_path", "tokenizer_path", "checkpoint_every_seconds", "train_log_every",
                              "val_loss_every", "compile_mode", "compile_fusion_io_limit",
                              "compile_mix_order_reduction", "attn_backend", "ce_backend", "mlp_backend",
                              "merge_qkv", "eval_compile", "prune_workers"})


class TrainingError(RuntimeError):
    """Training cannot continue; the message says why and what to change."""


def _inductor_has_option(name: str) -> bool:
    """Whether this torch's Inductor has the config entry `name` ("a" or "section.a")."""
    import torch._inductor.config as inductor_config

    obj: Any = inductor_config
    for part in name.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def compile_options(cfg: Hyperparameters) -> dict[str, Any]:
    """torch.compile's keyword arguments for the training graph: the mode, and Inductor options where set.

    torch.compile takes a mode or an options dict, not both, so a mode other than default is spelled out as its
    options when an option is added. A fusion limit on a torch without the option fails here, before any data or
    GPU work; mix-order reduction off on such a torch asks for nothing (it has no such fusion to turn off)."""
    mode = {} if cfg.compile_mode == "default" else {"mode": cfg.compile_mode}
    wanted: dict[str, Any] = {}
    if cfg.compile_fusion_io_limit:
        if not _inductor_has_option("max_fusion_unique_io_buffers"):
            raise TrainingError(f"compile_fusion_io_limit={cfg.compile_fusion_io_limit} needs Inductor's "
                                f"max_fusion_unique_io_buffers, which torch {torch.__version__} does not have; "
                                f"set compile_fusion_io_limit=0")
        wanted["max_fusion_unique_io_buffers"] = cfg.compile_fusion_io_limit
    if not cfg.compile_mix_order_reduction and _inductor_has_option("triton.mix_order_reduction"):
        wanted["triton.mix_order_reduction"] = False
    if not wanted:
        return mode
    opts = dict(torch._inductor.list_mode_options(mode["mode"])) if mode else {}
    opts.update(wanted)
    return {"options": opts}


def compile_training_graph(model: torch.nn.Module, cfg: Hyperparameters) -> Callable[..., torch.Tensor]:
    return torch.compile(model, dynamic=False, **compile_options(cfg))


class NonFiniteLoss(TrainingError):
    pass


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the run can be resumed."""


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the records' precision); plain fp32 on CPU so tests are exact."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _clone(obj: Any) -> Any:
    """Deep copy of a (nested) state dict with every tensor cloned."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _check_cpu_size(cfg: Hyperparameters, device: torch.device) -> None:
    """A GPU-sized preset on a CPU-only machine would run for days: stop with the fix instead."""
    if device.type != "cpu" or cfg.device == "cpu":
        return
    from golfnb.model import flops_per_token

    step_flops = flops_per_token(cfg, looping=cfg.num_loops > 0) * cfg.train_batch_tokens
    if step_flops > 5e12:
        raise ConfigError(
            f"this configuration needs a CUDA GPU (one step is {step_flops / 1e12:.0f} TFLOP) and none is "
            f"visible; use preset=smoke on CPU, or force it with device=cpu if you really mean it")


# ================================================================================================ state

@dataclass
class Trainer:
    cfg: Hyperparameters
    run_dir: Path | None
    dist: Any
    log: Any
    device: torch.device
    model: torch.nn.Module
    forward: Callable[..., torch.Tensor]
    bundle: Any
    loader: Any
    ema: Any
    val_tokens: torch.Tensor | None
    luts: Any
    grad_accum: int
    micro_seqs: int
    step: int = 0
    elapsed_s: float = 0.0  # training time on the clock (validation and checkpoints excluded)
    history: list[dict] = field(default_factory=list)
    phase_time: dict = field(default_factory=lambda: {"pre": 0.0, "post": 0.0})
    phase_steps: dict = field(default_factory=lambda: {"pre": 0, "post": 0})
    looping_step: int | None = None
    stop_signal: int = 0
    last_checkpoint: Path | None = None
    checkpoint_step: int | None = None  # step of the checkpoint written or loaded last
    resumed_from: int | None = None
    warmup_s: float = 0.0
    compile_cache: Any = None  # golfnb.compile_cache.CacheState when compiling

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train_batch_tokens

    def frac(self) -> float:
        cap = self.cfg.training_cap_seconds
        if cap > 0:
            return self.elapsed_s / cap
        return self.step / self.cfg.iterations

    def reached_end(self) -> bool:
        """The step cap or the wall-clock cap (the clock includes time spent before a resume)."""
        cap = self.cfg.training_cap_seconds
        return (cap > 0 and self.elapsed_s >= cap) or self.step >= self.cfg.iterations


# ================================================================================================ pre-flight checks

def _config_diff(old: Hyperparameters, new: Hyperparameters, resume: bool) -> dict[str, tuple[Any, Any]]:
    diff = diff_configs(old, new)
    if resume:
        diff = {k: v for k, v in diff.items() if k not in RESUMABLE_FIELDS}
    return diff


def _describe_diff(diff: dict[str, tuple[Any, Any]]) -> str:
    what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:6])
    return what + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")


def _check_run_dir(cfg: Hyperparameters, run_dir: Path, resume: bool) -> None:
    """Writable, and not holding another run (or this run's checkpoints, which a fresh start would discard)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run directory {run_dir} is not writable ({e.strerror or e}); choose another run_dir "
                          f"(--run-dir) on a writable disk") from None
    existing = run_dir / "config.json"
    latest = run_dir / CHECKPOINT_DIR / "LATEST"
    if existing.exists():
        try:
            old = Hyperparameters.from_json(existing)
        except ConfigError as e:
            raise ConfigError(f"{existing} is unreadable ({e}); choose a fresh run_dir") from None
        diff = _config_diff(old, cfg, resume)
        if diff:
            if resume:
                raise ConfigError(f"cannot resume {run_dir}: it holds a run of another config "
                                  f"({_describe_diff(diff)}); resume with the run's own config.json "
                                  f"(python -m golfnb.train --resume {run_dir}) or start a new run_dir")
            if latest.exists() or (run_dir / FINAL_MODEL).exists():
                raise ConfigError(f"run directory {run_dir} already holds a different run ({_describe_diff(diff)}); "
                                  f"choose a new run_dir (or delete the old one)")
    if not resume and latest.exists():
        step = latest.read_text().strip()
        raise ConfigError(f"run directory {run_dir} already holds a resumable checkpoint of this run ({step}); "
                          f"continue it with `python -m golfnb.train --resume {run_dir}` (train(..., resume=True)), "
                          f"or choose a new run_dir (or delete {run_dir / CHECKPOINT_DIR} to start over)")


def _terminate_partial_line(path: Path) -> None:
    """A process killed mid-write can leave a last line without its newline; appending to it would glue the
    next record onto it. Close it off, so readers skip one bad line and see every later one."""
    try:
        with open(path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    except FileNotFoundError:
        pass


def _scan_shard(path: Path, want_sha: bool) -> tuple[str | None, int]:
    """(sha256 or None, max token id) of a shard in one read. Block sizes are even, so no token is split."""
    import hashlib

    import numpy as np

    from golfnb.data.shards import HEADER_BYTES

    h = hashlib.sha256() if want_sha else None
    max_id = -1
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        if h is not None:
            h.update(head)
        while True:
            block = f.read(1 << 24)
            if not block:
                break
            if h is not None:
                h.update(block)  # hashlib and numpy both release the GIL: shards scan in parallel threads
            arr = np.frombuffer(block, dtype="<u2")
            if arr.size:
                max_id = max(max_id, int(arr.max()))
    return (h.hexdigest() if h is not None else None), max_id


def _first_bad_id(path: Path, vocab_size: int) -> tuple[int, int]:
    import numpy as np

    from golfnb.data.shards import open_shard

    tokens = open_shard(path)
    idx = int(np.flatnonzero(tokens >= vocab_size)[0])
    return idx, int(tokens[idx])


def _check_one_shard(path: Path, vocab_size: int, entry: dict[str, Any] | None, manifest_path: Path | None
                     ) -> tuple[list[str], int]:
    """Problems with one shard (header and size, manifest entry, sha256, token ids) and its byte count."""
    from golfnb.data.shards import ShardError, read_header

    try:
        h = read_header(path)
    except ShardError as e:
        return [str(e)], 0
    problems = []
    if entry is not None:
        if int(entry.get("tokens", -1)) != h.n_tokens:
            return [f"{path} holds {h.n_tokens} tokens but {manifest_path} says {entry.get('tokens')}: the file "
                    f"was replaced; download or build it again"], h.file_bytes
    want = entry.get("sha256") if entry else None
    sha, max_id = _scan_shard(path, bool(want))
    if want and sha != want:
        problems.append(f"{path} has sha256 {sha} but {manifest_path} says {want}: the file is corrupt or was "
                        f"changed; download it again (`golfnb data download` re-fetches files that fail the check) "
                        f"or rebuild it with `golfnb data build`")
    elif max_id >= vocab_size:
        idx, tok = _first_bad_id(path, vocab_size)
        problems.append(f"{path} holds token id {tok} at index {idx} >= vocab_size={vocab_size}: the shards were "
                        f"made with another tokenizer; use the preset / data_path / tokenizer_path that match them")
    return problems, h.file_bytes


def verify_data(cfg: Hyperparameters, rank: int = 0, world_size: int = 1, *, threads: int | None = None
                ) -> dict[str, Any]:
    """Check every shard this run will read, before any training: header and size, token ids below
    cfg.vocab_size, and, when the folder has a manifest.json (golfnb data build / download write one), that
    the shards are listed there with the same token count and sha256, and that the manifest's vocab size and
    tokenizer hash match the config's tokenizer.

    With several processes, rank r reads shards r, r+W, ...; each returns its own problems (the caller agrees
    on them). Raises nothing for shard problems: returns {"problems": [...], "files", "bytes", "hashed",
    "unlisted", "seconds"}; raises MissingDataError when there are no train shards and ShardError when the
    manifest itself is unreadable.
    """
    from golfnb.bpb import resolve_tokenizer_path
    from golfnb.data.loaders import resolve_data_path, train_files
    from golfnb.data.shards import list_shards, read_manifest

    t0 = time.perf_counter()
    folder = resolve_data_path(cfg)
    files = list(train_files(cfg)) + list_shards(folder, "val")  # train_files raises MissingDataError first
    man = read_manifest(folder)
    problems: list[str] = []
    entries: dict[str, dict[str, Any]] = {}
    man_path = folder / "manifest.json" if man is not None else None
    if man is not None:
        entries = {e["name"]: e for e in man["shards"] if isinstance(e, dict) and "name" in e}
        listed_train = sorted(n for n in entries if n.startswith("fineweb_train_"))
        if cfg.train_shards > 0:
            listed_train = listed_train[:cfg.train_shards]
        present = {p.name for p in files}
        for name in [n for n in listed_train + sorted(n for n in entries if n.startswith("fineweb_val_"))
                     if n not in present]:
            problems.append(f"{folder / name} is listed in {man_path} but missing (an interrupted download or "
                            f"copy?); run `golfnb data download` again (it fetches what is missing) or rebuild the "
                            f"folder with `golfnb data build`")
        mv = man.get("vocab_size")
        if mv is not None and int(mv) != cfg.vocab_size:
            problems.append(f"the shards in {folder} were made with a {mv}-piece tokenizer ({man_path}) but "
                            f"vocab_size={cfg.vocab_size}; use the preset / data_path that match them")
        tok = (man.get("tokenizer") or {}).get("sha256")
        tok_path = resolve_tokenizer_path(cfg)
        if not problems and tok and tok_path.is_file() and sha256_file(tok_path) != tok:
            problems.append(f"the shards in {folder} were made with a different tokenizer than {tok_path} (sha256 "
                            f"differs from {man_path}): the same ids would mean other pieces; set tokenizer_path "
                            f"to the model named in the manifest ({(man.get('tokenizer') or {}).get('path')})")
    mine = [] if problems else files[rank::world_size]
    n_threads = threads or min(8, os.cpu_count() or 1, max(len(mine), 1))
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        results = list(pool.map(lambda p: _check_one_shard(p, cfg.vocab_size, entries.get(p.name), man_path), mine))
    total = 0
    for probs, nbytes in results:
        problems.extend(probs)
        total += nbytes
    # A shard the manifest does not list (say, the challenge's validation shard copied next to locally built
    # train shards) is still checked for its header and ids, but nothing vouches for its content: say so.
    unlisted = [p.name for p in files if p.name not in entries] if man is not None else []
    return {"problems": problems, "folder": str(folder), "files": len(mine), "bytes": total,
            "hashed": man is not None and any("sha256" in e for e in entries.values()), "unlisted": unlisted,
            "seconds": time.perf_counter() - t0}


def _gather_problems(dist: Any, problems: list[str]) -> list[str]:
    """Every rank's problems on every rank (so all ranks raise the same error instead of some hanging)."""
    if not dist.enabled:
        return problems
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, problems)
    return list(dict.fromkeys(p for part in out for p in (part or [])))  # folder-level ones come from every rank


def _raise_data_problems(problems: list[str]) -> None:
    from golfnb.data.shards import ShardError

    if problems:
        head = f"{len(problems)} problem(s) with the training data:\n  - " if len(problems) > 1 else ""
        raise ShardError(head + "\n  - ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more"
                                                                if len(problems) > 12 else ""))


# ================================================================================================ prepare

def prepare(cfg: Hyperparameters, run_dir: str | Path | None = None, *, resume: bool = False,
            dist: Any = None, echo: bool = True, check_data: bool = True) -> Trainer:
    """Every check, then model, optimizer, data and compiled step, ready for `warmup` and `run_loop`.

    check_data: read every shard once before training (header, ids, manifest sha256; see `verify_data`).
    Off, only headers are checked up front and a bad token id surfaces when its batch is read.
    """
    from golfnb.attention import backend_options, resolve_backend
    from golfnb.fused_ce import resolve_ce_backend
    from golfnb.fused_mlp import resolve_mlp_backend
    from golfnb.bpb import build_byte_luts, check_tokenizer
    from golfnb.data.loaders import load_validation_tokens, make_train_loader
    from golfnb.distributed import init_distributed
    from golfnb.model import build_model, count_parameters
    from golfnb.optim import EMA, build_optimizers
    from golfnb.provenance import code_hash, data_summary, environment_info, git_identity
    from golfnb.runlog import RunLogger

    run_dir = Path(run_dir) if run_dir is not None else None
    # --- cheap checks first: none of these touch the GPU
    if dist is None:
        dist = init_distributed(cfg.device)
    grad_accum = cfg.grad_accum_for(dist.world_size)
    micro = cfg.micro_batch_seqs(dist.world_size)
    device = dist.device
    _check_cpu_size(cfg, device)
    if resume and (run_dir is None or not (run_dir / CHECKPOINT_DIR / "LATEST").exists()):
        raise ConfigError(f"nothing to resume in {run_dir}: no {CHECKPOINT_DIR}/LATEST; start a fresh run "
                          f"(set checkpoint_every_seconds > 0 to get resumable checkpoints)")
    sp = check_tokenizer(cfg)
    if run_dir is not None and dist.is_main:
        _check_run_dir(cfg, run_dir, resume)
    data_report = None
    if check_data:
        data_report = verify_data(cfg, dist.rank, dist.world_size)
        _raise_data_problems(_gather_problems(dist, data_report["problems"]))
    loader = make_train_loader(cfg, dist.rank, dist.world_size, device)  # validates shard headers
    val_tokens = load_validation_tokens(cfg)
    luts = build_byte_luts(sp, cfg.vocab_size)

    if run_dir is not None and dist.is_main:
        for name in ("metrics.jsonl", "train.log"):
            _terminate_partial_line(run_dir / name)
    log = RunLogger(run_dir, rank=dist.rank, echo=echo)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(cfg, device)
    backend = resolve_backend(cfg.attn_backend, device)
    attn_opts = backend_options(backend)  # FA4 tile overrides, if any: logged and written to the manifest
    model.set_attn_backend(backend)
    model.set_ce_backend(resolve_ce_backend(cfg.ce_backend, device))
    model.set_mlp_backend(resolve_mlp_backend(cfg.mlp_backend, device, cfg.mlp_activation))
    forward: Callable[..., torch.Tensor] = model
    cache_state = None
    if cfg.compile_mode != "none":
        from golfnb import compile_cache

        # before the first compiled call: artifacts persisted by an earlier run turn compilation into hits
        cache_state = compile_cache.load(cfg, device, dist.world_size, run_dir)
        forward = compile_training_graph(model, cfg)
    bundle = build_optimizers(model, cfg, dist)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    if run_dir is not None and dist.is_main:
        cfg.to_json(run_dir / "config.json")
        if not (resume and (run_dir / "env.json").exists()):  # a resume keeps the first session's record
            env = {"git": git_identity(), "code_sha256": code_hash(), "environment": environment_info(device, backend),
                   "data": data_summary(cfg.data_path, cfg.tokenizer_path), "world_size": dist.world_size}
            atomic_write_json(run_dir / "env.json", env)
    tr = Trainer(cfg=cfg, run_dir=run_dir, dist=dist, log=log, device=device, model=model, forward=forward,
                 bundle=bundle, loader=loader, ema=ema, val_tokens=val_tokens, luts=luts,
                 grad_accum=grad_accum, micro_seqs=micro, compile_cache=cache_state)
    if dist.is_main:
        n_params = count_parameters(model)
        log.header("golfnb train", {
            "code": {**git_identity(), "code_sha256": code_hash()},
            "environment": environment_info(device, backend),
            "run": {"run_dir": str(run_dir), "world_size": dist.world_size, "grad_accum_steps": grad_accum,
                    "micro_batch_seqs": micro, "device": str(device), "attn_backend": backend,
                    "attn_options": attn_opts,
                    "ce_backend": model.ce_backend, "mlp_backend": model.mlp_backend,
                    "model_params": n_params, "compile_mode": cfg.compile_mode, "resume": resume},
            "config": cfg.to_dict(),
            "data": data_summary(cfg.data_path, cfg.tokenizer_path) | {"val_tokens": int(val_tokens.numel()) - 1},
        })
        opts = "".join(f" attn_{part}:" + (",".join(f"{k}={int(v)}" for k, v in o.items()) or "default")
                       for part, o in attn_opts.items())
        log.log(f"model_params:{n_params} attn_backend:{backend}{opts} ce_backend:{model.ce_backend} "
                f"mlp_backend:{model.mlp_backend} "
                f"world_size:{dist.world_size} "
                f"grad_accum_steps:{grad_accum} micro_batch_seqs:{micro}")
        if cache_state is not None:
            log.log(cache_state.describe())
        if data_report is not None:
            how = "sha256 checked against manifest.json" if data_report["hashed"] else \
                "no manifest.json with hashes: headers and token ids checked only"
            log.log(f"data_check:{data_report['files']} shards {data_report['bytes'] / 1e9:.2f} GB on rank 0, {how}, "
                    f"{data_report['seconds']:.1f}s")
            if data_report["unlisted"]:
                names = ", ".join(data_report["unlisted"][:4]) + (" ..." if len(data_report["unlisted"]) > 4 else "")
                log.log(f"data_check:WARNING {len(data_report['unlisted'])} shard(s) not listed in manifest.json, "
                        f"their content is not hash-checked: {names}")
    return tr


# ================================================================================================ steps

def train_step(tr: Trainer, lr_scale: float, update_ema: bool = True) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches; returns the mean loss (a 0-d tensor, not synced)."""
    cfg = tr.cfg
    total = torch.zeros((), device=tr.device)
    try:
        for _ in range(tr.grad_accum):
            x, y = tr.loader.next_batch(tr.micro_seqs, cfg.train_seq_len)
            with autocast_for(tr.device):
                loss = tr.forward(x, y)
            (loss / tr.grad_accum).backward()
            total += loss.detach()
        tr.bundle.step(tr.step, lr_scale)
        tr.bundle.zero_grad()
    except torch.OutOfMemoryError:
        tr.bundle.zero_grad()
        raise TrainingError(
            f"out of GPU memory at a micro-batch of {tr.micro_seqs} x {cfg.train_seq_len} tokens; set "
            f"grad_accum_steps={tr.grad_accum * 2} (micro-batch {tr.micro_seqs // 2} sequences) and run again") from None
    if update_ema and tr.ema is not None:
        tr.ema.update(tr.model)
    return total / tr.grad_accum


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup(tr: Trainer) -> float:
    """Compile warm-up off the clock: the plain graph, then the looped one; then restore everything.

    On a resume this runs before the checkpoint is loaded, so whatever it touches is overwritten anyway."""
    cfg = tr.cfg
    if cfg.warmup_steps <= 0:
        return 0.0
    t0 = time.perf_counter()
    snap_model = _clone(tr.model.state_dict())
    snap_opt = _clone(tr.bundle.state_dict())
    snap_loader = _clone(tr.loader.state_dict())
    snap_rng = _rng_state(tr.device)
    phases = [False] + ([True] if cfg.num_loops > 0 else [])
    for looping in phases:
        tr.model.looping_active = looping
        for _ in range(cfg.warmup_steps):
            train_step(tr, 1.0, update_ema=False)
        tr.log.log(f"warmup:done looping:{looping} steps:{cfg.warmup_steps}")
    tr.model.looping_active = False
    tr.model.load_state_dict(snap_model)
    tr.bundle.load_state_dict(snap_opt)
    tr.bundle.zero_grad()
    tr.loader.load_state_dict(snap_loader)
    _set_rng_state(snap_rng, tr.device)
    if tr.ema is not None:
        from golfnb.optim import EMA

        tr.ema = EMA(tr.model, cfg.ema_decay)  # initialised from the restored step-0 weights
    _sync(tr.device)
    tr.warmup_s = time.perf_counter() - t0
    cache = tr.compile_cache
    how = "" if cache is None else f", compile cache {'warm' if cache.warm else 'cold'}"
    tr.log.log(f"warmup_s:{tr.warmup_s:.1f} (compile and warm-up, off the clock; all state restored{how})")
    if cache is not None and tr.dist.is_main:
        from golfnb import compile_cache

        t1 = time.perf_counter()
        written = compile_cache.save(cfg, tr.device, tr.dist.world_size, tr.run_dir, cache)
        if written:
            tr.log.log(f"compile_cache:saved files:{len(written)} bytes:{written[0].stat().st_size} "
                       f"seconds:{time.perf_counter() - t1:.1f} to:{', '.join(map(str, written))}")
    return tr.warmup_s


def validate(tr: Trainer, label: str = "val") -> dict:
    from golfnb.evals.plain import evaluate_plain

    was_training = tr.model.training
    tr.model.eval()
    res = evaluate_plain(tr.model, tr.val_tokens, tr.cfg, tr.luts, dist=tr.dist, forward=None)
    tr.model.train(was_training)
    tr.log.kv("val", step=tr.step, label=label, val_loss=res["val_loss"], val_bpb=res["val_bpb"],
              elapsed_s=round(tr.elapsed_s, 3), eval_s=round(res["seconds"], 3))
    return res


# ================================================================================================ checkpoints

def _rng_state(device: torch.device) -> dict:
    st = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["torch"].cpu())
    if "cuda" in st and device.type == "cuda":
        torch.cuda.set_rng_state(st["cuda"].cpu(), device)


def _save_hashed(path: Path, obj: Any) -> str:
    """torch.save to `path` atomically; returns the sha256 of the bytes written."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def _all_gather(dist: Any, obj: Any) -> list[Any]:
    if not dist.enabled:
        return [obj]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out


def _weights_finite(model: torch.nn.Module) -> bool:
    params = [p.detach() for p in model.parameters() if p.is_floating_point()]
    if not params:
        return True
    # max |w| per tensor: finite exactly when every entry is (an L2 norm could overflow on huge finite weights)
    peaks = torch.stack([n.float() for n in torch._foreach_norm(params, float("inf"))])
    return bool(torch.isfinite(peaks).all())


def latest_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a run's latest complete checkpoint (step, elapsed_s, world_size, files ...) with
    its folder under "dir"; None when the run has none."""
    root = Path(run_dir) / CHECKPOINT_DIR
    latest = root / "LATEST"
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    man_path = root / name / "manifest.json"
    try:
        man = json.loads(man_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{latest} names {name} but its manifest.json is unreadable ({e}); the checkpoint is "
                          f"damaged: start a new run_dir (or delete {root} to retrain in this one)") from None
    man["dir"] = str(root / name)
    return man


def save_checkpoint(tr: Trainer, reason: str) -> Path | None:
    """Write checkpoints/step_N/ (see the module docstring), then move LATEST to it; every rank calls this.

    Refuses to write non-finite weights (the last good checkpoint is kept). Returns the folder, or None when
    there is no run directory or the latest checkpoint already holds this step."""
    if tr.run_dir is None:
        return None
    if tr.checkpoint_step == tr.step:
        return tr.last_checkpoint
    if not _weights_finite(tr.model):
        where = f"the last good checkpoint is {tr.last_checkpoint}" if tr.last_checkpoint else \
            "no checkpoint was written"
        tr.log.kv("error", step=tr.step, error="non-finite weights")
        raise NonFiniteLoss(f"the weights became non-finite by step {tr.step}; not writing a checkpoint ({where}). "
                            f"Lower matrix_lr / tied_embed_lr / scalar_lr or check the data")
    root = tr.run_dir / CHECKPOINT_DIR
    step_dir = root / f"step_{tr.step:06d}"
    latest = root / "LATEST"
    if latest.is_file() and latest.read_text().strip() == step_dir.name:
        return step_dir  # never rewrite the checkpoint LATEST names: a kill mid-write would leave nothing good
    if tr.dist.is_main and step_dir.exists():
        shutil.rmtree(step_dir)  # leftovers of a write that was killed before LATEST moved
    barrier()
    optim = tr.bundle.state_dict()  # collective: gathers sharded Muon momentum on every rank
    files: dict[str, str] = {}
    if tr.dist.is_main:
        # model, optimizer and EMA are replicated (identical on every rank): rank 0 writes them once
        files["shared.pt"] = _save_hashed(step_dir / "shared.pt", {
            "format": CHECKPOINT_FORMAT,
            "step": tr.step,
            "elapsed_s": tr.elapsed_s,
            "looping_active": bool(tr.model.looping_active),
            "looping_step": -1 if tr.looping_step is None else tr.looping_step,
            "phase_time": dict(tr.phase_time),
            "phase_steps": dict(tr.phase_steps),
            "model": tr.model.state_dict(),
            "optim": optim,
            "ema": tr.ema.state_dict() if tr.ema is not None else {},
            "config": tr.cfg.to_dict(),
        })
    rank_name = f"rank{tr.dist.rank}.pt"
    files[rank_name] = _save_hashed(step_dir / rank_name, {
        "rank": tr.dist.rank, "world_size": tr.dist.world_size, "step": tr.step,
        "loader": tr.loader.state_dict(), "rng": _rng_state(tr.device)})
    gathered = _all_gather(tr.dist, files)  # also the barrier: every rank has written when this returns
    if tr.dist.is_main:
        all_files = {k: v for part in gathered for k, v in part.items()}
        atomic_write_json(step_dir / "manifest.json", {
            "format": CHECKPOINT_FORMAT, "step": tr.step, "elapsed_s": round(tr.elapsed_s, 6),
            "world_size": tr.dist.world_size, "reason": reason, "time": time.time(), "sha256": all_files})
        atomic_write_text(root / "LATEST", step_dir.name + "\n")  # the commit point
        for old in root.glob("step_*"):
            if old.name != step_dir.name:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    tr.last_checkpoint = step_dir
    tr.checkpoint_step = tr.step
    tr.log.log(f"checkpoint:{step_dir.name} reason:{reason} step:{tr.step} elapsed_s:{tr.elapsed_s:.2f}")
    return step_dir


def _load_verified(path: Path, want: str | None, device: torch.device) -> Any:
    if not path.is_file():
        raise ConfigError(f"checkpoint file {path} is missing; the checkpoint is incomplete: start a new run_dir "
                          f"(or delete {path.parent.parent} to retrain in this one)")
    if want is None or sha256_file(path) != want:
        raise ConfigError(f"checkpoint file {path} fails its sha256 check (manifest.json): the file is corrupt; "
                          f"resume is not possible from it: start a new run_dir (or delete {path.parent.parent} "
                          f"to retrain in this one)")
    return torch_load(path, map_location=device)


def load_checkpoint(tr: Trainer) -> None:
    """Restore the latest checkpoint into a prepared (and warmed-up) trainer; every rank calls this."""
    assert tr.run_dir is not None
    man = latest_checkpoint(tr.run_dir)
    if man is None:
        raise ConfigError(f"nothing to resume in {tr.run_dir}: no {CHECKPOINT_DIR}/LATEST")
    step_dir = Path(man["dir"])
    if int(man["world_size"]) != tr.dist.world_size:
        raise ConfigError(f"checkpoint {step_dir.name} was written by {man['world_size']} processes, this run has "
                          f"{tr.dist.world_size}; resume with torchrun --nproc_per_node={man['world_size']}")
    hashes = man.get("sha256") or {}
    shared = _load_verified(step_dir / "shared.pt", hashes.get("shared.pt"), tr.device)
    mine = _load_verified(step_dir / f"rank{tr.dist.rank}.pt", hashes.get(f"rank{tr.dist.rank}.pt"), tr.device)
    saved = Hyperparameters.from_dict(shared["config"])
    diff = _config_diff(saved, tr.cfg, resume=True)
    if diff:
        raise ConfigError(f"checkpoint {step_dir} was written by another config ({_describe_diff(diff)}); resume "
                          f"with the run's own config.json")
    tr.model.load_state_dict(shared["model"])
    tr.bundle.load_state_dict(shared["optim"])
    tr.bundle.zero_grad()
    if tr.ema is not None:
        tr.ema.load_state_dict(shared["ema"])
    tr.loader.load_state_dict(mine["loader"])
    _set_rng_state(mine["rng"], tr.device)
    tr.step = int(shared["step"])
    tr.elapsed_s = float(shared["elapsed_s"])
    tr.model.looping_active = bool(shared["looping_active"])
    tr.looping_step = None if shared["looping_step"] < 0 else int(shared["looping_step"])
    tr.phase_time = dict(shared["phase_time"])
    tr.phase_steps = dict(shared["phase_steps"])
    tr.resumed_from = tr.step
    tr.last_checkpoint = step_dir
    tr.checkpoint_step = tr.step
    redo = _last_logged_step(tr.run_dir) if tr.dist.is_main else None
    tr.log.kv("resume", step=tr.step, elapsed_s=round(tr.elapsed_s, 3), checkpoint=step_dir.name,
              looping=bool(tr.model.looping_active), superseded_steps=max((redo or 0) - tr.step, 0))
    tr.log.log(f"resumed:{step_dir.name} step:{tr.step} elapsed_s:{tr.elapsed_s:.2f} (training time already spent; "
               f"the schedule and the cap continue from it) looping:{tr.model.looping_active}")


def _last_logged_step(run_dir: Path) -> int | None:
    """Highest train step in metrics.jsonl (records past the checkpoint step are redone by the resume)."""
    last = None
    try:
        with open(run_dir / "metrics.jsonl") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("kind") == "train":
                    last = max(last or 0, int(rec.get("step", 0)))
    except FileNotFoundError:
        return None
    return last


# ================================================================================================ loop

@contextlib.contextmanager
def _signals(tr: Trainer):
    """Turn SIGTERM/SIGINT into a flag the loop checks after each step (spot pre-emption).

    Repeated signals change nothing: a pre-empted machine often signals every process while torchrun forwards
    the same signal to its workers, and a worker must still get its checkpoint written. SIGKILL stops at once.
    """
    if not hasattr(signal, "SIGTERM") or not threading_main():
        yield
        return
    old: dict[int, Any] = {}

    def handler(signum, _frame):
        tr.stop_signal = tr.stop_signal or signum

    for s in (signal.SIGTERM, signal.SIGINT):
        old[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_loop(tr: Trainer) -> None:
    from golfnb.model import flops_per_token
    from golfnb.optim import lr_multiplier

    cfg, dist = tr.cfg, tr.dist
    peak_flops = _peak_flops(tr.device)
    last_ckpt_elapsed = tr.elapsed_s
    window_t, window_steps = 0.0, 0
    tr.model.train()
    if cfg.val_loss_every > 0 and tr.step == 0:
        validate(tr)
    reached = tr.reached_end()  # a run resumed from its end checkpoint has nothing left to train
    if reached:
        tr.log.log(f"train:nothing left step:{tr.step} elapsed_s:{tr.elapsed_s:.2f}")
    with _signals(tr):
        while not reached:
            # recurrence switches on at a fraction of the budget, stays on afterwards
            if cfg.num_loops > 0 and not tr.model.looping_active and tr.frac() >= cfg.enable_looping_at:
                tr.model.looping_active = True
                tr.looping_step = tr.step
                tr.log.log(f"looping:on step:{tr.step} frac:{tr.frac():.4f} elapsed_s:{tr.elapsed_s:.2f}")
            phase = "post" if tr.model.looping_active else "pre"
            lr_scale = lr_multiplier(cfg, tr.step, tr.elapsed_s, _avg_step(tr))
            _sync(tr.device)
            t0 = time.perf_counter()
            loss = train_step(tr, lr_scale)
            loss_v = float(loss.item())  # synchronises
            dt = time.perf_counter() - t0
            tr.elapsed_s += dt
            tr.phase_time[phase] += dt
            tr.phase_steps[phase] += 1
            window_t += dt
            window_steps += 1
            tr.step += 1
            bad = not math.isfinite(loss_v)
            reached, signalled, bad_any = _agree(dist, tr.reached_end(), tr.stop_signal != 0, bad)
            if bad_any:
                where = f"; the last good checkpoint is {tr.last_checkpoint} (step {tr.checkpoint_step})" \
                    if tr.last_checkpoint else \
                    "; no checkpoint was written (set checkpoint_every_seconds > 0 to keep one)"
                tr.log.kv("error", step=tr.step, train_loss=loss_v, error="non-finite loss")
                raise NonFiniteLoss(f"training loss became {loss_v} at step {tr.step}{where}. Stopped: lower "
                                    f"matrix_lr / tied_embed_lr / scalar_lr (or grad_clip_norm) or check the data")
            if tr.step % max(cfg.train_log_every, 1) == 0 or tr.step <= 5 or reached:
                tok_s = window_steps * tr.tokens_per_step / max(window_t, 1e-9)
                rec = dict(step=tr.step, iterations=cfg.iterations, train_loss=loss_v, lr_scale=lr_scale,
                           step_ms=1000 * window_t / max(window_steps, 1), tok_s=tok_s,
                           mfu=flops_per_token(cfg, tr.model.looping_active) * tok_s / peak_flops / dist.world_size
                           if peak_flops else 0.0,
                           elapsed_s=round(tr.elapsed_s, 3), phase=phase)
                tr.log.kv("train", **rec)
                tr.history.append(rec)
                window_t, window_steps = 0.0, 0
            if cfg.val_loss_every > 0 and tr.step % cfg.val_loss_every == 0 and not reached:
                validate(tr)
            if signalled:
                save_checkpoint(tr, reason=f"signal {tr.stop_signal or 'on another rank'}")
                raise TrainingInterrupted(f"stopped on a signal at step {tr.step} (checkpoint {tr.last_checkpoint}); "
                                          f"resume with python -m golfnb.train --resume {tr.run_dir}")
            if cfg.checkpoint_every_seconds > 0 and not reached and \
                    tr.elapsed_s - last_ckpt_elapsed >= cfg.checkpoint_every_seconds:
                save_checkpoint(tr, reason="interval")
                last_ckpt_elapsed = tr.elapsed_s
    if cfg.checkpoint_every_seconds > 0:
        # a kill during the final evaluation then resumes straight into `finish`
        save_checkpoint(tr, reason="end")


def _agree(dist: Any, *flags: bool) -> tuple[bool, ...]:
    """Every rank sees a flag as set if any rank set it (one all-reduce MAX per step)."""
    if not dist.enabled:
        return tuple(bool(f) for f in flags)
    import torch.distributed as tdist

    t = torch.tensor([float(f) for f in flags], device=dist.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def _avg_step(tr: Trainer) -> float | None:
    n = tr.phase_steps["pre"] + tr.phase_steps["post"]
    return (tr.elapsed_s / n) if n else None


def _peak_flops(device: torch.device) -> float:
    """Datasheet dense bf16 peak used for MFU (H100/H200 SXM: 989 TFLOP/s); 0 on CPU (MFU not reported)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    if "H100" in name or "H200" in name or "GH200" in name:
        return 989e12
    if "A100" in name:
        return 312e12
    return float(os.environ.get("GOLFNB_PEAK_FLOPS", "0") or 0)


def finish(tr: Trainer) -> dict:
    """Final validation of the last weights, EMA weights loaded, post-EMA validation, final model saved."""
    cfg = tr.cfg
    summary: dict[str, Any] = {
        "steps": tr.step,
        "train_time_s": round(tr.elapsed_s, 3),
        "warmup_s": round(tr.warmup_s, 2),
        "compile_cache": None if tr.compile_cache is None else ("warm" if tr.compile_cache.warm else "cold"),
        "looping_step": tr.looping_step,
        "tok_s_pre": tr.phase_steps["pre"] * tr.tokens_per_step / tr.phase_time["pre"] if tr.phase_steps["pre"] else None,
        "tok_s_post": tr.phase_steps["post"] * tr.tokens_per_step / tr.phase_time["post"] if tr.phase_steps["post"] else None,
        "world_size": tr.dist.world_size,
        "resumed_from_step": tr.resumed_from,
    }
    if tr.device.type == "cuda":
        summary["peak_mem_alloc_mib"] = round(torch.cuda.max_memory_allocated(tr.device) / 2**20)
        summary["peak_mem_reserved_mib"] = round(torch.cuda.max_memory_reserved(tr.device) / 2**20)
    res = validate(tr, label="final")
    summary["val_loss"], summary["val_bpb"] = res["val_loss"], res["val_bpb"]
    if tr.ema is not None:
        tr.ema.copy_to(tr.model)
        res = validate(tr, label="post_ema")
        summary["post_ema_val_loss"], summary["post_ema_val_bpb"] = res["val_loss"], res["val_bpb"]
    if tr.run_dir is not None and tr.dist.is_main:
        atomic_torch_save(tr.run_dir / FINAL_MODEL, {
            "config": cfg.to_dict(), "state_dict": tr.model.state_dict(),
            "looping_active": bool(tr.model.looping_active), "step": tr.step})
        from golfnb.runs import record_many

        record_many(tr.run_dir, {f"train.{k}": v for k, v in summary.items()})
    tr.log.kv("summary", **{k: v for k, v in summary.items() if v is not None})
    return summary


def load_final_model(run_dir: str | Path, device: torch.device | str = "cpu"):
    """(cfg, model) from a run directory's final_model.pt (weights_only load; looping state restored)."""
    from golfnb.model import build_model

    path = Path(run_dir) / FINAL_MODEL
    if not path.exists():
        raise ConfigError(f"{path} does not exist; train the run first (or point at the right run_dir)")
    st = torch_load(path, map_location="cpu")
    cfg = Hyperparameters.from_dict(st["config"])
    model = build_model(cfg, "cpu")
    model.load_state_dict(st["state_dict"])
    model.looping_active = bool(st["looping_active"])
    return cfg, model.to(device)


def train(cfg: Hyperparameters, run_dir: str | Path | None = None, *, resume: bool = False,
          echo: bool = True, check_data: bool = True) -> dict:
    """Train `cfg`; returns the summary dict (steps, times, tok/s per phase, val numbers).

    resume=True continues run_dir from its latest checkpoint (cfg must be the run's own config, up to
    RESUMABLE_FIELDS). Raises ConfigError / ShardError for bad input (before training starts),
    TrainingInterrupted after a signal (a checkpoint was written), NonFiniteLoss when the loss diverges."""
    tr = prepare(cfg, run_dir, resume=resume, echo=echo, check_data=check_data)
    try:
        warmup(tr)
        if resume:
            load_checkpoint(tr)
        run_loop(tr)
        return finish(tr)
    finally:
        tr.log.close()


# ================================================================================================ CLI

def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m golfnb.train", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="named preset (pr1514, pr1533, pr1176, pr1217, baseline, smoke)")
    src.add_argument("--config", help="config.json / .yaml written by golfnb (e.g. a run's config.json)")
    src.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one field")
    p.add_argument("--run-dir", help="run directory (logs, config.json, checkpoints, final model)")
    p.add_argument("--data-dir", help="data root holding datasets/ and tokenizers/ (default $GOLFNB_DATA_DIR)")
    p.add_argument("--skip-data-check", action="store_true",
                   help="do not read every shard before training (headers are still checked)")
    return p


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"--set {it!r} must look like key=value")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def config_from_args(args: argparse.Namespace) -> tuple[Hyperparameters, Path | None, bool]:
    overrides = parse_overrides(args.set)
    if args.resume:
        run_dir = Path(args.resume)
        if args.run_dir and Path(args.run_dir).resolve() != run_dir.resolve():
            raise ConfigError(f"--resume {args.resume} continues that run in place; drop --run-dir {args.run_dir}")
        if not (run_dir / "config.json").exists():
            raise ConfigError(f"{run_dir} has no config.json; is it a golfnb run directory?")
        cfg = resolve(None, overrides, run_dir / "config.json")
        return cfg.with_data_root(args.data_dir), run_dir, True
    cfg = resolve(args.preset, overrides, args.config)
    data_dir = args.data_dir or os.environ.get("GOLFNB_DATA_DIR")
    cfg = cfg.with_data_root(data_dir)
    return cfg, Path(args.run_dir) if args.run_dir else None, False


def main(argv: list[str] | None = None) -> int:
    """The command line. Exit codes: 0 done, 1 training failed (non-finite loss, out of memory), 2 bad input
    (config, data, run directory; nothing was trained), 143 stopped on a signal after a checkpoint."""
    from golfnb.data.shards import ShardError

    args = build_arg_parser().parse_args(argv)
    try:
        cfg, run_dir, resume = config_from_args(args)
        train(cfg, run_dir, resume=resume, check_data=not args.skip_data_check)
    except ConfigError as e:
        print(f"golfnb.train: configuration error: {e}", file=sys.stderr)
        return 2
    except ShardError as e:
        print(f"golfnb.train: data error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"golfnb.train: {e}", file=sys.stderr)
        return INTERRUPT_EXIT_CODE
    except TrainingError as e:
        print(f"golfnb.train: {e}", file=sys.stderr)
        return 1
    finally:
        from golfnb.distributed import destroy

        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
