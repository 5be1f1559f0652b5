"""Training-throughput benchmark: tokens/s, ms/step, MFU and peak memory before and after recurrence.

    python -m golfnb.bench --preset pr1514 --steps 20
    python -m golfnb.bench --preset pr1514 --steps 20 --set attn_backend=sdpa_flash --json out.json
    python -m golfnb.bench --preset pr1514 --ce-only     # the LM head + cross-entropy alone, per CE backend

It runs the trainer's own step function (same model, optimizer, compile and precision as `golfnb.train`) on
real shards when the config's data is present, else on uniformly random tokens (throughput does not depend
on the token values). Start-up (process start to the first timed step: imports, model build, compile and the
warm-up steps of both graphs) is reported separately, as the records keep it off the clock.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from golfnb.provenance import device_name

_T_PROCESS = time.perf_counter()

__all__ = ["run_bench", "run_ce_bench", "SyntheticLoader", "main", "add_bench_parser", "median_ms"]


class SyntheticLoader:
    """Uniform random tokens with the train loader's interface (benchmarks only)."""

    def __init__(self, vocab: int, device: torch.device, seed: int = 0):
        self.vocab, self.device = vocab, device
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def next_batch(self, batch_seqs: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.vocab, (batch_seqs, seq_len + 1), generator=self.gen)
        t = t.to(self.device, non_blocking=True)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, st: dict) -> None:
        self.gen.set_state(st["gen"])


def median_ms(fn, reps: int = 20, warmup: int = 3, setup=None, device: torch.device | str | None = None) -> float:
    """Median milliseconds of `fn()` over `reps` calls after `warmup` untimed ones; `setup()` (untimed) runs
    before each call, e.g. to restore an input a kernel overwrites. CUDA events on a GPU (the kernels' device
    time, synchronised per call), the wall clock on CPU."""
    cuda = (torch.device(device).type == "cuda") if device is not None else torch.cuda.is_available()
    ms: list[float] = []
    for i in range(warmup + reps):
        if setup is not None:
            setup()
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ev[0].record()
            fn()
            ev[1].record()
            torch.cuda.synchronize()
            t = ev[0].elapsed_time(ev[1])
        else:
            t0 = time.perf_counter()
            fn()
            t = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            ms.append(t)
    ms.sort()
    return ms[len(ms) // 2]


def _time_steps(tr, n: int, lr_scale: float = 1.0) -> list[float]:
    from golfnb.train import _sync, train_step

    out = []
    for _ in range(n):
        _sync(tr.device)
        t0 = time.perf_counter()
        loss = train_step(tr, lr_scale, update_ema=True)
        loss.item()
        out.append(time.perf_counter() - t0)
    return out


def run_bench(cfg, steps: int = 20, data: str = "auto", log=print, profile_dir: str | None = None,
              kernel_sources_top: int = 0) -> dict[str, Any]:
    from golfnb.attention import available_backends, backend_options, resolve_backend
    from golfnb.fused_ce import resolve_ce_backend
    from golfnb.fused_mlp import resolve_mlp_backend
    from golfnb.distributed import init_distributed
    from golfnb.model import build_model, count_parameters, flops_per_token
    from golfnb.optim import EMA, build_optimizers
    from golfnb.runlog import RunLogger
    from golfnb.train import Trainer, _peak_flops, compile_training_graph, warmup

    dist = init_distributed(cfg.device)
    device = dist.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    loader = None
    source = "synthetic"
    if data in ("auto", "real") and Path(cfg.data_path).is_dir() and any(Path(cfg.data_path).glob("fineweb_train_*.bin")):
        from golfnb.data.loaders import make_train_loader

        loader = make_train_loader(cfg, dist.rank, dist.world_size, device)
        source = "real"
    elif data == "real":
        raise SystemExit(f"--data real but no train shards under {cfg.data_path}")
    if loader is None:
        loader = SyntheticLoader(cfg.vocab_size, device, seed=cfg.seed + dist.rank)
    model = build_model(cfg, device)
    backend = resolve_backend(cfg.attn_backend, device)
    model.set_attn_backend(backend)
    model.set_ce_backend(resolve_ce_backend(cfg.ce_backend, device))
    model.set_mlp_backend(resolve_mlp_backend(cfg.mlp_backend, device, cfg.mlp_activation))
    fwd = model if cfg.compile_mode == "none" else compile_training_graph(model, cfg)
    bundle = build_optimizers(model, cfg, dist)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    tr = Trainer(cfg=cfg, run_dir=None, dist=dist, log=RunLogger(None, rank=dist.rank, echo=False), device=device,
                 model=model, forward=fwd, bundle=bundle, loader=loader, ema=ema, val_tokens=None, luts=None,
                 grad_accum=cfg.grad_accum_for(dist.world_size), micro_seqs=cfg.micro_batch_seqs(dist.world_size))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup(tr)
    startup_s = time.perf_counter() - _T_PROCESS
    peak = _peak_flops(device)
    result: dict[str, Any] = {"preset_run_id": cfg.run_id, "device": device_name(device),
                              "world_size": dist.world_size, "attn_backend": backend,
                              "attn_options": backend_options(backend), "ce_backend": model.ce_backend,
                              "mlp_backend": model.mlp_backend,
                              # what else could run here: says whether fa3/fa2 were installed at all
                              "attn_backends_available": available_backends(device), "data": source,
                              "params": count_parameters(model), "startup_s": round(startup_s, 1),
                              "warmup_s": round(tr.warmup_s, 1), "tokens_per_step": cfg.train_batch_tokens,
                              "torch": torch.__version__, "compile_mode": cfg.compile_mode}
    phases = [("pre", False)] + ([("post", True)] if cfg.num_loops > 0 else [])
    for name, looping in phases:
        model.looping_active = looping
        _time_steps(tr, 2)  # settle (allocator, clocks) after the switch
        times = sorted(_time_steps(tr, steps))
        med = times[len(times) // 2]
        tok_s = cfg.train_batch_tokens / med
        fpt = flops_per_token(cfg, looping)
        result[name] = {"ms_per_step": round(1000 * med, 2), "ms_min": round(1000 * times[0], 2),
                        "ms_max": round(1000 * times[-1], 2), "tok_s": round(tok_s),
                        "tok_s_per_gpu": round(tok_s / dist.world_size),
                        "mfu": round(fpt * tok_s / dist.world_size / peak, 4) if peak else None,
                        "model_tflops_per_gpu": round(fpt * tok_s / dist.world_size / 1e12, 1)}
        log(f"bench phase:{name} " + " ".join(f"{k}:{v}" for k, v in result[name].items()))
    if device.type == "cuda":
        result["peak_mem_alloc_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    if profile_dir is not None:
        result["profile"] = profile_steps(tr, phases, Path(profile_dir), log=log,
                                          step_ms={n: result[n]["ms_per_step"] for n, _ in phases},
                                          sources_top=kernel_sources_top)
    log("bench " + " ".join(f"{k}:{v}" for k, v in result.items() if not isinstance(v, dict)))
    return result


# Kernel-name fragments per category, checked in order (attention before matmul: cuDNN's attention kernels also
# carry "sm90"/"cutlass"-style names). Inductor names its kernels triton_{poi,red,per}_fused_<ops>.
_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("fmha", "flash", "sdpa", "attention", "attn", "cudnn::fusion")),
    ("communication", ("nccl",)),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk", "sm90_", "sm80_", "ampere_", "wgmma")),
    ("fused reduction (Inductor)", ("triton_red", "triton_per")),
    ("fused pointwise (Inductor)", ("triton_poi",)),
    ("other Triton", ("triton_",)),
    ("copy / fill", ("memcpy", "memset", "copy_kernel", "fill_kernel")),
    ("optimizer (foreach)", ("foreach", "multi_tensor")),
)


# Profiler entries that carry device time but are not kernels: the launch queue filling up (the host is ahead of
# the GPU, which is good) and record_function ranges on the GPU timeline (Optimizer.step#..., ProfilerStep#...),
# which span kernels already counted. Counting them as kernel time would hide idle time.
_MARKERS = ("command buffer full", "optimizer.step#", "profilerstep#")
MARKER = "profiler marker (not a kernel)"


def kernel_category(name: str) -> str:
    """Which part of a step a GPU kernel belongs to, from its name (everything unmatched is eager ATen)."""
    low = name.lower()
    if any(m in low for m in _MARKERS):
        return MARKER
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "eager ATen (elementwise, reductions)"


def summarize_kernels(kernels: list[tuple[str, float, int]], wall_ms: float) -> list[dict[str, Any]]:
    """Kernel time per category: rows {category, ms, share, calls} sorted by time, plus the idle remainder.

    `kernels` holds (name, self device ms, calls) per kernel; `wall_ms` is the profiled step's clock. The GPU
    is idle for wall - busy (launch gaps, host work, synchronisations): that row is what CUDA graphs and
    fewer, larger kernels can win back."""
    cats: dict[str, list[float]] = {}
    for name, ms, calls in kernels:
        c = cats.setdefault(kernel_category(name), [0.0, 0])
        c[0] += ms
        c[1] += calls
    busy = sum(v[0] for k, v in cats.items() if k != MARKER)
    rows = [{"category": k, "ms": round(v[0], 2), "share": round(v[0] / wall_ms, 4) if wall_ms else None,
             "calls": int(v[1])} for k, v in sorted(cats.items(), key=lambda kv: -kv[1][0])]
    rows.append({"category": "GPU idle (wall - kernel time)", "ms": round(max(wall_ms - busy, 0.0), 2),
                 "share": round(max(wall_ms - busy, 0.0) / wall_ms, 4) if wall_ms else None, "calls": 0})
    return rows


def _device_kernels(prof) -> list[tuple[str, float, int]]:
    """(name, self device ms, calls) of every device kernel in a finished torch.profiler session."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if us > 0:
            out.append((e.key, us / 1000.0, int(e.count)))
    return out


def kernel_sources(names: list[str], cache_dir: str | Path | None = None) -> dict[str, list[str]]:
    """The source files of Inductor-generated kernels, by kernel name, from Inductor's on-disk cache.

    A profile names a slow kernel but not what it computes; its source (the fused ops, the loads, the launch
    heuristics) is in the cache directory Inductor wrote while compiling (`TORCHINDUCTOR_CACHE_DIR`, default
    /tmp/torchinductor_<user>). Names repeat across graphs (each graph numbers its kernels from 0), so every
    file defining the name is returned; a name found nowhere maps to []."""
    if cache_dir is None:
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

        cache_dir = inductor_cache_dir()
    found: dict[str, list[str]] = {n: [] for n in names}
    root = Path(cache_dir)
    if not root.is_dir() or not names:
        return found
    for f in sorted(root.rglob("*.py")):
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for n in names:
            if f"def {n}(" in text and text not in found[n]:
                found[n].append(text)
    return found


def profile_steps(tr, phases, out_dir: Path, log=print, top: int = 30,
                  step_ms: dict[str, float] | None = None, sources_top: int = 0) -> dict[str, Any]:
    """Profile one optimizer step per phase. Writes per phase the top-kernel table (by device time) and, on
    CUDA, the time per kernel category against the step's clock; returns {phase: {table, wall_ms, summary}}.
    `sources_top` > 0 also writes `profile_<phase>_sources.py`: the generated source of that many of the phase's
    slowest Inductor kernels (by device time per call), each under a comment with its time and call count.

    The clock is `step_ms[phase]` (the unprofiled median) when given: the profiler slows the host side, so the
    profiled step's own clock overstates the GPU's idle time."""
    from torch.profiler import ProfilerActivity, profile

    from golfnb.io import atomic_write_json, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = tr.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out: dict[str, Any] = {}
    for name, looping in phases:
        tr.model.looping_active = looping
        _time_steps(tr, 1)
        with profile(activities=acts) as prof:
            wall_ms = 1000 * _time_steps(tr, 1)[0]
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=90)
        path = out_dir / f"profile_{name}.txt"
        atomic_write_text(path, table)
        entry: dict[str, Any] = {"table": str(path), "wall_ms": round(wall_ms, 2)}
        log(f"profile phase:{name} wall_ms:{wall_ms:.1f}\n{table}")
        if cuda:
            clock = (step_ms or {}).get(name, wall_ms)
            entry["clock_ms"] = round(clock, 2)
            kernels = sorted(_device_kernels(prof), key=lambda k: -k[1])
            # every kernel, for the analysis the top-N table cannot give (what hides in a category)
            atomic_write_json(out_dir / f"profile_{name}_kernels.json",
                              [{"name": n, "ms": round(ms, 3), "calls": c, "category": kernel_category(n)}
                               for n, ms, c in kernels])
            rows = summarize_kernels(kernels, clock)
            entry["summary"] = rows
            text = "\n".join(f"{r['category']:<40} {r['ms']:>10.2f} ms {100 * (r['share'] or 0):6.1f} %  {r['calls']:>7} calls"
                             for r in rows)
            atomic_write_text(out_dir / f"profile_{name}_summary.txt", f"phase {name}, step clock {clock:.1f} ms (profiled {wall_ms:.1f} ms)\n{text}\n")
            log(f"profile phase:{name} by category\n{text}")
            if sources_top > 0:
                entry["sources"] = str(_write_sources(kernels, sources_top, out_dir / f"profile_{name}_sources.py"))
        out[name] = entry
    return out


def _write_sources(kernels: list[tuple[str, float, int]], n: int, path: Path,
                   cache_dir: str | Path | None = None) -> Path:
    from golfnb.io import atomic_write_text

    # per call, not in total: a kernel that runs once per micro-step but takes ten times its peers is the
    # anomaly worth reading, however its total compares with a cheap kernel called 88 times
    gen = sorted((k for k in kernels if k[0].startswith("triton_") and k[2] > 0), key=lambda k: -k[1] / k[2])[:n]
    srcs = kernel_sources([k[0] for k in gen], cache_dir)
    parts = []
    for name, ms, calls in gen:
        found = srcs[name]
        parts.append(f"# ==== {name}: {ms:.2f} ms in {calls} calls ({ms / calls:.3f} ms per call), "
                     f"{len(found)} source file(s) found\n" + "\n# ---- next file defining the name\n".join(found))
    atomic_write_text(path, "\n\n".join(parts) + "\n")
    return path


def run_ce_bench(cfg, steps: int = 20, tokens: int | None = None, log=print) -> dict[str, Any]:
    """The LM head GEMM + soft-capped cross-entropy alone, forward and backward, at one micro-step's shape.

    Arms: `torch` (the model's plain path: bf16 GEMM, fp32 soft-cap, F.cross_entropy) and, where it can run,
    `triton` (golfnb.fused_ce.head_softcap_ce). Each is compiled as training compiles the model unless
    compile_mode is none. Reports the median ms per forward+backward, the peak memory above the inputs, and
    each arm's loss on the same inputs (they must agree to rounding).
    """
    import torch.nn.functional as F

    from golfnb.fused_ce import head_softcap_ce, resolve_ce_backend, softcap_ce_reference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    n = tokens or cfg.micro_batch_seqs(1) * cfg.train_seq_len
    d, v, cap = cfg.model_dim, cfg.vocab_size, cfg.logit_softcap
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    h0 = torch.randn(n, d, device=device, dtype=dtype, generator=g)
    w0 = torch.randn(v, d, device=device, dtype=dtype, generator=g) * 2 * d ** -0.5  # logits with std ~2
    t = torch.randint(0, v, (n,), device=device, generator=g)

    def plain(h, w, tt):
        return softcap_ce_reference(F.linear(h, w), tt, cap).mean()

    def fused(h, w, tt):
        return head_softcap_ce(h, w, tt, cap).mean()

    arms = {"torch": plain}
    if resolve_ce_backend("auto", device) == "triton":
        arms["triton"] = fused

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    out: dict[str, Any] = {"device": device_name(device), "tokens": n, "model_dim": d, "vocab_size": v,
                           "logit_softcap": cap, "dtype": str(dtype).removeprefix("torch."),
                           "compile_mode": cfg.compile_mode, "steps": steps, "arms": {}}
    for name, fn in arms.items():
        f = fn if cfg.compile_mode == "none" else torch.compile(
            fn, dynamic=False, **({} if cfg.compile_mode == "default" else {"mode": cfg.compile_mode}))
        h = h0.clone().requires_grad_()
        w = w0.clone().requires_grad_()

        def once() -> torch.Tensor:
            h.grad = w.grad = None
            loss = f(h, w, t)
            loss.backward()
            return loss.detach()

        for _ in range(3):  # compile and warm-up
            once()
        h.grad = w.grad = None
        sync()
        base = torch.cuda.memory_allocated(device) if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            loss = once()
            sync()
            times.append(time.perf_counter() - t0)
        times.sort()
        arm = {"ms": round(1000 * times[len(times) // 2], 3), "ms_min": round(1000 * times[0], 3),
               "loss": float(loss), "grad_h_norm": float(h.grad.float().norm()),
               "grad_w_norm": float(w.grad.float().norm())}
        if cuda:
            arm["peak_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2 ** 20, 1)
        out["arms"][name] = arm
        log(f"ce_bench arm:{name} tokens:{n} vocab:{v} ms:{arm['ms']:.3f} loss:{arm['loss']:.6f}"
            + (f" peak_mib:{arm['peak_mib']}" if cuda else ""))
    if "triton" in out["arms"]:
        out["speedup"] = round(out["arms"]["torch"]["ms"] / out["arms"]["triton"]["ms"], 3)
        log(f"ce_bench speedup triton/torch: {out['speedup']:.3f}x")
    return out


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="training throughput per phase (tok/s, ms/step, MFU, memory)")
    _add_args(p)
    p.set_defaults(func=lambda a: _run_from_args(a))


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="pr1514")
    p.add_argument("--steps", type=int, default=20, help="timed steps per phase (median reported)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data", choices=("auto", "real", "synthetic"), default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", help="write the result here")
    p.add_argument("--profile", metavar="DIR", help="also profile one step per phase; kernel tables into DIR")
    p.add_argument("--kernel-sources", type=int, default=0, metavar="N",
                   help="with --profile: also save the generated source of each phase's N slowest Inductor kernels "
                        "(per call) from Inductor's cache directory")
    p.add_argument("--ce-only", action="store_true",
                   help="time only the LM head + cross-entropy (forward and backward) per CE backend")


def _run_from_args(args: argparse.Namespace) -> int:
    import os

    from golfnb.config import resolve
    from golfnb.train import parse_overrides

    cfg = resolve(args.preset, parse_overrides(args.set)).with_data_root(args.data_dir or os.environ.get("GOLFNB_DATA_DIR"))
    if args.ce_only:
        res = run_ce_bench(cfg, steps=args.steps)
    else:
        if args.kernel_sources and not args.profile:
            raise SystemExit("--kernel-sources needs --profile DIR (the sources are chosen from the profile)")
        res = run_bench(cfg, steps=args.steps, data=args.data, profile_dir=args.profile,
                        kernel_sources_top=args.kernel_sources)
    if args.json:
        from golfnb.io import atomic_write_json

        atomic_write_json(args.json, res)
    print(json.dumps(res, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m golfnb.bench", description=__doc__.split("\n")[0])
    _add_args(p)
    return _run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
