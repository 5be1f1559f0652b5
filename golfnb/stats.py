"""Multi-seed statistics for a submission: mean, std, and the challenge's significance test.

The challenge asks a new record to beat the current one by at least 0.005 nats per token at p < 0.01
(one-sided), shown over at least three seeds. Everything here works in **nats per token**, the unit of the
logs' `val_loss`:

* an entry's per-seed `val_loss` is already nats/token;
* a record given by `val_loss` (its mean, or its per-seed values) is used as is;
* a record given only by `val_bpb` is converted with the bytes-per-token ratio of the validation stream,
  rho = val_loss / (val_bpb * ln 2) = B / N_t (val_bpb = L / (B ln 2), val_loss = L / N_t).
  rho depends only on the validation stream and the tokenizer, so it is the same for every seed of an
  entry and for a record scored on the same stream with the same tokenizer; we take it from the entry's
  seeds (each seed's record-equivalent is bpb_record * ln 2 * rho_seed). A record scored with a different
  tokenizer has a different rho: then give its val_loss, not its bpb. For SP8192, rho = 3.726631, so the
  0.005-nat bar is 0.005 / (ln 2 * 3.726631) = 0.001936 bpb.

Which test:

* record given as seeds (its per-seed values): Welch's two-sample t-test (unequal variances, small n),
  H1: mean(entry) - mean(record) < -margin; both sides' seed noise enters the standard error.
* record given as one number (the published mean): a one-sample t-test of the entry's seeds against
  record - margin. It treats the record's mean as exact: its standard error leaves out the record's own
  seed noise (a larger |t|), while it has fewer degrees of freedom (n - 1), so its p-value can fall on
  either side of Welch's. It answers a narrower question; prefer the seeds when they are published.

The t distribution's CDF is computed here (regularised incomplete beta function by its continued fraction,
Abramowitz & Stegun 26.5.8, evaluated with Lentz's method) so nothing needs scipy at run time; the tests
compare against `scipy.stats.ttest_ind(..., equal_var=False, alternative="less")` and `ttest_1samp`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

__all__ = ["MARGIN_NATS", "ALPHA", "LN2", "StatsError", "mean_std", "betainc", "t_cdf", "bytes_per_token",
           "bpb_to_nats", "nats_to_bpb", "welch_one_sided", "one_sample_one_sided", "SignificanceResult",
           "significance", "compare_to_record"]

MARGIN_NATS = 0.005  # the challenge's bar: a new record improves by at least this many nats per token
ALPHA = 0.01  # ... at p < 0.01
LN2 = math.log(2.0)


class StatsError(ValueError):
    """Inputs a test cannot use; the message says what to give instead."""


# ================================================================================================ basics

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with n - 1), as the records report; std is 0.0 for one value."""
    xs = [float(v) for v in values]
    if not xs:
        raise StatsError("no values: give at least one seed's result")
    m = math.fsum(xs) / len(xs)
    if len(xs) == 1:
        return m, 0.0
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _beta_cf(a: float, b: float, x: float, max_iter: int = 500, eps: float = 1e-15) -> float:
    """Continued fraction of I_x(a, b) (A&S 26.5.8) by the modified Lentz method."""
    tiny = 1e-300

    def clamp(v: float) -> float:
        return tiny if abs(v) < tiny else v

    c = 1.0
    d = 1.0 / clamp(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, max_iter + 1):
        # even step d_{2m}, then odd step d_{2m+1}
        num = m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))
        d = 1.0 / clamp(1.0 + num * d)
        c = clamp(1.0 + num / c)
        h *= d * c
        num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))
        d = 1.0 / clamp(1.0 + num * d)
        c = clamp(1.0 + num / c)
        step = d * c
        h *= step
        if abs(step - 1.0) < eps:
            return h
    raise StatsError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0, 0 <= x <= 1.

    y = 1 - x when the caller has it more accurately than 1 - x can be computed (x close to 1)."""
    if a <= 0 or b <= 0:
        raise StatsError(f"betainc needs a, b > 0 (got a={a}, b={b})")
    y = 1.0 - x if y is None else y
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    # the fraction converges fast for x < (a+1)/(a+b+2); use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a) otherwise
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, y) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (df may be fractional, as Welch's is)."""
    if df <= 0 or math.isnan(df):
        raise StatsError(f"degrees of freedom must be > 0 (got {df})")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tt = t * t
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + tt), tt / (df + tt))  # P(T <= -|t|)
    return tail if t < 0 else 1.0 - tail


# ================================================================================================ units

def bytes_per_token(val_loss: float, val_bpb: float) -> float:
    """rho = B / N_t of the stream a (val_loss, val_bpb) pair was scored on."""
    if val_bpb <= 0:
        raise StatsError(f"val_bpb must be > 0 (got {val_bpb})")
    return val_loss / (val_bpb * LN2)


def bpb_to_nats(bpb: float, rho: float) -> float:
    """nats/token of a bits-per-byte value on a stream with rho bytes per token."""
    return bpb * LN2 * rho


def nats_to_bpb(nats: float, rho: float) -> float:
    return nats / (LN2 * rho)


# ================================================================================================ tests

def _need(values: Sequence[float], what: str, n: int = 2) -> list[float]:
    xs = [float(v) for v in values]
    if len(xs) < n:
        raise StatsError(f"{what}: {len(xs)} value(s), a t-test needs at least {n} (run more seeds)")
    if any(math.isnan(x) or math.isinf(x) for x in xs):
        raise StatsError(f"{what}: non-finite values {xs}")
    return xs


def _p_from(t_num: float, se: float, df: float) -> tuple[float, float]:
    """(t, one-sided p = P(T <= t)); a zero standard error gives t = +-inf (p 0 or 1; 0/0 counts as no effect)."""
    if se > 0:
        t = t_num / se
        return t, t_cdf(t, df)
    if t_num < 0:
        return -math.inf, 0.0
    return (math.inf if t_num > 0 else 0.0), 1.0


def welch_one_sided(entry: Sequence[float], record: Sequence[float], margin: float = MARGIN_NATS
                    ) -> tuple[float, float, float]:
    """(t, df, p) of Welch's test of H1: mean(entry) - mean(record) < -margin (lower is better).

    Same as scipy.stats.ttest_ind(entry + margin, record, equal_var=False, alternative="less")."""
    x = _need(entry, "entry seeds")
    y = _need(record, "record seeds")
    mx, sx = mean_std(x)
    my, sy = mean_std(y)
    vx, vy = sx * sx / len(x), sy * sy / len(y)
    se2 = vx + vy
    denom = (vx * vx / (len(x) - 1) if vx else 0.0) + (vy * vy / (len(y) - 1) if vy else 0.0)
    df = se2 * se2 / denom if denom > 0 else float(len(x) + len(y) - 2)
    t, p = _p_from(mx - my + margin, math.sqrt(se2), df)
    return t, df, p


def one_sample_one_sided(entry: Sequence[float], record_value: float, margin: float = MARGIN_NATS
                         ) -> tuple[float, float, float]:
    """(t, df, p) of the one-sample test of H1: mean(entry) < record_value - margin.

    Same as scipy.stats.ttest_1samp(entry, record_value - margin, alternative="less")."""
    x = _need(entry, "entry seeds")
    mx, sx = mean_std(x)
    df = float(len(x) - 1)
    t, p = _p_from(mx - (float(record_value) - margin), sx / math.sqrt(len(x)), df)
    return t, df, p


@dataclass(frozen=True)
class SignificanceResult:
    """The outcome of the record test, in nats/token (lower is better)."""

    test: str  # "welch" (record given as seeds) or "one_sample" (record given as one value)
    n_entry: int
    n_record: int  # 1 for a single value
    entry_mean: float
    entry_std: float
    record_mean: float
    record_std: float | None  # None for a single value
    improvement: float  # record_mean - entry_mean (positive: the entry is better)
    margin: float
    t: float
    df: float
    p_value: float
    alpha: float
    passed: bool  # p_value < alpha
    unit: str = "nats/token"
    record_from: str = "val_loss"  # or "val_bpb (converted with the entry's bytes/token)"

    def summary(self) -> str:
        verdict = "PASSES" if self.passed else "does not pass"
        rec = (f"{self.n_record} record seeds" if self.test == "welch" else "the record's value")
        return (f"{self.improvement:+.5f} {self.unit} vs {rec} ({self.entry_mean:.5f} vs {self.record_mean:.5f}); "
                f"{'Welch' if self.test == 'welch' else 'one-sample'} t = {self.t:.3f}, df = {self.df:.2f}, "
                f"one-sided p = {self.p_value:.3g} for an improvement of at least {self.margin} nats: {verdict} "
                f"p < {self.alpha}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("t", "p_value", "df"):
            if isinstance(d[k], float) and math.isinf(d[k]):
                d[k] = "inf" if d[k] > 0 else "-inf"
        return d


def significance(entry: Sequence[float], record: float | Sequence[float], *, margin: float = MARGIN_NATS,
                 alpha: float = ALPHA, record_from: str = "val_loss") -> SignificanceResult:
    """Test that the entry's per-seed losses beat `record` (one value, or per-seed values) by `margin`.

    Both in the same unit (nats/token for the challenge's bar); see the module docstring for the choice of
    test."""
    x = _need(entry, "entry seeds")
    mx, sx = mean_std(x)
    if isinstance(record, (int, float)):
        t, df, p = one_sample_one_sided(x, float(record), margin)
        return SignificanceResult("one_sample", len(x), 1, mx, sx, float(record), None, float(record) - mx, margin,
                                  t, df, p, alpha, p < alpha, record_from=record_from)
    y = _need(record, "record seeds", n=1)
    if len(y) == 1:
        return significance(x, y[0], margin=margin, alpha=alpha, record_from=record_from)
    t, df, p = welch_one_sided(x, y, margin)
    my, sy = mean_std(y)
    return SignificanceResult("welch", len(x), len(y), mx, sx, my, sy, my - mx, margin, t, df, p, alpha, p < alpha,
                              record_from=record_from)


def compare_to_record(entry_val_loss: Sequence[float], entry_val_bpb: Sequence[float], *,
                      record_val_loss: float | Sequence[float] | None = None,
                      record_val_bpb: float | Sequence[float] | None = None, margin: float = MARGIN_NATS,
                      alpha: float = ALPHA) -> SignificanceResult:
    """The challenge's test from what is known of the record: its val_loss (nats, preferred) or its val_bpb
    (converted to nats with the entry's bytes/token ratio, seed by seed when the record is one value)."""
    loss = _need(entry_val_loss, "entry val_loss")
    bpb = _need(entry_val_bpb, "entry val_bpb")
    if len(loss) != len(bpb):
        raise StatsError(f"entry val_loss has {len(loss)} seeds but val_bpb {len(bpb)}; give both per seed")
    if record_val_loss is not None:
        return significance(loss, record_val_loss, margin=margin, alpha=alpha)
    if record_val_bpb is None:
        raise StatsError("give the record's val_loss (nats/token) or val_bpb")
    rhos = [bytes_per_token(lo, b) for lo, b in zip(loss, bpb)]
    how = "val_bpb (converted with the entry's bytes/token)"
    if isinstance(record_val_bpb, (int, float)) or len(record_val_bpb) == 1:
        rb = float(record_val_bpb if isinstance(record_val_bpb, (int, float)) else record_val_bpb[0])
        # per seed: the entry's loss minus the record's loss on that seed's (identical) stream
        diffs = [lo - bpb_to_nats(rb, r) for lo, r in zip(loss, rhos)]
        rec_nats = bpb_to_nats(rb, math.fsum(rhos) / len(rhos))
        t, df, p = one_sample_one_sided(diffs, 0.0, margin)
        mx, sx = mean_std(loss)
        return SignificanceResult("one_sample", len(loss), 1, mx, sx, rec_nats, None, rec_nats - mx, margin, t, df,
                                  p, alpha, p < alpha, record_from=how)
    rho = math.fsum(rhos) / len(rhos)
    return significance(loss, [bpb_to_nats(float(b), rho) for b in record_val_bpb], margin=margin, alpha=alpha,
                        record_from=how)
