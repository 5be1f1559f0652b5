"""The FlashAttention-4 backend's wrapper: custom ops, fake shapes, autograd wiring, availability.

The kernels themselves need a Hopper/Blackwell GPU and the flash-attn-4 package (the GPU test below, run
where both exist); on CPU the wrapper runs with `golfnb._fa4.kernels` swapped for an explicit fp64
reference, so every step but the kernel call is checked: argument order into the backward, the
log-sum-exp's shape, GQA head counts, and that torch.compile traces the ops without breaking its graph.
"""
import math

import pytest
import torch

from golfnb import _fa4
from golfnb.attention import attention, available_backends, resolve_backend


def _ref_scores(q, k, v, causal):
    """fp64 [B, H, T, D] views of q, k, v (K/V repeated over each KV head's query-head group: FlashAttention's GQA)
    and the masked scores q k^T / sqrt(D)."""
    T, H, D = q.shape[1:]
    g = H // k.shape[2]
    qf = q.double().transpose(1, 2)
    kf = k.double().repeat_interleave(g, dim=2).transpose(1, 2)
    vf = v.double().repeat_interleave(g, dim=2).transpose(1, 2)
    s = qf @ kf.transpose(-1, -2) / math.sqrt(D)
    if causal:
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return qf, kf, vf, s


def _ref_fwd(q, k, v, causal):
    """softmax(q k^T / sqrt(D)) v with its log-sum-exp [B, H, T]."""
    _, _, vf, s = _ref_scores(q, k, v, causal)
    out = torch.softmax(s, dim=-1) @ vf
    return out.transpose(1, 2).to(q.dtype), torch.logsumexp(s, dim=-1).float()


def _ref_bwd(dout, q, k, v, out, lse, causal):
    """The attention backward written out in fp64 (the custom op runs below autograd, so no autograd here):
    dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D), K/V
    gradients summed over each KV head's query-head group. Checks that out and lse are the forward's."""
    o2, l2 = _ref_fwd(q, k, v, causal)
    assert torch.allclose(o2, out) and torch.allclose(l2, lse), "backward got another forward's out/lse"
    B, T, H, D = q.shape
    Hk = k.shape[2]
    g = H // Hk
    qf, kf, vf, s = _ref_scores(q, k, v, causal)
    do, of = (t.double().transpose(1, 2) for t in (dout, out))
    p = torch.softmax(s, dim=-1)
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ vf.transpose(-1, -2) - (do * of).sum(-1, keepdim=True))
    dq = ds @ kf / math.sqrt(D)
    dk = ds.transpose(-1, -2) @ qf / math.sqrt(D)
    fold = lambda t: t.reshape(B, Hk, g, T, D).sum(2).transpose(1, 2)  # noqa: E731
    return dq.transpose(1, 2).to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


@pytest.fixture
def reference_kernels(monkeypatch):
    calls = []

    def fwd(q, k, v, causal):
        calls.append("fwd")
        return _ref_fwd(q, k, v, causal)

    def bwd(*args):
        calls.append("bwd")
        return _ref_bwd(*args)

    monkeypatch.setattr(_fa4, "kernels", lambda: (fwd, bwd))
    return calls


def _qkv(B=2, T=24, H=8, Hk=4, D=16, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(B, T, h, D, generator=g).to(dtype) for h in (H, Hk, Hk)]


def test_fa4_wrapper_output_and_gradients_match_math(reference_kernels):
    q, k, v = (t.requires_grad_() for t in _qkv())
    out = _fa4.fa4_attention(q, k, v, causal=True)
    qm, km, vm = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention(qm, km, vm, backend="math")
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 2e-2
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * w).sum().backward()
    (ref * w).sum().backward()
    for got, want, name in ((q.grad, qm.grad, "q"), (k.grad, km.grad, "k"), (v.grad, vm.grad, "v")):
        assert got.shape == want.shape, name
        rel = (got.float() - want).norm() / want.norm()
        assert rel < 2e-2, f"d{name} off by {rel:.3g} relative"
    assert reference_kernels == ["fwd", "bwd"]


def test_fa4_fake_shapes_follow_flash_attention_layout():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(3, 40, 8, 64, dtype=torch.bfloat16)
        k = torch.empty(3, 40, 2, 64, dtype=torch.bfloat16)
        v = torch.empty(3, 40, 2, 64, dtype=torch.bfloat16)
        out, lse = torch.ops.golfnb.fa4_fwd(q, k, v, True)
        dq, dk, dv = torch.ops.golfnb.fa4_bwd(out, q, k, v, out, lse, True)
    assert tuple(out.shape) == (3, 40, 8, 64) and out.dtype == torch.bfloat16
    assert tuple(lse.shape) == (3, 8, 40) and lse.dtype == torch.float32
    assert [tuple(t.shape) for t in (dq, dk, dv)] == [(3, 40, 8, 64), (3, 40, 2, 64), (3, 40, 2, 64)]


def test_fa4_ops_trace_under_compile_without_graph_breaks(reference_kernels):
    """Dynamo sees the custom ops as single nodes (fullgraph=True fails on a break) and AOT autograd
    differentiates through them with the registered backward."""
    q, k, v = (t.requires_grad_() for t in _qkv(T=16))

    def f(q, k, v):
        return (_fa4.fa4_attention(q * 1.0, k, v, causal=True).float() ** 2).sum()

    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    loss.backward()
    qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
    f(qe, ke, ve).backward()
    assert torch.allclose(q.grad, qe.grad) and torch.allclose(k.grad, ke.grad) and torch.allclose(v.grad, ve.grad)


def test_fa4_rejects_fp32_and_bad_head_counts_with_a_fix():
    q, k, v = _qkv(dtype=torch.float32)
    with pytest.raises(ValueError, match="bf16"):
        _fa4.fa4_attention(q, k, v)
    q, k, v = _qkv(H=6, Hk=4)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        _fa4.fa4_attention(q, k, v)


def test_fa4_is_never_offered_on_cpu_and_asking_for_it_says_what_to_set():
    assert "fa4" not in available_backends("cpu")
    with pytest.raises(ValueError, match="attn_backend=auto"):
        resolve_backend("fa4", "cpu")
    assert resolve_backend("auto", "cpu") == "sdpa"


def test_fa2_detection_ignores_the_fa4_namespace(monkeypatch):
    """flash-attn-4 installs a `flash_attn` package holding only `cute`: that is not FlashAttention-2."""
    from golfnb import attention as A

    seen = []
    monkeypatch.setattr(A, "_has_module", lambda name: seen.append(name) or name == "flash_attn.cute")
    A._fa2_available.cache_clear()
    A._fa4_available.cache_clear()
    try:
        assert A._fa4_available() and not A._fa2_available()
        assert "flash_attn.flash_attn_interface" in seen
    finally:
        A._fa2_available.cache_clear()
        A._fa4_available.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fa4_forward_and_gradients_agree_with_math():
    if "fa4" not in available_backends("cuda"):
        pytest.skip("flash-attn-4 not installed or not a Hopper/Blackwell GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 1024, h, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for h in (8, 4, 4))
    out = attention(q, k, v, backend="fa4")
    qm, km, vm = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention(qm, km, vm, backend="math")
    assert (out.double() - ref).norm() / ref.norm() < 1e-2
    w = torch.randn(out.shape, device="cuda", generator=g, dtype=torch.float64)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    for got, want, name in ((q.grad, qm.grad, "q"), (k.grad, km.grad, "k"), (v.grad, vm.grad, "v")):
        rel = (got.double() - want).norm() / want.norm()
        assert rel < 2e-2, f"d{name} off by {rel:.3g} relative"


def test_fa4_options_parse_and_bad_values_say_what_to_change(monkeypatch):
    assert _fa4.parse_options("tile_m=128, tile_n=192,pack_gqa=0", _fa4.FWD_KEYS, "V") == (
        ("tile_m", 128), ("tile_n", 192), ("pack_gqa", False))
    assert _fa4.parse_options("", _fa4.BWD_KEYS, "V") == ()
    with pytest.raises(ValueError, match="tile_k.*NAME one of tile_m"):
        _fa4.parse_options("tile_k=64", _fa4.FWD_KEYS, "GOLFNB_FA4_FWD")
    with pytest.raises(ValueError, match="tile_m wants an integer"):
        _fa4.parse_options("tile_m=big", _fa4.FWD_KEYS, "GOLFNB_FA4_FWD")
    with pytest.raises(ValueError, match="pack_gqa is a switch"):
        _fa4.parse_options("pack_gqa=2", _fa4.FWD_KEYS, "GOLFNB_FA4_FWD")
    monkeypatch.setenv("GOLFNB_FA4_FWD", "tile_m=128")
    with pytest.raises(ValueError, match="tile_m and tile_n together"):
        _fa4.check_options()
    monkeypatch.setenv("GOLFNB_FA4_FWD", "tile_m=128,tile_n=176")
    monkeypatch.setenv("GOLFNB_FA4_BWD", "expand_kv=1,tile_n=64")
    assert _fa4.check_options() == {"fwd": {"tile_m": 128, "tile_n": 176},
                                    "bwd": {"expand_kv": True, "tile_n": 64}}
    from golfnb.attention import backend_options
    assert backend_options("sdpa_cudnn") == {}
    assert backend_options("fa4")["fwd"] == {"tile_m": 128, "tile_n": 176}


def test_fa4_options_reach_the_kernel_calls(monkeypatch):
    """kernels() hands GOLFNB_FA4_FWD to FA4's forward as its keyword requests and GOLFNB_FA4_BWD as fields
    replaced in the backward config FA4 itself would select (package modules faked: no GPU here)."""
    import dataclasses
    import sys
    import types

    seen = {}

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        tile_m: int = 128
        tile_n: int = 128
        dQ_swapAB: bool = False

    def select_bwd_config(inputs):
        seen["inputs"] = inputs
        return Cfg()

    class Inputs:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    def fwd(q, k, v, causal, return_lse, **kw):
        seen["fwd"] = kw
        return q, q[..., 0], None

    def bwd(q, k, v, out, dout, lse, causal, **kw):
        seen["bwd"] = kw
        return q, k, v

    iface = types.ModuleType("flash_attn.cute.interface")
    iface._flash_attn_fwd, iface._flash_attn_bwd = fwd, bwd
    conf = types.ModuleType("flash_attn.cute.config")
    conf.BwdHeuristicInputs, conf.select_bwd_config = Inputs, select_bwd_config
    for name, mod in (("flash_attn", types.ModuleType("flash_attn")), ("flash_attn.cute", types.ModuleType("x")),
                      ("flash_attn.cute.interface", iface), ("flash_attn.cute.config", conf)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(_fa4, "_device_arch", lambda device: 90)
    f, b = _fa4.kernels()
    q, k, v = _qkv()
    monkeypatch.setenv("GOLFNB_FA4_FWD", "tile_m=128,tile_n=192,pack_gqa=0")
    monkeypatch.setenv("GOLFNB_FA4_BWD", "dQ_swapAB=1,tile_m=64")
    f(q, k, v, True)
    assert seen["fwd"] == {"pack_gqa": False, "tile_mn": (128, 192)}
    b(q, q, k, v, q, q[..., 0], True)
    assert seen["bwd"] == {"config": Cfg(tile_m=64, tile_n=128, dQ_swapAB=True)}
    assert (seen["inputs"].device_arch, seen["inputs"].num_heads, seen["inputs"].num_heads_kv,
            seen["inputs"].causal) == (90, 8, 4, True)
    monkeypatch.delenv("GOLFNB_FA4_FWD")
    monkeypatch.delenv("GOLFNB_FA4_BWD")
    f(q, k, v, True)
    b(q, q, k, v, q, q[..., 0], True)
    assert seen["fwd"] == {} and seen["bwd"] == {}  # unset: FA4's own choice


def test_fa4_expand_kv_backward_equals_the_grouped_one(reference_kernels, monkeypatch):
    """expand_kv=1 runs the backward on K/V repeated per query head and sums each group's gradients: the same
    dK/dV as the kernel's own GQA accumulation (here the fp64 reference)."""
    q, k, v = _qkv(dtype=torch.float32)  # fp32, so that the per-head gradients are not rounded before the sum
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    out, lse = _fa4._fa4_fwd(q, k, v, True)
    grads = []
    for opts in ("", "expand_kv=1"):
        monkeypatch.setenv("GOLFNB_FA4_BWD", opts)
        grads.append(_fa4._fa4_bwd(dout, q, k, v, out, lse, True))
    for a, b in zip(*grads):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads[1][1].abs().sum() > 0 and reference_kernels.count("bwd") == 2


def test_fa4_sweep_script_picks_the_fastest_agreeing_configuration(monkeypatch, tmp_path):
    """scripts/gpu_fa4_sweep.py on CPU with kernels that sleep per configuration: a failing one is recorded,
    one whose output disagrees is never picked however fast, and the fastest agreeing one lands in fa4_best.env."""
    import importlib.util
    import os
    import time as _time
    from pathlib import Path

    sleeps = {"": 0.012, "pack_gqa=0": 0.001, "tile_m=128,tile_n=128,mma_pv_is_rs=1,intra_wg_overlap=1": 0.004}

    def fwd(q, k, v, causal):
        opts = os.environ.get("GOLFNB_FA4_FWD", "")
        if opts == "tile_m=128,tile_n=160,mma_pv_is_rs=1,intra_wg_overlap=1":
            raise RuntimeError("config rejected")
        _time.sleep(sleeps.get(opts, 0.02))
        out, lse = _ref_fwd(q, k, v, causal)
        return (out * 1.5 if opts == "pack_gqa=0" else out), lse  # the fastest one is wrong

    def bwd(*args):
        _time.sleep(0.002 if os.environ.get("GOLFNB_FA4_BWD") == "expand_kv=1" else 0.01)
        return _ref_bwd(*args)

    monkeypatch.setattr(_fa4, "kernels", lambda: (fwd, bwd))
    spec = importlib.util.spec_from_file_location("sweep", Path(__file__).parents[1] / "scripts" / "gpu_fa4_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    for name, value in (("OUT", str(tmp_path)), ("DEVICE", "cpu"), ("B", "1"), ("T", "32"), ("SPIN", "0"),
                        ("SWEEP_BUDGET", "600")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GOLFNB_FA4_FWD", "")
    monkeypatch.setenv("GOLFNB_FA4_BWD", "")
    monkeypatch.setattr(sweep, "BWD", ["", "expand_kv=1", "dQ_swapAB=1"])
    assert sweep.main() == 0
    import json
    res = json.loads((tmp_path / "fa4_sweep.json").read_text())
    failed = [r["opts"] for r in res["rows"] if "error" in r]
    assert failed == ["tile_m=128,tile_n=160,mma_pv_is_rs=1,intra_wg_overlap=1"]
    assert len(res["vs_math"]) == 2  # the default and the picked pair, each against the math backend
    assert all(err < 1e-2 for errs in res["vs_math"].values() for err in errs.values())  # bf16 rounding
    assert (tmp_path / "fa4_best.env").read_text() == (
        "GOLFNB_FA4_FWD=tile_m=128,tile_n=128,mma_pv_is_rs=1,intra_wg_overlap=1\nGOLFNB_FA4_BWD=expand_kv=1\n")
