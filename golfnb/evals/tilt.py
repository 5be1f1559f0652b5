"""The n-gram tilt pass (#1514 A2): causal n-gram hints, applied at scoring time over the sliding
or the score-first TTT pass.

1. Precompute (`compute_hints`): golfnb.evals.ngram scans the stream once, left to right, and gives every
   target index p a hint token and a strength beta, both functions of v[0..p-1] only. As in the record it
   runs on rank 0 and the result is broadcast. Its wall time is part of the pass (phase
   `ngram_precompute`, 33 s in A2 and left out of that README's eval time).
2. Scoring: at every scored position with a hint, the model's distribution p becomes
   p'(t) = p(t) e^{beta [t = h]} / Z, Z = 1 + p(h)(e^beta - 1), a normalised distribution over the whole
   vocabulary (golfnb.evals.ngram.tilt_nll, fp64). Positions without a hint keep their NLL bit for bit.

The hints are state built from evaluation tokens, so they count as adaptation: with `adapt_tokens` (the
legality self-exclusion check) they are computed from that stream instead of the scored one.

`evaluate_tilt` always tilts (it is the explicit tilt pass); `golfnb.evals.runner.run_evals` applies it to
the final pass only when cfg.ngram_tilt_enabled is set.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from golfnb.config import ConfigError, Hyperparameters
from golfnb.evals.common import EvalBudgetExceeded, TiltHints, model_device, rank_info, resolve_budget

__all__ = ["compute_hints", "evaluate_tilt", "TILT_BASES"]

TILT_BASES = ("sliding", "ttt", "ttt_muon")


def compute_hints(tokens: Any, cfg: Hyperparameters, luts: Any = None, dist: Any = None, *,
                  device: torch.device | str | None = None, backend: str = "auto") -> TiltHints:
    """Hints and betas for every index of `tokens` (rank 0 computes, every rank receives them on `device`).

    Uses cfg's ngram_* settings with the tilt switched on. `luts` (golfnb.bpb.ByteLUTs) are needed only by
    the word experts (ngram_within_beta / ngram_word_beta > 0).
    """
    from golfnb.evals.ngram import NgramTilt

    ranks = rank_info(dist)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    t = tokens if isinstance(tokens, torch.Tensor) else torch.as_tensor(np.asarray(tokens))
    n = int(t.numel())
    settings = dataclasses.replace(NgramTilt.from_config(cfg), enabled=True)
    t0 = time.perf_counter()
    meta: dict[str, Any] = {}
    if ranks.rank == 0:
        kw: dict[str, Any] = {}
        if luts is not None:
            kw = {"is_boundary": luts.is_boundary.cpu(), "has_leading_space": luts.has_leading_space.cpu()}
        r = settings.run(t.detach().cpu().reshape(-1), backend=backend, **kw)
        hints = torch.from_numpy(r.hints.astype(np.int64)).to(dev)
        betas = torch.from_numpy(r.betas.astype(np.float64)).to(dev)
        meta = {"backend": r.backend, "stats": dict(r.stats)}
    else:
        hints = torch.empty(n, dtype=torch.int64, device=dev)
        betas = torch.empty(n, dtype=torch.float64, device=dev)
    if ranks.enabled:
        import torch.distributed as tdist

        from golfnb.distributed import broadcast_object

        tdist.broadcast(hints, src=0)
        tdist.broadcast(betas, src=0)
        meta = broadcast_object(meta, src=0)
    return TiltHints(hints, betas, time.perf_counter() - t0, meta.get("backend", ""), meta.get("stats", {}))


def evaluate_tilt(model: torch.nn.Module, tokens: Any, cfg: Hyperparameters, luts: Any, dist: Any = None, *,
                  base: str = "ttt", hints: TiltHints | None = None, adapt_tokens: Any = None,
                  budget_seconds: float | None = None, continue_over_budget: bool = False, log: Any = None,
                  **base_kwargs: Any) -> dict[str, Any]:
    """The tilt applied over `base` ("sliding", "ttt" or "ttt_muon"); returns the base pass's dict named
    "<base>+tilt" with phase `ngram_precompute` and a `tilt` block: hint_rate (share of all targets with a
    hint), scored_hint_rate, precision (share of hints naming the true token), backend, precompute_s.

    `hints` skips the precompute (e.g. hints computed once and shared by several passes)."""
    from golfnb.evals.ngram import hint_stats
    from golfnb.evals.sliding import evaluate_sliding
    from golfnb.evals.ttt import evaluate_ttt

    if base not in TILT_BASES:
        raise ConfigError(f"tilt base {base!r} is not one of {', '.join(TILT_BASES)}")
    device = model_device(model)
    budget = resolve_budget(cfg, budget_seconds)
    t0 = time.perf_counter()
    if hints is None:
        src = tokens if adapt_tokens is None else adapt_tokens
        hints = compute_hints(src, cfg, luts, dist, device=device)
    pre_s = time.perf_counter() - t0
    if budget > 0 and pre_s >= budget and not continue_over_budget:
        raise EvalBudgetExceeded(f"{base}+tilt", pre_s, budget, pre_s, 0, 1, "passes",
                                 "the n-gram precompute alone used the budget; lower ngram_order_max")
    kw = dict(base_kwargs, tilt=hints, log=log, continue_over_budget=continue_over_budget,
              method_name=f"{base}+tilt",
              budget_seconds=max(budget - pre_s, 1e-9) if budget > 0 else 0.0)
    if base == "sliding":
        res = evaluate_sliding(model, tokens, cfg, luts, dist, **kw)
    else:
        res = evaluate_ttt(model, tokens, cfg, luts, dist, adapt_tokens=adapt_tokens,
                           optimizer="sgd" if base == "ttt" else "muon", **kw)
    res["phases"] = {"ngram_precompute": pre_s, **res["phases"]}
    res["seconds"] += pre_s
    tok = tokens if isinstance(tokens, torch.Tensor) else torch.as_tensor(np.asarray(tokens))
    st = hint_stats(hints.hints.detach().cpu().numpy(), tok.detach().cpu().numpy())
    res["tilt"] = {
        "hint_rate": st["hint_rate"], "precision": st["precision"], "correct_rate": st["correct_rate"],
        "n_hints": st["n_hints"],
        "scored_hint_rate": res.get("hinted_targets", 0) / max(res["targets_scored"], 1),
        "precompute_s": pre_s, "backend": hints.backend, "stats": hints.stats,
        "base_beta": cfg.ngram_base_beta, "orders": cfg.ngram_orders(),
    }
    return res
