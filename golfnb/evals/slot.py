"""SLOT family: eval-time optimisation of a small additive vector at the last hidden layer
(Hu et al., arXiv:2505.12392, via #1128/#1172).

The model splits into `hidden(x)` (everything through the final RMSNorm) and the head
`30 tanh(h E^T / 30)`. Per batch of sliding windows (golfnb's SP8192 layout, not the records' older one):
H = hidden(x) once, detached, fp32; then `slot_steps` AdamW steps (lr `slot_lr`, weight decay 1e-8,
eps 1e-5, default betas) on a parameter added to H (and, for one variant, to the pre-cap logits), through
the head only; then the scored positions are scored with it. Variants differ in which positions feed the
loss and how the parameter is shared:

* ``standard`` (#1176): one delta [1,1,d] for the whole batch; loss over *every* valid position of every
  window, the to-be-scored targets included. (#1176 also put zero-padded tail targets in the loss; golfnb
  leaves padding out, which is noise, not the leak.)
* ``context_shared`` (#1217): one delta for the batch; loss over each window's context positions
  [0, T-S-1) (the record's range, which also drops position T-S-1, an off-by-one), window 0 included
  although all its positions are scored. Window i+1 of the same batch has window i's scored targets in its
  context, so they reach the shared delta: the leak clarkkev pointed out.
* ``context_per_window`` (the fix discussed in #1217): delta [B,1,d], each row optimised only on its own
  window's context positions [0, T-S-1); a window without context (window 0) is not optimised (its delta
  stays 0). Every delta depends only on targets before its window's scored ones.
* ``logit_bias`` (#1229): per-window delta [B,1,d] plus a logit bias [B,1,V] added before the soft-cap,
  loss on *exactly* the scored positions, lr cosine from slot_lr to slot_lr/10 over the steps.

Which of these are leaderboard-legal is not asserted here: `evaluate_slot` asks golfnb.legality, which runs
the legality checks on a small model (cached per variant and settings). A variant that fails runs only with
allow_illegal=True, and its result carries `leaderboard_legal: False`.

`slot_pass` is the bare algorithm (what the legality checks run); `evaluate_slot` adds the gate and labels.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

from golfnb.config import CHOICES, ConfigError, Hyperparameters
from golfnb.evals.common import (BudgetClock, EvalObserver, IllegalMethodError, PhaseTimer, Scorer,
                                 StreamBatcher, as_stream, emit, finish_result, model_device, rank_info,
                                 rank_range, resolve_budget, sliding_windows)

__all__ = ["slot_pass", "evaluate_slot", "SLOT_VARIANTS"]

SLOT_VARIANTS: tuple[str, ...] = CHOICES["slot_variant"]
_PER_WINDOW = ("context_per_window", "logit_bias")


def _loss_mask(variant: str, b: dict[str, Any], ctx_end: int, pos: torch.Tensor) -> torch.Tensor:
    """Positions whose targets enter the delta loss, [rows, T]."""
    valid, scored = b["valid"], b["scored"]
    if variant == "standard":
        return valid
    if variant == "logit_bias":
        return scored
    ctx = valid & (pos[None, :] < ctx_end)
    if variant == "context_per_window":  # a window without context (window 0) is not optimised
        ctx = ctx & b["has_context"][:, None]
    return ctx


def slot_pass(model: torch.nn.Module, tokens: Any, cfg: Hyperparameters, luts: Any, dist: Any = None, *,
              variant: str | None = None, observer: EvalObserver | None = None, adapt_tokens: Any = None,
              hidden_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
              budget_seconds: float | None = None, continue_over_budget: bool = False, log: Any = None
              ) -> dict[str, Any]:
    """One SLOT pass, no legality gate (see `evaluate_slot`). `adapt_tokens` replaces the targets of the
    delta loss (the legality self-exclusion check); scoring reads `tokens`."""
    from golfnb.train import autocast_for

    variant = variant or cfg.slot_variant
    if variant not in SLOT_VARIANTS:
        raise ConfigError(f"slot variant {variant!r} is not one of {', '.join(SLOT_VARIANTS)}")
    name = f"slot:{variant}"
    device = model_device(model)
    ranks = rank_info(dist)
    timer = PhaseTimer(device)
    seq, stride, rows = cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_seqs
    stream, U = as_stream(tokens, device, seq)
    if adapt_tokens is None:
        adapt = stream
    else:
        adapt, Ua = as_stream(adapt_tokens, device, seq)
        if Ua != U:
            raise ValueError(f"adapt_tokens has {Ua + 1} tokens but tokens has {U + 1}; they must align")
    plan = sliding_windows(U, seq, stride)
    ctx_end = seq - stride - 1  # #1217's context range [0, T-S-1)
    shares = [rank_range(len(plan), r, ranks.world) for r in range(ranks.world)]
    n_batches = [-(-(hi - lo) // rows) for lo, hi in shares]
    clock = BudgetClock(name, resolve_budget(cfg, budget_seconds), continue_over=continue_over_budget, log=log,
                        ranks=ranks, device=device, unit="batches",
                        advice="lower slot_steps, raise eval_stride or eval_batch_seqs", t0=timer.t0)
    clock.plan(max(n_batches), min(n_batches))
    lo, hi = shares[ranks.rank]
    batcher = StreamBatcher(stream, plan, rows)
    scorer = Scorer(stream, U, luts, observer=observer)
    hidden = hidden_fn if hidden_fn is not None else model.hidden
    d, V = cfg.model_dim, cfg.vocab_size
    pos = torch.arange(seq, device=device)
    per_window = variant in _PER_WINDOW
    steps, lr = cfg.slot_steps, cfg.slot_lr
    was_training = model.training
    model.eval()
    opt_steps = 0
    try:
        for k, s in enumerate(range(lo, hi, rows)):
            bid = f"{ranks.rank}:{k}"
            b = batcher.batch(s, min(s + rows, hi))
            with timer.span("hidden"), torch.no_grad(), autocast_for(device):
                H = hidden(b["x"]).float()
            y_adapt = adapt[b["tgt"]]
            lmask = _loss_mask(variant, b, ctx_end, pos)
            delta = torch.zeros(rows if per_window else 1, 1, d, device=device, requires_grad=True)
            bias = torch.zeros(rows, 1, V, device=device, requires_grad=True) if variant == "logit_bias" else None
            active = lmask.any(dim=1) if per_window else lmask.any().reshape(1)
            with timer.span("optimise"):
                sel = lmask.nonzero()
                if steps > 0 and sel.numel():
                    r_idx, p_idx = sel[:, 0], sel[:, 1]
                    h_sel = H[r_idx, p_idx]
                    y_sel = y_adapt[r_idx, p_idx]
                    t_sel = b["tgt"][r_idx, p_idx]
                    if per_window:  # sum of per-window means: each row's delta sees only its own window
                        w = 1.0 / lmask.sum(dim=1).clamp_min(1).double()
                        weight = w[r_idx].float()
                    params = [delta] + ([bias] if bias is not None else [])
                    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-8, eps=1e-5)
                    with torch.enable_grad():
                        for step in range(steps):
                            if variant == "logit_bias":  # #1229: cosine lr -> lr/10
                                lo_lr = lr / 10
                                cur = lo_lr + 0.5 * (lr - lo_lr) * (1 + math.cos(math.pi * step / max(steps, 1)))
                                for g in opt.param_groups:
                                    g["lr"] = cur
                            dsel = delta[r_idx, 0] if per_window else delta[0, 0][None, :]
                            logits = model.logits_from_hidden(h_sel + dsel,
                                                              bias=bias[r_idx, 0] if bias is not None else None)
                            ce = F.cross_entropy(logits, y_sel, reduction="none")
                            loss = (ce * weight).sum() if per_window else ce.mean()
                            opt.zero_grad(set_to_none=True)
                            loss.backward()
                            opt.step()
                            opt_steps += 1
                            if observer is not None:
                                _report_mutations(observer, variant, bid, r_idx, t_sel, per_window)
            with timer.span("score"), torch.no_grad():
                m0 = b["min_from"]
                d_eff = delta.detach() * active.to(delta.dtype).view(-1, 1, 1)
                logits = model.logits_from_hidden(H[:, m0:] + d_eff,
                                                  bias=bias.detach() if bias is not None else None)
                deps: Any = ("model", f"slot:{bid}")
                if per_window and observer is not None:  # one delta per row: name it per position
                    deps = [("model", f"slot:{bid}:{r}") for r in range(rows) for _ in range(seq - m0)]
                scorer.score(logits, b["tgt"][:, m0:], b["scored"][:, m0:], deps=deps)
            clock.tick(k + 1)
    finally:
        model.train(was_training)
    with timer.span("reduce"):
        scored = scorer.finish(ranks, luts)
    return finish_result(name, scored, timer, clock, variant=variant, slot_steps=steps, slot_lr=lr,
                         windows=len(plan), optimizer_steps=opt_steps)


def _report_mutations(observer: EvalObserver, variant: str, bid: str, r_idx: torch.Tensor, t_sel: torch.Tensor,
                      per_window: bool) -> None:
    """The largest target index each updated delta consumed, read off the loss positions just used."""
    if per_window:
        for r in torch.unique(r_idx).tolist():
            observer.on_mutation(f"slot:{bid}:{r}", int(t_sel[r_idx == r].max()), f"slot_{variant}_step")
    else:
        observer.on_mutation(f"slot:{bid}", int(t_sel.max()), f"slot_{variant}_step")


def evaluate_slot(model: torch.nn.Module, tokens: Any, cfg: Hyperparameters, luts: Any, dist: Any = None, *,
                  variant: str | None = None, allow_illegal: bool | None = None, log: Any = None,
                  **kwargs: Any) -> dict[str, Any]:
    """A SLOT pass gated by golfnb's measured legality verdict for this variant and these settings.

    Raises IllegalMethodError (before any evaluation work) when the variant fails the checks and neither
    `allow_illegal` nor cfg.allow_illegal is set; with it, the pass runs and every number is labelled
    `leaderboard_legal: False` (and logged as NOT leaderboard-legal).
    """
    from golfnb.legality import legality_verdict

    variant = variant or cfg.slot_variant
    allow = cfg.allow_illegal if allow_illegal is None else allow_illegal
    verdict = legality_verdict(f"slot:{variant}", cfg.replace(slot_variant=variant))
    ranks = rank_info(dist)
    if not verdict.legal and not allow:
        raise IllegalMethodError(
            f"slot_variant={variant!r} fails golfnb's legality checks ({', '.join(verdict.failed)}): "
            f"{verdict.summary}. Its numbers would not be leaderboard-legal. Use slot_variant='context_per_window' "
            f"(causal), or set allow_illegal=True to run it anyway with every result labelled")
    res = slot_pass(model, tokens, cfg, luts, dist, variant=variant, log=log, **kwargs)
    res["leaderboard_legal"] = verdict.legal
    res["legality"] = verdict.as_dict()
    if not verdict.legal:
        msg = (f"{res['method']}: val_bpb {res['val_bpb']:.6f} is NOT leaderboard-legal "
               f"(fails {', '.join(verdict.failed)})")
        if log is not None:
            emit(log, msg, ranks)
        elif ranks.rank == 0:
            warnings.warn(msg, stacklevel=2)
    return res
