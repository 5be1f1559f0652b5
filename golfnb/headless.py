"""Train, quantize and evaluate a run without Jupyter, into a run directory the notebooks then render.

Remote GPU machines often have no Jupyter; users run the stages there headless and bring the run directory
back, where `notebooks/*.ipynb` find the results already present and only plot and tabulate them:

    python -m golfnb.headless --preset pr1514 --run-dir runs/20261122-1200_pr1514_s1337 --set seed=1337
    python -m golfnb.headless --run-dir runs/x --stages quantize,eval      # a trained run

Stages (each one a function a notebook cell calls too):
- ``train``: golfnb.train.train -> final_model.pt, train.log, metrics.jsonl, metrics.json (train.*)
- ``quantize``: golfnb.pipeline.quantize_run -> artifacts/model.gnb, metrics.json (quant.*)
- ``eval``: `evaluate_run` -> the config's eval passes on the dequantized artifact (the number that counts),
  each result written to evals/<method>.json and summarised in metrics.json (eval.<method>.*)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from golfnb.config import ConfigError, Hyperparameters
from golfnb.io import atomic_write_json

__all__ = ["evaluate_run", "eval_metrics", "read_eval", "eval_path", "run_stages", "main", "STAGES"]

STAGES = ("train", "quantize", "eval")
EVAL_DIR = "evals"


def eval_path(run_dir: str | Path, method: str) -> Path:
    return Path(run_dir) / EVAL_DIR / (method.replace(":", "_").replace("+", "_plus_") + ".json")


def read_eval(run_dir: str | Path, method: str) -> dict[str, Any] | None:
    """A stored eval result of a run (None when that method was not run)."""
    p = eval_path(run_dir, method)
    return json.loads(p.read_text()) if p.is_file() else None


_HEADLINE = ("val_bpb", "val_loss", "targets_scored", "bytes", "seconds", "leaderboard_legal")


def _summary(res: dict[str, Any]) -> dict[str, Any]:
    return {k: res[k] for k in _HEADLINE if k in res}


def eval_metrics(res: dict[str, Any]) -> dict[str, Any]:
    """The flat `eval.<method>.*` metrics of one eval result: headline numbers, phase seconds, and the
    method's own diagnostics (TTT chunks and steps, tilt hint rates, SLOT steps)."""
    m = str(res["method"])
    out: dict[str, Any] = {f"eval.{m}.{k}": v for k, v in _summary(res).items()}
    for ph, s in (res.get("phases") or {}).items():
        out[f"eval.{m}.phase.{ph}_s"] = round(float(s), 4)
    for k in ("windows", "n_chunks", "steps", "optimizer_steps", "trainable_params"):
        if k in res:
            out[f"eval.{m}.{k}"] = res[k]
    for k in ("hint_rate", "scored_hint_rate", "precision", "precompute_s"):
        if k in (res.get("tilt") or {}):
            out[f"eval.{m}.tilt.{k}"] = res["tilt"][k]
    failed = (res.get("legality") or {}).get("failed_checks")
    if failed:
        out[f"eval.{m}.failed_checks"] = list(failed)
    return out


def evaluate_run(run_dir: str | Path, *, methods: Sequence[str] | None = None, device: str | torch.device | None = None,
                 overrides: dict[str, Any] | None = None, source: str = "artifact", log: Any = print,
                 force: bool = False) -> dict[str, dict[str, Any]]:
    """Evaluate a run's model on the validation stream; results to evals/<method>.json and metrics.json.

    methods: canonical method names (``plain``, ``sliding``, ``ttt+tilt``, ``slot:context_per_window`` ...);
    default: the config's own passes (cfg.eval_methods(), the final one with the tilt when enabled).
    source: ``artifact`` (the quantized, round-tripped model: what a submission scores) or ``final`` (the
    unquantized final_model.pt). A method whose result file already exists for the same source and the same
    overrides is not re-run unless `force`; other overrides run again and replace the file.
    """
    from golfnb.bpb import build_byte_luts
    from golfnb.data.loaders import load_validation_tokens
    from golfnb.evals.common import persist_scoring_forward, scoring_forward
    from golfnb.evals.runner import method_key, run_method
    from golfnb.legality import legality_verdict
    from golfnb.pipeline import load_quantized
    from golfnb.provenance import device_name
    from golfnb.runs import record_many
    from golfnb.train import load_final_model

    run_dir = Path(run_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if source == "artifact":
        cfg, model = load_quantized(run_dir, dev)
    elif source == "final":
        cfg, model = load_final_model(run_dir, dev)
    else:
        raise ConfigError(f"source={source!r} must be 'artifact' or 'final'")
    if overrides:
        cfg = cfg.replace(**overrides)
    if cfg.num_loops > 0:
        model.looping_active = True
    if methods is None:
        methods = [method_key(p, cfg) for p in cfg.eval_methods()]
    asked = dict(overrides or {})

    def reusable(m: str) -> dict[str, Any] | None:
        # a stored result answers only the same question: same model source, same eval overrides
        prev = read_eval(run_dir, m)
        if force or prev is None or prev.get("source", source) != source:
            return None
        return prev if prev.get("overrides", {}) == asked else None

    stored = {m: reusable(m) for m in methods}
    todo = [m for m in methods if stored[m] is None]
    results: dict[str, dict[str, Any]] = {m: r for m, r in stored.items() if r is not None}
    if not todo:
        return results
    val = load_validation_tokens(cfg)
    luts = build_byte_luts(cfg.tokenizer_path, cfg.vocab_size, device=dev)
    hidden_fn = scoring_forward(model, cfg, run_dir)  # compiled once, shared by the methods
    if hidden_fn is not None and log is not None:
        log(hidden_fn.cache.describe().replace("compile_cache:", "eval_compile_cache:", 1))
    for m in todo:
        verdict = legality_verdict(m, cfg)
        if not verdict.legal and not cfg.allow_illegal:
            raise ConfigError(f"{m} fails golfnb's legality checks ({', '.join(verdict.failed)}); pass "
                              f"overrides={{'allow_illegal': True}} to run it labelled not leaderboard-legal")
        t0 = time.perf_counter()
        res = run_method(m, model, val, cfg, luts, None, log=log, hidden_fn=hidden_fn)
        res["method"] = m
        res["source"] = source
        res["device"] = device_name(dev)  # a notebook may render this result on another machine
        res["compiled_forward"] = hidden_fn is not None and not m.startswith("plain")
        if res["compiled_forward"]:
            res["eval_compile_cache"] = "warm" if hidden_fn.cache.warm else "cold"
        res["overrides"] = asked
        res["leaderboard_legal"] = verdict.legal
        res["legality"] = verdict.as_dict()
        res["wall_s"] = round(time.perf_counter() - t0, 3)
        atomic_write_json(eval_path(run_dir, m), res)
        tag = "" if verdict.legal else " NOT leaderboard-legal"
        if log is not None:
            log(f"eval:{m} source:{source} val_loss:{res['val_loss']:.6f} val_bpb:{res['val_bpb']:.6f} "
                f"seconds:{res.get('seconds', 0):.1f}{tag}")
        record_many(run_dir, eval_metrics(res))
        results[m] = res
        persist_scoring_forward(hidden_fn, log)  # after each method, off its clock: a later failure keeps it
    return results


def run_stages(cfg: Hyperparameters | None, run_dir: str | Path, stages: Sequence[str] = STAGES, *,
               methods: Sequence[str] | None = None, source: str = "artifact",
               eval_overrides: dict[str, Any] | None = None, log: Any = print) -> dict[str, Any]:
    run_dir = Path(run_dir)
    out: dict[str, Any] = {}
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ConfigError(f"unknown stage(s) {bad}; stages are {', '.join(STAGES)}")
    if "train" in stages:
        if cfg is None:
            raise ConfigError("the train stage needs a config (--preset or --config)")
        from golfnb.train import train

        out["train"] = train(cfg, run_dir)
    if "quantize" in stages:
        from golfnb.pipeline import quantize_run

        out["quantize"] = quantize_run(run_dir, log=log)
    if "eval" in stages:
        res = evaluate_run(run_dir, methods=methods, source=source, overrides=eval_overrides, log=log)
        out["eval"] = {m: _summary(r) for m, r in res.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    from golfnb.config import resolve
    from golfnb.evals.common import EvalBudgetExceeded
    from golfnb.train import INTERRUPT_EXIT_CODE, TrainingError, TrainingInterrupted, parse_overrides

    p = argparse.ArgumentParser(prog="python -m golfnb.headless", description=__doc__.split("\n")[0])
    p.add_argument("--preset")
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--stages", default=",".join(STAGES), help="comma list of train,quantize,eval")
    p.add_argument("--methods", default=None, help="comma list of eval methods (default: the config's passes)")
    p.add_argument("--source", choices=("artifact", "final"), default="artifact",
                   help="eval stage: the quantized artifact (what a submission scores) or the unquantized final model")
    p.add_argument("--eval-set", action="append", default=[], metavar="KEY=VALUE",
                   help="eval stage: override one field of the run's config (e.g. eval_stride=64, eval_compile=off)")
    a = p.parse_args(argv)
    stages = [s for s in a.stages.split(",") if s]
    try:
        cfg = None
        if a.preset or a.config:
            cfg = resolve(a.preset, parse_overrides(a.set), a.config)
            cfg = cfg.with_data_root(a.data_dir or os.environ.get("GOLFNB_DATA_DIR"))
        methods = a.methods.split(",") if a.methods else None
        res = run_stages(cfg, a.run_dir, stages, methods=methods, source=a.source,
                         eval_overrides=parse_overrides(a.eval_set) or None)
    except ConfigError as e:
        print(f"golfnb.headless: configuration error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad data, artifact or packing input (ShardError, QuantError, PackError ...)
        print(f"golfnb.headless: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"golfnb.headless: {e}", file=sys.stderr)
        return INTERRUPT_EXIT_CODE
    except (TrainingError, EvalBudgetExceeded) as e:
        print(f"golfnb.headless: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
