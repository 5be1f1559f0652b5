"""Score-first test-time training (PR #461's recipe as run by #549/#1413/#1477/#1493/#1514/#1533)
and its Muon form (#1176 from #1135).

The stream's targets are cut into chunks of C = ttt_chunk_tokens: chunk c holds targets (cC, (c+1)C].
For each chunk in order:

1. SCORE: the sliding windows (golfnb.evals.sliding's layout) whose scored targets lie in chunk c, under
   no_grad, with the weights as they are now. Windows and chunk edges are stride-aligned, so no window's
   scored targets straddle two chunks (the config checks C is a multiple of both stride and window).
2. ADAPT (every chunk but the last): C/T rows of T tokens starting at cC (inputs v[cC + jT ...], targets
   shifted by one, so the largest target consumed is (c+1)C: exactly the tokens just scored), split into
   contiguous per-rank row ranges; `ttt_epochs` passes over micro-batches of `ttt_batch_seqs` rows, each a
   step: mean CE over the global micro-batch, gradients summed over ranks, global-norm clip at
   `ttt_grad_clip`, then the update. lr_c = ttt_lr * (1 + cos(pi c / (n_chunks - 1))) / 2.

Updates:
* sgd (the SP8192 records): one torch SGD(momentum=ttt_momentum) for the whole pass; momentum persists
  across chunks.
* muon (#1176): no optimizer state; after the all-reduce and the clip, every parameter with >= 2 dims
  (banks batched, the tied embedding too) moves by -lr_c * NS5(grad) (golfnb.optim's Newton-Schulz, no
  momentum, no row norm, no shape scale), 1-D parameters by -lr_c * grad. ttt_momentum is not used.

Freezing: the first `ttt_freeze_blocks` blocks' parameters (names `blocks.<i>.*`) get no updates. In a
banked model the matrices live in the banks, not under `blocks.<i>`, so only those blocks' control
scalars freeze: exactly what #1176's TTT_FREEZE_BLOCKS=2 did (4,112 parameters). golfnb mirrors it rather
than silently freezing bank slices, and reports the frozen count.

Rows on unequal ranks: every rank takes part in every step (a rank without rows contributes zero
gradients), and the loss is normalised by the *global* token count of the step, so any world size computes
the same update as one process.

The weights are restored at the end (`restore_weights=True`), so a later pass never sees a model trained
on validation tokens. (#1176's SLOT pass ran on the TTT-adapted model and re-scored every token.)
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from golfnb.config import ConfigError, Hyperparameters
from golfnb.evals.common import (BudgetClock, EvalObserver, PhaseTimer, Scorer, StreamBatcher, TiltHints,
                                 as_stream, emit, finish_result, model_device, rank_info, rank_range,
                                 resolve_budget, score_window_batch, sliding_windows)

__all__ = ["evaluate_ttt", "evaluate_muon_ttt", "ttt_parameters", "chunk_windows", "ttt_lr_at"]


def ttt_lr_at(cfg: Hyperparameters, chunk: int, n_chunks: int) -> float:
    """Cosine over chunks: ttt_lr at chunk 0, 0 at the last chunk."""
    if n_chunks <= 1:
        return cfg.ttt_lr
    return cfg.ttt_lr * 0.5 * (1.0 + math.cos(math.pi * chunk / (n_chunks - 1)))


def ttt_parameters(model: torch.nn.Module, freeze_blocks: int) -> tuple[list[str], list[str]]:
    """(trainable names, frozen names). Frozen = parameters under blocks.<i>. for i < freeze_blocks."""
    prefixes = tuple(f"blocks.{i}." for i in range(freeze_blocks))
    train, frozen = [], []
    for name, _ in model.named_parameters():
        (frozen if name.startswith(prefixes) else train).append(name)
    return train, frozen


def chunk_windows(first_target: np.ndarray, last_target: np.ndarray, chunk_tokens: int, n_targets: int
                  ) -> tuple[int, np.ndarray]:
    """(n_chunks, bounds) with windows [bounds[c], bounds[c+1]) scoring inside chunk c."""
    n_chunks = -(-n_targets // chunk_tokens)
    chunk_of = (first_target - 1) // chunk_tokens
    if not np.array_equal(chunk_of, (last_target - 1) // chunk_tokens):
        bad = int(np.flatnonzero(chunk_of != (last_target - 1) // chunk_tokens)[0])
        raise ConfigError(f"window {bad} scores targets {int(first_target[bad])}..{int(last_target[bad])}, across "
                          f"a chunk edge; make ttt_chunk_tokens a multiple of eval_stride and eval_seq_len")
    return n_chunks, np.searchsorted(chunk_of, np.arange(n_chunks + 1), side="left")


def _row_plan(rows: int, world: int, batch: int) -> tuple[list[tuple[int, int]], int]:
    shares = [rank_range(rows, r, world) for r in range(world)]
    n_steps = max((-(-(hi - lo) // batch) for lo, hi in shares), default=0)
    return shares, n_steps


def evaluate_ttt(model: torch.nn.Module, tokens: Any, cfg: Hyperparameters, luts: Any, dist: Any = None, *,
                 optimizer: str | None = None, tilt: TiltHints | None = None,
                 observer: EvalObserver | None = None, adapt_tokens: Any = None, restore_weights: bool = True,
                 hidden_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 budget_seconds: float | None = None, continue_over_budget: bool = False, log: Any = None,
                 method_name: str | None = None) -> dict[str, Any]:
    """Score-first TTT over `tokens` (see the module docstring). optimizer: "sgd" | "muon" (default
    cfg.ttt_optimizer). `adapt_tokens` (same length as tokens) replaces the stream in every training batch
    (the legality self-exclusion check); scoring always reads `tokens`.

    Diagnostics: chunk_bpb (per-chunk bpb list), n_chunks, steps, trainable/frozen parameter counts.
    """
    from golfnb.train import autocast_for

    opt_name = optimizer or cfg.ttt_optimizer
    if opt_name not in ("sgd", "muon"):
        raise ConfigError(f"TTT optimizer {opt_name!r} is not one of sgd, muon")
    name = method_name or ("ttt" if opt_name == "sgd" else "ttt_muon")
    seq, stride, rows_per_fwd = cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_seqs
    C = cfg.ttt_chunk_tokens
    if C % seq or C % stride:
        raise ConfigError(f"ttt_chunk_tokens={C} must be a multiple of eval_seq_len={seq} and eval_stride={stride}")
    device = model_device(model)
    ranks = rank_info(dist)
    timer = PhaseTimer(device)
    stream, U = as_stream(tokens, device, seq)
    if adapt_tokens is None:
        adapt = stream
    else:
        adapt, Ua = as_stream(adapt_tokens, device, seq)
        if Ua != U:
            raise ValueError(f"adapt_tokens has {Ua + 1} tokens but tokens has {U + 1}; they must align")
    plan = sliding_windows(U, seq, stride)
    n_chunks, bounds = chunk_windows(plan.first_target, plan.last_target, C, U)
    R = C // seq
    row_shares, n_steps = _row_plan(R, ranks.world, max(cfg.ttt_batch_seqs, 1))
    my_lo, my_hi = row_shares[ranks.rank]
    bs = max(cfg.ttt_batch_seqs, 1)

    train_names, frozen_names = ttt_parameters(model, cfg.ttt_freeze_blocks)
    named = dict(model.named_parameters())
    params = [named[n] for n in train_names]
    old_flags = {n: p.requires_grad for n, p in named.items()}
    train_set = set(train_names)
    for n, p in named.items():
        p.requires_grad_(n in train_set)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()} if restore_weights else None
    sgd = torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum) if opt_name == "sgd" else None
    if opt_name == "muon":
        from golfnb.optim import zeropower_via_newtonschulz5

    clock = BudgetClock(name, resolve_budget(cfg, budget_seconds), continue_over=continue_over_budget, log=log,
                        ranks=ranks, device=device, unit="chunks",
                        advice="lower ttt_epochs, raise ttt_chunk_tokens or eval_stride", t0=timer.t0)
    clock.plan(n_chunks, n_chunks)
    batcher = StreamBatcher(stream, plan, rows_per_fwd)
    scorer = Scorer(stream, U, luts, observer=observer, tilt=tilt, n_groups=n_chunks)
    hidden = hidden_fn if hidden_fn is not None else model.hidden
    pos = torch.arange(seq, device=device)
    row_ids = torch.arange(max(bs, 1), device=device)
    was_training = model.training
    steps_done = 0
    banked = bool(getattr(model, "banked", False))
    if banked and cfg.ttt_freeze_blocks:
        emit(log, f"{name}: banked model: ttt_freeze_blocks={cfg.ttt_freeze_blocks} freezes only those blocks' "
                  f"control scalars ({sum(named[n].numel() for n in frozen_names)} params), as #1176", ranks)
    try:
        for c in range(n_chunks):
            # ---- score chunk c with the weights as they are: nothing here has seen its tokens
            w_lo, w_hi = int(bounds[c]), int(bounds[c + 1])
            s_lo, s_hi = (w_lo + o for o in rank_range(w_hi - w_lo, ranks.rank, ranks.world))
            with timer.span("score"), torch.no_grad(), autocast_for(device):
                model.eval()
                for s in range(s_lo, s_hi, rows_per_fwd):
                    score_window_batch(model, hidden, batcher, s, min(s + rows_per_fwd, s_hi), scorer, group=c)
            # ---- adapt on chunk c (never the last): targets (cC, (c+1)C], all scored above
            if c < n_chunks - 1 and cfg.ttt_epochs > 0 and R > 0:
                lr_c = ttt_lr_at(cfg, c, n_chunks)
                with timer.span("adapt"):
                    model.train()
                    if sgd is not None:
                        for g in sgd.param_groups:
                            g["lr"] = lr_c
                    for _ in range(cfg.ttt_epochs):
                        for k in range(n_steps):
                            mine = range(my_lo + k * bs, min(my_lo + (k + 1) * bs, my_hi))
                            step_rows = [range(lo + k * bs, min(lo + (k + 1) * bs, hi)) for lo, hi in row_shares]
                            global_tokens = seq * sum(len(r) for r in step_rows)
                            max_row = max((r[-1] for r in step_rows if len(r)), default=-1)
                            if global_tokens == 0:
                                continue
                            for p in params:
                                p.grad = None
                            if len(mine):
                                starts = c * C + (row_ids[:len(mine)] + mine.start) * seq
                                grid = starts[:, None] + pos[None, :]
                                x, y = adapt[grid], adapt[grid + 1]
                                with autocast_for(device):
                                    loss = model.nll(x, y).sum() / global_tokens
                                loss.backward()
                            _sync_grads(params, ranks)
                            if cfg.ttt_grad_clip > 0:
                                torch.nn.utils.clip_grad_norm_(params, cfg.ttt_grad_clip)
                            with torch.no_grad():
                                if sgd is not None:
                                    sgd.step()
                                else:
                                    for p in params:
                                        g = p.grad
                                        if p.ndim >= 2:
                                            u = zeropower_via_newtonschulz5(g.float(), cfg.muon_backend_steps)
                                            p.add_(u.to(p.dtype), alpha=-lr_c)
                                        else:
                                            p.add_(g.to(p.dtype), alpha=-lr_c)
                            steps_done += 1
                            if observer is not None:
                                observer.on_mutation("model", c * C + (max_row + 1) * seq,
                                                     f"ttt_{opt_name}_step")
            clock.tick(c + 1)
    finally:
        for p in params:
            p.grad = None
        if snapshot is not None:
            model.load_state_dict(snapshot)
        for n, p in named.items():
            p.requires_grad_(old_flags[n])
        model.train(was_training)
    with timer.span("reduce"):
        scored = scorer.finish(ranks, luts)
    g = scored["group_sums"]
    chunk_bpb = [float(gl / (gb * math.log(2.0))) if gb > 0 else float("nan") for gl, _, gb in g.tolist()]
    diag: dict[str, Any] = {
        "optimizer": opt_name, "n_chunks": n_chunks, "chunk_tokens": C, "epochs": cfg.ttt_epochs,
        "lr": cfg.ttt_lr, "momentum": cfg.ttt_momentum if opt_name == "sgd" else 0.0, "steps": steps_done,
        "trainable_params": int(sum(named[n].numel() for n in train_names)),
        "frozen_params": int(sum(named[n].numel() for n in frozen_names)),
        "chunk_bpb": chunk_bpb, "windows": len(plan), "weights_restored": restore_weights,
    }
    if tilt is not None:
        diag["hinted_targets"] = scored["hinted"]
    return finish_result(name, scored, timer, clock, **diag)


def _sync_grads(params: list[torch.nn.Parameter], ranks: Any) -> None:
    """Fill missing gradients with zeros (every rank must join every reduction) and SUM them over ranks.
    Each rank's loss is already divided by the global token count, so the sum is the global mean."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not ranks.enabled:
        return
    from golfnb.distributed import all_reduce_sum_

    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    all_reduce_sum_(flat)
    o = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[o:o + n].view_as(p.grad))
        o += n


def evaluate_muon_ttt(model: torch.nn.Module, tokens: Any, cfg: Hyperparameters, luts: Any, dist: Any = None,
                      **kwargs: Any) -> dict[str, Any]:
    """Muon-TTT (#1176): `evaluate_ttt` with optimizer="muon"."""
    return evaluate_ttt(model, tokens, cfg, luts, dist, optimizer="muon", **kwargs)
