"""golfnb.optim on CPU: Newton-Schulz, Muon against a plain loop, banks against separate matrices, the
bundle's groups / clipping / complete state, the LR and momentum schedules, and the EMA."""
from __future__ import annotations

import functools
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from golfnb.config import ConfigError, preset
from golfnb.optim import (EMA, Muon, ParallelMuon, RoundRobinMuon, build_optimizers, lr_multiplier,
                          muon_momentum_at, zeropower_via_newtonschulz5)

# --------------------------------------------------------------------------- a tiny model with roles

V, D, L, KV, HID = 48, 16, 2, 8, 32


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_q = nn.Linear(D, D, bias=False)
        self.c_k = nn.Linear(D, KV, bias=False)
        self.c_v = nn.Linear(D, KV, bias=False)
        self.proj = nn.Linear(D, D, bias=False)


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, HID, bias=False)
        self.proj = nn.Linear(HID, D, bias=False)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attn()
        self.mlp = _Mlp()
        self.attn_scale = nn.Parameter(torch.ones(D))


class Toy(nn.Module):
    """Names and roles as golfnb.model uses them; a bf16 tied embedding; banked or per-layer matrices."""

    def __init__(self, banked: bool, untied_head: bool = False, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.banked = banked
        self.tok_emb = nn.Embedding(V, D).to(torch.bfloat16)
        self.blocks = nn.ModuleList(_Block() for _ in range(L))
        if banked:
            for blk in self.blocks:  # banks replace the per-layer linears
                del blk.attn, blk.mlp
            self.qo_bank = nn.Parameter(torch.empty(2 * L, D, D))
            self.kv_bank = nn.Parameter(torch.empty(2 * L, KV, D))
            self.mlp_up_bank = nn.Parameter(torch.empty(L, HID, D))
            self.mlp_down_bank = nn.Parameter(torch.empty(L, D, HID))
        self.skip_weight = nn.Parameter(torch.full((D,), 0.5))
        self.lm_head = nn.Linear(D, V, bias=False) if untied_head else None
        with torch.no_grad():
            for _, p in sorted(self.named_parameters()):
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def param_roles(self) -> dict[str, str]:
        roles = {}
        for n, p in self.named_parameters():
            if n.endswith("_bank") or (n.startswith("blocks.") and p.ndim == 2):
                roles[n] = "matrix"
            elif n == "tok_emb.weight":
                roles[n] = "embed"
            elif n == "lm_head.weight":
                roles[n] = "head"
            else:
                roles[n] = "scalar"
        return roles

    def weights(self, i: int) -> tuple[torch.Tensor, ...]:
        if self.banked:
            return (self.qo_bank[i], self.kv_bank[i], self.kv_bank[L + i], self.qo_bank[L + i],
                    self.mlp_up_bank[i], self.mlp_down_bank[i])
        b = self.blocks[i]
        return (b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight, b.attn.proj.weight,
                b.mlp.fc.weight, b.mlp.proj.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(ids).float()
        x0 = x
        for i in range(L):
            wq, wk, wv, wo, wup, wdown = self.weights(i)
            q = x @ wq.T
            kv = (x @ wk.T) * (x @ wv.T)
            a = torch.tanh(q + torch.cat([kv, kv], dim=-1))
            x = x + self.blocks[i].attn_scale * (a @ wo.T)
            x = x + F.relu(x @ wup.T).square() @ wdown.T
        x = x + self.skip_weight * x0
        w = self.lm_head.weight if self.lm_head is not None else self.tok_emb.weight.float()
        logits = x[:, :-1] @ w.T
        return F.cross_entropy(logits.reshape(-1, V).float(), ids[:, 1:].reshape(-1))


def unbanked_params(m: Toy) -> dict[str, torch.Tensor]:
    """The matrices under per-layer names (whatever the layout) plus every other parameter."""
    out = {}
    for i in range(L):
        for k, t in zip(("q", "k", "v", "o", "up", "down"), m.weights(i)):
            out[f"{i}.{k}"] = t.detach().clone()
    for n, p in m.named_parameters():
        if not (n.endswith("_bank") or ".attn." in n or ".mlp." in n):
            out[n] = p.detach().clone()
    return out


def bank_copy_of(unbanked: Toy) -> Toy:
    m = Toy(banked=True)
    with torch.no_grad():
        for i in range(L):
            for dst, src in zip(m.weights(i), unbanked.weights(i)):
                dst.copy_(src)
        for n, p in unbanked.named_parameters():
            if not (".attn." in n or ".mlp." in n):
                m.get_parameter(n).copy_(p)
    return m


# Newton-Schulz in float64, for comparisons between batched and per-matrix forms: in bf16 a batched product
# can round differently from a single one on some CPUs, and five iterations amplify that to ~1 %.
NS64 = functools.partial(zeropower_via_newtonschulz5, dtype=torch.float64)


def cfg_for(banked: bool, **kw):
    base = dict(bank_params=banked, matrix_lr=0.03, scalar_lr=0.02, tied_embed_lr=0.05, muon_wd=0.05,
                embed_wd=0.04, adam_wd=0.02, muon_momentum=0.95, muon_momentum_warmup_start=0.85,
                muon_momentum_warmup_steps=4, grad_clip_norm=0.0, compile_mode="none")
    base.update(kw)
    return preset("smoke", **base)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(1000 + step))


def train(model: Toy, bundle, steps: range, ema: EMA | None = None) -> None:
    for s in steps:
        model(batch(s)).backward()
        bundle.step(s, lr_scale=1.0 - 0.1 * s)
        bundle.zero_grad()
        if ema is not None:
            ema.update(model)


# --------------------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (40, 40), (5, 24, 40)])
def test_ns5_output_is_near_orthogonal(shape):
    torch.manual_seed(0)
    O = zeropower_via_newtonschulz5(torch.randn(*shape))
    assert O.dtype == torch.bfloat16 and O.shape == shape
    s = torch.linalg.svdvals(O.float())
    # the quintic's known band: five steps leave every singular value in roughly [0.68, 1.14]
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())


def test_ns5_batched_equals_per_matrix_and_scale_invariant():
    torch.manual_seed(1)
    G = torch.randn(4, 24, 40)
    batched = zeropower_via_newtonschulz5(G)
    single = torch.stack([zeropower_via_newtonschulz5(g) for g in G])
    # bf16: a batched product may round differently from a single one on some CPUs, so a loose band (a
    # slice mix-up would be off by ~0.2); float64: the same numbers
    torch.testing.assert_close(batched.float(), single.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(NS64(G), torch.stack([NS64(g) for g in G]), atol=1e-12, rtol=0)
    # per-matrix Frobenius normalisation: scaling one slice (by a power of two, exact in bf16) leaves its
    # output alone and the other slices untouched
    G2 = G.clone()
    G2[1] *= 1024.0
    out2 = zeropower_via_newtonschulz5(G2)
    torch.testing.assert_close(out2[1].float(), batched[1].float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(out2[0].float(), batched[0].float(), atol=2e-2, rtol=0)
    assert NS64(G).dtype == torch.float64
    with pytest.raises(ValueError, match="matrix"):
        zeropower_via_newtonschulz5(torch.randn(5))


# --------------------------------------------------------------------------- Muon vs a plain loop


def _ref_ns(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if tall else X


@pytest.mark.parametrize("nesterov,row_normalize,wd", [(True, True, 0.1), (False, False, 0.0),
                                                       (True, False, 0.0), (False, True, 0.05)])
def test_muon_matches_plain_loop(nesterov, row_normalize, wd):
    torch.manual_seed(2)
    shapes = [(16, 32), (48, 16), (24, 24)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros(s) for s in shapes]
    opt = Muon(params, lr=0.02, momentum=0.9, nesterov=nesterov, row_normalize=row_normalize, weight_decay=wd)
    for step in range(4):
        lr, mu = 0.02 * (1 - 0.2 * step), 0.85 + 0.03 * step
        for g in opt.param_groups:
            g["lr"], g["momentum"] = lr, mu
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            bufs[i] = mu * bufs[i] + g
            u = g + mu * bufs[i] if nesterov else bufs[i]
            if row_normalize:
                u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-7)
            o = _ref_ns(u) * math.sqrt(max(1.0, u.shape[0] / u.shape[1]))
            ref[i] = ref[i] * (1 - lr * wd) - lr * o.float()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, atol=1e-6, rtol=1e-6)


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="AdamW"):
        Muon([nn.Parameter(torch.ones(8))])


def test_bank_equals_separate_matrices():
    torch.manual_seed(3)
    bank = nn.Parameter(torch.randn(3, 16, 40))
    mats = [nn.Parameter(bank.detach()[i].clone()) for i in range(3)]
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, row_normalize=True, weight_decay=0.1)
    ob, om = Muon([bank], ns_fn=NS64, **kw), Muon(mats, ns_fn=NS64, **kw)
    for _ in range(3):
        g = torch.randn(3, 16, 40)
        bank.grad = g.clone()
        for i, m in enumerate(mats):
            m.grad = g[i].clone()
        ob.step()
        om.step()
    torch.testing.assert_close(bank.detach(), torch.stack([m.detach() for m in mats]), atol=1e-6, rtol=1e-6)


def test_round_robin_single_rank_equals_muon():
    # The batched-by-shape form (with W = 1: no communication) against the per-matrix reference, with two
    # param groups, repeated shapes, and a matrix that gets no gradient on one step.
    torch.manual_seed(7)
    shapes = [(16, 32), (16, 32), (40, 16), (16, 32), (40, 16), (24, 24)]
    ps = [nn.Parameter(torch.randn(s)) for s in shapes]
    twins = [nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, row_normalize=True, weight_decay=0.1)
    rr = RoundRobinMuon([{"params": ps[:4]}, {"params": ps[4:], "weight_decay": 0.0}], ns_fn=NS64, **kw)
    mu = Muon([{"params": twins[:4]}, {"params": twins[4:], "weight_decay": 0.0}], ns_fn=NS64, **kw)
    for step in range(3):
        for i, (p, t) in enumerate(zip(ps, twins)):
            g = None if (step == 1 and i == 1) else torch.randn(p.shape)
            p.grad, t.grad = (None, None) if g is None else (g.clone(), g.clone())
        rr.step()
        mu.step()
    for p, t in zip(ps, twins):
        torch.testing.assert_close(p.detach(), t.detach(), atol=1e-5, rtol=1e-5)
    for m1, m2 in zip(rr.export_momentum(), mu.export_momentum()):
        torch.testing.assert_close(m1, m2, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="2-D"):
        RoundRobinMuon([nn.Parameter(torch.randn(2, 4, 4))])


def test_parallel_muon_single_rank_equals_muon():
    # The sharded form with W = 1 runs the same phases without communication; standalone step() works too.
    torch.manual_seed(4)
    banks = [nn.Parameter(torch.randn(3, 16, 32)), nn.Parameter(torch.randn(2, 32, 16))]
    twins = [nn.Parameter(b.detach().clone()) for b in banks]
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, row_normalize=True, weight_decay=0.1)
    pm, mu = ParallelMuon(banks, rank=0, world_size=1, **kw), Muon(twins, **kw)
    for _ in range(3):
        for b, t in zip(banks, twins):
            g = torch.randn(b.shape)
            b.grad, t.grad = g.clone(), g.clone()
        pm.step()
        mu.step()
    for b, t in zip(banks, twins):
        torch.testing.assert_close(b.detach(), t.detach(), atol=0, rtol=0)
    for m1, m2 in zip(pm.export_momentum(), mu.export_momentum()):
        torch.testing.assert_close(m1, m2, atol=0, rtol=0)
    with pytest.raises(ValueError, match="3-D"):
        ParallelMuon([nn.Parameter(torch.randn(4, 4))], rank=0, world_size=1)


# --------------------------------------------------------------------------- the bundle


def test_bundle_groups_and_per_step_values():
    cfg = cfg_for(False)
    model = Toy(banked=False, untied_head=True)
    b = build_optimizers(model, cfg)
    groups = {g["name"]: g for g in b.adam.param_groups}
    names = {n for n, _ in model.named_parameters()}
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in groups["embed"]["params"]} == {"tok_emb.weight"}
    assert {by_id[id(p)] for p in groups["head"]["params"]} == {"lm_head.weight"}
    scal = {by_id[id(p)] for p in groups["scalar"]["params"]}
    assert scal == {n for n in names if n.endswith("attn_scale")} | {"skip_weight"}
    assert len(b.muon.params_in_order()) == 6 * L
    assert groups["embed"]["weight_decay"] == cfg.embed_wd and groups["scalar"]["weight_decay"] == cfg.adam_wd
    assert groups["head"]["weight_decay"] == 0.0
    b.set_hyperparameters(step=2, lr_scale=0.5)
    lrs = b.current_lrs()
    assert lrs == pytest.approx({"embed": 0.5 * cfg.tied_embed_lr, "scalar": 0.5 * cfg.scalar_lr,
                                 "head": 0.5 * cfg.head_lr, "matrix": 0.5 * cfg.matrix_lr})
    assert b.muon.param_groups[0]["momentum"] == pytest.approx(0.85 + 0.5 * (0.95 - 0.85))
    assert b.muon.param_groups[0]["weight_decay"] == cfg.muon_wd


def test_bundle_rejects_bad_models():
    cfg = cfg_for(False)

    class NoRoles(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(4, 4))

    with pytest.raises(TypeError, match="param_roles"):
        build_optimizers(NoRoles(), cfg)

    class VectorMatrix(NoRoles):
        def __init__(self) -> None:
            super().__init__()
            self.v = nn.Parameter(torch.ones(4))

        def param_roles(self):
            return {"w": "matrix", "v": "matrix"}

    with pytest.raises(ValueError, match="scalar"):
        build_optimizers(VectorMatrix(), cfg)

    class Missing(NoRoles):
        def param_roles(self):
            return {}

    with pytest.raises(ValueError, match="no role"):
        build_optimizers(Missing(), cfg)
    with pytest.raises(ConfigError, match="bank_params"):
        build_optimizers(Toy(banked=True), cfg_for(False))
    with pytest.raises(ConfigError, match="bank_params"):
        build_optimizers(Toy(banked=False), cfg_for(True))


def test_bundle_banked_equals_unbanked():
    # Same weights, same data: the banked model's bank slices follow the per-layer model's matrices.
    mu = Toy(banked=False)
    mb = bank_copy_of(mu)
    bu = build_optimizers(mu, cfg_for(False, grad_clip_norm=0.5), ns_fn=NS64)
    bb = build_optimizers(mb, cfg_for(True, grad_clip_norm=0.5), ns_fn=NS64)
    train(mu, bu, range(4))
    train(mb, bb, range(4))
    pu, pb = unbanked_params(mu), unbanked_params(mb)
    assert pu.keys() == pb.keys()
    for k in pu:
        # a bf16 parameter may land one rounding step apart if an fp32 input to its update differs in
        # the last bit (the banked gradient is assembled by a different backward)
        rtol = 2.0 ** -7 if pu[k].dtype == torch.bfloat16 else 1e-4
        diff = float((pb[k].float() - pu[k].float()).abs().max())
        assert torch.allclose(pb[k].float(), pu[k].float(), atol=1e-4, rtol=rtol), (k, diff)


def test_bundle_global_clip_matches_clip_grad_norm():
    torch.manual_seed(5)
    m1, m2 = Toy(banked=True), Toy(banked=True)
    b1 = build_optimizers(m1, cfg_for(True, grad_clip_norm=0.05))
    b2 = build_optimizers(m2, cfg_for(True, grad_clip_norm=0.0))
    for s in range(3):
        m1(batch(s)).backward()
        m2(batch(s)).backward()
        # clip_grad_norm_'s rule, with the norm accumulated in fp32 (torch's own would round the bf16
        # embedding gradient's norm to bf16 first)
        grads = [p.grad for p in m2.parameters()]
        total = torch.sqrt(sum(g.float().square().sum() for g in grads))
        coef = (0.05 / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef)
        b1.step(s, 1.0)
        b2.step(s, 1.0)
        b1.zero_grad()
        b2.zero_grad()
        assert total > 0.05  # the clip is active in this test
        torch.testing.assert_close(b1.last_grad_norm, total, rtol=1e-5, atol=0)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("banked", [False, True])
def test_state_dict_resume_is_bit_identical(banked):
    cfg = cfg_for(banked, grad_clip_norm=1.0)
    # uninterrupted
    ma = Toy(banked=banked)
    ba = build_optimizers(ma, cfg)
    ea = EMA(ma, 0.9)
    train(ma, ba, range(6), ea)
    # interrupted after 3 steps, everything saved, restored into fresh objects
    mb = Toy(banked=banked)
    bb = build_optimizers(mb, cfg)
    eb = EMA(mb, 0.9)
    train(mb, bb, range(3), eb)
    blob = io.BytesIO()
    torch.save({"model": mb.state_dict(), "opt": bb.state_dict(), "ema": eb.state_dict()}, blob)
    blob.seek(0)
    ck = torch.load(blob, weights_only=True)
    mc = Toy(banked=banked, seed=99)  # different initial weights: everything must come from the checkpoint
    mc.load_state_dict(ck["model"])
    bc = build_optimizers(mc, cfg)
    bc.load_state_dict(ck["opt"])
    ec = EMA(mc, 0.5)
    ec.load_state_dict(ck["ema"])
    train(mc, bc, range(3, 6), ec)
    for (n, pa), pc in zip(ma.named_parameters(), mc.parameters()):
        assert torch.equal(pa, pc), n
    for k in ea.shadow:
        assert torch.equal(ea.shadow[k], ec.shadow[k]), k
    sa, sc = ba.state_dict(), bc.state_dict()
    assert sa["muon_momentum"].keys() == sc["muon_momentum"].keys() and len(sa["muon_momentum"]) > 0
    for k in sa["muon_momentum"]:
        assert torch.equal(sa["muon_momentum"][k], sc["muon_momentum"][k]), k


@pytest.mark.parametrize("banked", [False, True])
def test_restoring_step0_snapshot_forgets_warmup(banked):
    # The compile warm-up of the records: snapshot, train, restore. Afterwards training must equal a fresh run
    # (no momentum or Adam moments leak from the thrown-away steps).
    cfg = cfg_for(banked)
    mf = Toy(banked=banked)
    bf = build_optimizers(mf, cfg)
    train(mf, bf, range(3))
    mw = Toy(banked=banked)
    bw = build_optimizers(mw, cfg)
    snap_model = {k: v.clone() for k, v in mw.state_dict().items()}
    snap_opt = bw.state_dict()
    train(mw, bw, range(5))  # warm-up steps
    mw.load_state_dict(snap_model)
    bw.load_state_dict(snap_opt)
    assert all(not t.any() for t in bw.state_dict()["muon_momentum"].values())
    train(mw, bw, range(3))
    for (n, pf), pw in zip(mf.named_parameters(), mw.parameters()):
        assert torch.equal(pf, pw), n
    # a mid-run snapshot is not aliased by the optimizer that loads it: restoring it twice gives the same run
    mid = bw.state_dict()
    mid_model = {k: v.clone() for k, v in mw.state_dict().items()}
    finals = []
    for _ in range(2):
        mw.load_state_dict(mid_model)
        bw.load_state_dict(mid)
        train(mw, bw, range(3, 5))
        finals.append([p.detach().clone() for p in mw.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_compiled_ns_does_not_recompile_when_lr_and_momentum_change():
    graphs = []

    def counting_backend(gm, example_inputs):  # runs the captured graph eagerly, counting compiles
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    ns = torch.compile(zeropower_via_newtonschulz5, backend=counting_backend, dynamic=False)
    model = Toy(banked=True)
    b = build_optimizers(model, cfg_for(True), ns_fn=ns)
    train(model, b, range(2))
    after_first = len(graphs)
    assert after_first == 4  # one graph per bank shape
    train(model, b, range(2, 6))  # lr_scale and warm-up momentum change every step
    assert len(graphs) == after_first
    torch._dynamo.reset()


# --------------------------------------------------------------------------- schedules


def test_lr_multiplier_wallclock_and_step_modes():
    cfg = preset("pr1514")  # 600 s clock, 12 s GPTQ reserve, warmdown_frac 0.667
    cap = cfg.training_cap_seconds
    assert cap == 588.0
    assert lr_multiplier(cfg, 0, 0.0) == 1.0
    assert lr_multiplier(cfg, 100, 0.30 * cap) == 1.0
    assert lr_multiplier(cfg, 100, 0.333 * cap) == pytest.approx(1.0, abs=1e-9)
    assert lr_multiplier(cfg, 100, 0.5 * cap) == pytest.approx(0.5 / 0.667)
    assert lr_multiplier(cfg, 100, 0.9 * cap) == pytest.approx(0.1 / 0.667)
    assert lr_multiplier(cfg, 100, cap) == 0.0
    assert lr_multiplier(cfg, 100, 1.2 * cap) == 0.0
    floor = cfg.replace(min_lr=0.1)
    assert lr_multiplier(floor, 100, 0.95 * cap) == pytest.approx(0.1)
    assert lr_multiplier(floor, 100, 0.5 * cap) == pytest.approx(0.5 / 0.667)
    steps = cfg.replace(max_wallclock_seconds=0.0, iterations=1000, warmdown_frac=0.72)
    assert lr_multiplier(steps, 279, 1e6) == 1.0  # the clock is ignored without a cap
    assert lr_multiplier(steps, 500, 0.0) == pytest.approx(0.5 / 0.72)
    assert lr_multiplier(steps, 1000, 0.0) == 0.0
    off = cfg.replace(warmdown_frac=0.0)
    assert lr_multiplier(off, 10, 0.99 * cap) == 1.0


def test_lr_multiplier_warmdown_iters_form():
    by_step = preset("pr1514", max_wallclock_seconds=0.0, iterations=1000, warmdown_iters=200)
    assert lr_multiplier(by_step, 799, 0.0) == 1.0
    assert lr_multiplier(by_step, 800, 0.0) == 1.0
    assert lr_multiplier(by_step, 900, 0.0) == pytest.approx(0.5)
    assert lr_multiplier(by_step, 1000, 0.0) == 0.0
    clock = preset("pr1514", warmdown_iters=100)  # cap 588 s
    assert lr_multiplier(clock, 400, 400.0, avg_step_s=1.0) == 1.0  # 188 s left > 100 steps * 1 s
    assert lr_multiplier(clock, 538, 538.0, avg_step_s=1.0) == pytest.approx(0.5)
    assert lr_multiplier(clock, 269, 538.0) == pytest.approx(50.0 / 200.0)  # avg step = 538 / 269 = 2 s
    assert lr_multiplier(clock.replace(min_lr=0.3), 538, 538.0, avg_step_s=1.0) == pytest.approx(0.5)
    assert lr_multiplier(clock.replace(min_lr=0.3), 580, 580.0, avg_step_s=1.0) == pytest.approx(0.3)


def test_muon_momentum_warmup():
    cfg = preset("pr1514")  # 0.92 -> 0.97 over 1500 steps
    assert muon_momentum_at(cfg, 0) == pytest.approx(0.92)
    assert muon_momentum_at(cfg, 750) == pytest.approx(0.945)
    assert muon_momentum_at(cfg, 1500) == pytest.approx(0.97)
    assert muon_momentum_at(cfg, 3000) == pytest.approx(0.97)
    assert muon_momentum_at(cfg.replace(muon_momentum_warmup_steps=0), 0) == pytest.approx(0.97)


# --------------------------------------------------------------------------- EMA


def test_ema_matches_hand_loop_and_restores_dtypes():
    torch.manual_seed(6)
    model = Toy(banked=False)
    model.register_buffer("counter", torch.zeros((), dtype=torch.long))
    model.register_buffer("stat", torch.zeros(3))
    d = 0.8
    ema = EMA(model, d)
    assert "counter" not in ema.shadow and ema.shadow["tok_emb.weight"].dtype == torch.float32
    assert "stat" in ema.shadow
    hand = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape).to(p.dtype))
            model.stat = torch.randn(3)  # a re-assigned buffer is followed
            model.skip_weight.data = model.skip_weight.data + 1.0  # so is a swapped .data
        ema.update(model)
        for k, v in model.state_dict().items():
            if k in hand:
                hand[k] = d * hand[k] + (1 - d) * v.float()
    for k in hand:
        torch.testing.assert_close(ema.shadow[k], hand[k], atol=1e-6, rtol=1e-6, msg=k)
    ema.copy_to(model)
    assert model.tok_emb.weight.dtype == torch.bfloat16
    assert torch.equal(model.tok_emb.weight, ema.shadow["tok_emb.weight"].bfloat16())
    assert torch.equal(model.skip_weight.detach(), ema.shadow["skip_weight"])
    sd = ema.state_dict()
    with pytest.raises(ValueError, match="keys differ"):
        EMA(Toy(banked=False, seed=3), 0.5).load_state_dict(sd)  # no "stat" buffer there
    fresh = Toy(banked=False, seed=3)
    fresh.register_buffer("stat", torch.ones(3))
    other = EMA(fresh, 0.5)
    other.load_state_dict(sd)
    assert other.decay == d and all(torch.equal(other.shadow[k], ema.shadow[k]) for k in hand)
    with pytest.raises(ValueError):
        EMA(model, 1.0)
