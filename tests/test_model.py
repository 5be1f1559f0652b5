"""Model: every switch changes the computation, and each technique matches its formula."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from golfnb.attention import attention
from golfnb.config import ConfigError, Hyperparameters, preset
from golfnb.model import GPT, apply_rotary, build_model, count_parameters, rms_norm, xsa_project

# a narrow copy of the pr1514 stack: same depth, loop and parallel layout, small width (fast on CPU)
NARROW = dict(model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=1024, train_seq_len=64, eval_seq_len=64,
              train_batch_tokens=64 * 8, rope_dims=8, embed_bf16=False, device="cpu")


def narrow(**kw) -> Hyperparameters:
    return preset("pr1514", **{**NARROW, **kw})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a deterministic random value keyed by its name, so zero-initialised output
    projections and neutral control tensors do not hide a switch's effect."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(seed + sum(map(ord, name)) * 7919)
            scale = 0.5 / math.sqrt(p.shape[-1]) if p.ndim >= 2 else 0.3
            base = 1.0 if name.endswith(("attn_scale", "mlp_scale", "skip_weights", "q_gain")) else 0.0
            p.copy_((base + scale * torch.randn(p.shape, generator=g)).to(p.dtype))
    return model


def ids(n=2, t=64, v=1024, seed=1):
    return torch.randint(0, v, (n, t), generator=torch.Generator().manual_seed(seed))


def test_parameter_counts_match_the_records():
    # #1514's logged count: 35,944,536 with loop 3-5 (n_skip 8), 35,943,512 with loop 4-5; #1533 adds lane_merge
    assert count_parameters(build_model(preset("pr1514"))) == 35_944_536
    assert count_parameters(build_model(preset("pr1514", loop_start=4))) == 35_943_512
    assert count_parameters(build_model(preset("pr1533"))) == 35_944_537
    assert count_parameters(build_model(preset("baseline"))) == 17_059_912


def test_recurrence_executes_the_spec_layer_lists():
    cfg = narrow()
    m = build_model(cfg)
    calls: list[int] = []
    for i, b in enumerate(m.blocks):
        b.attn.register_forward_hook(lambda mod, a, o, i=i: calls.append(i))
    m(ids())
    assert calls == list(range(11))
    calls.clear()
    m.looping_active = True
    m(ids())
    assert calls == [0, 1, 2, 3, 4, 5, 3, 4] + [5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert cfg.encoder_decoder(True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert narrow(loop_start=4).encoder_decoder(True) == ([0, 1, 2, 3, 4, 5, 4], [5, 4, 5, 6, 7, 8, 9, 10])


def test_xsa_removes_the_component_along_the_own_value_vector():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 5, 8, 16, generator=g)
    v = torch.randn(2, 5, 4, 16, generator=g)
    out = xsa_project(y, v)
    vhat = F.normalize(v, dim=-1).repeat_interleave(2, dim=2)  # head h pairs with kv head h // 2
    assert torch.allclose((out * vhat).sum(-1), torch.zeros(2, 5, 8), atol=1e-5)
    # what remains is y minus exactly its projection
    proj = (y * vhat).sum(-1, keepdim=True) * vhat
    assert torch.allclose(out, y - proj, atol=1e-5)


def test_partial_rope_rotates_only_the_first_dims_and_preserves_norm():
    cfg = narrow()
    m = build_model(cfg)
    cos, sin = m.rotary(16, torch.device("cpu"), torch.float32)
    x = torch.randn(1, 16, 2, 16)
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])
    assert torch.allclose(y[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1), atol=1e-5)
    # relative position only: <R_a q, R_b k> depends on a - b
    q, k = torch.randn(16), torch.randn(16)
    qq = apply_rotary(q.expand(1, 16, 1, 16).contiguous(), cos, sin)[0, :, 0]
    kk = apply_rotary(k.expand(1, 16, 1, 16).contiguous(), cos, sin)[0, :, 0]
    assert torch.allclose(qq[5] @ kk[3], qq[9] @ kk[7], atol=1e-4)


def test_ntk_rescale_only_above_the_reference_length():
    cfg = preset("pr1176", model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8, train_seq_len=64,
                 eval_seq_len=64, train_batch_tokens=512, ve_layers=(), ve_dim=0, bigram_vocab_size=0,
                 rope_train_seq_len=32)
    m = build_model(cfg)
    c32, _ = m.rotary(32, torch.device("cpu"), torch.float32)
    c64, _ = m.rotary(64, torch.device("cpu"), torch.float32)
    assert not torch.allclose(c64[:, :32], c32)  # base rescaled for the whole sequence at 64 > 32
    base = 10000.0 * (64 / 32) ** (8 / 6)
    expect = torch.cos(torch.tensor(5.0, dtype=torch.float64) / base ** (2 / 8)).float()
    assert torch.allclose(c64[0, 5, 0, 1], expect, atol=1e-6)


def test_gptj_parallel_block_equals_its_formula():
    cfg = narrow()
    m = randomize(build_model(cfg))
    b = m.blocks[8]
    x, x0 = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    from golfnb.model import _Ctx

    ctx = _Ctx(rope=m.rotary(16, x.device, x.dtype), backend="math", ve=None)
    out = b(x, x0, ctx, None, parallel=True)
    x_in = b.resid_mix[0] * x + b.resid_mix[1] * x0
    ln = 1 / math.sqrt(9)
    a = b.attn(rms_norm(x_in) * ln, ctx.rope, True, "math", None, None)
    f = b.mlp(rms_norm(x_in) * ln, None)
    assert torch.allclose(out, x_in + b.attn_scale * a + b.mlp_scale * f, atol=1e-5)
    seq = b(x, x0, ctx, None, parallel=False)
    u = x_in + b.attn_scale * a
    assert torch.allclose(seq, u + b.mlp_scale * b.mlp(rms_norm(u) * ln, None), atol=1e-5)


def _reference_hidden(m: GPT, tokens: torch.Tensor) -> torch.Tensor:
    """An independent transcription of the block maths (attention, MLP, residual mixing) using the blocks' attention and MLP as black boxes."""
    cfg = m.cfg
    x = rms_norm(m.tok_emb(tokens).float())
    x0 = x
    rope = m.rotary(tokens.shape[1], tokens.device, torch.float32)

    def attn(b, inp):
        return b.attn_scale * b.attn(rms_norm(inp) * b.ln, rope, b.xsa, "math", None, None)

    def mlp(b, inp):
        return b.mlp_scale * b.mlp(rms_norm(inp) * b.ln, None)

    def skip_merge(x, k, s):
        g = torch.sigmoid(m.skip_gates[k])
        return g * x + (1 - g) * (m.skip_weights[k] * s)

    enc, dec = cfg.encoder_decoder(m.looping_active)
    stack = []
    for i in enc:
        b = m.blocks[i]
        xi = b.resid_mix[0] * x + b.resid_mix[1] * x0
        u = xi + attn(b, xi)
        x = u + mlp(b, u)
        stack.append(x)
    lane0 = lane1 = None
    for k, i in enumerate(dec):
        b = m.blocks[i]
        s = stack.pop() if k < min(len(enc), len(dec)) else None
        if i < cfg.parallel_start_layer:
            if s is not None:
                x = skip_merge(x, k, s)
            xi = b.resid_mix[0] * x + b.resid_mix[1] * x0
            u = xi + attn(b, xi)
            x = u + mlp(b, u)
            continue
        if lane0 is None:
            if s is not None:
                x = skip_merge(x, k, s)
            lane0, lane1 = x, x
        elif s is not None:
            lane0 = skip_merge(lane0, k, s)
        if cfg.parallel_residual == "two_lane":
            l0 = b.resid_mix[0] * lane0 + b.resid_mix[1] * x0
            lane0 = l0 + attn(b, l0)
            lane1 = lane1 + mlp(b, lane1)
        else:
            a = attn(b, b.resid_mix[0] * lane0 + b.resid_mix[1] * x0)
            f = mlp(b, lane1)
            P, r = m.parallel_post_lambdas[i], m.parallel_resid_lambdas[i]
            lane0, lane1 = r[0] * lane0 + P[0, 0] * a + P[1, 0] * f, r[1] * lane1 + P[0, 1] * a + P[1, 1] * f
    if cfg.parallel_residual == "two_lane":
        x = m.lane_merge * lane0 + (1 - m.lane_merge) * lane1
    else:
        x = (lane0 + lane1) / 2
    return rms_norm(x)


@pytest.mark.parametrize("variant,start", [("two_lane", 7), ("routed", 8)])
@pytest.mark.parametrize("looping", [False, True])
def test_two_lane_variants_equal_their_formulas(variant, start, looping):
    m = randomize(build_model(narrow(parallel_residual=variant, parallel_start_layer=start)))
    m.set_attn_backend("math")
    m.looping_active = looping
    t = ids(t=32)
    assert torch.allclose(m.hidden(t), _reference_hidden(m, t), atol=1e-5)


def test_two_lane_layout_that_would_rejoin_is_rejected():
    with pytest.raises(ConfigError, match="raise parallel_start_layer"):
        build_model(narrow(parallel_residual="two_lane", parallel_start_layer=4))


def test_banked_equals_unbanked():
    cfg = narrow(parallel_residual="two_lane")
    plain = randomize(build_model(cfg))
    banked = build_model(cfg.replace(bank_params=True))
    banked.load_unbanked_state_dict(plain.state_dict())
    for looping in (False, True):
        plain.looping_active = banked.looping_active = looping
        t = ids()
        assert torch.allclose(plain(t, t), banked(t, t), atol=1e-6)
    sd = banked.unbanked_state_dict()
    assert set(sd) == set(plain.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in plain.state_dict().items())


SWITCHES = [
    dict(qk_gain_init=4.0),
    dict(xsa_last_n=0),
    dict(rope_dims=16),
    dict(ln_scale=False),
    dict(skip_gates_enabled=False),
    dict(parallel_residual="none"),
    dict(parallel_residual="two_lane"),
    dict(parallel_residual="routed", parallel_start_layer=8),
    dict(mlp_activation="relu2"),
    dict(logit_softcap=15.0),
    dict(bigram_vocab_size=64, bigram_dim=16),
    dict(smear_gate=True),
    dict(ve_dim=16, ve_layers=(9, 10)),
    dict(tie_embeddings=False),
    dict(num_loops=0),
    dict(loop_start=4),
]


@pytest.mark.parametrize("change", SWITCHES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_every_switch_changes_the_computation(change):
    t = ids()
    base = randomize(build_model(narrow()))
    other = randomize(build_model(narrow(**change)))
    if "qk_gain_init" in change:  # a learnable init: compare freshly initialised gains on otherwise equal weights
        other.load_state_dict(base.state_dict())
        with torch.no_grad():
            for b in other.blocks:
                b.attn.q_gain.fill_(4.0)
    base.looping_active = other.looping_active = True
    assert not torch.allclose(base.forward_logits(t), other.forward_logits(t), atol=1e-5), change


def test_bigram_hash_buckets_follow_the_formula():
    m = build_model(narrow(bigram_vocab_size=2816, bigram_dim=16))
    t = torch.tensor([[5, 7, 1000]])
    got = m.bigram.bucket_ids(t)[0].tolist()
    assert got[0] == 2815
    assert got[1] == ((36313 * 7) ^ (27191 * 5)) % 2815
    assert got[2] == ((36313 * 1000) ^ (27191 * 7)) % 2815


def test_smear_gate_mixes_with_previous_token_only():
    m = randomize(build_model(narrow(smear_gate=True)))
    t = ids(t=16)
    h1 = m.hidden(t)
    t2 = t.clone()
    t2[:, 10] = (t2[:, 10] + 1) % 1024
    h2 = m.hidden(t2)
    assert torch.allclose(h1[:, :10], h2[:, :10], atol=1e-6)  # causal: earlier positions unaffected
    assert not torch.allclose(h1[:, 10:], h2[:, 10:])


def test_model_is_causal():
    m = randomize(build_model(narrow(bigram_vocab_size=64, bigram_dim=16, smear_gate=True, ve_dim=16,
                                     ve_layers=(9,))))
    m.looping_active = True
    t = ids(t=32)
    t2 = t.clone()
    t2[:, 20:] = (t2[:, 20:] * 7 + 3) % 1024
    assert torch.allclose(m.forward_logits(t)[:, :20], m.forward_logits(t2)[:, :20], atol=1e-5)


def test_attention_backends_agree_with_math_on_cpu():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 40, 8, 16, generator=g)
    k = torch.randn(2, 40, 4, 16, generator=g)
    v = torch.randn(2, 40, 4, 16, generator=g)
    ref = attention(q, k, v, backend="math")
    assert torch.allclose(attention(q, k, v, backend="sdpa"), ref, atol=1e-5)
    # causal: output at t ignores keys after t
    k2 = k.clone()
    k2[:, 30:] += 1.0
    assert torch.allclose(attention(q, k2, v, backend="math")[:, :30], ref[:, :30], atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "fa3", "fa4", "fa2"])
def test_gpu_backends_agree_with_math(backend):
    from golfnb.attention import available_backends

    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} not available here")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(4, 512, 8, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(4, 512, 4, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(4, 512, 4, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    ref = attention(q.double(), k.double(), v.double(), backend="math").float()
    out = attention(q, k, v, backend=backend).float()
    assert (out - ref).norm() / ref.norm() < 1e-2


def test_embedding_master_weights_are_bf16_when_configured():
    m = build_model(preset("smoke"))
    assert m.tok_emb.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if n != "tok_emb.weight")


@pytest.mark.parametrize("banked", [False, True], ids=["unbanked", "banked"])
def test_merged_qkv_gemm_equals_three_linears(banked):
    """merge_qkv computes q, k, v with one GEMM while training: loss and every gradient equal the three-linear
    path's; without autograd the three modules run (GPTQ hooks their inputs)."""
    cfg = narrow(bank_params=banked, ve_dim=16, ve_layers=(9, 10))
    models = {}
    for merged in (True, False):
        m = randomize(build_model(cfg.replace(merge_qkv=merged)), seed=3)
        m.looping_active = True
        models[merged] = m
    t = ids()
    losses, grads = {}, {}
    for merged, m in models.items():
        assert all(b.attn.merged is merged for b in m.blocks)
        losses[merged] = m(t, t)
        losses[merged].backward()
        grads[merged] = {n: p.grad for n, p in m.named_parameters()}
    assert torch.allclose(losses[True], losses[False], atol=1e-6, rtol=0)
    assert grads[True].keys() == grads[False].keys()
    for n, g in grads[True].items():
        ref = grads[False][n]
        assert (g is None) == (ref is None), n
        if g is not None:
            assert torch.allclose(g, ref, atol=1e-6, rtol=1e-5), n

    if not banked:
        seen = []
        hook = models[True].blocks[0].attn.c_k.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
        models[True](t, t).backward()
        assert seen == []  # training: the merged GEMM, not the module
        with torch.no_grad():
            models[True].forward_logits(t)
        hook.remove()
        assert seen == [torch.Size([2, 64, 64])]
