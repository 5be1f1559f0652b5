"""Sliding-window evaluation (the SP8192 scheme): window eval_seq_len, stride eval_stride, every
target scored exactly once with the most context the window allows.

Window 0 scores targets 1..T; window ws = k*S (k >= 1) scores its last S positions, so every target past
the first window sees at least T - S tokens of context. The records' older layout (#549/#1176/#1217)
re-scored the final stride in every tail window; golfnb does not.

Work split as in the records: windows in contiguous per-rank ranges, `eval_batch_seqs` windows per forward
(the last batch padded with rows that score nothing, so a compiled forward sees one shape), the LM head
computed only on the scored positions (the last S positions of each window, all positions only in the
batch holding window 0), fp64 sums all-reduced once at the end.

`tilt` (golfnb.evals.tilt) applies the n-gram tilt to every scored position; `hidden_fn` replaces
`model.hidden` (e.g. `torch.compile(model.hidden)`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from golfnb.config import Hyperparameters
from golfnb.evals.common import (BudgetClock, EvalObserver, PhaseTimer, Scorer, StreamBatcher, TiltHints,
                                 as_stream, finish_result, model_device, rank_info, rank_range,
                                 resolve_budget, score_window_batch, sliding_windows)

__all__ = ["evaluate_sliding"]


def evaluate_sliding(model: torch.nn.Module, tokens: Any, cfg: Hyperparameters, luts: Any, dist: Any = None, *,
                     hidden_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     tilt: TiltHints | None = None, observer: EvalObserver | None = None,
                     budget_seconds: float | None = None, continue_over_budget: bool = False,
                     log: Any = None, adapt_tokens: Any = None, method_name: str = "sliding") -> dict[str, Any]:
    """Score every target once with sliding windows; see the module docstring.

    Returns val_loss, val_bpb, targets_scored, bytes, seconds, phases, budget and `windows`.
    `adapt_tokens` is accepted for a uniform method signature and ignored (nothing adapts here).
    """
    from golfnb.train import autocast_for

    del adapt_tokens
    device = model_device(model)
    ranks = rank_info(dist)
    timer = PhaseTimer(device)
    seq, stride, rows = cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_seqs
    stream, U = as_stream(tokens, device, seq)
    plan = sliding_windows(U, seq, stride)
    clock = BudgetClock(method_name, resolve_budget(cfg, budget_seconds), continue_over=continue_over_budget,
                        log=log, ranks=ranks, device=device, unit="batches",
                        advice="raise eval_stride (fewer windows) or eval_batch_seqs", t0=timer.t0)
    shares = [rank_range(len(plan), r, ranks.world) for r in range(ranks.world)]
    n_batches = [-(-(hi - lo) // rows) for lo, hi in shares]
    clock.plan(max(n_batches), min(n_batches))
    lo, hi = shares[ranks.rank]
    batcher = StreamBatcher(stream, plan, rows)
    scorer = Scorer(stream, U, luts, observer=observer, tilt=tilt)
    hidden = hidden_fn if hidden_fn is not None else model.hidden
    was_training = model.training
    model.eval()
    try:
        with timer.span("score"), torch.no_grad(), autocast_for(device):
            for k, s in enumerate(range(lo, hi, rows)):
                score_window_batch(model, hidden, batcher, s, min(s + rows, hi), scorer)
                clock.tick(k + 1)
    finally:
        model.train(was_training)
    with timer.span("reduce"):
        scored = scorer.finish(ranks, luts)
    diag: dict[str, Any] = {"windows": len(plan), "stride": stride, "seq_len": seq}
    if tilt is not None:
        diag["hinted_targets"] = scored["hinted"]
    return finish_result(method_name, scored, timer, clock, **diag)
