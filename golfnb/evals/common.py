"""What every eval method shares: the window layout, byte-exact scoring, the eval budget, and the hooks
the legality checks listen on.

Scoring. A method hands `Scorer.score` fp32 logits for a grid of positions, the *global* index
p of each position's target token v[p] (1 <= p <= U) and a mask of the positions it really scores. The
scorer takes NLL from fp32 cross-entropy, optionally tilts it (n-gram tilt), credits
bytes(p) = golfnb.bpb.target_bytes(v[p-1], v[p]) and keeps fp64 sums on the device (no host sync per
batch); `Scorer.finish` all-reduces them once (golfnb.bpb.BpbAccumulator) and returns val_loss / val_bpb.

Windows (the SP8192 scheme). With U targets, window length T and stride S (ctx = T - S):
window 0 scores targets 1..min(T, U); window ws = kS (k >= 1, while ws + ctx < U) reads v[ws : ws+wlen]
and scores its positions [ctx, wlen), i.e. targets ws+ctx+1 .. ws+wlen. Every target is scored exactly
once and, past the first window, with at least ctx tokens of context. The older #549/#1176/#1217 layout
re-scored the tail; it is not reproduced. With S = T this is exactly the plain layout.

Budget. `BudgetClock` projects the wall time of a pass from its first units (batches or chunks), logs the
projection once, and raises `EvalBudgetExceeded` when the projection (or the elapsed time) passes the
budget, unless the caller asked to continue. Under several ranks the projection is agreed by an
all-reduce(MAX) at unit counts every rank reaches, so all ranks stop together and no collective is left
waiting.

Observation. An `EvalObserver` receives every scoring (targets, reported NLL, optionally the full
log-probability vector actually used, and the adaptive states the scores depend on) and every state
mutation (which state, the largest target index whose token it consumed). Methods report what their code
really did (indices are read off the masks and row ranges used in the losses), and `golfnb.legality`
turns the record into the checks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from golfnb.config import ConfigError, Hyperparameters

__all__ = [
    "scoring_forward",
    "ScoringForward",
    "persist_scoring_forward",
    "EvalBudgetExceeded",
    "IllegalMethodError",
    "EvalObserver",
    "ScoreTrace",
    "ScoreEvent",
    "MutationEvent",
    "RankInfo",
    "rank_info",
    "rank_range",
    "WindowPlan",
    "sliding_windows",
    "plain_windows",
    "TiltHints",
    "Scorer",
    "BudgetClock",
    "PhaseTimer",
    "StreamBatcher",
    "as_stream",
    "model_device",
    "emit",
    "score_window_batch",
]


# ==================================================================== errors

class EvalBudgetExceeded(RuntimeError):
    """A pass was projected (or measured) to run past its eval budget and was stopped."""

    def __init__(self, method: str, projected_s: float, budget_s: float, elapsed_s: float, done: int,
                 total: int, unit: str, advice: str = ""):
        self.method = method
        self.projected_s = float(projected_s)
        self.budget_s = float(budget_s)
        self.elapsed_s = float(elapsed_s)
        self.done = int(done)
        self.total = int(total)
        hint = f"; {advice}" if advice else ""
        super().__init__(
            f"{method}: projected {projected_s:.1f} s for {total} {unit} (measured over the first {done}, "
            f"{elapsed_s:.1f} s so far) exceeds the eval budget of {budget_s:.1f} s{hint}. Raise "
            f"eval_budget_seconds (0 = no budget) or pass continue_over_budget=True to run it anyway")


class IllegalMethodError(ConfigError):
    """A method that fails golfnb's legality checks was asked for without allow_illegal=True."""


# ==================================================================== observation

class EvalObserver:
    """Receives what a pass scores and what it mutates. The base class ignores everything.

    `on_score(targets, nll, logprobs, deps)`: targets = global target indices (int64, CPU), nll = the NLL
    the pass accumulates for them (fp64), logprobs = [n, V] fp64 log-probabilities of the distribution
    actually used (only when `want_logprobs`), deps = per position, the names of the adaptive states the
    score depended on ("model", "slot:3", ...).
    `on_mutation(state, max_index, kind)`: `state` was updated by a step whose inputs included target
    tokens up to global index `max_index` (and none beyond).
    """

    want_logprobs: bool = False

    def on_score(self, targets: torch.Tensor, nll: torch.Tensor, logprobs: torch.Tensor | None,
                 deps: Sequence[tuple[str, ...]]) -> None:
        pass

    def on_mutation(self, state: str, max_index: int, kind: str) -> None:
        pass


@dataclass
class ScoreEvent:
    seq: int
    targets: np.ndarray
    nll: np.ndarray
    logprobs: torch.Tensor | None
    deps: list[tuple[str, ...]]


@dataclass
class MutationEvent:
    seq: int
    state: str
    max_index: int
    kind: str


class ScoreTrace(EvalObserver):
    """Records every event in order (what golfnb.legality reads)."""

    def __init__(self, want_logprobs: bool = True):
        self.want_logprobs = want_logprobs
        self.events: list[ScoreEvent | MutationEvent] = []

    def on_score(self, targets, nll, logprobs, deps) -> None:
        self.events.append(ScoreEvent(len(self.events), targets.detach().cpu().numpy().astype(np.int64),
                                      nll.detach().cpu().double().numpy(),
                                      None if logprobs is None else logprobs.detach().cpu().double(),
                                      list(deps)))

    def on_mutation(self, state, max_index, kind) -> None:
        self.events.append(MutationEvent(len(self.events), str(state), int(max_index), str(kind)))

    @property
    def scores(self) -> list[ScoreEvent]:
        return [e for e in self.events if isinstance(e, ScoreEvent)]

    @property
    def mutations(self) -> list[MutationEvent]:
        return [e for e in self.events if isinstance(e, MutationEvent)]

    def scored_indices(self) -> np.ndarray:
        s = self.scores
        return np.concatenate([e.targets for e in s]) if s else np.zeros(0, dtype=np.int64)

    def nll_by_index(self) -> dict[int, float]:
        """First reported NLL per target index."""
        out: dict[int, float] = {}
        for e in self.scores:
            for i, v in zip(e.targets.tolist(), e.nll.tolist()):
                out.setdefault(i, v)
        return out

    def logprobs_by_index(self) -> dict[int, torch.Tensor]:
        """First log-probability vector per target index (needs want_logprobs)."""
        out: dict[int, torch.Tensor] = {}
        for e in self.scores:
            if e.logprobs is None:
                raise ValueError("this trace was recorded without log-probabilities (want_logprobs=False)")
            for r, i in enumerate(e.targets.tolist()):
                if i not in out:
                    out[i] = e.logprobs[r]
        return out


# ==================================================================== ranks

@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world: int = 1
    enabled: bool = False


def rank_info(dist: Any = None) -> RankInfo:
    """Rank/world from a golfnb DistContext; without one, from a live torch.distributed group (so the
    all-reduces of golfnb.bpb and this module always agree on who takes part), else a single process."""
    if dist is not None:
        return RankInfo(int(dist.rank), int(dist.world_size), bool(dist.enabled) and int(dist.world_size) > 1)
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        return RankInfo(tdist.get_rank(), tdist.get_world_size(), True)
    return RankInfo()


def rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous share [lo, hi) of n items for `rank` (sizes differ by at most one)."""
    return (n * rank) // world, (n * (rank + 1)) // world


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class ScoringForward:
    """`model.hidden` under torch.compile, warm-started from golfnb's persisted eval compile cache.

    Static shapes: a pass sees a few batch shapes (full batches, the last partial one, TTT's chunk rows),
    each compiled once; the weights stay inputs of the graph, so TTT's in-place updates are seen.
    `persist()` (call it after the passes, off the eval clock) writes the compiled artifacts for the next
    eval of this stack (golfnb.compile_cache, purpose "eval"); it only writes when a shape was compiled
    since the last write."""

    def __init__(self, model: torch.nn.Module, cfg: Hyperparameters, run_dir: Any = None):
        from golfnb import compile_cache

        self.cfg, self.run_dir, self.device = cfg, run_dir, model_device(model)
        # before the first compiled call, so that compilation of a known graph becomes cache hits
        self.cache = compile_cache.load(cfg, self.device, 1, run_dir, purpose="eval")
        self._fn = torch.compile(model.hidden, dynamic=False)
        self._shapes: set[tuple[int, ...]] = set()
        self._persisted: set[tuple[int, ...]] = set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._shapes.add(tuple(x.shape))
        return self._fn(x)

    @property
    def shapes(self) -> set[tuple[int, ...]]:
        return set(self._shapes)

    def persist(self) -> list[Any]:
        """Write the artifacts (the run's cache/compile_eval.bin and the shared file); [] when nothing new."""
        from golfnb import compile_cache

        if self._shapes <= self._persisted:
            return []
        written = compile_cache.save(self.cfg, self.device, 1, self.run_dir, purpose="eval")
        self._persisted = set(self._shapes)
        return written


def scoring_forward(model: torch.nn.Module, cfg: Hyperparameters, run_dir: Any = None) -> ScoringForward | None:
    """The compiled `model.hidden` the eval passes score with (cfg.eval_compile), or None for eager.

    `run_dir` adds the run's own eval compile cache (cache/compile_eval.bin) to the machine's shared one."""
    on = cfg.eval_compile == "on" or (cfg.eval_compile == "auto" and model_device(model).type == "cuda")
    return ScoringForward(model, cfg, run_dir) if on else None


def persist_scoring_forward(hidden_fn: Any, log: Any = None) -> None:
    """Persist a ScoringForward's compiled artifacts (anything else: nothing to do); logs what was written."""
    if not isinstance(hidden_fn, ScoringForward):
        return
    try:
        written = hidden_fn.persist()
    except Exception as e:  # a cache is an optimisation: failing to write one must not fail an eval
        emit(log, f"eval_compile_cache:not saved ({type(e).__name__}: {e})")
        return
    if written:
        emit(log, f"eval_compile_cache:saved files:{len(written)} bytes:{written[0].stat().st_size} "
                  f"shapes:{sorted(hidden_fn.shapes)}")


def emit(log: Any, msg: str, ranks: RankInfo | None = None) -> None:
    """Send one line to `log` (a callable, or an object with .log such as golfnb.runlog.RunLogger); rank 0 only."""
    if log is None or (ranks is not None and ranks.rank != 0):
        return
    if hasattr(log, "log"):
        log.log(msg)
    else:
        log(msg)


# ==================================================================== windows

@dataclass(frozen=True)
class WindowPlan:
    """Windows over a stream of U targets: start ws, length wlen, first scored position in the window."""

    starts: np.ndarray
    lens: np.ndarray
    score_from: np.ndarray
    seq_len: int
    stride: int
    n_targets: int

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    @property
    def first_target(self) -> np.ndarray:
        """Global index of each window's first scored target."""
        return self.starts + self.score_from + 1

    @property
    def last_target(self) -> np.ndarray:
        return self.starts + self.lens


def sliding_windows(n_targets: int, seq_len: int, stride: int) -> WindowPlan:
    """The SP8192 sliding layout: every target scored once, each with the most context."""
    if n_targets < 1:
        raise ValueError(f"need at least one target, got a stream of {n_targets + 1} tokens")
    if not (1 <= stride <= seq_len):
        raise ConfigError(f"eval_stride={stride} must be in 1..eval_seq_len={seq_len}")
    ctx = seq_len - stride
    later = np.arange(stride, max(n_targets - ctx, 0), stride, dtype=np.int64)  # ws + ctx < U
    starts = np.concatenate([np.zeros(1, dtype=np.int64), later])
    lens = np.minimum(seq_len, n_targets - starts)
    score_from = np.full_like(starts, ctx)
    score_from[0] = 0
    return WindowPlan(starts, lens, score_from, seq_len, stride, n_targets)


def plain_windows(n_targets: int, seq_len: int) -> WindowPlan:
    """Non-overlapping windows of seq_len; the last may be shorter."""
    return sliding_windows(n_targets, seq_len, seq_len)


def as_stream(tokens: Any, device: torch.device, seq_len: int) -> tuple[torch.Tensor, int]:
    """(int64 stream on `device` padded with seq_len+1 zeros so window gathers never run off the end, U)."""
    t = tokens if isinstance(tokens, torch.Tensor) else torch.as_tensor(np.asarray(tokens))
    if t.ndim != 1:
        raise ValueError(f"val tokens must be a 1-D stream, got shape {tuple(t.shape)}")
    if t.numel() < 2:
        raise ValueError(f"val stream has {t.numel()} tokens; at least 2 are needed to score one target")
    if t.is_floating_point():
        raise ValueError(f"val tokens must be integer ids, got dtype {t.dtype}")
    t = t.to(device=device, dtype=torch.long)
    U = int(t.numel()) - 1
    return torch.cat([t, torch.zeros(seq_len + 1, dtype=torch.long, device=device)]), U


class StreamBatcher:
    """Builds the tensors of one batch of consecutive windows: inputs, the global target index grid and masks.

    The window table lives on the device (padded with `batch_rows` empty rows), so a batch is a slice of it:
    no host-to-device copy, hence no stream synchronisation, per batch.
    """

    def __init__(self, stream: torch.Tensor, plan: WindowPlan, batch_rows: int):
        self.stream = stream
        self.plan = plan
        self.rows = int(batch_rows)
        dev = self.device = stream.device
        pad = np.zeros(self.rows, dtype=np.int64)
        self.starts = torch.from_numpy(np.concatenate([plan.starts, pad])).to(dev)
        self.lens = torch.from_numpy(np.concatenate([plan.lens, pad])).to(dev)
        self.score_from = torch.from_numpy(np.concatenate([plan.score_from, pad + plan.seq_len])).to(dev)
        self.pos = torch.arange(plan.seq_len, device=dev)
        self.row = torch.arange(self.rows, device=dev)

    def batch(self, lo: int, hi: int, stream: torch.Tensor | None = None) -> dict[str, Any]:
        """Windows lo..hi-1 (at most batch_rows) as `batch_rows` rows; rows past hi score nothing, so every
        forward has one shape. `min_from` (host int) is the first position any row scores."""
        p = self.plan
        n = hi - lo
        if not 0 < n <= self.rows:
            raise ValueError(f"a batch holds 1..{self.rows} windows, got {n}")
        st = self.starts[lo:lo + self.rows]
        ln = self.lens[lo:lo + self.rows] * (self.row < n)
        fr = self.score_from[lo:lo + self.rows]
        src = self.stream if stream is None else stream
        grid = st[:, None] + self.pos[None, :]
        valid = self.pos[None, :] < ln[:, None]
        x = torch.where(valid, src[grid], torch.zeros_like(grid))  # zero-padded tail, as the records
        tgt = (grid + 1).clamp_max(p.n_targets)  # global target index of each position
        scored = valid & (self.pos[None, :] >= fr[:, None])
        has_context = (fr > 0) & (ln > 0)
        return {"x": x, "tgt": tgt, "valid": valid, "scored": scored, "has_context": has_context,
                "min_from": int(p.score_from[lo:hi].min()), "n": n}


# ==================================================================== scoring

@dataclass
class TiltHints:
    """n-gram tilt inputs aligned with the stream: hint token (-1 none) and strength for each target index."""

    hints: torch.Tensor  # int64 [N]
    betas: torch.Tensor  # float64 [N]
    seconds: float = 0.0
    backend: str = ""
    stats: dict = field(default_factory=dict)

    def to(self, device: torch.device) -> "TiltHints":
        return TiltHints(self.hints.to(device), self.betas.to(device), self.seconds, self.backend, self.stats)


def _tilted_logprobs(logits: torch.Tensor, hints: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """log p' for rows of fp32 logits under the tilt p'(t) = p(t) e^{beta [t=h]} / Z, materialised in fp64
    (the legality checks compare the scorer's tilted NLL against this vector)."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    has = hints >= 0
    if not bool(has.any()):
        return lp
    h = hints.clamp_min(0)
    b = torch.where(has, betas.double(), torch.zeros_like(betas, dtype=torch.float64))
    log_ph = lp.gather(1, h[:, None]).squeeze(1)
    log_z = torch.log1p(torch.exp(log_ph) * torch.expm1(b))
    out = lp - log_z[:, None]
    bump = torch.zeros_like(out)
    bump.scatter_(1, h[:, None], b[:, None])
    return out + bump


class Scorer:
    """fp64 loss/token/byte sums of one pass (optionally per group, e.g. TTT chunks), on the device."""

    def __init__(self, stream: torch.Tensor, n_targets: int, luts: Any, *, observer: EvalObserver | None = None,
                 tilt: TiltHints | None = None, n_groups: int = 0):
        self.stream = stream
        self.n_targets = n_targets
        self.device = stream.device
        self.luts = luts.to(self.device)
        self.observer = observer
        self.tilt = tilt.to(self.device) if tilt is not None else None
        if self.tilt is not None and self.tilt.hints.numel() < n_targets + 1:
            raise ValueError(f"tilt hints cover {self.tilt.hints.numel()} tokens but the stream has "
                             f"{n_targets + 1}; compute them on the same stream")
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.group_sums = torch.zeros(max(n_groups, 0), 3, dtype=torch.float64, device=self.device)
        self.hinted = torch.zeros((), dtype=torch.float64, device=self.device)

    def score(self, logits: torch.Tensor, tgt: torch.Tensor, mask: torch.Tensor, *,
              deps: tuple[str, ...] | Sequence[tuple[str, ...]] = ("model",), group: int | None = None
              ) -> torch.Tensor:
        """Accumulate the masked positions. logits [..., V] fp32, tgt / mask with the leading shape.

        `deps` is one tuple for all positions or one tuple per element of the grid (row-major), naming the
        adaptive states the scores used (for the score-before-update check). Returns the fp64 NLL grid.
        """
        from golfnb.bpb import target_bytes

        V = logits.shape[-1]
        lg = logits.reshape(-1, V).float()
        t = tgt.reshape(-1)
        m = mask.reshape(-1)
        y = self.stream[t]
        prev = self.stream[t - 1]
        nll = F.cross_entropy(lg, y, reduction="none")
        if self.tilt is not None:
            from golfnb.evals.ngram import tilt_nll

            nll64 = tilt_nll(lg, y, self.tilt.hints[t], self.tilt.betas[t], nll=nll)
            self.hinted += ((self.tilt.hints[t] >= 0) & m).double().sum()
        else:
            nll64 = nll.double()
        nb = target_bytes(prev, y, self.luts).double()
        md = m.double()
        upd = torch.stack([(nll64 * md).sum(), md.sum(), (nb * md).sum()])
        self.sums += upd
        if group is not None and self.group_sums.shape[0]:
            self.group_sums[group] += upd
        obs = self.observer
        if obs is not None:
            idx = m.nonzero().squeeze(1)
            lp = None
            if obs.want_logprobs:
                if self.tilt is not None:
                    lp = _tilted_logprobs(lg[idx], self.tilt.hints[t[idx]], self.tilt.betas[t[idx]])
                else:
                    lp = torch.log_softmax(lg[idx].double(), dim=-1)
            if deps and isinstance(deps[0], str):
                dl = [tuple(deps)] * int(idx.numel())  # type: ignore[arg-type]
            else:
                dl = [tuple(deps[i]) for i in idx.tolist()]  # type: ignore[index]
            obs.on_score(t[idx], nll64[idx], lp, dl)
        return nll64.reshape(tgt.shape)

    def finish(self, ranks: RankInfo, luts: Any) -> dict[str, Any]:
        """All-reduce (once) and the headline numbers; per-group sums come back as `group_sums` (CPU fp64)."""
        from golfnb.bpb import BpbAccumulator
        from golfnb.distributed import all_reduce_sum_

        acc = BpbAccumulator(luts, device=self.device)
        acc.add_sums(self.sums[0], self.sums[1], self.sums[2])
        if ranks.enabled:
            acc.all_reduce()
        out: dict[str, Any] = {"val_loss": acc.val_loss, "val_bpb": acc.val_bpb, "loss_sum": acc.loss_sum,
                               "targets_scored": acc.tokens, "bytes": acc.bytes}
        extra = torch.cat([self.group_sums.reshape(-1), self.hinted.reshape(1)])
        if ranks.enabled:
            all_reduce_sum_(extra)
        extra = extra.cpu()
        out["group_sums"] = extra[:-1].reshape(-1, 3)
        out["hinted"] = int(round(float(extra[-1])))
        return out


def score_window_batch(model: torch.nn.Module, hidden_fn: Callable[[torch.Tensor], torch.Tensor],
                       batcher: StreamBatcher, lo: int, hi: int, scorer: Scorer, *,
                       group: int | None = None, deps: tuple[str, ...] = ("model",)) -> None:
    """Forward windows lo..hi-1 and score their scored positions; the head runs only from the first
    scored position of the batch onward (the last `stride` positions, except in the batch of window 0)."""
    b = batcher.batch(lo, hi)
    h = hidden_fn(b["x"])
    m0 = b["min_from"]
    logits = model.logits_from_hidden(h[:, m0:])
    scorer.score(logits, b["tgt"][:, m0:], b["scored"][:, m0:], deps=deps, group=group)


# ==================================================================== time

class PhaseTimer:
    """Wall seconds per named phase (synchronising CUDA at phase edges so the split is real)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    class _Span:
        def __init__(self, timer: "PhaseTimer", name: str):
            self.timer, self.name = timer, name

        def __enter__(self):
            self.timer.sync()
            self.t = time.perf_counter()
            return self

        def __exit__(self, *exc):
            self.timer.sync()
            self.timer.add(self.name, time.perf_counter() - self.t)
            return False

    def span(self, name: str) -> "PhaseTimer._Span":
        return PhaseTimer._Span(self, name)

    def total(self) -> float:
        return time.perf_counter() - self.t0


class BudgetClock:
    """Projects a pass's wall time from its first units and enforces the budget (0 = none)."""

    def __init__(self, method: str, budget_s: float, *, continue_over: bool = False, log: Any = None,
                 ranks: RankInfo | None = None, device: torch.device | None = None, unit: str = "batches",
                 advice: str = "", check_after: int = 3, t0: float | None = None):
        if budget_s < 0 or not math.isfinite(budget_s):
            raise ConfigError(f"eval budget {budget_s!r} must be a finite number of seconds >= 0 (0 = none)")
        self.method = method
        self.budget_s = float(budget_s)
        self.continue_over = continue_over
        self.log = log
        self.ranks = ranks or RankInfo()
        self.device = device or torch.device("cpu")
        self.unit = unit
        self.advice = advice
        self.check_after = max(int(check_after), 1)
        self.t0 = time.perf_counter() if t0 is None else t0
        self.total = 0
        self.sync_units = 0
        self.t_first: float | None = None
        self.projected_s: float | None = None
        self.over_budget = False
        self._every = 1

    def plan(self, total_units: int, sync_units: int) -> None:
        """total: units of the busiest rank; sync: units every rank reaches (checks happen only there)."""
        self.total = int(total_units)
        self.sync_units = int(sync_units)
        self._every = max(1, self.total // 20)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _is_check(self, done: int) -> bool:
        if done > self.sync_units or done >= self.total:
            return False
        first = min(self.check_after, max(self.sync_units, 1))
        return done == first or (done > first and (done - first) % self._every == 0)

    def tick(self, done: int) -> None:
        """Call after each finished unit (done = units finished on this rank)."""
        if done == 1:
            self._sync()
            self.t_first = self.elapsed()
        if not self._is_check(done):
            return
        self._sync()
        el = self.elapsed()
        if done >= 2 and self.t_first is not None:
            rate = (el - self.t_first) / (done - 1)  # the first unit carries compile and warm-up
        else:
            rate = el / max(done, 1)
        projected = el + rate * (self.total - done)
        if self.ranks.enabled:
            from golfnb.distributed import all_reduce_max

            projected = all_reduce_max(projected, self.device if self.device.type == "cuda" else None)
        first_report = self.projected_s is None
        if first_report:
            self.projected_s = projected
            budget = f"budget {self.budget_s:.0f} s" if self.budget_s > 0 else "no budget"
            emit(self.log, f"{self.method}: projected {projected:.1f} s for {self.total} {self.unit} "
                           f"(after {done}; {budget})", self.ranks)
        if self.budget_s > 0 and projected > self.budget_s:
            if not self.continue_over:
                raise EvalBudgetExceeded(self.method, projected, self.budget_s, el, done, self.total, self.unit,
                                         self.advice)
            if not self.over_budget:
                emit(self.log, f"{self.method}: WARNING projected {projected:.1f} s exceeds the eval budget "
                               f"{self.budget_s:.1f} s; continuing as asked", self.ranks)
            self.over_budget = True

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def summary(self) -> dict[str, Any]:
        el = self.elapsed()
        if self.budget_s > 0 and el > self.budget_s:
            self.over_budget = True
        return {"budget_s": self.budget_s, "projected_s": self.projected_s, "over_budget": self.over_budget}


def resolve_budget(cfg: Hyperparameters, budget_seconds: float | None) -> float:
    return float(cfg.eval_budget_seconds if budget_seconds is None else budget_seconds)


def finish_result(method: str, scored: dict[str, Any], timer: PhaseTimer, clock: BudgetClock,
                  **diagnostics: Any) -> dict[str, Any]:
    """The dict every method returns (headline numbers, phases, budget, then method diagnostics)."""
    res: dict[str, Any] = {"method": method}
    for k in ("val_loss", "val_bpb", "loss_sum", "targets_scored", "bytes"):
        res[k] = scored[k]
    res["seconds"] = timer.total()
    res["phases"] = dict(timer.phases)
    res["budget"] = clock.summary()
    res["leaderboard_legal"] = None  # set by run_evals / evaluate_slot from golfnb.legality's verdict
    res.update(diagnostics)
    return res
