"""Run directories, the notebook runner (`golfnb run`) and the stage launchers the notebooks call.

One run = one directory `runs/<UTC YYYYmmdd-HHMMSS>_<name>_s<seed>/` holding the executed notebooks, the
resolved `config.json`, `train.log`, per-rank logs (`logs/rank<r>.log`, plus torchrun's own per-rank
stdout/stderr under `logs/torchrun/`), `metrics.json`, `metrics.jsonl`, `env.json`, and the git-ignored
checkpoints and artifacts.

    golfnb run notebooks/train.ipynb -p preset smoke -p seed 1                 # new run directory
    golfnb run notebooks/train.ipynb notebooks/quantize.ipynb notebooks/eval_sliding.ipynb -y params.yaml
    golfnb run notebooks/eval_ttt.ipynb -p run_dir runs/<run> -p optimizer muon   # into an existing run

`-p NAME VALUE` values are read as: true/false -> bool, none/null -> None, decimal integers -> int (so
`0012` is 12, never octal), other numbers -> float, `{...}` / `[...]` -> YAML flow (a dict or list, e.g.
`-p overrides '{num_loops: 0}'`), anything else -> str. `-y params.yaml` gives typed values directly.
Unlike plain papermill (which warns and runs on), a parameter no notebook declares is an error with the
closest declared name.

Plain papermill works too: `papermill notebooks/train.ipynb runs/x/train.ipynb -p seed 1` (create runs/x
first; papermill does not create folders). A notebook whose `run_dir` parameter is left empty finds its run
directory, in this order: (1) `PAPERMILL_OUTPUT_PATH` when papermill runs with `--inject-output-path` (or
`--inject-paths`): the folder of the output notebook; (2) the command line of the papermill process that
started the kernel (Linux /proc, else `ps`): again the folder of the output notebook; (3) interactive use
(JupyterLab): a fresh `runs/<stamp>_<name>_s<seed>/`. Passing `-p run_dir DIR` always wins.

Training from a notebook never spawns ranks inside the kernel and never uses `!torchrun` (a failing shell
escape leaves the notebook "successful"): `launch_training` starts `torchrun ... -m golfnb.train --config
<run>/config.json --run-dir <run>` in its own session (process group), streams rank 0's lines into the cell,
kills the whole group when the cell is interrupted or fails, and raises on a non-zero exit so papermill
fails too.
"""
from __future__ import annotations

import argparse
import ast
import datetime as _dt
import difflib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from golfnb.config import CHOICES, ConfigError, Hyperparameters, diff_configs, resolve

__all__ = [
    "TrainingLaunchError", "TrainPlan", "new_run_dir", "resolve_run_dir", "papermill_context",
    "parse_papermill_argv", "training_done", "notebook_parameters", "notebook_needs_run", "parse_param_value", "run_notebook",
    "torchrun_command", "child_env", "stream_process", "launch_training", "plan_training", "run_training",
    "quantize_stage", "reserialize_artifact", "eval_method_name", "run_eval",
    "ttt_unadapted_chunks", "slot_verdict", "add_run_parser", "main",
]

FINAL_MODEL = "final_model.pt"  # golfnb.train.FINAL_MODEL (not imported: importing train pulls in torch)
CONFIG_NAME = "config.json"
_INTERRUPTED = 143  # golfnb.train.INTERRUPT_EXIT_CODE


class TrainingLaunchError(RuntimeError):
    """The training subprocess exited non-zero; the message carries its exit code and last lines."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


# ================================================================================================ run dirs

def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.")
    return s or "run"


def new_run_dir(root: str | os.PathLike = "runs", name: str = "run", seed: int | None = None, *,
                stamp: str | None = None, create: bool = True) -> Path:
    """`<root>/<UTC YYYYmmdd-HHMMSS>_<name>[_s<seed>]`, created (a numeric suffix when the name is taken)."""
    stamp = stamp or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}_{_slug(name)}" + (f"_s{int(seed)}" if seed is not None else "")
    root = Path(root)
    path = root / base
    k = 2
    while path.exists():
        path = root / f"{base}-{k}"
        k += 1
    if create:
        path.mkdir(parents=True, exist_ok=False)
    return path


def parse_papermill_argv(argv: Sequence[str]) -> dict[str, Any] | None:
    """The notebook/output paths and --cwd of a papermill command line, or None if it is not one.

    Uses papermill's own click command to parse (so every option papermill knows is handled) without
    running anything.
    """
    args = [a for a in argv if a != ""]
    start = None
    for i, a in enumerate(args):
        if Path(a).name == "papermill" and (i == 0 or args[i - 1] != "-m"):
            start = i + 1
            break
        if a == "-m" and i + 1 < len(args) and args[i + 1] == "papermill":
            start = i + 2
            break
    if start is None:
        return None
    try:
        from papermill.cli import papermill as pm_cli

        ctx = pm_cli.make_context("papermill", list(args[start:]), resilient_parsing=True)
    except Exception:  # noqa: BLE001 - not a papermill command line we can read: treat as "not papermill"
        return None
    nb, out = ctx.params.get("notebook_path"), ctx.params.get("output_path")
    if not nb or not out:
        return None
    return {"notebook_path": nb, "output_path": out, "cwd": ctx.params.get("cwd")}


def _parent_process(pid: int) -> tuple[list[str], list[Path]]:
    """(argv, candidate working directories) of process `pid`; empty when they cannot be read."""
    proc = Path("/proc") / str(pid)
    argv: list[str] = []
    dirs: list[Path] = []
    if proc.is_dir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            env = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
            pwd = next((e[4:] for e in env if e.startswith("PWD=")), None)
            if pwd:  # the shell's directory: papermill --cwd changes the process cwd, not PWD
                dirs.append(Path(pwd))
            dirs.append(Path(os.readlink(proc / "cwd")))
        except OSError:
            pass
    else:
        try:
            out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
            argv = shlex.split(out)
        except (OSError, subprocess.SubprocessError, ValueError):
            argv = []
    dirs.append(Path.cwd())
    return argv, dirs


def papermill_context(pid: int | None = None) -> dict[str, Any] | None:
    """When this kernel was started by the papermill CLI: its notebook and output paths (absolute).

    The kernel's parent process is papermill; its command line names the output notebook. A relative path
    is resolved against the directory where the output notebook really exists (papermill writes it before
    the first cell runs), trying the shell's $PWD, the process's cwd and ours.
    """
    argv, dirs = _parent_process(os.getppid() if pid is None else pid)
    parsed = parse_papermill_argv(argv) if argv else None
    if parsed is None:
        return None
    out = Path(parsed["output_path"])
    nb = Path(parsed["notebook_path"])
    if not out.is_absolute():
        base = next((d for d in dirs if (d / out).exists()), dirs[0])
        out, nb = base / out, (nb if nb.is_absolute() else base / nb)
    return {"notebook_path": nb, "output_path": out, "cwd": parsed["cwd"]}


def resolve_run_dir(run_dir: str | os.PathLike | None = "", *, name: str = "run", seed: int | None = None,
                    runs_root: str | os.PathLike = "runs", papermill_output_path: str | None = None,
                    must_exist: bool = False, new: bool = True) -> Path | None:
    """The run directory of a notebook (see the module docstring for the order). `must_exist` is for the
    notebooks that read a trained run (quantize, eval): they never invent a new directory. With
    `new=False`, interactive use without a run_dir gives None instead of a fresh directory."""
    if run_dir:
        p = Path(run_dir)
        if must_exist and not p.is_dir():
            raise ConfigError(f"run_dir={str(run_dir)!r} does not exist; point it at a trained run directory "
                              f"(e.g. one under runs/ made by train.ipynb)")
        p.mkdir(parents=True, exist_ok=True)
        return p
    source = None
    if papermill_output_path:
        out = Path(papermill_output_path)
    else:
        ctx = papermill_context()
        out = ctx["output_path"] if ctx else None
        source = ctx["notebook_path"] if ctx else None
    if out is not None and str(out) not in ("", "-"):
        d = Path(out).parent
        if source is not None and Path(source).resolve().parent == d.resolve():
            raise ConfigError(f"the executed notebook would land next to its source in {d}; write it into a run "
                              f"directory instead: papermill {Path(source).name} runs/<name>/{Path(out).name}")
        if must_exist and not (d / CONFIG_NAME).is_file():
            raise ConfigError(f"{d} (the folder of the output notebook) holds no {CONFIG_NAME}; execute this "
                              f"notebook into a trained run directory or pass -p run_dir DIR")
        return d
    if must_exist:
        raise ConfigError("no run directory: set run_dir to a trained run (e.g. -p run_dir runs/<run>)")
    return new_run_dir(runs_root, name, seed) if new else None


def training_done(run_dir: str | os.PathLike) -> bool:
    """True when the run already trained: final_model.pt is there, or metrics.json holds train.* results
    (a remote GPU run brought back without its weights)."""
    from golfnb.runs import read_metrics

    d = Path(run_dir)
    if (d / FINAL_MODEL).is_file():
        return True
    return d.is_dir() and any(k.startswith("train.") for k in read_metrics(d))


# ================================================================================================ notebooks

def notebook_parameters(notebook: str | os.PathLike) -> dict[str, Any]:
    """{name: default} of a notebook's `parameters` cell (defaults as Python literals)."""
    import papermill

    p = Path(notebook)
    if not p.is_file():
        raise ConfigError(f"notebook {p} does not exist")
    out: dict[str, Any] = {}
    for name, info in papermill.inspect_notebook(str(p)).items():
        try:
            out[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            out[name] = info["default"]
    return out


def notebook_needs_run(notebook: str | os.PathLike) -> bool:
    """True for notebooks that read an existing trained run (quantize, evals): notebook metadata
    `golfnb.needs_run` (kept by nbstripout, which strips only outputs and volatile metadata)."""
    import json

    meta = json.loads(Path(notebook).read_text()).get("metadata", {})
    return bool(meta.get("golfnb", {}).get("needs_run", False))


_INT = re.compile(r"[+-]?\d+")


def parse_param_value(text: str) -> Any:
    """A `-p NAME VALUE` value typed (see the module docstring)."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null", "~"):
        return None
    if _INT.fullmatch(t):
        return int(t)
    try:
        return float(t)
    except ValueError:
        pass
    if t[:1] in "{[":
        import yaml

        try:
            return yaml.safe_load(t)
        except yaml.YAMLError as e:
            raise ConfigError(f"parameter value {text!r} is not valid YAML/JSON ({e}); quote keys and "
                              f"strings, e.g. '{{\"num_loops\": 0}}'") from None
    return text


def _check_names(given: Iterable[str], declared: Iterable[str], where: str) -> None:
    declared = list(declared)
    for name in given:
        if name not in declared:
            close = difflib.get_close_matches(name, declared, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"parameter {name!r} is not declared by {where}{hint} (parameters: "
                              f"{', '.join(declared)})")


def run_notebook(notebook: str | os.PathLike, run_dir: str | os.PathLike, params: Mapping[str, Any] | None = None,
                 *, output_name: str | None = None, log_output: bool = True, kernel_name: str = "python3",
                 execution_timeout: float | None = None, cwd: str | os.PathLike | None = None) -> Path:
    """Execute `notebook` with papermill into `run_dir` (created), passing `run_dir`; returns the executed
    notebook's path. Unknown parameters raise ConfigError before a kernel starts. A notebook declaring
    `interactive` gets `interactive=False` unless given: executed copies hold static figures only."""
    import papermill

    nb = Path(notebook)
    declared = notebook_parameters(nb)
    params = dict(params or {})
    _check_names(params, declared, nb.name)
    rd = Path(run_dir)
    rd.mkdir(parents=True, exist_ok=True)
    if "run_dir" in declared:
        params["run_dir"] = str(rd)
    if "interactive" in declared:
        params.setdefault("interactive", False)
    out = rd / (output_name or nb.name)
    papermill.execute_notebook(str(nb), str(out), parameters=params, kernel_name=kernel_name,
                               log_output=log_output, progress_bar=False, execution_timeout=execution_timeout,
                               cwd=None if cwd is None else str(cwd))
    return out


# ================================================================================================ training

def torchrun_command(run_dir: str | os.PathLike, nproc: int, *, resume: bool = False,
                     config: str | os.PathLike | None = None, python: str | None = None) -> list[str]:
    """`torchrun --standalone --nproc_per_node=N ... -m golfnb.train --config <run>/config.json --run-dir <run>`
    (as `python -m torch.distributed.run`, so the kernel's interpreter runs it whatever PATH says).

    Only local rank 0 reaches the console (`--local-ranks-filter 0`); every rank's stdout and stderr are
    also teed to files under <run>/logs/torchrun/ (tracebacks of a failing rank land there)."""
    rd = Path(run_dir)
    cmd = [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}",
           "--log-dir", str(rd / "logs" / "torchrun"), "--tee", "3", "--local-ranks-filter", "0",
           "-m", "golfnb.train"]
    if resume:
        return cmd + ["--resume", str(rd)]
    return cmd + ["--config", str(config or rd / CONFIG_NAME), "--run-dir", str(rd)]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent's environment (NCCL_*, CUDA_VISIBLE_DEVICES ... survive) with PYTHONUNBUFFERED=1."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def _kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the whole group (the trainer checkpoints on it), then SIGKILL after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            # the leader is gone; stragglers of the group get the same signal once more
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return
        except subprocess.TimeoutExpired:
            continue


def stream_process(command: Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | os.PathLike | None = None, echo: Callable[[str], Any] | None = print,
                   grace_s: float = 30.0, tail: int = 40) -> tuple[int, list[str]]:
    """Run `command` in a new session, stream its merged stdout/stderr line by line to `echo`, and return
    (exit code, last `tail` lines). Any exception while streaming (KeyboardInterrupt when the cell is
    interrupted, or one raised by `echo`) kills the whole process group before it propagates."""
    proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, errors="replace", env=dict(env) if env is not None else None,
                            cwd=None if cwd is None else str(cwd), start_new_session=True)
    last: deque[str] = deque(maxlen=tail)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            last.append(line)
            if echo is not None:
                echo(line)
        rc = proc.wait()
    except BaseException:
        _kill_group(proc, grace_s)
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    return rc, list(last)


def launch_training(run_dir: str | os.PathLike, nproc: int = 1, *, resume: bool = False,
                    command: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                    echo: Callable[[str], Any] | None = None, grace_s: float = 30.0) -> int:
    """Train `<run_dir>/config.json` under torchrun with `nproc` processes (see `torchrun_command`).

    `command` replaces the torchrun command line (another launcher, or a test). Returns 0; a non-zero exit
    raises TrainingLaunchError with the last lines of output, so a notebook cell (and papermill) fails."""
    rd = Path(run_dir)
    if command is None:
        if not resume and not (rd / CONFIG_NAME).is_file():
            raise ConfigError(f"{rd / CONFIG_NAME} does not exist; write the resolved config first "
                              f"(plan_training does) or pass resume=True for a checkpointed run")
        command = torchrun_command(rd, nproc, resume=resume)
    say = echo if echo is not None else (lambda s: print(s, flush=True))
    say("launch: " + " ".join(shlex.quote(str(c)) for c in command))
    t0 = time.perf_counter()
    rc, last = stream_process(command, env=child_env(env), echo=say, grace_s=grace_s)
    if rc != 0:
        # torchrun reports a failed worker as its own exit 1; the trainer's one-line reason is in the output
        cause = next((ln.split("]:", 1)[-1].strip() for ln in reversed(last) if "golfnb.train:" in ln), None)
        resume_hint = "stopped on a signal; a checkpoint was written, continue with resume=True"
        why = cause or {_INTERRUPTED: resume_hint}.get(rc, "see the last lines below")
        if cause and "stopped on a signal" in cause:  # torchrun turns the trainer's 143 into its own 1
            why = f"{cause} ({resume_hint})"
        tail = "\n".join(last[-15:])
        raise TrainingLaunchError(f"training exited with code {rc} after {time.perf_counter() - t0:.0f} s: {why}\n"
                                  f"Per-rank logs: {rd / 'logs'}. Last lines:\n{tail}", rc)
    return rc


@dataclass
class TrainPlan:
    """What the train notebook will do: `action` is train | resume | render (results already present)."""

    cfg: Hyperparameters
    run_dir: Path
    action: str
    nproc: int  # 0 = in this process
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        how = "in this process" if self.nproc == 0 else f"torchrun with {self.nproc} process(es)"
        head = {"render": f"{self.run_dir} already holds training results: rendering them only (no training)",
                "resume": f"resuming {self.run_dir} from its latest checkpoint, {how}",
                "train": f"training {self.cfg.run_id or 'run'} seed {self.cfg.seed} into {self.run_dir}, {how}"}
        return "\n".join([head[self.action], *self.notes])


def _auto_nproc(nproc: int) -> int:
    import torch

    if nproc < 0:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if nproc > 0:
        if 8 % nproc:
            raise ConfigError(f"nproc={nproc} must divide 8 (1, 2, 4 or 8) so grad_accum_steps = 8 // world_size "
                              f"is whole; nproc=0 trains in this process")
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_gpu and nproc > n_gpu:
            raise ConfigError(f"nproc={nproc} but only {n_gpu} GPU(s) are visible; use nproc={n_gpu} or less")
    return nproc


def plan_training(preset: str | None = "smoke", seed: int = 1337, nproc: int = -1, run_dir: str = "",
                  data_dir: str = "", overrides: Mapping[str, Any] | None = None, resume: bool = False, *,
                  papermill_output_path: str | None = None, runs_root: str = "runs") -> TrainPlan:
    """Validate the train notebook's parameters and decide what to do, before any work starts.

    overrides go through Hyperparameters.from_dict (an unknown key fails with "did you mean"). nproc: -1 =
    every visible GPU under torchrun, or in this process on a CPU-only machine; 0 = in this process;
    N = torchrun with N processes. The resolved config is written to <run_dir>/config.json (what torchrun
    reads) unless the run already trained or resumes."""
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides must be a dict of field: value, got {type(overrides).__name__}")
    ov = dict(overrides or {})
    if "seed" in ov:
        raise ConfigError("give the seed as the notebook's `seed` parameter, not inside overrides")
    cfg = resolve(preset or None, {**ov, "seed": seed})
    cfg = cfg.with_data_root(data_dir or os.environ.get("GOLFNB_DATA_DIR") or None)
    n = _auto_nproc(int(nproc))
    rd = resolve_run_dir(run_dir, name=cfg.run_id or (preset or "run"), seed=seed, runs_root=runs_root,
                         papermill_output_path=papermill_output_path)
    existing = rd / CONFIG_NAME
    notes: list[str] = []
    if training_done(rd):
        stored = Hyperparameters.from_json(existing) if existing.is_file() else cfg
        diff = diff_configs(stored, cfg)
        if diff:
            keys = ", ".join(list(diff)[:8]) + (" ..." if len(diff) > 8 else "")
            notes.append(f"note: the run's own config.json is shown; this notebook's parameters differ in {len(diff)} "
                         f"field(s) ({keys}) and were not used")
        return TrainPlan(stored, rd, "render", 0, notes)
    if resume:
        if not (rd / "checkpoints" / "LATEST").is_file():
            raise ConfigError(f"resume=True but {rd} has no checkpoints/LATEST; start a fresh run (resume=False) "
                              f"or set checkpoint_every_seconds > 0 to get resumable checkpoints")
        return TrainPlan(Hyperparameters.from_json(existing), rd, "resume", n, notes)
    if existing.is_file():
        old = Hyperparameters.from_json(existing)
        diff = diff_configs(old, cfg)
        if diff and (rd / "checkpoints").is_dir():
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:6])
            raise ConfigError(f"{rd} holds checkpoints of another config ({what}); use a new run_dir, or "
                              f"resume=True with the run's own settings")
    cfg.to_json(existing)
    return TrainPlan(cfg, rd, "train", n, notes)


def run_training(plan: TrainPlan, *, echo: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Carry out a TrainPlan; returns the run's train.* metrics (from metrics.json)."""
    from golfnb.runs import read_metrics

    if plan.action != "render":
        if plan.nproc == 0:
            from golfnb.train import train

            train(plan.cfg, plan.run_dir, resume=plan.action == "resume")
        else:
            launch_training(plan.run_dir, plan.nproc, resume=plan.action == "resume", echo=echo)
    m = {k: v for k, v in read_metrics(plan.run_dir).items() if k.startswith("train.")}
    if not m:
        raise ConfigError(f"{plan.run_dir} has no train.* results in metrics.json after training; see train.log")
    return m


# ================================================================================================ quantize

def reserialize_artifact(path: str | os.PathLike, compressor: str, out: str | os.PathLike | None = None):
    """Write the same quantized model with another compressor (no GPU, no re-quantization): the codes and
    scales are identical, only the compressed bytes differ. Default output: `<stem>.<compressor>.gnb` next to
    `path`; an existing file with that compressor is reused. Returns golfnb.artifact.ArtifactInfo."""
    import hashlib

    from golfnb.artifact import COMPRESSORS, ArtifactInfo, load_artifact, read_header, save_artifact

    if compressor not in COMPRESSORS:
        close = difflib.get_close_matches(compressor, list(COMPRESSORS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"compressor={compressor!r} is not one of {', '.join(COMPRESSORS)}{hint}")
    src = Path(path)
    hdr = read_header(src)
    dst = Path(out) if out is not None else src.with_name(f"{src.stem}.{compressor}{src.suffix}")
    if dst.is_file():
        h = read_header(dst)
        if h["compressor"] == compressor:
            return ArtifactInfo(dst, h["file_bytes"], h["sha256"], compressor, h["byte_shuffle_stride"], 0.0)
    q = load_artifact(src)
    info = save_artifact(dst, q, compressor, hdr["byte_shuffle_stride"])
    assert info.sha256 == hashlib.sha256(dst.read_bytes()).hexdigest()
    return info


def quantize_stage(run_dir: str | os.PathLike, compressor: str | None = None, *, code_bytes: int | None = None,
                   log: Any = print, record: bool = True) -> dict[str, Any]:
    """The quantize notebook's work: quantize a trained run unless `artifacts/model.gnb` exists; when
    `compressor` differs from the one the artifact used, also write `artifacts/model.<compressor>.gnb`.
    `code_bytes`: the size of the packed train_gpt.py when known (None: golfnb.pack estimates it).

    Returns {action: existing|quantized, artifact, compressor, model_bytes, alternatives: {c: {...}}}."""
    from golfnb.artifact import read_header
    from golfnb.pipeline import ARTIFACT_RELPATH, quantize_run
    from golfnb.runs import record_many

    rd = Path(run_dir)
    art = rd / ARTIFACT_RELPATH
    if compressor and compressor not in CHOICES["compressor"]:
        close = difflib.get_close_matches(compressor, CHOICES["compressor"], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"compressor={compressor!r} is not one of {', '.join(CHOICES['compressor'])}{hint}")
    if art.is_file():
        action = "existing"
    elif (rd / FINAL_MODEL).is_file():
        quantize_run(rd, overrides={"compressor": compressor} if compressor else None, code_bytes=code_bytes,
                     progress=False, log=log)
        action = "quantized"
    else:
        raise ConfigError(f"{rd} has neither {ARTIFACT_RELPATH} nor {FINAL_MODEL}; train the run first "
                          f"(train.ipynb) or point run_dir at a trained run")
    hdr = read_header(art)
    res: dict[str, Any] = {"action": action, "artifact": str(art), "compressor": hdr["compressor"],
                           "model_bytes": hdr["file_bytes"], "sha256": hdr["sha256"], "alternatives": {}}
    if compressor and compressor != hdr["compressor"]:
        info = reserialize_artifact(art, compressor)
        res["alternatives"][compressor] = {"artifact": str(info.path), "model_bytes": info.bytes,
                                           "sha256": info.sha256, "seconds": round(info.seconds, 2)}
        if log is not None:
            how = f"in {info.seconds:.1f} s" if info.seconds > 0 else "(the file from an earlier call, reused)"
            log(f"reserialized {hdr['compressor']} -> {compressor}: {hdr['file_bytes']:,} -> {info.bytes:,} bytes "
                f"({info.bytes - hdr['file_bytes']:+,}) {how}: {info.path}")
        if record:
            record_many(rd, {f"quant.reserialized.{compressor}.model_bytes": info.bytes,
                             f"quant.reserialized.{compressor}.sha256": info.sha256})
    return res


# ================================================================================================ evals

def eval_method_name(kind: str, *, optimizer: str = "sgd", variant: str = "context_per_window",
                     base: str = "sliding") -> str:
    """Canonical golfnb.evals method name of an eval notebook's choice (validated, with suggestions)."""

    def pick(name: str, value: str, allowed: Sequence[str]) -> str:
        if value not in allowed:
            close = difflib.get_close_matches(str(value), list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}{hint}")
        return value

    if kind in ("plain", "sliding"):
        return kind
    if kind == "ttt":
        return "ttt" if pick("optimizer", optimizer, CHOICES["ttt_optimizer"]) == "sgd" else "ttt_muon"
    if kind == "slot":
        return "slot:" + pick("variant", variant, CHOICES["slot_variant"])
    if kind == "tilt":
        return pick("base", base, ("sliding", "ttt", "ttt_muon")) + "+tilt"
    raise ConfigError(f"eval kind {kind!r} is not one of plain, sliding, ttt, slot, tilt")


def run_eval(run_dir: str | os.PathLike, method: str, *, overrides: Mapping[str, Any] | None = None,
             force: bool = False, device: str | None = None, source: str = "artifact",
             log: Any = print, display: bool = True) -> dict[str, Any]:
    """golfnb.headless.evaluate_run for one method (skipped when evals/<method>.json exists for the same
    overrides, unless force); it records the method's metrics into the run, shown here in the notebook."""
    from golfnb.headless import eval_metrics, evaluate_run
    from golfnb.runs import show_metrics

    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides must be a dict of field: value, got {type(overrides).__name__}")
    res = evaluate_run(run_dir, methods=[method], device=device or None, overrides=dict(overrides or {}) or None,
                       source=source, log=log, force=force)[method]
    if display:
        show_metrics(eval_metrics(res))
    return res


def ttt_unadapted_chunks(run_dir: str | os.PathLike, *, overrides: Mapping[str, Any] | None = None,
                         device: str | None = None, force: bool = False) -> list[float]:
    """Per-chunk bpb of the run's artifact with TTT's chunking but no adaptation (ttt_epochs=0): the
    reference TTT's per-chunk gain is measured against. Its overall bpb equals the sliding pass's (same
    windows). Cached in evals/ttt_unadapted_chunks.json, keyed by the chunking settings."""
    import json

    import torch

    from golfnb.bpb import build_byte_luts
    from golfnb.data.loaders import load_validation_tokens
    from golfnb.evals.ttt import evaluate_ttt
    from golfnb.io import atomic_write_json
    from golfnb.pipeline import load_quantized

    rd = Path(run_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg, model = load_quantized(rd, dev)
    if overrides:
        cfg = cfg.replace(**overrides)
    key = {k: getattr(cfg, k) for k in ("eval_seq_len", "eval_stride", "ttt_chunk_tokens", "max_val_tokens")}
    cache = rd / "evals" / "ttt_unadapted_chunks.json"
    if cache.is_file() and not force:
        data = json.loads(cache.read_text())
        if data.get("settings") == key:
            return [float(x) for x in data["chunk_bpb"]]
    model.looping_active = cfg.num_loops > 0
    val = load_validation_tokens(cfg)
    luts = build_byte_luts(cfg.tokenizer_path, cfg.vocab_size, device=dev)
    res = evaluate_ttt(model, val, cfg.replace(ttt_epochs=0), luts, None, optimizer="sgd",
                       method_name="ttt_unadapted")
    atomic_write_json(cache, {"settings": key, "chunk_bpb": res["chunk_bpb"], "val_bpb": res["val_bpb"]})
    return [float(x) for x in res["chunk_bpb"]]


def slot_verdict(run_dir: str | os.PathLike, variant: str, overrides: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """golfnb.legality's measured verdict for SLOT `variant` under the run's settings (the same one
    evaluate_run gates on; cached in this process, so the eval that follows does not measure it again)."""
    from golfnb.legality import legality_verdict

    method = eval_method_name("slot", variant=variant)
    cfg = Hyperparameters.from_json(Path(run_dir) / CONFIG_NAME).replace(**dict(overrides or {}))
    return legality_verdict(method, cfg.replace(slot_variant=variant)).as_dict()


# ================================================================================================ CLI

def _load_param_files(files: Sequence[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise ConfigError(f"parameters file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"parameters file {p} must hold a mapping of name: value")
        out.update(data)
    return out


def add_run_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`golfnb run NOTEBOOK... [-p NAME VALUE]... [-y params.yaml]... [--name NAME] [--run-dir DIR]`."""
    paras = __doc__.split("\n\n")
    p = subparsers.add_parser("run", help="execute notebooks with papermill into a run directory",
                              description="\n\n".join([paras[0], paras[2], paras[3]]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="+", metavar="NOTEBOOK", help="notebooks to execute, in order")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a parameter (typed: see above); given to every notebook that declares it")
    p.add_argument("-y", "--parameters-yaml", action="append", default=[], metavar="FILE",
                   help="YAML file of parameters (typed values, lists, dicts)")
    p.add_argument("--name", help="run name in the directory name (default: the preset, else the notebook)")
    p.add_argument("--run-dir", help="execute into this directory (an existing run, e.g. for eval notebooks)")
    p.add_argument("--runs-root", default="runs", help="parent of new run directories (default runs/)")
    p.add_argument("--output", help="file name of the executed notebook (one notebook only)")
    p.add_argument("--kernel", default="python3", help="Jupyter kernel (default python3)")
    p.add_argument("--execution-timeout", type=float, default=None, help="seconds per cell (default none)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not stream cell output (--log-output off)")
    p.set_defaults(func=_cmd_run)
    return p


def _cmd_run(a: argparse.Namespace) -> int:
    import logging

    from papermill.exceptions import PapermillExecutionError

    nbs = [Path(n) for n in a.notebooks]
    if a.output and len(nbs) > 1:
        raise ConfigError("--output names one executed notebook; give one NOTEBOOK with it")
    params = _load_param_files(a.parameters_yaml)
    params.update({k: parse_param_value(v) for k, v in a.parameter})
    declared = {nb: notebook_parameters(nb) for nb in nbs}
    union: dict[str, Any] = {}
    for d in declared.values():
        for k, v in d.items():
            union.setdefault(k, v)
    _check_names(params, union, ", ".join(n.name for n in nbs))
    run_dir = a.run_dir or params.pop("run_dir", None) or None
    if run_dir is None and notebook_needs_run(nbs[0]):
        raise ConfigError(f"{nbs[0].name} reads a trained run: pass --run-dir runs/<run> (or put a training "
                          f"notebook first)")
    if run_dir is None:
        seed = params.get("seed", union.get("seed")) if "seed" in union else None
        name = a.name or params.get("preset") or union.get("preset") or nbs[0].stem
        run_dir = new_run_dir(a.runs_root, str(name), seed)
    run_dir = Path(run_dir)
    if not a.quiet and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"golfnb run: run directory {run_dir}", flush=True)
    for nb in nbs:
        mine = {k: v for k, v in params.items() if k in declared[nb]}
        try:
            out = run_notebook(nb, run_dir, mine, output_name=a.output, log_output=not a.quiet,
                               kernel_name=a.kernel, execution_timeout=a.execution_timeout)
        except PapermillExecutionError as e:
            print(f"golfnb run: {nb} failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
                  f"  the executed notebook with the traceback: {run_dir / (a.output or nb.name)}", file=sys.stderr)
            return 1
        print(f"golfnb run: executed {out}", flush=True)
    print(f"golfnb run: done: {run_dir}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from golfnb.cli import run_subcommand

    return run_subcommand("run", add_run_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
