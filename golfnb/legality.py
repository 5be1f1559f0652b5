"""Executable legality checks for eval methods (the challenge README and issue #1017's conditions).

A method is run on a small model and a short token stream, with an observer (golfnb.evals.common) that
records every scoring (target index, reported NLL, the full log-probability vector actually used, the
adaptive states it depended on) and every state mutation (state, the largest target index it consumed).
Then:

* ``prefix_invariance`` (condition 1): for sampled t, change v[t] (every sampled t), and separately every
  v[>t] (every other sampled t), rerun the *whole* method (adaptation, SLOT, n-gram precompute included)
  and require every log-probability vector used at target indices <= t to be unchanged (to `atol`).
  #1240's "flip a target" test is the special case.
* ``self_exclusion``: swap v[t] only in the adaptation inputs (TTT batches, delta losses, n-gram updates;
  the methods take `adapt_tokens`), keep the scored stream, and require the distribution used at t to be
  unchanged. Also reports the self-prediction advantage (NLL at t with v[t] swapped out of adaptation
  minus NLL with it in; #1240 measured +0.24 nats for #1176's SLOT, +0.73 for #1229's).
* ``normalisation`` (condition 2): every materialised distribution sums to 1 (+-1e-6), has no positive
  log-probability, and the NLL the method accumulated equals -log p(y) of that same vector (catches
  "blend only the correct token" caches, PR #886).
* ``score_once`` (condition 4): every target 1..U scored exactly once, none other; targets_scored = U and
  bytes = golfnb.bpb.count_stream_bytes of the stream.
* ``score_before_update`` (condition 3): walking the event log in order, every scored index must be greater
  than every index consumed by earlier mutations of each state it depends on.

`check_method(name)` runs them and returns a `LegalityReport`; `legality_verdict(name, cfg)` runs them on
golfnb's tiny check setting with cfg's method settings (cached per method and settings) and is what the
eval methods use to label and gate themselves. The n-gram precompute is one opaque scan, so its causality
is established by the two rerun checks (which rerun the scan) rather than by its event log.

Tolerance: `atol=1e-6` (nats, per log-probability) on CPU, the default and what verdicts use. Legal methods
reproduce their prefix distributions bit for bit except for rare last-bit differences of BLAS kernels whose
path depends on memory alignment (seen: 2e-10); the leaks of the SLOT variants measured on the check
setting are 0.02-0.7. On CUDA the default is 1e-3: non-deterministic kernels (atomics in backward passes)
perturb TTT weights slightly; pass an `atol` that sits well below the effect sizes you care about.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from golfnb.config import Hyperparameters, preset
from golfnb.evals.common import MutationEvent, ScoreEvent, ScoreTrace

__all__ = [
    "CHECKS",
    "CheckResult",
    "LegalityReport",
    "Verdict",
    "check_method",
    "legality_verdict",
    "legality_report",
    "clear_verdict_cache",
    "check_config",
    "check_stream",
    "synthetic_luts",
    "make_check_model",
    "LEGAL_METHODS",
]

CHECKS = ("prefix_invariance", "self_exclusion", "normalisation", "score_once", "score_before_update")

# Methods golfnb offers as leaderboard-legal; tests assert each passes every check (the verdict is measured,
# this list only names what the tests must confirm).
LEGAL_METHODS = ("plain", "sliding", "ttt", "ttt_muon", "slot:context_per_window", "sliding+tilt", "ttt+tilt",
                 "ttt_muon+tilt")

NORM_TOL = 1e-6  # |sum p - 1|
NLL_TOL = 1e-4  # |reported NLL - (-log p(y))|: fp32 cross-entropy vs fp64 log-softmax of the same logits

MethodFn = Callable[..., dict]


# ==================================================================== results

@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str
    max_diff: float = 0.0
    violations: int = 0
    checked: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "detail": self.detail, "max_diff": self.max_diff,
                "violations": self.violations, "checked": self.checked}


@dataclass
class LegalityReport:
    method: str
    checks: dict[str, CheckResult]
    positions: list[int]
    n_targets: int
    seconds: float
    atol: float
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks.values())

    @property
    def failed(self) -> list[str]:
        return [n for n, c in self.checks.items() if not c.passed]

    def summary(self) -> str:
        head = f"{self.method}: {'PASSES' if self.passed else 'FAILS'} golfnb's legality checks"
        lines = [head] + [f"  {'ok  ' if c.passed else 'FAIL'} {n}: {c.detail}" for n, c in self.checks.items()]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "passed": self.passed, "failed": self.failed,
                "checks": {n: c.as_dict() for n, c in self.checks.items()}, "positions": self.positions,
                "n_targets": self.n_targets, "seconds": self.seconds, "atol": self.atol,
                "diagnostics": self.diagnostics}


@dataclass(frozen=True)
class Verdict:
    """The measured verdict of one method under given settings (what results are labelled with)."""

    method: str
    legal: bool
    failed: tuple[str, ...]
    summary: str
    settings: tuple

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "leaderboard_legal": self.legal, "failed_checks": list(self.failed),
                "summary": self.summary, "settings": dict(self.settings),
                "how": "measured by golfnb.legality on a small model (prefix invariance, self-exclusion, "
                       "normalisation, score-once, score-before-update)"}


# ==================================================================== the tiny check setting

# Window 32, stride 8, 4 windows per forward, TTT chunks of 64 tokens (2 rows of 32): every mechanism the
# checks probe (shared deltas across overlapping windows, chunk edges, several chunks) appears in a stream
# of a few hundred tokens.
_TINY = dict(eval_seq_len=32, eval_stride=8, eval_batch_seqs=4, ttt_chunk_tokens=64, ttt_batch_seqs=2,
             train_seq_len=32, eval_budget_seconds=0.0, device="cpu", compile_mode="none",
             final_eval="plain", sliding_eval=True, ttt_enabled=False, slot_enabled=False,
             ngram_table_bits=16)

# Settings of the method under test that the tiny setting takes over from the caller's config.
_KNOBS = {
    "ttt": ("ttt_lr", "ttt_momentum", "ttt_epochs", "ttt_freeze_blocks", "ttt_grad_clip", "muon_backend_steps"),
    "slot": ("slot_steps", "slot_lr"),
    "tilt": ("ngram_base_beta", "ngram_agree_bonus", "ngram_within_beta", "ngram_word_beta", "ngram_order_min",
             "ngram_order_max", "ngram_order_stride"),
    "model": ("bank_params",),
}


def _knob_groups(method: str) -> list[str]:
    base, _, mod = method.partition("+")
    groups = ["model"]
    if base.startswith("ttt"):
        groups.append("ttt")
    if base.startswith("slot:"):
        groups.append("slot")
    if mod == "tilt":
        groups.append("tilt")
    return groups


def _settings(method: str, cfg: Hyperparameters | None) -> tuple:
    if cfg is None:
        return ()
    out = []
    for g in _knob_groups(method):
        for k in _KNOBS[g]:
            out.append((k, getattr(cfg, k)))
    return tuple(out)


def check_config(cfg: Hyperparameters | None = None, method: str | None = None) -> Hyperparameters:
    """The tiny CPU setting (smoke model, window 32 / stride 8) carrying cfg's settings for `method`."""
    base = preset("smoke", **_TINY)
    if cfg is None:
        return base
    changes = dict(_settings(method, cfg)) if method is not None else {
        k: getattr(cfg, k) for g in _KNOBS.values() for k in g}
    if "ttt_freeze_blocks" in changes:
        changes["ttt_freeze_blocks"] = min(changes["ttt_freeze_blocks"], base.num_layers)
    return base.replace(**changes)


def check_stream(n_tokens: int = 385, vocab_size: int = 1024, seed: int = 0) -> torch.Tensor:
    """A deterministic stream with repeated structure (so n-gram hints fire): BOS, then a 24-token motif
    over ids 4..67 repeated with 3% random substitutions, and a BOS every 128 tokens."""
    rng = np.random.default_rng(seed)
    hi = min(68, vocab_size)
    motif = rng.integers(4, hi, size=24)
    v = np.resize(motif, n_tokens).astype(np.int64)
    noise = rng.random(n_tokens) < 0.03
    v[noise] = rng.integers(4, hi, size=int(noise.sum()))
    v[::128] = 1
    return torch.from_numpy(v)


def synthetic_luts(vocab_size: int):
    """Byte tables without a tokenizer (ids 0-3 control, 1-4 bytes per piece, every third id with a
    leading space): enough for the byte-total check to be non-trivial."""
    from golfnb.bpb import ByteLUTs

    ids = torch.arange(vocab_size)
    base = (1 + ids % 4).to(torch.int32)
    boundary = ids < 4
    base[boundary] = 0
    lead = (ids % 3 == 0) & ~boundary
    return ByteLUTs(base, lead, boundary)


def make_check_model(cfg: Hyperparameters, seed: int = 0) -> torch.nn.Module:
    """A smoke-sized model with randomly perturbed weights: the fresh init zeroes the output projections
    (every block would be the identity and attention could not leak), so every matrix gets noise of scale
    0.5/sqrt(fan_in) and the embedding std 0.5 (sharp, non-uniform predictions)."""
    from golfnb.model import build_model

    model = build_model(cfg, "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "tok_emb.weight":
                p.copy_((noise * 0.5).to(p.dtype))
            elif p.ndim >= 2:
                p.add_((noise * 0.5 / p.shape[-1] ** 0.5).to(p.dtype))
            else:
                p.add_((noise * 0.1).to(p.dtype))
    model.looping_active = cfg.num_loops > 0
    return model


# ==================================================================== running a method

def _resolve(method: str | MethodFn) -> tuple[str, MethodFn]:
    if callable(method):
        return getattr(method, "__name__", "custom"), method
    from golfnb.distributed import single_process_context
    from golfnb.evals.runner import run_method

    def fn(model, tokens, cfg, luts, *, observer, adapt_tokens):
        # always one process: a check must not join (or split work across) the ranks of a live group
        solo = single_process_context(next(model.parameters()).device)
        return run_method(method, model, tokens, cfg, luts, solo, observer=observer, adapt_tokens=adapt_tokens,
                          budget_seconds=0.0)

    return method, fn


def _other_token(tok: int, vocab: int, rng: np.random.Generator) -> int:
    return int((tok + 1 + rng.integers(vocab - 1)) % vocab)


def check_method(method: str | MethodFn, model: torch.nn.Module | None = None, tokens: Any = None,
                 cfg: Hyperparameters | None = None, luts: Any = None, *, n_positions: int = 4, seed: int = 0,
                 atol: float | None = None, checks: Sequence[str] = CHECKS) -> LegalityReport:
    """Run the legality checks on `method` (a canonical name, see golfnb.evals.runner, or a callable
    `fn(model, tokens, cfg, luts, *, observer, adapt_tokens) -> result dict`).

    Without a model: golfnb's tiny setting (`check_config(cfg, method)`, `make_check_model`,
    `check_stream`, `synthetic_luts`). With one, pass the tokens, cfg and luts to run it under; each run
    works on a deep copy of the model. `n_positions` positions t are drawn (seeded) from the last three
    quarters of the stream.
    """
    t_start = time.perf_counter()
    name, fn = _resolve(method)
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; choose from {', '.join(CHECKS)}")
    if model is None:
        cfg = check_config(cfg, name if isinstance(method, str) else None)
        model = make_check_model(cfg, seed)
        tokens = check_stream(vocab_size=cfg.vocab_size, seed=seed) if tokens is None else tokens
        luts = synthetic_luts(cfg.vocab_size) if luts is None else luts
    elif tokens is None or cfg is None or luts is None:
        raise ValueError("with a model, also pass tokens, cfg and luts (or pass no model for the tiny setting)")
    tokens = torch.as_tensor(tokens).reshape(-1).long().cpu()
    U = int(tokens.numel()) - 1
    V = int(cfg.vocab_size)
    device = next(model.parameters()).device
    if atol is None:
        atol = 1e-6 if device.type == "cpu" else 1e-3
    rng = np.random.default_rng(seed)
    lo = max(1, U // 4)
    positions = sorted(int(t) for t in rng.choice(np.arange(lo, U), size=min(n_positions, U - lo), replace=False))

    def run(stream: torch.Tensor, adapt: torch.Tensor | None = None) -> tuple[dict, ScoreTrace]:
        tr = ScoreTrace(want_logprobs=True)
        m = copy.deepcopy(model)
        res = fn(m, stream, cfg, luts, observer=tr, adapt_tokens=adapt)
        return res, tr

    base_res, base_tr = run(tokens)
    out: dict[str, CheckResult] = {}
    diag: dict[str, Any] = {"val_bpb": base_res.get("val_bpb"), "mutations": len(base_tr.mutations)}
    if "tilt" in base_res:
        diag["hint_rate"] = base_res["tilt"]["hint_rate"]
    base_lp = base_tr.logprobs_by_index()

    if "prefix_invariance" in checks:
        out["prefix_invariance"] = _prefix_invariance(run, tokens, base_lp, positions, V, rng, atol)
    if "self_exclusion" in checks:
        out["self_exclusion"], diag["self_prediction_advantage_nats"] = _self_exclusion(
            run, tokens, base_tr, positions, V, rng, atol)
    if "normalisation" in checks:
        out["normalisation"] = _normalisation(base_tr, tokens)
    if "score_once" in checks:
        out["score_once"] = _score_once(base_tr, base_res, tokens, luts, U)
    if "score_before_update" in checks:
        out["score_before_update"] = _score_before_update(base_tr)
    return LegalityReport(name, out, positions, U, time.perf_counter() - t_start, atol, diag)


# ==================================================================== the checks

def _prefix_invariance(run, tokens, base_lp, positions, V, rng, atol) -> CheckResult:
    worst, viol, checked, first = 0.0, 0, 0, ""
    U = int(tokens.numel()) - 1
    for j, t in enumerate(positions):
        for kind in ("v[t]", "v[>t]") if j % 2 == 0 else ("v[t]",):
            mod = tokens.clone()
            if kind == "v[t]":
                mod[t] = _other_token(int(tokens[t]), V, rng)
            else:
                if t >= U:
                    continue
                mod[t + 1:] = torch.from_numpy(rng.integers(0, V, size=U - t))
            _, tr = run(mod)
            lp = tr.logprobs_by_index()
            for p, row in base_lp.items():
                if p > t:
                    continue
                checked += 1
                if p not in lp:
                    viol += 1
                    first = first or f"target {p} no longer scored after changing {kind} at t={t}"
                    continue
                d = float((row - lp[p]).abs().max())
                worst = max(worst, d)
                if d > atol:
                    viol += 1
                    first = first or f"changing {kind} at t={t} moved the distribution at target {p} by {d:.3g}"
    passed = viol == 0 and checked > 0
    detail = (f"{checked} distributions at targets <= t unchanged under edits of v[t] and v[>t] at "
              f"{len(positions)} positions"
              if passed else (first or "nothing was checked") + f" ({viol} of {checked} changed)")
    return CheckResult("prefix_invariance", passed, detail, worst, viol, checked)


def _self_exclusion(run, tokens, base_tr, positions, V, rng, atol) -> tuple[CheckResult, float]:
    base_lp = base_tr.logprobs_by_index()
    base_nll = base_tr.nll_by_index()
    worst, viol, adv, first = 0.0, 0, [], ""
    for t in positions:
        adapt = tokens.clone()
        adapt[t] = _other_token(int(tokens[t]), V, rng)
        _, tr = run(tokens, adapt)
        lp = tr.logprobs_by_index()
        if t not in lp or t not in base_lp:
            viol += 1
            first = first or f"target {t} was not scored in both runs"
            continue
        d = float((base_lp[t] - lp[t]).abs().max())
        adv.append(tr.nll_by_index()[t] - base_nll[t])
        worst = max(worst, d)
        if d > atol:
            viol += 1
            first = first or (f"swapping v[{t}] out of the adaptation inputs moved its own distribution by {d:.3g}")
    mean_adv = float(np.mean(adv)) if adv else 0.0
    passed = viol == 0 and bool(positions)
    detail = (f"the distribution at t ignores v[t] in every adaptation input ({len(positions)} positions)" if passed
              else f"{first}; self-prediction advantage {mean_adv:+.3g} nats")
    return CheckResult("self_exclusion", passed, detail, worst, viol, len(positions)), mean_adv


def _normalisation(trace: ScoreTrace, tokens: torch.Tensor) -> CheckResult:
    worst_sum, worst_nll, viol, n, first = 0.0, 0.0, 0, 0, ""
    for e in trace.scores:
        if e.logprobs is None:
            return CheckResult("normalisation", False, "no distributions were recorded", 0.0, 1, 0)
        lp = e.logprobs
        n += lp.shape[0]
        y = tokens[torch.from_numpy(e.targets)]
        s = torch.exp(lp).sum(dim=-1)
        err_sum = (s - 1).abs()
        bad = ~torch.isfinite(lp).all(dim=-1) | (err_sum > NORM_TOL) | (lp.max(dim=-1).values > 1e-12)
        nll_err = (torch.from_numpy(e.nll) + lp.gather(1, y[:, None]).squeeze(1)).abs()
        bad |= nll_err > NLL_TOL
        worst_sum = max(worst_sum, float(err_sum.max()))
        worst_nll = max(worst_nll, float(nll_err.max()))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            first = first or (f"target {int(e.targets[i])}: sum p = {float(s[i]):.9g}, reported NLL "
                              f"{float(e.nll[i]):.6g} vs -log p(y) = {float(-lp[i, y[i]]):.6g}")
            viol += int(bad.sum())
    passed = viol == 0 and n > 0
    detail = (f"{n} distributions sum to 1 (max err {worst_sum:.2g}) and match the reported NLL "
              f"(max err {worst_nll:.2g})" if passed else (first or "nothing was scored") + f" ({viol} of {n})")
    return CheckResult("normalisation", passed, detail, max(worst_sum, worst_nll), viol, n)


def _score_once(trace: ScoreTrace, res: dict, tokens: torch.Tensor, luts: Any, U: int) -> CheckResult:
    from golfnb.bpb import count_stream_bytes

    idx = trace.scored_indices()
    problems = []
    if idx.size and (idx.min() < 1 or idx.max() > U):
        problems.append(f"scored indices outside 1..{U} ({int(idx.min())}..{int(idx.max())})")
    counts = np.bincount(np.clip(idx, 0, U), minlength=U + 1)[1:]
    twice, never = int((counts > 1).sum()), int((counts == 0).sum())
    if twice:
        problems.append(f"{twice} targets scored more than once (max {int(counts.max())}x)")
    if never:
        problems.append(f"{never} targets never scored")
    expected = count_stream_bytes(tokens, luts)
    if res.get("targets_scored") != U:
        problems.append(f"targets_scored = {res.get('targets_scored')} != U = {U}")
    if res.get("bytes") != expected:
        problems.append(f"bytes = {res.get('bytes')} != {expected} (golfnb.bpb.count_stream_bytes)")
    passed = not problems
    detail = f"each of the {U} targets scored once, {expected} bytes" if passed else "; ".join(problems)
    return CheckResult("score_once", passed, detail, 0.0, len(problems), U)


def _score_before_update(trace: ScoreTrace) -> CheckResult:
    consumed: dict[str, int] = {}
    viol, n, worst, first = 0, 0, 0, ""
    n_mut = 0
    for e in trace.events:
        if isinstance(e, MutationEvent):
            n_mut += 1
            consumed[e.state] = max(consumed.get(e.state, -1), e.max_index)
            continue
        assert isinstance(e, ScoreEvent)
        for i, deps in zip(e.targets.tolist(), e.deps):
            n += 1
            bound = max((consumed.get(s, -1) for s in deps), default=-1)
            if i <= bound:
                viol += 1
                worst = max(worst, bound - i + 1)
                if not first:
                    st = max(deps, key=lambda s: consumed.get(s, -1))
                    first = f"target {i} scored with state {st!r} already updated on targets up to {bound}"
    passed = viol == 0 and n > 0
    detail = (f"{n} scores, {n_mut} mutations: every score precedes every update that consumed it" if passed
              else (first or "nothing was scored") + f" ({viol} of {n} scores)")
    return CheckResult("score_before_update", passed, detail, float(worst), viol, n)


# ==================================================================== verdicts

_REPORTS: dict[tuple, LegalityReport] = {}


def legality_report(method: str, cfg: Hyperparameters | None = None) -> LegalityReport:
    """`check_method` on the tiny CPU setting with cfg's settings for `method` (see `check_config`),
    computed once per process per (method, settings) and cached. cfg=None means the smoke defaults."""
    cfg = cfg if cfg is not None else check_config(None)
    key = (method, _settings(method, cfg))
    if key not in _REPORTS:
        with torch.random.fork_rng(devices=[]):
            _REPORTS[key] = check_method(method, cfg=cfg)
    return _REPORTS[key]


def legality_verdict(method: str, cfg: Hyperparameters | None = None) -> Verdict:
    """The measured verdict for `method` under cfg's settings (from the cached `legality_report`): what
    evaluate_slot and run_evals label results with and gate on."""
    cfg = cfg if cfg is not None else check_config(None)
    rep = legality_report(method, cfg)
    fails = tuple(rep.failed)
    summ = "; ".join(f"{n}: {rep.checks[n].detail}" for n in fails) if fails else "passes every check"
    return Verdict(method, rep.passed, fails, summ, _settings(method, cfg))


def clear_verdict_cache() -> None:
    _REPORTS.clear()
