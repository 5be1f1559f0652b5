"""golfnb.legality: every method golfnb calls legal passes every check, and the checks catch the leaks the
records had (standard SLOT #1176, shared-delta context SLOT #1217, logit-bias SLOT #1229) plus synthetic
double-scoring, unnormalised and peeking methods, so each check is shown able to fail."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from golfnb.evals.common import EvalObserver
from golfnb.evals.plain import evaluate_plain
from golfnb.evals.sliding import evaluate_sliding
from golfnb.legality import (CHECKS, LEGAL_METHODS, check_config, check_method, check_stream, legality_report,
                             legality_verdict, make_check_model, synthetic_luts)


@pytest.mark.parametrize("method", LEGAL_METHODS)
def test_legal_methods_pass_every_check(method):
    rep = legality_report(method)
    assert rep.passed, rep.summary()
    assert set(rep.checks) == set(CHECKS)
    assert rep.checks["prefix_invariance"].checked > 100
    if method.endswith("+tilt"):
        assert rep.diagnostics["hint_rate"] > 0.2  # the check stream makes the n-gram hints fire
    if method.startswith(("ttt", "slot")):
        assert rep.diagnostics["mutations"] > 0  # the ordering check saw real updates


@pytest.mark.parametrize("variant,must_fail", [
    ("standard", ("prefix_invariance", "self_exclusion", "score_before_update")),
    ("context_shared", ("prefix_invariance", "self_exclusion", "score_before_update")),
    ("logit_bias", ("prefix_invariance", "self_exclusion", "score_before_update")),
])
def test_leaky_slot_variants_are_caught(variant, must_fail):
    rep = legality_report(f"slot:{variant}")
    assert not rep.passed
    for name in must_fail:
        assert not rep.checks[name].passed, rep.summary()
    # the leak is far above the tolerance, not a rounding artefact
    assert rep.checks["prefix_invariance"].max_diff > 1e3 * rep.atol
    # they still normalise and score each target once: the failure is causality, not accounting
    assert rep.checks["normalisation"].passed and rep.checks["score_once"].passed
    assert rep.diagnostics["self_prediction_advantage_nats"] > 0
    v = legality_verdict(f"slot:{variant}")
    assert v.legal is False and set(must_fail) <= set(v.failed)


def test_verdict_follows_the_settings():
    """Measured, not tabulated: standard SLOT with zero steps never moves its delta, so it passes."""
    cfg = check_config(None).replace(slot_steps=0)
    assert legality_verdict("slot:standard", cfg).legal is True
    assert legality_verdict("slot:standard").legal is False


def _tiny():
    cfg = check_config(None)
    return cfg, make_check_model(cfg), check_stream(vocab_size=cfg.vocab_size), synthetic_luts(cfg.vocab_size)


def test_double_scoring_is_caught():
    """Two passes reported into one log (a 'best of two passes' scheme) score every target twice."""
    def two_passes(model, tokens, cfg, luts, *, observer, adapt_tokens):
        evaluate_plain(model, tokens, cfg, luts, observer=observer)
        return evaluate_sliding(model, tokens, cfg, luts, observer=observer)

    cfg, model, toks, luts = _tiny()
    rep = check_method(two_passes, model, toks, cfg, luts, checks=("score_once",))
    assert not rep.checks["score_once"].passed and "more than once" in rep.checks["score_once"].detail


def test_unnormalised_scores_are_caught():
    """Boosting only the correct token's probability (PR #886's cache blend) without renormalising."""
    class Boost(EvalObserver):
        want_logprobs = True

        def __init__(self, inner):
            self.inner = inner

        def on_score(self, targets, nll, logprobs, deps):
            self.inner.on_score(targets, nll - 0.1, logprobs, deps)

        def on_mutation(self, state, max_index, kind):
            self.inner.on_mutation(state, max_index, kind)

    def boosted(model, tokens, cfg, luts, *, observer, adapt_tokens):
        return evaluate_sliding(model, tokens, cfg, luts, observer=Boost(observer))

    cfg, model, toks, luts = _tiny()
    rep = check_method(boosted, model, toks, cfg, luts, checks=("normalisation",))
    assert not rep.checks["normalisation"].passed and rep.checks["normalisation"].violations > 0


def test_peeking_at_the_target_is_caught():
    """A forward that sees each position's own target (inputs shifted by one) breaks prefix invariance."""
    def peek(model, tokens, cfg, luts, *, observer, adapt_tokens):
        return evaluate_sliding(model, tokens, cfg, luts, observer=observer,
                                hidden_fn=lambda x: model.hidden(torch.roll(x, -1, dims=1)))

    cfg, model, toks, luts = _tiny()
    rep = check_method(peek, model, toks, cfg, luts, checks=("prefix_invariance", "self_exclusion"))
    assert not rep.checks["prefix_invariance"].passed
    assert rep.checks["self_exclusion"].passed  # it adapts nothing: the leak is in scoring, not adaptation


def test_check_on_a_callers_model_and_real_bytes(sp1024_model, val_prefix_sp1024):
    """check_method on a model, stream, config and tokenizer LUTs the caller supplies."""
    from golfnb.bpb import build_byte_luts
    from golfnb.data.shards import open_shard

    cfg = check_config(None)
    model = make_check_model(cfg, seed=3)
    toks = torch.from_numpy(np.asarray(open_shard(val_prefix_sp1024)[:257]).astype(np.int64))
    luts = build_byte_luts(sp1024_model, 1024)
    rep = check_method("sliding", model, toks, cfg, luts, n_positions=2)
    assert rep.passed, rep.summary()
    with pytest.raises(ValueError, match="also pass tokens"):
        check_method("sliding", model)
