"""Export the seeds of an entry as a challenge record folder, `records/<track>/<date>_<name>/`.

    golfnb submit --runs runs/a_s1337 runs/a_s42 runs/a_s7 --name "My stack" --author "Ada" \\
        --github-id ada --track track_10min_16mb --record-name "A2 (#1514)" --record-bpb 1.0798

(or notebooks/submission.ipynb). From three or more run directories of one config that differ only in
seed, it writes:

* `train_gpt.py`: golfnb.pack's single file for the runs' config (identical for every seed: the seed comes
  from SEED). Refused when the seeds' code identity (env.json code_sha256, git commit and diff) or configs
  (beyond seed and run_id) differ, when the golfnb sources changed since the runs, or when the code bytes
  a run accounted for at quantize time are not the packed file's length.
* `train_seed<N>.log`: each run's rank-0 `train.log` as written, followed, for runs whose quantize and
  eval stages ran headless or from the notebooks (their results live in metrics.json and
  evals/<method>.json, not in train.log), by those results rendered in the lines the packed script prints
  (byte accounting, eval passes, `final_<method>_exact`), under a header that says so.
* `submission.json`: name, author, github_id, date, track, val_bpb / val_loss (mean over seeds, the final
  eval method's numbers on the round-tripped artifact) and their std, bytes_total, per-seed results, times,
  the significance test against the record (golfnb.stats) and compliance flags, all derived from the runs:
  legality from each eval result's measured verdict (`leaderboard_legal`, `legality`), budgets from the
  measured times and byte counts. Nothing there is typed in by hand.
* `README.md`: a generated write-up: summary, per-seed table, test, what changed against the preset it
  builds on (golfnb.config.diff_configs), phase times, artifact accounting, compliance, reproduction,
  credits by PR number.
* `requirements.txt`.

Result values come from metrics.json (train.*, quant.*, eval.<method>.*) and evals/*.json; the final method
is golfnb.evals.runner.method_key(cfg.final_eval, cfg). `golfnb validate FOLDER` checks the result.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from golfnb.config import BYTES_LIMIT, PRESET_NOTES, PRESETS, ConfigError, Hyperparameters, diff_configs, preset

__all__ = ["SubmitError", "SeedRun", "Submission", "TRACK_BUDGETS", "PER_RUN_FIELDS", "load_seed_run",
           "check_consistent", "seed_log_text", "credits", "build_submission", "write_submission",
           "export_submission", "render_readme", "add_submit_parser", "main"]

# wall-clock budgets (train, eval) in seconds per track; tracks not listed have no time limit
TRACK_BUDGETS: dict[str, tuple[float, float]] = {"track_10min_16mb": (600.0, 600.0)}
PER_RUN_FIELDS = ("seed", "run_id")  # may differ between the seeds of one entry
# machine-specific fields: the packed file replaces the paths by the challenge layout
_PATH_FIELDS = ("data_path", "tokenizer_path")
_RENDERED_HEADER = "golfnb submit: quantize and eval results of this run"


class SubmitError(ValueError):
    """The runs cannot be exported as one entry; the message says what to change."""


# ================================================================================================ one seed

def _read_json(path: Path, what: str, fix: str) -> dict[str, Any]:
    if not path.is_file():
        raise SubmitError(f"{path} is missing ({what}); {fix}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SubmitError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise SubmitError(f"{path} does not hold a JSON object; {fix}")
    return data


@dataclass
class SeedRun:
    """One run directory's results, as the export reads them."""

    run_dir: Path
    cfg: Hyperparameters
    env: dict[str, Any]
    metrics: dict[str, Any]
    evals: dict[str, dict[str, Any]]  # method -> result, every pass of cfg.eval_methods()
    methods: list[str]  # canonical method names, in order (the last one the final)
    method: str  # the final method

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def final(self) -> dict[str, Any]:
        return self.evals[self.method]

    @property
    def val_loss(self) -> float:
        return float(self.final["val_loss"])

    @property
    def val_bpb(self) -> float:
        return float(self.final["val_bpb"])

    @property
    def model_bytes(self) -> int:
        return int(self.metrics["quant.model_bytes"])

    @property
    def accounted_code_bytes(self) -> int:
        return int(self.metrics["quant.code_bytes"])

    @property
    def calibration_s(self) -> float:
        return float(self.metrics.get("quant.calibration_s") or 0.0)

    @property
    def train_loop_s(self) -> float:
        return float(self.metrics["train.train_time_s"])

    @property
    def train_s(self) -> float:
        """What the train budget covers: the clocked loop plus GPTQ calibration, as the packed
        script's `gptq:train_time` line adds them."""
        return self.train_loop_s + self.calibration_s

    def pass_seconds(self, method: str) -> float:
        r = self.evals[method]
        return float(r.get("wall_s", r.get("seconds", 0.0)))

    @property
    def eval_s(self) -> float:
        """Every eval pass the packed script runs, one after the other (one 600 s budget covers them all)."""
        return math.fsum(self.pass_seconds(m) for m in self.methods)


def _eval_result(run_dir: Path, metrics: dict[str, Any], method: str) -> dict[str, Any] | None:
    from golfnb.headless import read_eval

    res = read_eval(run_dir, method)
    if res is not None:
        return res
    prefix = f"eval.{method}."
    flat = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
    return flat if "val_bpb" in flat and "val_loss" in flat else None


def load_seed_run(run_dir: str | Path) -> SeedRun:
    """A run directory's config, identity and results; SubmitError naming the missing stage otherwise."""
    from golfnb.pack import eval_method_keys
    from golfnb.evals.runner import method_key

    rd = Path(run_dir)
    if not rd.is_dir():
        raise SubmitError(f"run directory {rd} does not exist")
    cfg_path = rd / "config.json"
    if not cfg_path.is_file():
        raise SubmitError(f"{cfg_path} is missing: {rd} is not a trained golfnb run directory")
    try:
        cfg = Hyperparameters.from_json(cfg_path)
    except ConfigError as e:
        raise SubmitError(f"{cfg_path}: {e}") from None
    env = _read_json(rd / "env.json", "code and environment identity, written by training",
                     "export runs trained by golfnb (train notebook, golfnb.headless or golfnb.train)")
    metrics = _read_json(rd / "metrics.json", "the run's results", "train, quantize and evaluate the run first")
    if "train.train_time_s" not in metrics:
        raise SubmitError(f"{rd}: metrics.json has no train.* results; train the run to the end first")
    for k in ("quant.model_bytes", "quant.code_bytes"):
        if k not in metrics:
            raise SubmitError(f"{rd}: metrics.json has no {k}; quantize the run first "
                              f"(python -m golfnb.headless --run-dir {rd} --stages quantize, or quantize.ipynb)")
    art = rd / "artifacts" / "model.gnb"
    if art.is_file() and art.stat().st_size != int(metrics["quant.model_bytes"]):
        raise SubmitError(f"{art} is {art.stat().st_size} bytes but the run recorded quant.model_bytes "
                          f"{metrics['quant.model_bytes']}: the artifact changed after it was evaluated; quantize "
                          f"and evaluate the run again")
    methods = eval_method_keys(cfg)
    evals = {}
    for m in methods:
        res = _eval_result(rd, metrics, m)
        if res is None:
            raise SubmitError(f"{rd} has no result for eval pass {m} (the packed script runs {', '.join(methods)}, "
                              f"and the eval budget covers them all); evaluate it: python -m golfnb.headless "
                              f"--run-dir {rd} --stages eval")
        evals[m] = res
    return SeedRun(rd, cfg, env, metrics, evals, methods, method_key(cfg.final_eval, cfg))


# ================================================================================================ consistency

def _identity(env: dict[str, Any]) -> tuple:
    git = env.get("git") or {}
    return env.get("code_sha256"), git.get("commit"), git.get("diff_sha256")


def _data_identity(env: dict[str, Any]) -> tuple:
    d = env.get("data") or {}
    shards = tuple(sorted((s.get("name"), s.get("sha256")) for s in d.get("shards") or [] if isinstance(s, dict)))
    return d.get("tokenizer_sha256"), shards


def check_consistent(runs: Sequence[SeedRun], *, min_seeds: int = 3, current_code: str | None = None) -> None:
    """SubmitError unless the runs are >= min_seeds distinct seeds of one config, code and data, and (when
    `current_code` is given) that code is the golfnb source tree packing will read."""
    if len(runs) < min_seeds:
        raise SubmitError(f"{len(runs)} run(s) given; a submission needs at least {min_seeds} seeds (the challenge's "
                          f"significance test is over seeds): train more seeds of the same config")
    seeds = [r.seed for r in runs]
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise SubmitError(f"seed(s) {dup} appear in more than one run ({', '.join(str(r.run_dir) for r in runs)}); "
                          f"give one run per seed")
    ref = runs[0]
    for r in runs[1:]:
        if _identity(r.env) != _identity(ref.env):
            a, b = _identity(ref.env), _identity(r.env)
            raise SubmitError(f"{r.run_dir} ran other code than {ref.run_dir}: code_sha256/commit/diff {b} vs {a}. "
                              f"All seeds must run the same code: re-run the odd seed from the same checkout")
        diff = {k: v for k, v in diff_configs(ref.cfg, r.cfg).items() if k not in PER_RUN_FIELDS + _PATH_FIELDS}
        if diff:
            what = ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
            raise SubmitError(f"{r.run_dir} has another config than {ref.run_dir} ({what}); the seeds of an entry "
                              f"may differ only in {' and '.join(PER_RUN_FIELDS)}")
        if _data_identity(r.env) != _data_identity(ref.env):
            raise SubmitError(f"{r.run_dir} trained on other data or another tokenizer than {ref.run_dir} "
                              f"(env.json data manifests differ); use the same shards for every seed")
    if current_code is not None and ref.env.get("code_sha256") != current_code:
        git = ref.env.get("git") or {}
        raise SubmitError(f"the golfnb sources changed since these runs (runs: code_sha256 {ref.env.get('code_sha256')}, "
                          f"now {current_code}), so the packed train_gpt.py would not be the code that produced the "
                          f"logs. Check out the runs' code (commit {git.get('commit')}, diff sha256 "
                          f"{git.get('diff_sha256')}) and export again, or re-run the seeds with the current code")


# ================================================================================================ logs

def _has_pipeline_lines(text: str) -> bool:
    return bool(re.search(r"^Code size: \d+ bytes", text, re.M)) and bool(re.search(r"^final_\S+_exact ", text, re.M))


def seed_log_text(run: SeedRun) -> str:
    """train_seed<N>.log: the run's train.log, plus its quantize/eval results when train.log lacks them."""
    log = run.run_dir / "train.log"
    if not log.is_file():
        raise SubmitError(f"{log} is missing: the rank-0 log is part of the submission; export runs trained by "
                          f"golfnb (their train.log is written as they train)")
    text = log.read_text(encoding="utf-8", errors="replace")
    if _has_pipeline_lines(text):
        return text  # a run of the packed script: its log already has every line
    m = run.metrics
    code, model = run.accounted_code_bytes, run.model_bytes
    lines = ["=" * 100,
             f"{_RENDERED_HEADER} (stages run headless or from the notebooks record them in metrics.json and "
             f"evals/<method>.json, not in train.log; rendered from those files in the lines the packed "
             f"train_gpt.py prints; eval seconds are each pass's wall time)"]
    if "quant.hessians" in m:
        lines.append(f"gptq:collected {m['quant.hessians']} Hessians from {m.get('quant.calibration_batches')} batches "
                     f"in {run.calibration_s:.2f}s")
    lines.append(f"gptq:train_time:{run.train_loop_s:.2f}s + calibration:{run.calibration_s:.2f}s = {run.train_s:.2f}s")
    lines.append(f"quant:method:{m.get('quant.method')} label:{m.get('quant.label')} quantize_s:"
                 f"{float(m.get('quant.quantize_s') or 0):.2f} serialize_s:{float(m.get('quant.serialize_s') or 0):.2f} "
                 f"pruned:{m.get('quant.pruned_entries', 0)} artifact_sha256:{m.get('quant.sha256')}")
    lines += [f"Serialized model {m.get('quant.label')}: {model} bytes", f"Code size: {code} bytes",
              f"Total submission size: {model + code} bytes"]
    for meth in run.methods:
        r = run.evals[meth]
        leg = r.get("leaderboard_legal")
        failed = (r.get("legality") or {}).get("failed_checks") or []
        tag = ("leaderboard-legal" if leg else "not verified" if leg is None
               else f"NOT leaderboard-legal (fails {', '.join(failed)})")
        lines.append(f"legality:{meth} {tag}")
    for meth in run.methods:
        r = run.evals[meth]
        lines.append(f"eval:{meth} method:{meth} val_loss:{float(r['val_loss']):.8f} val_bpb:{float(r['val_bpb']):.8f} "
                     f"targets:{r.get('targets_scored')} bytes:{r.get('bytes')} seconds:{run.pass_seconds(meth):.1f}")
    lines.append(f"final_eval:{run.cfg.final_eval} method:{run.method} val_loss:{run.val_loss:.8f} "
                 f"val_bpb:{run.val_bpb:.8f} eval_seconds:{run.eval_s:.1f}")
    lines.append(f"final_{run.method}_exact val_loss:{run.val_loss:.8f} val_bpb:{run.val_bpb:.8f}")
    return text + ("" if text.endswith("\n") or not text else "\n") + "\n".join(lines) + "\n"


# ================================================================================================ credits

# technique -> (is it on?, credit), after the records' provenance
_CREDITS: tuple[tuple[str, Any, str], ...] = (
    ("SP8192 tokenizer, GPTQ'd embeddings, SDClip, ShuffledSequenceLoader", lambda c: c.vocab_size == 8192, "#1394"),
    ("LeakyReLU(0.5)^2 MLP", lambda c: c.mlp_activation == "leaky_relu2", "#493, #518, #549"),
    ("XSA (exclusive self-attention)", lambda c: c.xsa_last_n > 0, "arXiv:2603.09078; #265, #478, #549"),
    ("partial RoPE + layerwise LN scale", lambda c: c.rope_dims > 0 or c.ln_scale, "#315"),
    ("sigmoid-gated U-Net skips", lambda c: c.skip_gates_enabled, "#289, #1172"),
    ("QK-gain", lambda c: c.qk_gain_init != 1.5, "#1125 sweep; #1176, #1217, #1394, #1413, #1493"),
    ("depth recurrence", lambda c: c.num_loops > 0, "#1204, #1394, #1493"),
    ("parallel residuals", lambda c: c.parallel_residual != "none", "#1204, #1412, #1477, #1493, #1514, #1530"),
    ("parameter banking + Parallel Muon", lambda c: c.bank_params, "#399, #549"),
    ("MuonEq-R", lambda c: c.muon_row_normalize, "#1217 (arXiv:2603.28254)"),
    ("Muon momentum 0.97", lambda c: abs(c.muon_momentum - 0.97) < 1e-9, "#1514"),
    ("EMA of weights", lambda c: c.ema_decay > 0, "EMA replacing SWA (jfprincz); #1445 for 0.9965"),
    ("full-Hessian GPTQ", lambda c: c.gptq_enabled, "#535, #634, #1019, #1060"),
    ("brotli-11 + byte shuffle", lambda c: c.compressor == "brotli" and c.byte_shuffle, "#1089, #1172, #1218, #1394"),
    ("BigramHash / SmearGate / value embeddings", lambda c: c.bigram_vocab_size > 0 or c.smear_gate or c.ve_dim > 0,
     "#162, #65, #1019, #1060"),
    ("coprime-stride loader", lambda c: c.loader == "coprime", "#726, #1060"),
    ("sliding-window eval", lambda c: c.sliding_eval, "the challenge's stride-64 eval"),
    ("score-first TTT", lambda c: c.ttt_enabled, "#461, #549, #1413"),
    ("causal n-gram token tilt", lambda c: c.ngram_tilt_enabled, "#1420 (kernel), #1514 (causal fix)"),
    ("SLOT", lambda c: c.slot_enabled, "arXiv:2505.12392; #1128, #1172, #1176, #1217"),
)


def credits(cfg: Hyperparameters) -> list[tuple[str, str]]:
    """(technique, credit) for every technique cfg switches on."""
    return [(name, who) for name, on, who in _CREDITS if on(cfg)]


# ================================================================================================ the entry

@dataclass
class Submission:
    """Everything `write_submission` writes, built in memory first."""

    folder_name: str
    track: str
    files: dict[str, str]  # file name -> text
    info: dict[str, Any]  # submission.json
    pack_stats: dict[str, Any] = field(default_factory=dict)


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9.+-]+", "_", name.strip()).strip("_")
    if not s:
        raise SubmitError(f"name {name!r} has no letters or digits to name the folder with; choose another")
    return s[:80]


def _base_preset(cfg: Hyperparameters, base: str | None) -> str:
    if base is not None:
        if base not in PRESETS:
            raise SubmitError(f"base preset {base!r} is not one of {', '.join(PRESETS)}")
        return base
    return cfg.run_id if cfg.run_id in PRESETS else "pr1514"


def _hardware(env: dict[str, Any]) -> str:
    e = env.get("environment") or {}
    n = env.get("world_size") or 1
    gpu = e.get("gpu")
    return f"{n}x {gpu}" if gpu else f"{n}x CPU ({e.get('platform', '?')})"


def _requirements(cfg: Hyperparameters, env: dict[str, Any]) -> str:
    e = env.get("environment") or {}
    comp = {"brotli": ["brotli"], "zstd": ["zstandard"]}.get(cfg.compressor, [])
    lines = ["# what the packed train_gpt.py imports at run time (lzma, json ... are the standard library)",
             f"# versions the seeds ran with: python {e.get('python')}, torch {e.get('torch')}, numpy "
             f"{e.get('numpy')}, sentencepiece {e.get('sentencepiece')}, CUDA {e.get('cuda')}",
             "torch", "numpy", "sentencepiece", *comp]
    attn = {  # fa3 comes from attn_backend=auto, which falls back; fa4 is only ever asked for by name
        "fa3": "FlashAttention-3 (flash_attn_interface) ran the attention: install its wheel for identical kernels; "
               "without it the script falls back to PyTorch SDPA",
        "fa4": "FlashAttention-4 (flash-attn-4, flash_attn.cute) ran the attention: the config asks for it "
               "(attn_backend=fa4), so install it, or repack with attn_backend=auto for PyTorch SDPA",
    }.get(e.get("attn_backend"))
    if attn:
        lines.append("# " + attn)
    return "\n".join(lines) + "\n"


def build_submission(runs: Sequence[SeedRun], *, name: str, author: str, github_id: str,
                     track: str = "track_10min_16mb", record_name: str, record_bpb: float | None = None,
                     record_val_loss: float | None = None, record_seeds_bpb: Sequence[float] | None = None,
                     record_seeds_val_loss: Sequence[float] | None = None, blurb: str | None = None,
                     date: str | None = None, base_preset: str | None = None, min_seeds: int = 3,
                     check_code: bool = True) -> Submission:
    """The record folder's files for `runs` (validated: see check_consistent); nothing is written."""
    from golfnb.io import sha256_bytes
    from golfnb.pack import pack_config, pack_text
    from golfnb.provenance import code_hash
    from golfnb.stats import compare_to_record, mean_std

    for what, v in (("name", name), ("author", author), ("github_id", github_id), ("record_name", record_name)):
        if not isinstance(v, str) or not v.strip():
            raise SubmitError(f"{what} is empty; give the entry's {what.replace('_', ' ')}")
    if not re.fullmatch(r"track_[a-z0-9_]+", track):
        raise SubmitError(f"track {track!r} is not a records/ track folder name such as track_10min_16mb")
    if record_bpb is None and record_val_loss is None and not record_seeds_bpb and not record_seeds_val_loss:
        raise SubmitError("give the record to beat: record_bpb or record_val_loss (its published mean), or its "
                          "per-seed values")
    date = date or _dt.date.today().isoformat()
    try:
        _dt.date.fromisoformat(date)
    except ValueError:
        raise SubmitError(f"date {date!r} is not YYYY-MM-DD") from None
    runs = sorted(runs, key=lambda r: r.seed)
    check_consistent(runs, min_seeds=min_seeds, current_code=code_hash() if check_code else None)
    ref = runs[0]
    cfg = ref.cfg

    # ---- the code: one packed file for every seed
    packed_cfg = pack_config(cfg)
    code_text, pack_stats = pack_text(packed_cfg)
    code = code_text.encode("utf-8")
    bad = [r for r in runs if r.accounted_code_bytes != len(code)]
    if bad:
        what = ", ".join(f"{r.run_dir}: {r.accounted_code_bytes}" for r in bad)
        raise SubmitError(f"the packed train_gpt.py is {len(code)} bytes but runs accounted for other code sizes at "
                          f"quantize time ({what}): the code or config changed after quantizing; quantize those runs "
                          f"again (their logged byte accounting must be the shipped file's)")

    # ---- numbers
    limit = min(cfg.bytes_limit, BYTES_LIMIT)
    train_budget, eval_budget = TRACK_BUDGETS.get(track, (None, None))
    losses = [r.val_loss for r in runs]
    bpbs = [r.val_bpb for r in runs]
    m_loss, s_loss = mean_std(losses)
    m_bpb, s_bpb = mean_std(bpbs)
    totals = {r.seed: r.model_bytes + len(code) for r in runs}
    seed_results: dict[str, Any] = {}
    for r in runs:
        seed_results[str(r.seed)] = {
            "val_loss": round(r.val_loss, 8), "val_bpb": round(r.val_bpb, 8),
            "bytes_total": totals[r.seed], "bytes_model": r.model_bytes, "bytes_code": len(code),
            "train_time_ms": round(r.train_s * 1000), "train_loop_ms": round(r.train_loop_s * 1000),
            "calibration_ms": round(r.calibration_s * 1000), "eval_time_ms": round(r.eval_s * 1000),
            "steps": r.metrics.get("train.steps"),
            "pre_quant_val_bpb": r.metrics.get("train.post_ema_val_bpb", r.metrics.get("train.val_bpb")),
            "eval_passes": {m: {"val_bpb": round(float(r.evals[m]["val_bpb"]), 8),
                                "val_loss": round(float(r.evals[m]["val_loss"]), 8),
                                "seconds": round(r.pass_seconds(m), 3)} for m in r.methods},
            "artifact_sha256": r.metrics.get("quant.sha256"),
        }
    if record_seeds_val_loss:
        sig = compare_to_record(losses, bpbs, record_val_loss=list(record_seeds_val_loss))
    elif record_val_loss is not None:
        sig = compare_to_record(losses, bpbs, record_val_loss=float(record_val_loss))
    elif record_seeds_bpb:
        sig = compare_to_record(losses, bpbs, record_val_bpb=list(record_seeds_bpb))
    else:
        sig = compare_to_record(losses, bpbs, record_val_bpb=float(record_bpb))

    # ---- compliance: measured, never typed in
    legality: dict[str, Any] = {}
    for meth in ref.methods:
        verdicts = [r.evals[meth].get("leaderboard_legal") for r in runs]
        leg = (ref.evals[meth].get("legality") or {})
        legality[meth] = {"leaderboard_legal": all(v is True for v in verdicts),
                          "per_seed": {str(r.seed): r.evals[meth].get("leaderboard_legal") for r in runs},
                          "failed_checks": sorted({c for r in runs
                                                   for c in (r.evals[meth].get("legality") or {}).get("failed_checks") or []}),
                          "how": leg.get("how"), "settings": leg.get("settings")}
    envs = [r.env for r in runs]
    on_8xh100 = all((e.get("world_size") == 8 and "H100" in str((e.get("environment") or {}).get("gpu"))) for e in envs)
    compliance = {
        "artifact_under_16mb": all(t <= limit for t in totals.values()),
        "train_under_600s": None if train_budget is None else all(r.train_s <= train_budget for r in runs),
        "eval_under_600s": None if eval_budget is None else all(r.eval_s <= eval_budget for r in runs),
        "three_seeds": len(runs) >= 3,
        "eval_leaderboard_legal": all(v["leaderboard_legal"] for v in legality.values()),
        "legality": legality,
        "single_file": True,  # golfnb.pack: every module the script imports is inside train_gpt.py
        "no_network_imports": True,  # golfnb.pack.check_no_network passed on the packed sources
        "ran_on_8xH100": on_8xh100,
        "bytes_limit": limit, "train_budget_s": train_budget, "eval_budget_s": eval_budget,
        "max_train_time_s": round(max(r.train_s for r in runs), 3),
        "max_eval_time_s": round(max(r.eval_s for r in runs), 3),
        "max_bytes_total": max(totals.values()),
    }
    base = _base_preset(cfg, base_preset)
    changes = {k: v for k, v in diff_configs(preset(base), cfg).items() if k not in PER_RUN_FIELDS + _PATH_FIELDS}
    techniques = [t for t, _who in credits(cfg)]
    if blurb is None:
        blurb = (f"golfnb {base} stack{' with ' + str(len(changes)) + ' config changes' if changes else ''}; "
                 f"final eval {ref.method} on the round-tripped {ref.metrics.get('quant.label')} artifact; "
                 f"{len(runs)} seeds, mean val_bpb {m_bpb:.5f} (std {s_bpb:.5f}).")
    env0 = ref.env.get("environment") or {}
    info: dict[str, Any] = {
        "name": name.strip(), "author": author.strip(), "github_id": github_id.strip(), "date": date, "track": track,
        "val_bpb": round(m_bpb, 8), "val_bpb_std": round(s_bpb, 8),
        "val_loss": round(m_loss, 8), "val_loss_std": round(s_loss, 8),
        "bytes_total": max(totals.values()), "bytes_code": len(code), "blurb": blurb,
        "eval_method": ref.method, "metric": f"final_{ref.method}_exact val_bpb (mean over seeds)",
        "seeds": [r.seed for r in runs], "seed_results": seed_results,
        "train_time_ms": max(v["train_time_ms"] for v in seed_results.values()),
        "eval_time_ms": max(v["eval_time_ms"] for v in seed_results.values()),
        "record": {"name": record_name, "val_bpb": record_bpb, "val_loss": record_val_loss,
                   "seeds_val_bpb": list(record_seeds_bpb) if record_seeds_bpb else None,
                   "seeds_val_loss": list(record_seeds_val_loss) if record_seeds_val_loss else None},
        "significance": sig.as_dict(),
        "compliance": compliance,
        "hardware": _hardware(ref.env), "pytorch_version": env0.get("torch"),
        "technique_summary": ", ".join(techniques),
        "code": {"train_gpt_sha256": sha256_bytes(code), "golfnb_source_sha256": ref.env.get("code_sha256"),
                 "git": ref.env.get("git"), "packed_modules": len(pack_stats["modules"]),
                 "left_out": pack_stats["left_out"]},
        "base_preset": base, "config_changes": {k: [a, b] for k, (a, b) in changes.items()},
    }
    files = {"train_gpt.py": code_text, "requirements.txt": _requirements(cfg, ref.env)}
    for r in runs:
        files[f"train_seed{r.seed}.log"] = seed_log_text(r)
    files["submission.json"] = json.dumps(info, indent=2) + "\n"
    files["README.md"] = render_readme(info, runs, sig, changes, credits(cfg), pack_stats)
    return Submission(f"{date}_{_slug(name)}", track, files, info, pack_stats)


# ================================================================================================ README

def _numeric_cell(v: Any) -> bool:
    try:
        float(str(v).replace(",", ""))
        return True
    except ValueError:
        return str(v) in ("", "-")


def _md_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A GitHub markdown table; columns of numbers are right-aligned."""
    align = ["---:" if i and all(_numeric_cell(r[i]) for r in rows) else "---" for i in range(len(head))]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _yes(v: Any) -> str:
    return "n/a" if v is None else ("yes" if v else "**NO**")


def render_readme(info: dict[str, Any], runs: Sequence[SeedRun], sig: Any, changes: dict[str, tuple[Any, Any]],
                  credit_rows: Sequence[tuple[str, str]], pack_stats: dict[str, Any]) -> str:
    """The write-up, from the same numbers as submission.json."""
    c = info["compliance"]
    rec = info["record"]
    rec_txt = rec["name"] + (f" ({rec['val_bpb']})" if rec.get("val_bpb") is not None else "")
    L: list[str] = [f"# {info['name']}", ""]
    L.append(f"**val_bpb {info['val_bpb']:.5f}** (std {info['val_bpb_std']:.5f}, {len(runs)} seeds; val_loss "
             f"{info['val_loss']:.5f} nats/token) with `{info['eval_method']}` on the round-tripped artifact, "
             f"{info['bytes_total']:,} bytes at most. Against {rec_txt}: {sig.improvement:+.5f} nats/token, one-sided "
             f"p = {sig.p_value:.3g} for the 0.005-nat bar ({'passes' if sig.passed else 'does not pass'} p < 0.01).")
    L += ["", info["blurb"], "", f"{info['author']} (@{info['github_id']}), {info['date']}, {info['track']}.", ""]

    L += ["## Results", ""]
    rows = []
    for r in runs:
        s = info["seed_results"][str(r.seed)]
        rows.append([r.seed, s["steps"], f"{s['train_time_ms'] / 1000:.1f}", f"{s['eval_time_ms'] / 1000:.1f}",
                     f"{s['pre_quant_val_bpb']:.5f}" if isinstance(s["pre_quant_val_bpb"], (int, float)) else "-",
                     f"{s['val_loss']:.8f}", f"{s['val_bpb']:.8f}", f"{s['bytes_total']:,}"])
    rows.append(["**mean**", "", "", "", "", f"{info['val_loss']:.8f}", f"{info['val_bpb']:.8f}", ""])
    rows.append(["**std**", "", "", "", "", f"{info['val_loss_std']:.8f}", f"{info['val_bpb_std']:.8f}", ""])
    L += _md_table(["seed", "steps", "train s", "eval s", "pre-quant bpb", "val_loss", "val_bpb", "bytes total"], rows)
    L += ["", "Every eval pass, per seed (val_bpb):", ""]
    L += _md_table(["seed", *runs[0].methods],
                   [[r.seed, *[f"{float(r.evals[m]['val_bpb']):.6f}" for m in r.methods]] for r in runs])
    L += ["", "### Significance", "", sig.summary() + ".", "",
          ("The record is one published value, so this is a one-sample t-test of the seeds against record - 0.005 "
           "(it treats the record's mean as exact: the record's own seed noise is not in it)."
           if sig.test == "one_sample" else
           "The record's per-seed values are known, so this is Welch's unequal-variance two-sample t-test."),
          f"Units: nats/token; the record's {sig.record_from}. See golfnb/stats.py for the conversion.", ""]

    note = PRESET_NOTES.get(info["base_preset"], "")
    L += ["## What changed", "", f"Built on golfnb's `{info['base_preset']}` preset ({note}). Config differences "
          f"(golfnb.config.diff_configs; seed, run_id and data paths aside):", ""]
    if changes:
        L += _md_table(["field", info["base_preset"], "this entry"], [[f"`{k}`", f"`{a!r}`", f"`{b!r}`"]
                                                                      for k, (a, b) in changes.items()])
    else:
        L.append("None: this entry runs the preset as it is.")
    L.append("")

    L += ["## Phase times", "", "Seconds, per seed (train = clocked loop + GPTQ calibration on train data; the eval "
          "total is every pass the script runs, one budget for all):", ""]
    rows = []
    for r in runs:
        m = r.metrics
        rows.append([r.seed, f"{r.train_loop_s:.1f}", f"{r.calibration_s:.1f}", f"{r.train_s:.1f}",
                     f"{float(m.get('quant.quantize_s') or 0):.1f}", f"{float(m.get('quant.serialize_s') or 0):.1f}",
                     *[f"{r.pass_seconds(x):.1f}" for x in r.methods], f"{r.eval_s:.1f}"])
    L += _md_table(["seed", "train loop", "calibration", "train total", "quantize", "serialize",
                    *[f"eval {x}" for x in runs[0].methods], "eval total"], rows)
    if c["train_budget_s"] is not None:
        L += ["", f"Budgets: train {c['train_budget_s']:.0f} s (max used {c['max_train_time_s']:.1f} s), eval "
              f"{c['eval_budget_s']:.0f} s (max used {c['max_eval_time_s']:.1f} s). Measured on {info['hardware']}."]
    L.append("")

    L += ["## Artifact accounting", "",
          f"`train_gpt.py` is {info['bytes_code']:,} bytes: golfnb's self-extracting single file (LZMA2 + base85) "
          f"holding {len(pack_stats.get('modules') or [])} modules and the config; sha256 "
          f"`{info['code']['train_gpt_sha256']}`.", ""]
    if pack_stats.get("left_out"):
        L += ["Left out because this config does not use them: " +
              ", ".join(f"`{m}`" for m in sorted(pack_stats["left_out"])) + ".", ""]
    rows = [[r.seed, r.metrics.get("quant.label"), f"{r.model_bytes:,}", f"{info['bytes_code']:,}",
             f"{r.model_bytes + info['bytes_code']:,}", f"{c['bytes_limit'] - r.model_bytes - info['bytes_code']:,}",
             r.metrics.get("quant.pruned_entries", 0)] for r in runs]
    L += _md_table(["seed", "model", "model bytes", "code bytes", "total", "margin", "pruned +-1"], rows)
    L += ["", f"Cap: {c['bytes_limit']:,} bytes (decimal), code + compressed model.", ""]

    L += ["## Compliance", "", "Every flag is measured by golfnb, not declared:", ""]
    def budget(v: Any) -> str:
        return "(no limit on this track)" if v is None else f"{v:.0f} s"

    L += [f"- artifact (code + model) <= {c['bytes_limit']:,} bytes on every seed: {_yes(c['artifact_under_16mb'])}",
          f"- train <= {budget(c['train_budget_s'])} on every seed: {_yes(c['train_under_600s'])}",
          f"- eval <= {budget(c['eval_budget_s'])} on every seed: {_yes(c['eval_under_600s'])}",
          f"- at least 3 seeds: {_yes(c['three_seeds'])}",
          f"- every eval pass leaderboard-legal by golfnb's checks: {_yes(c['eval_leaderboard_legal'])}",
          "- all counted code in the one `train_gpt.py`, no network imports: yes (checked when packing)",
          f"- measured on 8xH100: {_yes(c['ran_on_8xH100'])} ({info['hardware']})", ""]
    L += _md_table(["eval pass", "leaderboard-legal", "failed checks"],
                   [[f"`{m}`", _yes(v["leaderboard_legal"]), ", ".join(v["failed_checks"]) or "-"]
                    for m, v in c["legality"].items()])
    L += ["", "Legality is golfnb.legality's measured verdict (prefix invariance, self-exclusion, normalisation, "
          "score-once, score-before-update on a small model with this config's method settings); the packed script "
          "carries the verdicts measured when it was packed.", ""]

    seeds = " ".join(str(s) for s in info["seeds"])
    L += ["## Reproduction", "", "With the challenge's data layout (`./data/datasets/fineweb10B_sp<V>/`, "
          "`./data/tokenizers/fineweb_<V>_bpe.model`):", "", "```bash", "pip install -r requirements.txt",
          f"for SEED in {seeds}; do", "  SEED=$SEED torchrun --standalone --nproc_per_node=8 train_gpt.py",
          "done", "```", "", "The seeds were run with golfnb (code sha256 "
          f"`{info['code']['golfnb_source_sha256']}`, commit `{(info['code']['git'] or {}).get('commit')}`); this "
          "folder was written by `golfnb submit` and is checked by `golfnb validate`.", ""]
    L += ["## Credits", ""]
    L += [f"- {t}: {who}" for t, who in credit_rows]
    L.append("")
    return "\n".join(L)


# ================================================================================================ writing

def write_submission(sub: Submission, out: str | Path = "records", overwrite: bool = False) -> Path:
    """Write the folder `out/<track>/<folder_name>/` (every file atomically)."""
    from golfnb.io import atomic_write_text

    folder = Path(out) / sub.track / sub.folder_name
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise SubmitError(f"{folder} already exists; choose another name or date, or pass overwrite=True "
                          f"(--overwrite)")
    for name, text in sub.files.items():
        atomic_write_text(folder / name, text)
    return folder


def export_submission(run_dirs: Sequence[str | Path], *, out: str | Path = "records", overwrite: bool = False,
                      **kwargs: Any) -> Path:
    """load_seed_run for every run, build_submission(**kwargs), write_submission: the folder's path."""
    if not run_dirs:
        raise SubmitError("no run directories given")
    runs = [load_seed_run(d) for d in run_dirs]
    return write_submission(build_submission(runs, **kwargs), out, overwrite)


# ================================================================================================ CLI

def _floats(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        raise SubmitError(f"{text!r} is not a comma-separated list of numbers") from None


def _cmd_submit(a: argparse.Namespace) -> int:
    try:
        folder = export_submission(
            a.runs, out=a.out, overwrite=a.overwrite, name=a.name, author=a.author, github_id=a.github_id,
            track=a.track, record_name=a.record_name, record_bpb=a.record_bpb, record_val_loss=a.record_val_loss,
            record_seeds_bpb=_floats(a.record_seeds_bpb), record_seeds_val_loss=_floats(a.record_seeds_val_loss),
            blurb=a.blurb, date=a.date, base_preset=a.base_preset, min_seeds=a.min_seeds)
    except (SubmitError, ConfigError) as e:
        print(f"golfnb submit: {e}", file=sys.stderr)
        return 2
    info = json.loads((folder / "submission.json").read_text())
    print(f"wrote {folder}: val_bpb {info['val_bpb']:.5f} +- {info['val_bpb_std']:.5f} over {len(info['seeds'])} "
          f"seeds, {info['bytes_total']:,} bytes; {info['significance']['p_value']} one-sided p vs the record")
    print(f"check it: golfnb validate {folder}")
    return 0


def add_submit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`golfnb submit --runs RUN_DIR... --name N --author A --github-id G --track T --record-name R
    --record-bpb X [--out records/]`."""
    p = subparsers.add_parser("submit", help="export >= 3 seeds of one config as a challenge record folder")
    p.add_argument("--runs", nargs="+", required=True, help="run directories, one per seed")
    p.add_argument("--name", required=True, help="entry name (also the folder name, slugified)")
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--track", default="track_10min_16mb")
    p.add_argument("--record-name", required=True, help="the record this entry is compared with")
    p.add_argument("--record-bpb", type=float, help="the record's published val_bpb (mean)")
    p.add_argument("--record-val-loss", type=float, help="the record's val_loss in nats/token (preferred to bpb)")
    p.add_argument("--record-seeds-bpb", help="the record's per-seed val_bpb, comma-separated (Welch's test)")
    p.add_argument("--record-seeds-val-loss", help="the record's per-seed val_loss, comma-separated")
    p.add_argument("--blurb", help="one-paragraph description (default: generated from the config)")
    p.add_argument("--date", help="YYYY-MM-DD (default: today)")
    p.add_argument("--base-preset", help="preset the 'what changed' section compares with (default: the runs' run_id)")
    p.add_argument("--min-seeds", type=int, default=3)
    p.add_argument("--out", default="records", help="records root (default: records/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder of the same name")
    p.set_defaults(func=_cmd_submit)
    return p


def main(argv: list[str] | None = None) -> int:
    from golfnb.cli import run_subcommand

    return run_subcommand("submit", add_submit_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
