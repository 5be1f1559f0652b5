"""Training: one code path for CPU, one GPU and N GPUs.

`train(cfg, run_dir)` is callable from a notebook cell; `python -m golfnb.train` is what torchrun launches:

    torchrun --standalone --nproc_per_node=8 -m golfnb.train --preset pr1514 --run-dir runs/x
    python -m golfnb.train --config runs/x/config.json --set seed=42 --run-dir runs/y
    python -m golfnb.train --resume runs/x

The loop follows the records (spec 3.5-3.8): `grad_accum_steps = 8 // world_size` so one GPU sees the
eight-GPU batch; the learning-rate schedule and the depth-recurrence switch run on the fraction of the
wall-clock budget (600 s minus the GPTQ reserve) that has elapsed; every rank agrees on the stop through an
all-reduce(MAX). Compile warm-up steps (including the looped graph) run before the clock starts and leave no
trace: model weights, optimizer moments and momentum buffers, loader and RNG are restored afterwards (the
banked records leak warm-up momentum into training; golfnb does not).

Everything that can be checked before GPU time is spent is checked in `prepare` (config, world size, device,
tokenizer, shards, run directory). Checkpoints are written atomically at a wall-clock interval and on
SIGTERM/SIGINT; a non-finite loss stops the run and keeps the last good checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from golfnb.config import ConfigError, Hyperparameters, resolve
from golfnb.distributed import barrier
from golfnb.io import atomic_torch_save, atomic_write_json, atomic_write_text, torch_load

__all__ = ["train", "prepare", "Trainer", "TrainingError", "NonFiniteLoss", "TrainingInterrupted", "main",
           "autocast_for", "load_final_model", "CHECKPOINT_DIR"]

CHECKPOINT_DIR = "checkpoints"
FINAL_MODEL = "final_model.pt"
INTERRUPT_EXIT_CODE = 143  # 128 + SIGTERM: the run stopped on a signal after writing a checkpoint


class TrainingError(RuntimeError):
    """Training cannot continue; the message says why and what to change."""


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
    resumed_from: int | None = None
    warmup_s: float = 0.0

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train_batch_tokens

    def frac(self) -> float:
        cap = self.cfg.training_cap_seconds
        if cap > 0:
            return self.elapsed_s / cap
        return self.step / self.cfg.iterations


# ================================================================================================ prepare

def _check_run_dir(cfg: Hyperparameters, run_dir: Path, resume: bool) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run directory {run_dir} is not writable ({e.strerror}); choose another run_dir") from None
    existing = run_dir / "config.json"
    if existing.exists():
        try:
            old = Hyperparameters.from_json(existing)
        except ConfigError as e:
            raise ConfigError(f"{existing} is unreadable ({e}); choose a fresh run_dir") from None
        from golfnb.config import diff_configs

        diff = diff_configs(old, cfg)
        if diff:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:6])
            if resume:
                raise ConfigError(f"cannot resume {run_dir}: it holds a run of another config ({what}); resume "
                                  f"with the run's own config.json or start a new run_dir")
            has_ckpt = (run_dir / CHECKPOINT_DIR / "LATEST").exists() or (run_dir / FINAL_MODEL).exists()
            if has_ckpt:
                raise ConfigError(f"run directory {run_dir} already holds a different run ({what}); choose a new "
                                  f"run_dir (or delete the old one)")


def prepare(cfg: Hyperparameters, run_dir: str | Path | None = None, *, resume: bool = False,
            dist: Any = None, echo: bool = True) -> Trainer:
    """Every check, then model, optimizer, data and compiled step, ready for `warmup` and `run_loop`."""
    from golfnb.bpb import build_byte_luts, check_tokenizer
    from golfnb.data.loaders import load_validation_tokens, make_train_loader
    from golfnb.distributed import init_distributed
    from golfnb.model import build_model, count_parameters
    from golfnb.optim import EMA, build_optimizers
    from golfnb.provenance import code_hash, data_summary, environment_info, git_identity
    from golfnb.runlog import RunLogger
    from golfnb.attention import resolve_backend

    run_dir = Path(run_dir) if run_dir is not None else None
    # --- cheap checks first: none of these touch the GPU
    if dist is None:
        dist = init_distributed(cfg.device)
    grad_accum = cfg.grad_accum_for(dist.world_size)
    micro = cfg.micro_batch_seqs(dist.world_size)
    device = dist.device
    _check_cpu_size(cfg, device)
    check_tokenizer(cfg)
    if run_dir is not None and dist.is_main:
        _check_run_dir(cfg, run_dir, resume)
    if resume and (run_dir is None or not (run_dir / CHECKPOINT_DIR / "LATEST").exists()):
        raise ConfigError(f"nothing to resume in {run_dir}: no {CHECKPOINT_DIR}/LATEST; start a fresh run "
                          f"(set checkpoint_every_seconds > 0 to get resumable checkpoints)")
    loader = make_train_loader(cfg, dist.rank, dist.world_size, device)  # validates shards
    val_tokens = load_validation_tokens(cfg)
    luts = build_byte_luts(cfg.tokenizer_path, cfg.vocab_size)

    log = RunLogger(run_dir, rank=dist.rank, echo=echo)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(cfg, device)
    backend = resolve_backend(cfg.attn_backend, device)
    model.set_attn_backend(backend)
    forward: Callable[..., torch.Tensor] = model
    if cfg.compile_mode != "none":
        kwargs = {} if cfg.compile_mode == "default" else {"mode": cfg.compile_mode}
        forward = torch.compile(model, dynamic=False, **kwargs)
    bundle = build_optimizers(model, cfg, dist)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    if run_dir is not None and dist.is_main:
        cfg.to_json(run_dir / "config.json")
        env = {"git": git_identity(), "code_sha256": code_hash(), "environment": environment_info(device, backend),
               "data": data_summary(cfg.data_path, cfg.tokenizer_path), "world_size": dist.world_size}
        atomic_write_json(run_dir / "env.json", env)
    tr = Trainer(cfg=cfg, run_dir=run_dir, dist=dist, log=log, device=device, model=model, forward=forward,
                 bundle=bundle, loader=loader, ema=ema, val_tokens=val_tokens, luts=luts,
                 grad_accum=grad_accum, micro_seqs=micro)
    if dist.is_main:
        n_params = count_parameters(model)
        log.header("golfnb train", {
            "code": {**git_identity(), "code_sha256": code_hash()},
            "environment": environment_info(device, backend),
            "run": {"run_dir": str(run_dir), "world_size": dist.world_size, "grad_accum_steps": grad_accum,
                    "micro_batch_seqs": micro, "device": str(device), "attn_backend": backend,
                    "model_params": n_params, "compile_mode": cfg.compile_mode, "resume": resume},
            "config": cfg.to_dict(),
            "data": data_summary(cfg.data_path, cfg.tokenizer_path) | {"val_tokens": int(val_tokens.numel()) - 1},
        })
        log.log(f"model_params:{n_params} attn_backend:{backend} world_size:{dist.world_size} "
                f"grad_accum_steps:{grad_accum} micro_batch_seqs:{micro}")
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
    """Compile warm-up off the clock (spec 3.8): the plain graph, then the looped one; then restore everything."""
    cfg = tr.cfg
    if cfg.warmup_steps <= 0:
        return 0.0
    t0 = time.perf_counter()
    snap_model = _clone(tr.model.state_dict())
    snap_opt = _clone(tr.bundle.state_dict())
    snap_loader = _clone(tr.loader.state_dict())
    snap_rng = torch.get_rng_state()
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
    torch.set_rng_state(snap_rng)
    if tr.ema is not None:
        from golfnb.optim import EMA

        tr.ema = EMA(tr.model, cfg.ema_decay)  # initialised from the restored step-0 weights (spec 3.6)
    _sync(tr.device)
    tr.warmup_s = time.perf_counter() - t0
    tr.log.log(f"warmup_s:{tr.warmup_s:.1f} (compile and warm-up, off the clock; all state restored)")
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


def save_checkpoint(tr: Trainer, reason: str) -> Path | None:
    """Per-rank files under checkpoints/step_N/, then an atomic LATEST pointer once every rank has written."""
    if tr.run_dir is None:
        return None
    step_dir = tr.run_dir / CHECKPOINT_DIR / f"step_{tr.step:06d}"
    state = {
        "step": tr.step,
        "elapsed_s": tr.elapsed_s,
        "looping_active": bool(tr.model.looping_active),
        "looping_step": -1 if tr.looping_step is None else tr.looping_step,
        "phase_time": dict(tr.phase_time),
        "phase_steps": dict(tr.phase_steps),
        "model": tr.model.state_dict(),
        "optim": tr.bundle.state_dict(),
        "ema": tr.ema.state_dict() if tr.ema is not None else {},
        "loader": tr.loader.state_dict(),
        "rng": _rng_state(tr.device),
        "config": tr.cfg.to_dict(),
        "world_size": tr.dist.world_size,
        "reason": reason,
    }
    atomic_torch_save(step_dir / f"rank{tr.dist.rank}.pt", state)
    barrier()
    if tr.dist.is_main:
        atomic_write_text(tr.run_dir / CHECKPOINT_DIR / "LATEST", step_dir.name + "\n")
        for old in sorted((tr.run_dir / CHECKPOINT_DIR).glob("step_*")):
            if old.name != step_dir.name:
                for f in old.glob("*"):
                    f.unlink(missing_ok=True)
                old.rmdir()
    barrier()
    tr.last_checkpoint = step_dir
    tr.log.log(f"checkpoint:{step_dir.name} reason:{reason} step:{tr.step} elapsed_s:{tr.elapsed_s:.2f}")
    return step_dir


def load_checkpoint(tr: Trainer) -> None:
    assert tr.run_dir is not None
    latest = (tr.run_dir / CHECKPOINT_DIR / "LATEST").read_text().strip()
    path = tr.run_dir / CHECKPOINT_DIR / latest / f"rank{tr.dist.rank}.pt"
    if not path.exists():
        raise ConfigError(f"checkpoint {path} is missing; the run was written with another world size? "
                          f"resume with the same number of processes")
    st = torch_load(path, map_location=tr.device)
    if st["world_size"] != tr.dist.world_size:
        raise ConfigError(f"checkpoint was written by {st['world_size']} processes, this run has "
                          f"{tr.dist.world_size}; resume with --nproc_per_node {st['world_size']}")
    saved = Hyperparameters.from_dict(st["config"])
    from golfnb.config import diff_configs

    if diff_configs(saved, tr.cfg):
        raise ConfigError("checkpoint config differs from this run's config; resume with the run's config.json")
    tr.model.load_state_dict(st["model"])
    tr.bundle.load_state_dict(st["optim"])
    if tr.ema is not None:
        tr.ema.load_state_dict(st["ema"])
    tr.loader.load_state_dict(st["loader"])
    torch.set_rng_state(st["rng"]["torch"].cpu())
    if "cuda" in st["rng"] and tr.device.type == "cuda":
        torch.cuda.set_rng_state(st["rng"]["cuda"].cpu(), tr.device)
    tr.step = int(st["step"])
    tr.elapsed_s = float(st["elapsed_s"])
    tr.model.looping_active = bool(st["looping_active"])
    tr.looping_step = None if st["looping_step"] < 0 else int(st["looping_step"])
    tr.phase_time = dict(st["phase_time"])
    tr.phase_steps = dict(st["phase_steps"])
    tr.resumed_from = tr.step
    tr.log.log(f"resumed:{latest} step:{tr.step} elapsed_s:{tr.elapsed_s:.2f} looping:{tr.model.looping_active}")


# ================================================================================================ loop

@contextlib.contextmanager
def _signals(tr: Trainer):
    """Turn SIGTERM/SIGINT into a flag the loop checks after each step (spot pre-emption)."""
    if not hasattr(signal, "SIGTERM") or threading_main() is False:
        yield
        return
    old = {}

    def handler(signum, _frame):
        tr.stop_signal = signum

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
    cap = cfg.training_cap_seconds
    peak_flops = _peak_flops(tr.device)
    last_ckpt_elapsed = tr.elapsed_s
    window_t, window_steps = 0.0, 0
    tr.model.train()
    if cfg.val_loss_every > 0 and tr.step == 0:
        validate(tr)
    with _signals(tr):
        while True:
            # recurrence switches on at a fraction of the budget (spec 2.7), stays on afterwards
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
            reached = (cap > 0 and tr.elapsed_s >= cap) or tr.step >= cfg.iterations
            reached, signalled, bad_any = _agree(dist, reached, tr.stop_signal != 0, bad)
            if bad_any:
                where = f" (last good checkpoint: {tr.last_checkpoint})" if tr.last_checkpoint else \
                    " (no checkpoint was written; set checkpoint_every_seconds > 0 to keep one)"
                tr.log.kv("error", step=tr.step, train_loss=loss_v, error="non-finite loss")
                raise NonFiniteLoss(f"training loss became {loss_v} at step {tr.step}; stopped{where}. Lower "
                                    f"matrix_lr / tied_embed_lr or check the data")
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
                save_checkpoint(tr, reason=f"signal {tr.stop_signal or 'peer'}")
                raise TrainingInterrupted(f"stopped on a signal at step {tr.step}; resume with "
                                          f"python -m golfnb.train --resume {tr.run_dir}")
            if reached:
                break
            if cfg.checkpoint_every_seconds > 0 and tr.elapsed_s - last_ckpt_elapsed >= cfg.checkpoint_every_seconds:
                save_checkpoint(tr, reason="interval")
                last_ckpt_elapsed = tr.elapsed_s


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
        "looping_step": tr.looping_step,
        "tok_s_pre": tr.phase_steps["pre"] * tr.tokens_per_step / tr.phase_time["pre"] if tr.phase_steps["pre"] else None,
        "tok_s_post": tr.phase_steps["post"] * tr.tokens_per_step / tr.phase_time["post"] if tr.phase_steps["post"] else None,
        "world_size": tr.dist.world_size,
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
          echo: bool = True) -> dict:
    """Train `cfg`; returns the summary dict (steps, times, tok/s per phase, val numbers)."""
    tr = prepare(cfg, run_dir, resume=resume, echo=echo)
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
    return p


def parse_overrides(items: list[str]) -> dict[str, str]:
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
        if not (run_dir / "config.json").exists():
            raise ConfigError(f"{run_dir} has no config.json; is it a golfnb run directory?")
        cfg = resolve(None, overrides, run_dir / "config.json")
        return cfg, run_dir, True
    cfg = resolve(args.preset, overrides, args.config)
    data_dir = args.data_dir or os.environ.get("GOLFNB_DATA_DIR")
    cfg = cfg.with_data_root(data_dir)
    return cfg, Path(args.run_dir) if args.run_dir else None, False


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        cfg, run_dir, resume = config_from_args(args)
        train(cfg, run_dir, resume=resume)
    except ConfigError as e:
        print(f"golfnb.train: configuration error: {e}", file=sys.stderr)
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
