"""golfnb.stats against scipy (a dev dependency only): the t distribution's CDF, Welch's one-sided test, the
one-sample test, and the bpb -> nats conversion the challenge's 0.005-nat bar needs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from golfnb import stats

scipy_stats = pytest.importorskip("scipy.stats")


def test_t_cdf_matches_scipy_over_a_wide_range():
    rng = np.random.default_rng(0)
    dfs = np.concatenate([[0.5, 1.0, 1.7, 2.0, 3.45, 4.0, 30.0, 1e4], rng.uniform(0.3, 300, 200)])
    worst_abs = worst_rel = 0.0
    for df in dfs:
        for t in np.concatenate([[-60.0, -8.0, 0.0, 0.3, 2.5, 40.0], rng.normal(0, 4, 20)]):
            ours, ref = stats.t_cdf(float(t), float(df)), float(scipy_stats.t.cdf(t, df))
            worst_abs = max(worst_abs, abs(ours - ref))
            if 0 < ref < 1e-3:  # the p-value region: relative accuracy matters there
                worst_rel = max(worst_rel, abs(ours - ref) / ref)
    assert worst_abs < 1e-11 and worst_rel < 1e-9
    assert stats.t_cdf(math.inf, 3) == 1.0 and stats.t_cdf(-math.inf, 3) == 0.0
    # closed forms (df 1: Cauchy, df 2), also where scipy itself rounds (|t| ~ 1e-9)
    for t in (-1e-9, 1e-9, -3e-5, 0.7, -25.0):
        assert stats.t_cdf(t, 1.0) == pytest.approx(0.5 + math.atan(t) / math.pi, rel=1e-13, abs=1e-16)
        assert stats.t_cdf(t, 2.0) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), rel=1e-13, abs=1e-16)
    with pytest.raises(stats.StatsError, match="degrees of freedom"):
        stats.t_cdf(1.0, 0)


def test_betainc_matches_scipy():
    special = pytest.importorskip("scipy.special")
    for a, b, x in [(0.5, 0.5, 0.3), (2.0, 0.5, 0.99), (10.0, 3.0, 0.5), (0.1, 20.0, 1e-4), (150.0, 0.5, 0.999)]:
        assert stats.betainc(a, b, x) == pytest.approx(float(special.betainc(a, b, x)), rel=1e-12, abs=1e-15)
    assert stats.betainc(2, 3, 0.0) == 0.0 and stats.betainc(2, 3, 1.0) == 1.0


# seeds of an entry and of a record, nats/token, spread like real 3-5 seed records
CASES = [
    ([2.7810, 2.7822, 2.7805], [2.7900, 2.7915, 2.7893]),
    ([2.7810, 2.7822, 2.7805, 2.7818, 2.7811], [2.7850, 2.7862, 2.7871]),
    ([2.7900, 2.7910, 2.7895], [2.7900, 2.7915, 2.7893]),  # no improvement at all
    ([2.7600, 2.7950, 2.7700], [2.7900, 2.7901, 2.7899]),  # noisy entry
]


@pytest.mark.parametrize("entry,record", CASES)
def test_welch_matches_scipy_ttest_ind(entry, record):
    t, df, p = stats.welch_one_sided(entry, record, margin=0.005)
    # H1: mean(entry) - mean(record) < -0.005  <=>  mean(entry + 0.005) < mean(record)
    ref = scipy_stats.ttest_ind(np.add(entry, 0.005), record, equal_var=False, alternative="less")
    assert t == pytest.approx(float(ref.statistic), rel=1e-10)
    assert p == pytest.approx(float(ref.pvalue), rel=1e-9, abs=1e-15)
    assert df == pytest.approx(float(ref.df), rel=1e-10)


@pytest.mark.parametrize("entry,record", CASES)
def test_one_sample_matches_scipy_ttest_1samp(entry, record):
    value = float(np.mean(record))
    t, df, p = stats.one_sample_one_sided(entry, value, margin=0.005)
    ref = scipy_stats.ttest_1samp(entry, value - 0.005, alternative="less")
    assert t == pytest.approx(float(ref.statistic), rel=1e-10)
    assert p == pytest.approx(float(ref.pvalue), rel=1e-9, abs=1e-15)
    assert df == len(entry) - 1


def test_significance_picks_the_test_and_the_verdict():
    entry, record = CASES[0]
    w = stats.significance(entry, record)
    assert w.test == "welch" and w.n_record == 3 and w.passed == (w.p_value < 0.01)
    one = stats.significance(entry, float(np.mean(record)))
    assert one.test == "one_sample" and one.record_std is None
    # the single value ignores the record's seed noise (a smaller standard error, so a larger |t|) but has
    # fewer degrees of freedom (n - 1): its p-value can land on either side of Welch's
    assert abs(one.t) >= abs(w.t) and one.df == 2 and w.df > 2
    assert stats.significance(entry, [2.79]).test == "one_sample"
    flat = stats.significance(*CASES[2])
    assert not flat.passed and flat.improvement < 0.005 and flat.p_value > 0.5
    assert "does not pass" in flat.summary() and ("PASSES" in w.summary()) == w.passed
    with pytest.raises(stats.StatsError, match="at least 2"):
        stats.significance([2.78], 2.79)


def test_bpb_and_nats_conversions_use_the_bytes_per_token_ratio():
    # SP8192's stream: 40,540,160 targets, 151,078,222 bytes
    rho = 151_078_222 / 40_540_160
    loss = 2.7918
    bpb = loss / (math.log(2) * rho)
    assert stats.bytes_per_token(loss, bpb) == pytest.approx(rho, rel=1e-12)
    assert stats.bpb_to_nats(bpb, rho) == pytest.approx(loss, rel=1e-12)
    assert stats.nats_to_bpb(0.005, rho) == pytest.approx(0.001936, abs=5e-7)  # the bar in bpb for SP8192


def test_compare_to_record_in_bpb_equals_the_test_in_nats():
    rho = 3.726631
    entry_loss = [2.7810, 2.7822, 2.7805]
    entry_bpb = [lo / (math.log(2) * rho) for lo in entry_loss]
    record_bpb = 1.0798
    by_bpb = stats.compare_to_record(entry_loss, entry_bpb, record_val_bpb=record_bpb)
    by_nats = stats.compare_to_record(entry_loss, entry_bpb, record_val_loss=record_bpb * math.log(2) * rho)
    assert by_bpb.test == by_nats.test == "one_sample"
    assert by_bpb.p_value == pytest.approx(by_nats.p_value, rel=1e-9)
    assert by_bpb.record_mean == pytest.approx(by_nats.record_mean, rel=1e-12)
    seeds = stats.compare_to_record(entry_loss, entry_bpb, record_val_bpb=[1.0796, 1.0799, 1.0800])
    ref = scipy_stats.ttest_ind(np.add(entry_loss, 0.005), [b * math.log(2) * rho for b in (1.0796, 1.0799, 1.0800)],
                                equal_var=False, alternative="less")
    assert seeds.test == "welch" and seeds.p_value == pytest.approx(float(ref.pvalue), rel=1e-8)
    with pytest.raises(stats.StatsError, match="val_loss .* or val_bpb"):
        stats.compare_to_record(entry_loss, entry_bpb)
    with pytest.raises(stats.StatsError, match="per seed"):
        stats.compare_to_record(entry_loss, entry_bpb[:2], record_val_bpb=1.08)


def test_mean_std_is_the_sample_std():
    m, s = stats.mean_std([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3) and s == pytest.approx(float(np.std([1.0, 2.0, 4.0], ddof=1)))
    assert stats.mean_std([3.0]) == (3.0, 0.0)
    with pytest.raises(stats.StatsError):
        stats.mean_std([])
