"""Plain evaluation: non-overlapping windows of eval_seq_len, every position scored.

The cheapest honest number and the one the trainer uses for periodic validation. The first tokens of each
window see little context, so it reads ~0.02 bpb worse than the sliding pass on the record models; it is a
diagnostic, not what the records submit.

Windows are split into contiguous per-rank ranges; each rank runs `B` windows per forward, where B follows
the records: val_batch_tokens / (world_size * grad_accum_steps) tokens per rank per forward (32 windows
of 2048 for SP8192 on any world size). The last, possibly shorter window is zero-padded and masked.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from golfnb.config import Hyperparameters
from golfnb.evals.common import (BudgetClock, EvalObserver, PhaseTimer, Scorer, StreamBatcher, as_stream,
                                 finish_result, model_device, plain_windows, rank_info, rank_range,
                                 resolve_budget)

__all__ = ["evaluate_plain", "plain_batch_seqs"]


def plain_batch_seqs(cfg: Hyperparameters, world_size: int) -> int:
    """Windows per rank per forward: the records' VAL_BATCH_TOKENS // (world * grad_accum) // seq_len."""
    per_rank = cfg.val_batch_tokens // (world_size * cfg.grad_accum_for(world_size))
    return max(1, per_rank // cfg.eval_seq_len)


def evaluate_plain(model: torch.nn.Module, tokens: Any, cfg: Hyperparameters, luts: Any, dist: Any = None,
                   forward: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                   observer: EvalObserver | None = None, budget_seconds: float | None = None,
                   continue_over_budget: bool = False, log: Any = None,
                   adapt_tokens: Any = None) -> dict[str, Any]:
    """Score every target of `tokens` once with non-overlapping windows.

    forward: optional callable ids [B, T] -> logits [B, T, V] (e.g. the compiled model); default
    `model.forward_logits`. Runs under no_grad and bf16 autocast on CUDA; leaves the model's looping state
    and train/eval mode as it found them. `adapt_tokens` is accepted for a uniform method signature and
    ignored (plain eval adapts nothing).
    """
    from golfnb.train import autocast_for

    del adapt_tokens
    device = model_device(model)
    ranks = rank_info(dist)
    timer = PhaseTimer(device)
    seq = cfg.eval_seq_len
    stream, U = as_stream(tokens, device, seq)
    plan = plain_windows(U, seq)
    rows = plain_batch_seqs(cfg, ranks.world)
    clock = BudgetClock("plain", resolve_budget(cfg, budget_seconds), continue_over=continue_over_budget,
                        log=log, ranks=ranks, device=device, unit="batches",
                        advice="plain eval is one forward per window: lower max_val_tokens for quick runs",
                        t0=timer.t0)
    counts = [rank_range(len(plan), r, ranks.world) for r in range(ranks.world)]
    n_batches = [-(-(hi - lo) // rows) for lo, hi in counts]
    clock.plan(max(n_batches), min(n_batches))
    lo, hi = counts[ranks.rank]
    batcher = StreamBatcher(stream, plan, rows)
    scorer = Scorer(stream, U, luts, observer=observer)
    was_training = model.training
    model.eval()
    fwd = forward if forward is not None else model.forward_logits
    try:
        with timer.span("score"), torch.no_grad(), autocast_for(device):
            for k, s in enumerate(range(lo, hi, rows)):
                b = batcher.batch(s, min(s + rows, hi))
                logits = fwd(b["x"])
                scorer.score(logits, b["tgt"], b["scored"])
                clock.tick(k + 1)
    finally:
        model.train(was_training)
    with timer.span("reduce"):
        scored = scorer.finish(ranks, luts)
    return finish_result("plain", scored, timer, clock, windows=len(plan), batch_seqs=rows)
