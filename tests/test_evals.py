"""Eval methods on a smoke-sized model with perturbed weights and the first 1,025 tokens of the challenge's
real validation stream (sp1024): target and byte accounting, fast paths against plain references, the
equivalences between methods, the budget stop, and the distributed split (two gloo ranks)."""
from __future__ import annotations

import copy
import math
import os
import socket

import numpy as np
import pytest
import torch

from golfnb.bpb import build_byte_luts, count_stream_bytes
from golfnb.config import preset
from golfnb.data.shards import open_shard
from golfnb.evals.common import (EvalBudgetExceeded, IllegalMethodError, ScoreTrace, TiltHints,
                                 sliding_windows)
from golfnb.evals.plain import evaluate_plain
from golfnb.evals.sliding import evaluate_sliding
from golfnb.evals.slot import SLOT_VARIANTS, evaluate_slot, slot_pass
from golfnb.evals.tilt import compute_hints, evaluate_tilt
from golfnb.evals.ttt import evaluate_ttt
from golfnb.legality import make_check_model
from golfnb.optim import zeropower_via_newtonschulz5

N_TOKENS = 1025  # U = 1024 targets: 4 TTT chunks of 256, 61 sliding windows

# window 64 / stride 16 / 8 windows per forward; TTT chunks of 256 tokens = 4 rows of 64
CFG_KW = dict(eval_seq_len=64, eval_stride=16, eval_batch_seqs=8, ttt_chunk_tokens=256, ttt_batch_seqs=4,
              eval_budget_seconds=0.0)


def _cfg(**kw):
    return preset("smoke", **{**CFG_KW, **kw})


@pytest.fixture(scope="module")
def cfg():
    return _cfg()


@pytest.fixture(scope="module")
def stream(val_prefix_sp1024):
    return torch.from_numpy(np.asarray(open_shard(val_prefix_sp1024)[:N_TOKENS]).astype(np.int64))


@pytest.fixture(scope="module")
def luts(sp1024_model):
    return build_byte_luts(sp1024_model, 1024)


@pytest.fixture(scope="module")
def model(cfg):
    return make_check_model(cfg, seed=0)


@pytest.fixture(scope="module")
def sliding_ref(model, stream, cfg, luts):
    tr = ScoreTrace(want_logprobs=False)
    return evaluate_sliding(model, stream, cfg, luts, observer=tr), tr


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ------------------------------------------------------------------------------------------------ plain

def test_plain_scores_every_target_once_against_a_direct_loop(model, stream, cfg, luts):
    U = N_TOKENS - 1
    tr = ScoreTrace(want_logprobs=False)
    res = evaluate_plain(model, stream, cfg, luts, observer=tr)
    assert res["targets_scored"] == U
    assert res["bytes"] == count_stream_bytes(stream, luts)
    assert np.array_equal(np.sort(tr.scored_indices()), np.arange(1, U + 1))
    # reference: each non-overlapping window through model.nll, one at a time
    T, ref = cfg.eval_seq_len, 0.0
    with torch.no_grad():
        for ws in range(0, U, T):
            n = min(T, U - ws)
            ref += float(model.nll(stream[None, ws:ws + n], stream[None, ws + 1:ws + n + 1]).double().sum())
    assert res["loss_sum"] == pytest.approx(ref, rel=1e-9, abs=1e-6)
    assert res["val_bpb"] == pytest.approx(res["loss_sum"] / (res["bytes"] * math.log(2)), rel=1e-12)
    assert 2.0 < res["val_loss"] < 30.0  # a perturbed model: non-trivial, finite predictions
    assert set(res["phases"]) >= {"score"} and res["seconds"] > 0


# ------------------------------------------------------------------------------------------------ sliding

def test_window_layout_covers_each_target_once_with_full_context():
    for U, T, S in [(1024, 64, 16), (1000, 64, 16), (50, 64, 16), (4097, 128, 32), (10, 4, 1)]:
        p = sliding_windows(U, T, S)
        covered = np.concatenate([np.arange(f, l + 1) for f, l in zip(p.first_target, p.last_target)])
        assert np.array_equal(covered, np.arange(1, U + 1)), (U, T, S)
        later = p.starts > 0
        assert (p.score_from[later] == T - S).all() and (p.lens <= T).all()


def test_sliding_matches_a_per_target_reference_window(model, stream, cfg, luts):
    """The batched fast path (padding, head on scored positions only) against a plain recomputation of
    each sampled target's window from the sliding layout's formula, unpadded."""
    U, T, S = N_TOKENS - 1, cfg.eval_seq_len, cfg.eval_stride
    tr = ScoreTrace(want_logprobs=False)
    res = evaluate_sliding(model, stream, cfg, luts, observer=tr)
    assert res["targets_scored"] == U and res["bytes"] == count_stream_bytes(stream, luts)
    got = tr.nll_by_index()
    assert sorted(got) == list(range(1, U + 1))
    for p in [1, 17, 64, 65, 80, 81, 500, 1000, 1009, 1010, 1024]:
        ws = 0 if p <= T else -(-(p - T) // S) * S
        wlen = min(T, U - ws)
        if ws > 0:
            assert p - ws - 1 >= T - S  # at least window - stride tokens of context
        with torch.no_grad():
            nll = model.nll(stream[None, ws:ws + wlen], stream[None, ws + 1:ws + wlen + 1])[0, p - ws - 1]
        assert got[p] == pytest.approx(float(nll), abs=2e-5), p


def test_sliding_with_stride_equal_to_window_is_plain(model, stream, luts):
    c = _cfg(eval_stride=64)
    a = evaluate_sliding(model, stream, c, luts)
    b = evaluate_plain(model, stream, c, luts)
    assert a["targets_scored"] == b["targets_scored"] and a["bytes"] == b["bytes"]
    assert a["loss_sum"] == pytest.approx(b["loss_sum"], rel=1e-9)


def test_rank_shares_partition_the_work(model, stream, cfg, luts, sliding_ref):
    """Without a process group, each rank's share is visible: together they are the whole pass."""
    from golfnb.distributed import DistContext

    parts = [evaluate_sliding(model, stream, cfg, luts, DistContext(rank=r, world_size=3)) for r in range(3)]
    full = sliding_ref[0]
    assert sum(p["targets_scored"] for p in parts) == full["targets_scored"]
    assert sum(p["bytes"] for p in parts) == full["bytes"]
    assert sum(p["loss_sum"] for p in parts) == pytest.approx(full["loss_sum"], rel=1e-9)


# ------------------------------------------------------------------------------------------------ TTT

def test_ttt_with_zero_lr_is_sliding(model, stream, cfg, luts, sliding_ref):
    before = _state(model)
    res = evaluate_ttt(model, stream, cfg.replace(ttt_lr=0.0), luts)
    assert res["steps"] == 3 * 3  # 3 adapted chunks x 3 epochs x 1 micro-batch of 4 rows
    assert res["loss_sum"] == pytest.approx(sliding_ref[0]["loss_sum"], rel=1e-9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ttt_scores_first_adapts_and_restores(model, stream, cfg, luts, sliding_ref):
    before = _state(model)
    res = evaluate_ttt(model, stream, cfg, luts)
    assert res["targets_scored"] == N_TOKENS - 1 and res["bytes"] == count_stream_bytes(stream, luts)
    assert res["n_chunks"] == 4 and len(res["chunk_bpb"]) == 4
    assert abs(res["loss_sum"] - sliding_ref[0]["loss_sum"]) > 1e-3  # adaptation changed later chunks
    # chunk 0 is scored before any update, so it equals the sliding pass on targets 1..256
    ref = sliding_ref[1].nll_by_index()
    pos = torch.arange(1, 257)
    from golfnb.bpb import target_bytes

    b0 = int(target_bytes(stream[pos - 1], stream[pos], luts).sum())
    chunk0 = sum(ref[i] for i in range(1, 257)) / (b0 * math.log(2))
    assert res["chunk_bpb"][0] == pytest.approx(chunk0, rel=1e-9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored


def test_ttt_freeze_blocks_leaves_the_first_blocks_alone(cfg, stream, luts):
    m = make_check_model(cfg, seed=1)
    before = _state(m)
    res = evaluate_ttt(m, stream, cfg.replace(ttt_freeze_blocks=2), luts, restore_weights=False)
    after = m.state_dict()
    for k in before:
        same = torch.equal(before[k], after[k])
        if k.startswith(("blocks.0.", "blocks.1.")):
            assert same, k
    assert not torch.equal(before["blocks.2.attn.c_q.weight"], after["blocks.2.attn.c_q.weight"])
    assert res["frozen_params"] == sum(v.numel() for k, v in before.items() if k.startswith(("blocks.0.", "blocks.1.")))


def test_muon_ttt_moves_weights_by_newton_schulz_of_the_clipped_gradient(cfg, stream, luts):
    """Two chunks, one epoch, one micro-batch: exactly one update, after chunk 0, at lr = ttt_lr. Recompute it
    by hand: mean CE over chunk 0's four rows, global clip, then -lr*NS5(g) for matrices, -lr*g for vectors."""
    c = cfg.replace(ttt_epochs=1, ttt_lr=0.01, ttt_grad_clip=0.5)
    toks = stream[:2 * 256 + 1]
    m = make_check_model(c, seed=2)
    ref = copy.deepcopy(m)
    res = evaluate_ttt(m, toks, c, luts, optimizer="muon", restore_weights=False)
    assert res["steps"] == 1 and res["optimizer"] == "muon" and math.isfinite(res["val_bpb"])
    x = toks[:256].view(4, 64)
    y = toks[1:257].view(4, 64)
    ref.train()
    loss = ref.nll(x, y).sum() / 256
    loss.backward()
    params = [p for p in ref.parameters()]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    changed = 0
    with torch.no_grad():
        for (name, p_ref), p_new in zip(ref.named_parameters(), m.parameters()):
            u = zeropower_via_newtonschulz5(p_ref.grad.float(), 5) if p_ref.ndim >= 2 else p_ref.grad
            want = p_ref.detach().clone().add_(u.to(p_ref.dtype), alpha=-0.01)
            torch.testing.assert_close(p_new, want, rtol=1e-4, atol=1e-6, msg=name)
            changed += int(not torch.equal(p_new, p_ref))
    assert changed > 10


# ------------------------------------------------------------------------------------------------ tilt

def test_tilt_with_zero_strength_is_its_base_and_real_hints_fire(model, stream, cfg, luts, sliding_ref):
    hints = compute_hints(stream, cfg, luts)
    assert int((hints.hints >= 0).sum()) > 0  # the real text gives hints at these orders
    zero = TiltHints(hints.hints, torch.zeros_like(hints.betas))
    a = evaluate_tilt(model, stream, cfg, luts, base="sliding", hints=zero)
    assert a["method"] == "sliding+tilt"
    assert a["loss_sum"] == pytest.approx(sliding_ref[0]["loss_sum"], rel=1e-12)
    t = evaluate_tilt(model, stream, cfg, luts, base="sliding")
    assert t["tilt"]["hint_rate"] > 0 and t["tilt"]["scored_hint_rate"] == pytest.approx(t["tilt"]["hint_rate"])
    assert t["loss_sum"] != pytest.approx(sliding_ref[0]["loss_sum"], rel=1e-9)
    assert t["targets_scored"] == N_TOKENS - 1 and "ngram_precompute" in t["phases"]
    ttt0 = evaluate_ttt(model, stream, cfg, luts)
    tt = evaluate_tilt(model, stream, cfg, luts, base="ttt", hints=zero)
    assert tt["loss_sum"] == pytest.approx(ttt0["loss_sum"], rel=1e-12)


# ------------------------------------------------------------------------------------------------ SLOT

@pytest.mark.parametrize("variant", SLOT_VARIANTS)
def test_slot_without_steps_is_sliding(variant, model, stream, cfg, luts, sliding_ref):
    res = slot_pass(model, stream, cfg.replace(slot_steps=0), luts, variant=variant)
    assert res["targets_scored"] == N_TOKENS - 1 and res["optimizer_steps"] == 0
    assert res["loss_sum"] == pytest.approx(sliding_ref[0]["loss_sum"], rel=1e-6)


def test_slot_gate_and_labels(model, stream, cfg, luts, sliding_ref):
    ok = evaluate_slot(model, stream, cfg, luts, variant="context_per_window")
    assert ok["leaderboard_legal"] is True and ok["optimizer_steps"] > 0
    assert ok["loss_sum"] != pytest.approx(sliding_ref[0]["loss_sum"], rel=1e-9)
    with pytest.raises(IllegalMethodError, match="allow_illegal"):
        evaluate_slot(model, stream, cfg, luts, variant="standard")
    lines = []
    bad = evaluate_slot(model, stream, cfg, luts, variant="standard", allow_illegal=True, log=lines.append)
    assert bad["leaderboard_legal"] is False and "prefix_invariance" in bad["legality"]["failed_checks"]
    assert any("NOT leaderboard-legal" in ln for ln in lines)
    with pytest.warns(UserWarning, match="NOT leaderboard-legal"):  # no log: still said out loud
        evaluate_slot(model, stream, cfg.replace(allow_illegal=True), luts, variant="logit_bias")


# ------------------------------------------------------------------------------------------------ budget

def test_budget_stop_reports_the_projection(model, stream, cfg, luts):
    lines: list[str] = []
    with pytest.raises(EvalBudgetExceeded) as ei:
        evaluate_sliding(model, stream, cfg, luts, budget_seconds=1e-4, log=lines.append)
    e = ei.value
    assert e.projected_s > e.budget_s == 1e-4 and e.done == 3 and e.total == 8
    assert "projected" in str(e) and "continue_over_budget" in str(e)
    assert any("projected" in ln for ln in lines)
    with pytest.raises(EvalBudgetExceeded, match="chunks"):
        evaluate_ttt(model, stream, cfg, luts, budget_seconds=1e-4)
    res = evaluate_sliding(model, stream, cfg, luts, budget_seconds=1e-4, continue_over_budget=True)
    assert res["budget"]["over_budget"] and res["budget"]["projected_s"] > 1e-4
    assert res["targets_scored"] == N_TOKENS - 1


# ------------------------------------------------------------------------------------------------ run_evals

def test_run_evals_runs_the_configured_passes_in_order(stream, luts):
    from golfnb.evals.runner import run_evals

    c = _cfg(final_eval="ttt")
    m = make_check_model(c, seed=0)
    lines: list[str] = []
    res = run_evals(m, stream, c, luts, log=lines.append)
    assert list(res) == c.eval_methods() == ["plain", "sliding", "ttt"]
    assert res["ttt"]["method"] == "ttt+tilt" and res["ttt"]["is_final"] and not res["sliding"]["is_final"]
    assert res["sliding"]["method"] == "sliding"  # the tilt rides on the final pass only, as #1514
    assert all(r["targets_scored"] == N_TOKENS - 1 and r["leaderboard_legal"] is True for r in res.values())
    assert any(ln.startswith("final_eval:ttt method:ttt+tilt") for ln in lines)
    assert m.looping_active is True  # make_check_model turns looping on; run_evals put it back


def test_run_evals_refuses_an_illegal_pass_before_any_work(stream, luts):
    from golfnb.evals.runner import run_evals

    c = _cfg(slot_enabled=True, slot_variant="context_shared", final_eval="sliding", ttt_enabled=False)
    with pytest.raises(IllegalMethodError, match="slot:context_shared"):
        run_evals(make_check_model(c), stream, c, luts, check_legality=False)


# ------------------------------------------------------------------------------------------------ two ranks

def _worker(rank: int, world: int, port: int, val_path: str, sp_path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from golfnb.distributed import destroy, init_distributed

    ctx = init_distributed("cpu")
    try:
        c = _cfg()
        toks = torch.from_numpy(np.asarray(open_shard(val_path)[:N_TOKENS]).astype(np.int64))
        lu = build_byte_luts(sp_path, 1024)
        m = make_check_model(c, seed=0)
        r = {"sliding": evaluate_sliding(m, toks, c, lu, ctx), "ttt": evaluate_ttt(m, toks, c, lu, ctx),
             "tilt": evaluate_tilt(m, toks, c, lu, ctx, base="sliding")}
        if rank == 0:
            torch.save({k: (v["loss_sum"], v["targets_scored"], v["bytes"]) for k, v in r.items()}, out)
    finally:
        destroy()


def test_two_gloo_ranks_match_one_process(model, stream, cfg, luts, sliding_ref, tmp_path,
                                          val_prefix_sp1024, sp1024_model):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "dist.pt"
    mp.spawn(_worker, args=(2, port, str(val_prefix_sp1024), str(sp1024_model), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    one = {"sliding": sliding_ref[0], "ttt": evaluate_ttt(model, stream, cfg, luts),
           "tilt": evaluate_tilt(model, stream, cfg, luts, base="sliding")}
    for k, r in one.items():
        loss, n, b = got[k]
        assert (n, b) == (r["targets_scored"], r["bytes"]), k
        assert loss == pytest.approx(r["loss_sum"], rel=1e-6), k


# ------------------------------------------------------------------------------------------------ compiled forward

def test_eval_compile_policy(model, cfg):
    from golfnb.evals.common import scoring_forward

    assert scoring_forward(model, cfg.replace(eval_compile="auto")) is None  # CPU: eager
    assert scoring_forward(model, cfg.replace(eval_compile="off")) is None
    assert scoring_forward(model, cfg.replace(eval_compile="on")) is not None


def test_compiled_scoring_forward_matches_eager_and_sees_ttt_updates(stream, cfg, luts, tmp_path, monkeypatch):
    from golfnb.evals.runner import run_method

    monkeypatch.setenv("GOLFNB_CACHE_DIR", str(tmp_path))  # the persisted eval compile cache lands here

    # TTT: the compiled forward must read the weights as TTT changes them in place (a graph that froze them
    # as constants would score every chunk with the initial weights and give another number)
    on, off = cfg.replace(eval_compile="on", ttt_lr=0.05), cfg.replace(eval_compile="off", ttt_lr=0.05)
    torch._dynamo.reset()
    eager = run_method("ttt", make_check_model(cfg, seed=0), stream, off, luts)
    compiled = run_method("ttt", make_check_model(cfg, seed=0), stream, on, luts)
    frozen = run_method("ttt", make_check_model(cfg, seed=0), stream, off.replace(ttt_lr=0.0), luts)
    assert abs(eager["val_bpb"] - frozen["val_bpb"]) > 1e-3  # adaptation changes the score here
    assert compiled["val_bpb"] == pytest.approx(eager["val_bpb"], abs=2e-5)
    assert compiled["targets_scored"] == eager["targets_scored"]
