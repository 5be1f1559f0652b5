"""The fused soft-capped cross-entropy (golfnb.fused_ce + golfnb._triton_ce) against the plain formula.

Without a GPU the Triton kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by
conftest.py), so CI checks the very kernel source that runs on the H100. With a GPU the same tests run the compiled kernel on CUDA tensors, plus one at pr1514's shapes.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from golfnb import fused_ce
from golfnb.config import ConfigError, preset
from golfnb.model import build_model

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


@pytest.fixture
def kernel():
    """golfnb._triton_ce: compiled for the GPU, or in Triton's interpreter on CPU (set up in conftest.py)."""
    if not CUDA:
        assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets TRITON_INTERPRET=1 without a GPU"
    return importlib.import_module("golfnb._triton_ce")


def _reference(z, t, softcap):
    zr = z.detach().float().requires_grad_()
    loss = fused_ce.softcap_ce_reference(zr, t, softcap)
    loss.sum().backward()
    return loss.detach(), zr.grad


@pytest.mark.parametrize("V,block", [(1000, None), (1000, 256), (512, None)])
@pytest.mark.parametrize("softcap", [30.0, 0.0])
@pytest.mark.parametrize("fast", [True, False])
def test_kernel_matches_plain_formula_fp32(kernel, V, block, softcap, fast):
    g = torch.Generator().manual_seed(V + int(softcap))
    z = (torch.randn(48, V, generator=g) * 12).to(DEV)  # beyond the soft-cap's linear range
    t = torch.randint(0, V, (48,), generator=g).to(DEV)
    ref_loss, ref_dz = _reference(z, t, softcap)
    loss, dz = kernel.softcap_ce(z, t, softcap, True, block=block, fast=fast)
    assert loss.dtype == torch.float32 and dz.dtype == z.dtype and dz.shape == z.shape
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(dz, ref_dz, rtol=1e-4, atol=1e-6)
    if softcap == 0:
        assert (dz.sum(1).abs() < 1e-5).all()  # softmax - onehot: each row sums to zero
    loss2, empty = kernel.softcap_ce(z, t, softcap, False, block=block, fast=fast)
    assert empty.numel() == 0 and torch.equal(loss2, loss)  # the loss does not depend on with_grad


def test_kernel_bf16_logits_and_int32_targets(kernel):
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(64, 2048, generator=g) * 8).bfloat16().to(DEV)
    t = torch.randint(0, 2048, (64,), generator=g, dtype=torch.int32).to(DEV)
    ref_loss, ref_dz = _reference(z, t.long(), 30.0)
    loss, dz = kernel.softcap_ce(z, t, 30.0, True)
    assert dz.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=2e-5)  # fp32 inside: the same loss
    torch.testing.assert_close(dz.float(), ref_dz, rtol=1e-2, atol=1e-5)  # one bf16 rounding of the gradient


def test_out_of_range_target_gives_nan_not_a_wrong_number(kernel):
    z = torch.randn(4, 300, device=DEV)
    t = torch.tensor([0, 299, 300, -1], device=DEV)
    for block in (None, 128):
        loss, _ = kernel.softcap_ce(z, t, 30.0, False, block=block)
        assert torch.isfinite(loss[:2]).all() and torch.isnan(loss[2:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_op_gradients_match_autograd_of_the_plain_path(kernel, dtype):
    g = torch.Generator().manual_seed(2)
    N, d, V = 40, 32, 700
    h0 = torch.randn(N, d, generator=g).to(DEV, dtype)
    w0 = (torch.randn(V, d, generator=g) * 0.7).to(DEV, dtype)
    t = torch.randint(0, V, (N,), generator=g).to(DEV)
    up = torch.rand(N, generator=g).to(DEV)  # an arbitrary upstream gradient per token, not just a mean

    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss = fused_ce.head_softcap_ce(h, w, t, 30.0)
    (loss * up).sum().backward()
    hr, wr = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    ref = fused_ce.softcap_ce_reference(hr @ wr.t(), t, 30.0)
    (ref * up).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(loss, ref.detach().float(), **tol)
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    torch.testing.assert_close(h.grad.float(), hr.grad.float(), **tol)
    torch.testing.assert_close(w.grad.float(), wr.grad.float(), **tol)


def test_head_op_traces_under_torch_compile(kernel):
    """The fake implementation and the autograd.Function trace through Dynamo and AOT autograd."""
    g = torch.Generator().manual_seed(3)
    h0 = torch.randn(16, 24, generator=g, device="cpu").to(DEV)
    w0 = torch.randn(300, 24, generator=g, device="cpu").to(DEV)
    t = torch.randint(0, 300, (16,), generator=g).to(DEV)

    def f(h, w):
        return fused_ce.head_softcap_ce(torch.tanh(h), w, t, 30.0).mean()

    grads = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [None, 128])
def test_gradient_written_over_the_logits_equals_the_separate_output(kernel, block):
    g = torch.Generator().manual_seed(9)
    z = (torch.randn(32, 500, generator=g) * 10).to(DEV)
    t = torch.randint(0, 500, (32,), generator=g).to(DEV)
    loss, dz = kernel.softcap_ce(z, t, 30.0, True, block=block)
    buf = z.clone()
    loss2, dz2 = kernel.softcap_ce(buf, t, 30.0, True, block=block, inplace=True)
    assert dz2.data_ptr() == buf.data_ptr()
    assert torch.equal(loss2, loss) and torch.equal(dz2, dz)
    with pytest.raises(ValueError, match="inplace needs"):
        kernel.softcap_ce(z.t(), t[:500], 30.0, True, inplace=True)


def test_inductor_feeds_the_head_gemm_output_straight_to_the_in_place_kernel(kernel):
    """Under Inductor the in-place op must reuse the GEMM's output buffer: a functionalization copy of the
    [N, V] logits would cost the pass the kernel exists to save."""
    import re

    from torch._inductor.utils import run_and_get_code

    g = torch.Generator().manual_seed(4)
    h = torch.randn(16, 24, generator=g).to(DEV).requires_grad_()
    w = torch.randn(300, 24, generator=g).to(DEV).requires_grad_()
    t = torch.randint(0, 300, (16,), generator=g).to(DEV)
    cf = torch.compile(lambda h, w: fused_ce.head_softcap_ce(torch.tanh(h), w, t, 30.0).mean(), fullgraph=True)

    def step():
        loss = cf(h, w)
        loss.backward()
        return loss

    loss, codes = run_and_get_code(step)
    fwd = next(c for c in codes if "softcap_ce_grad_" in c)
    mm_out = re.search(r"extern_kernels\.mm\(.*out=(buf\d+)\)", fwd)
    op_arg = re.search(r"golfnb\.softcap_ce_grad_\.default\((buf\d+),", fwd)
    assert mm_out and op_arg and mm_out.group(1) == op_arg.group(1), fwd
    assert ".copy_(" not in fwd and "clone" not in fwd
    ref = fused_ce.softcap_ce_reference(torch.tanh(h.detach()) @ w.detach().t(), t, 30.0).mean()
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-5)


def test_model_loss_and_every_gradient_agree_between_backends(kernel):
    cfg = preset("smoke")
    V = cfg.vocab_size
    losses, grads = [], []
    for backend in ("torch", "triton"):
        m = build_model(cfg, DEV)
        m.set_ce_backend(backend)
        g = torch.Generator().manual_seed(4)
        ids = torch.randint(0, V, (2, 64), generator=g).to(DEV)
        tgt = torch.randint(0, V, (2, 64), generator=g).to(DEV)
        loss = m(ids, tgt)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and "tok_emb.weight" in grads[1]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=2e-3, atol=2e-5, msg=n)


@pytest.mark.parametrize("field", ["ce_backend", "mlp_backend"])
def test_kernel_backend_settings_resolve_alike(field, monkeypatch):
    """Both Triton kernels' settings (auto|triton|torch) follow one set of rules (fused_ce.resolve_kernel_backend)."""
    from golfnb import fused_mlp

    resolve = fused_ce.resolve_ce_backend if field == "ce_backend" else fused_mlp.resolve_mlp_backend
    setter = "set_ce_backend" if field == "ce_backend" else "set_mlp_backend"
    assert resolve("auto", "cpu") == "torch"
    assert resolve("torch", "cpu") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # an explicit triton on CPU: the interpreter, never picked by auto
    assert resolve("triton", "cpu") == "triton"
    assert resolve("auto", "cpu") == "torch"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match=f"needs a CUDA device.*TRITON_INTERPRET=1.*{field}=auto or torch"):
        resolve("triton", "cpu")
    with pytest.raises(ValueError, match="unknown"):
        resolve("liger", "cpu")
    with pytest.raises(ConfigError, match=field):
        preset("smoke", **{field: "liger"})
    with pytest.raises(ValueError, match="resolve it"):
        getattr(build_model(preset("smoke"), "cpu"), setter)("auto")
    if CUDA:
        assert resolve("auto", "cuda") == "triton"


def test_bad_inputs_to_the_fused_loss():
    with pytest.raises(ValueError, match=r"targets must be \[N\]"):
        fused_ce.head_softcap_ce(torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(3, dtype=torch.long), 30.0)
    with pytest.raises(ValueError, match="int32 or int64"):
        fused_ce.head_softcap_ce(torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(4), 30.0)


def test_kernels_read_only_constexpr_globals(kernel):
    """Compiled Triton refuses a kernel that reads a module global unless the global is a tl.constexpr instance
    (`X = tl.constexpr(v)`; an annotation `X: tl.constexpr = v` is not enough). The interpreter the CPU suite
    uses does not check this, so check it here from the kernels' own code objects."""
    import types

    import triton
    import triton.language as tl

    jitted = {n: f for n, f in vars(kernel).items() if hasattr(f, "fn") and hasattr(f.fn, "__code__")}
    assert {"_softcap_ce_kernel", "_capped", "_load_capped", "_tanh"} <= set(jitted)
    for name, f in jitted.items():
        for g in f.fn.__code__.co_names:
            if g not in vars(kernel):
                continue  # an attribute name (tl.load) or a builtin, not a module global
            val = vars(kernel)[g]
            ok = isinstance(val, (types.ModuleType, tl.constexpr)) or g in jitted or val in (triton, tl)
            assert ok, f"kernel {name} reads module global {g!r} = {val!r}: make it tl.constexpr(...)"


def test_packed_kernel_keeps_its_constexpr_annotations_and_runs(tmp_path):
    """The minified, packed kernel module compiles (Triton reads its source through the packed loader)."""
    from golfnb import pack

    text, _ = pack.pack_text(pack.submission_config(preset("smoke", ce_backend="auto")))
    mods = pack.payload_modules(pack.unwrap(text))
    src = mods["golfnb._triton_ce"][0]
    # compiled Triton (unlike its interpreter) refuses kernel arguments or globals that are not constexpr
    assert "SOFTCAP: tl.constexpr" in src and "LOG2E = tl.constexpr(" in src
    assert "golfnb.fused_ce" in mods
    (tmp_path / "train_gpt.py").write_text(text)
    probe = textwrap.dedent("""
        import runpy, sys, torch
        runpy.run_path("train_gpt.py", run_name="packed")   # installs the in-memory golfnb, runs nothing
        import golfnb._triton_ce as k
        assert k.__file__.startswith("<packed>"), k.__file__
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        z = torch.randn(8, 300, device=dev) * 10
        t = torch.randint(0, 300, (8,), device=dev)
        loss, dz = k.softcap_ce(z, t, 30.0, True)
        ref = torch.nn.functional.cross_entropy(30 * torch.tanh(z / 30), t, reduction="none")
        print("maxdiff", float(((loss - ref).abs() / ref.abs()).max()))  # relative: losses here reach ~40 nats
    """)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if not CUDA:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    diff = float(proc.stdout.split("maxdiff")[1])
    assert diff < 1e-4


@pytest.mark.skipif(not CUDA, reason="needs a GPU: pr1514's shapes, compiled model step")
def test_pr1514_shapes_on_gpu(kernel):
    g = torch.Generator(device="cuda").manual_seed(5)
    N, V, d = 8192, 8192, 512
    h = (torch.randn(N, d, device="cuda", generator=g)).bfloat16().requires_grad_()
    w = (torch.randn(V, d, device="cuda", generator=g) * 0.05).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    loss = fused_ce.head_softcap_ce(h, w, t, 30.0).mean()
    loss.backward()
    hr, wr = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(30 * torch.tanh((hr @ wr.t()).float() / 30), t)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.float(), hr.grad.float(), rtol=2e-2, atol=2e-6)
    torch.testing.assert_close(w.grad.float(), wr.grad.float(), rtol=2e-2, atol=2e-6)
