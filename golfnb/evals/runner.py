"""Run the eval passes a config asks for, in order, and dispatch any method by its canonical name.

Canonical method names (what golfnb.legality checks and results carry in `method`):
``plain``, ``sliding``, ``ttt`` (SGD), ``ttt_muon``, ``slot:<variant>``, and ``<base>+tilt`` for the n-gram
tilt over ``sliding``, ``ttt`` or ``ttt_muon``.

`run_evals` maps cfg.eval_methods() (plain, sliding, ttt, slot) onto them: ttt becomes ttt_muon when
cfg.ttt_optimizer is muon; the tilt (cfg.ngram_tilt_enabled) applies to the final pass when that is sliding
or ttt, as #1514 applied it inside its final TTT pass while its sliding pass stayed plain.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import torch

from golfnb.config import ConfigError, Hyperparameters
from golfnb.evals.common import (EvalBudgetExceeded, IllegalMethodError, emit, persist_scoring_forward, rank_info,
                                 resolve_budget, scoring_forward)

__all__ = ["run_evals", "run_method", "method_key", "METHOD_BASES"]

METHOD_BASES = ("plain", "sliding", "ttt", "ttt_muon", "slot")


def method_key(pass_name: str, cfg: Hyperparameters) -> str:
    """Canonical method name of one of cfg.eval_methods()' passes under cfg."""
    if pass_name == "plain":
        return "plain"
    if pass_name == "slot":
        return f"slot:{cfg.slot_variant}"
    if pass_name == "ttt":
        key = "ttt" if cfg.ttt_optimizer == "sgd" else "ttt_muon"
    elif pass_name == "sliding":
        key = "sliding"
    else:
        raise ConfigError(f"unknown eval pass {pass_name!r}; passes are plain, sliding, ttt, slot")
    if cfg.ngram_tilt_enabled and pass_name == cfg.final_eval:
        key += "+tilt"
    return key


def run_method(method: str, model: torch.nn.Module, tokens: Any, cfg: Hyperparameters, luts: Any,
               dist: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Run the method called `method` (canonical name) with no legality gate.

    kwargs: observer, adapt_tokens, budget_seconds, continue_over_budget, log, hidden_fn (ignored by
    plain, which takes `forward`; default: golfnb.evals.common.scoring_forward), hints (tilt methods only).
    """
    base, plus, mod = method.partition("+")
    own_fn = None
    if kwargs.get("hidden_fn") is None and base != "plain":
        kwargs["hidden_fn"] = own_fn = scoring_forward(model, cfg)
        if own_fn is not None:
            emit(kwargs.get("log"), own_fn.cache.describe().replace("compile_cache:", "eval_compile_cache:", 1),
                 rank_info(dist))
    try:
        return _dispatch(method, base, plus, mod, model, tokens, cfg, luts, dist, kwargs)
    finally:
        # a forward this call compiled for itself is persisted here, after the pass and off its clock
        if own_fn is not None and rank_info(dist).rank == 0:
            persist_scoring_forward(own_fn, kwargs.get("log"))


def _dispatch(method: str, base: str, plus: str, mod: str, model: torch.nn.Module, tokens: Any,
              cfg: Hyperparameters, luts: Any, dist: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    from golfnb.evals.plain import evaluate_plain
    from golfnb.evals.sliding import evaluate_sliding
    from golfnb.evals.slot import SLOT_VARIANTS, slot_pass
    from golfnb.evals.tilt import TILT_BASES, evaluate_tilt
    from golfnb.evals.ttt import evaluate_ttt

    if plus:
        if mod != "tilt" or base not in TILT_BASES:
            raise ConfigError(f"method {method!r}: only '<{'|'.join(TILT_BASES)}>+tilt' combine")
        return evaluate_tilt(model, tokens, cfg, luts, dist, base=base, **kwargs)
    kwargs.pop("hints", None)
    if base == "plain":
        kwargs.pop("hidden_fn", None)
        return evaluate_plain(model, tokens, cfg, luts, dist, **kwargs)
    if base == "sliding":
        return evaluate_sliding(model, tokens, cfg, luts, dist, **kwargs)
    if base in ("ttt", "ttt_muon"):
        return evaluate_ttt(model, tokens, cfg, luts, dist, optimizer="sgd" if base == "ttt" else "muon", **kwargs)
    if base.startswith("slot:") and base[5:] in SLOT_VARIANTS:
        return slot_pass(model, tokens, cfg, luts, dist, variant=base[5:], **kwargs)
    raise ConfigError(f"unknown eval method {method!r}; methods: plain, sliding, ttt, ttt_muon, "
                      f"slot:<{'|'.join(SLOT_VARIANTS)}>, <sliding|ttt|ttt_muon>+tilt")


def run_evals(model: torch.nn.Module, val_tokens: Any, cfg: Hyperparameters, luts: Any, dist: Any = None,
              log: Any = None, *, budget_seconds: float | None = None, continue_over_budget: bool = False,
              hidden_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
              check_legality: bool = True, run_dir: Any = None) -> dict[str, dict[str, Any]]:
    """Every pass of cfg.eval_methods(), in order; returns {pass name: result}.

    * Legality first, off the eval clock: each pass's method gets golfnb.legality's measured verdict
      (cached per method and settings; a few CPU seconds the first time). A pass whose method fails the
      checks stops the run here, before any evaluation, unless cfg.allow_illegal; with it the pass runs
      and its result says `leaderboard_legal: False`. SLOT passes are always checked (they gate);
      `check_legality=False` skips the others (their `leaderboard_legal` is then None).
    * Looping (depth recurrence) is switched on for every pass when cfg.num_loops > 0 and put
      back afterwards.
    * One eval budget (cfg.eval_budget_seconds unless `budget_seconds`) covers all passes together, as the
      challenge's 600 s does: each pass gets what the earlier ones left.
    * TTT restores the weights it trained, so each pass sees the same model (#1176 scored SLOT on a
      TTT-adapted model).

    Each result gets `pass`, `is_final` (the pass named by cfg.final_eval: its val_bpb is the submission's
    number), `leaderboard_legal` and `legality`.
    """
    from golfnb.legality import legality_verdict

    ranks = rank_info(dist)
    passes = cfg.eval_methods()
    keys = {p: method_key(p, cfg) for p in passes}

    t_leg = time.perf_counter()
    verdicts = {p: legality_verdict(keys[p], cfg) for p in passes if check_legality or p == "slot"}
    for p, v in verdicts.items():
        tag = "leaderboard-legal" if v.legal else f"NOT leaderboard-legal (fails {', '.join(v.failed)})"
        emit(log, f"legality:{keys[p]} {tag}", ranks)
    bad = [p for p, v in verdicts.items() if not v.legal]
    if bad and not cfg.allow_illegal:
        what = "; ".join(f"{keys[p]} fails {', '.join(verdicts[p].failed)}" for p in bad)
        raise IllegalMethodError(f"eval passes that fail golfnb's legality checks: {what}. Change them (e.g. "
                                 f"slot_variant='context_per_window'), disable them, or set allow_illegal=True to "
                                 f"run them with every number labelled not leaderboard-legal")
    legality_s = time.perf_counter() - t_leg

    budget = resolve_budget(cfg, budget_seconds)
    own_fn = None
    if hidden_fn is None:  # one compiled forward for all passes (each pass would otherwise trace it again)
        hidden_fn = own_fn = scoring_forward(model, cfg, run_dir)
        if own_fn is not None:
            emit(log, own_fn.cache.describe().replace("compile_cache:", "eval_compile_cache:", 1), ranks)
    had_loop = getattr(model, "looping_active", None)
    if had_loop is not None:
        model.looping_active = cfg.num_loops > 0
    results: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    try:
        for i, p in enumerate(passes):
            elapsed = time.perf_counter() - t0
            remaining = 0.0
            if budget > 0:
                remaining = budget - elapsed
                if remaining <= 0:
                    if not continue_over_budget:
                        raise EvalBudgetExceeded(keys[p], elapsed, budget, elapsed, i, len(passes), "passes",
                                                 f"the passes before {p} used the whole budget")
                    remaining = 1e-9
            res = run_method(keys[p], model, val_tokens, cfg, luts, dist, budget_seconds=remaining,
                             continue_over_budget=continue_over_budget, log=log, hidden_fn=hidden_fn)
            v = verdicts.get(p)
            res["pass"] = p
            res["is_final"] = p == cfg.final_eval
            res["leaderboard_legal"] = v.legal if v is not None else None
            res["legality"] = v.as_dict() if v is not None else None
            flag = "" if (v is None or v.legal) else " NOT leaderboard-legal"
            emit(log, f"eval:{p} method:{keys[p]} val_loss:{res['val_loss']:.8f} val_bpb:{res['val_bpb']:.8f} "
                      f"targets:{res['targets_scored']} bytes:{res['bytes']} seconds:{res['seconds']:.1f}{flag}",
                 ranks)
            results[p] = res
    finally:
        if had_loop is not None:
            model.looping_active = had_loop
    total = time.perf_counter() - t0
    if own_fn is not None and ranks.rank == 0:  # off the eval clock: `total` is already taken
        persist_scoring_forward(own_fn, log)
    illegal = [p for p, r in results.items() if r["leaderboard_legal"] is False]
    if illegal and log is None and ranks.rank == 0:
        warnings.warn(f"eval passes {', '.join(illegal)} ran with allow_illegal: their numbers are NOT "
                      f"leaderboard-legal", stacklevel=2)
    fin = results[cfg.final_eval]
    flag = "" if fin["leaderboard_legal"] in (True, None) else " NOT leaderboard-legal"
    emit(log, f"final_eval:{cfg.final_eval} method:{fin['method']} val_loss:{fin['val_loss']:.8f} "
              f"val_bpb:{fin['val_bpb']:.8f} eval_seconds:{total:.1f} legality_check_seconds:{legality_s:.1f}{flag}",
         ranks)
    return results
