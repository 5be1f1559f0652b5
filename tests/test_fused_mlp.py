"""The fused LeakyReLU^2 MLP (golfnb.fused_mlp + golfnb._triton_mlp) against the plain formula.

Without a GPU the Triton kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by
conftest.py), so CI checks the kernel source that runs on the H100. Two interpreter quirks shape the CPU
tolerances: bf16 operands are handed to its dot product as fp32 copies (it multiplies bf16 bit patterns
otherwise), and its fp32 -> bf16 conversion truncates where the GPU rounds to nearest, so a bf16 output may
sit one bf16 step below the GPU's. The GPU test at pr1514's shapes checks exact agreement of the activation.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from golfnb import fused_mlp
from golfnb.config import preset
from golfnb.model import build_model

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
SMALL = dict(block_m=32, block_n=64, block_k=32, group_m=2, num_warps=4, num_stages=1)  # interpreter-sized tiles
TMA = {**SMALL, "tma": 1}
TMA_FLAT = {**SMALL, "tma": 2}
# the descriptor kernel's other options: warp specialisation, and the epilogue in two halves with h loaded early
TMA_VARIANTS = [TMA, TMA_FLAT, {**SMALL, "tma": 3}, {**SMALL, "tma": 2, "split": 2, "early_aux": 1},
                {**SMALL, "tma": 1, "split": 2}, {**SMALL, "tma": 3, "split": 2, "early_aux": 1}]
BF16_STEP = 2.0 ** -7  # relative spacing of bf16 numbers: one step of truncation


@pytest.fixture
def kernel():
    """golfnb._triton_mlp: compiled for the GPU, or in Triton's interpreter on CPU (set up in conftest.py)."""
    if not CUDA:
        assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets TRITON_INTERPRET=1 without a GPU"
    return importlib.import_module("golfnb._triton_mlp")


def _operands(M, d, H, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, d, generator=g).to(DEV, dtype)
    w_up = (torch.randn(H, d, generator=g) / d ** 0.5).to(DEV, dtype)
    w_down = (torch.randn(d, H, generator=g) / H ** 0.5).to(DEV, dtype)
    dy = torch.randn(M, d, generator=g).to(DEV, dtype)
    return x, w_up, w_down, dy


def _close_bf16(got: torch.Tensor, want: torch.Tensor, steps: float = 1.0, atol: float = 1e-6) -> None:
    """Within `steps` bf16 steps of `want` (relative), elementwise."""
    err = (got.float() - want.float()).abs()
    bound = steps * BF16_STEP * want.float().abs() + atol
    worst = (err - bound).max().item()
    assert worst <= 0, f"largest excess over {steps} bf16 step(s): {worst:.3g} (max err {err.max().item():.3g})"


@pytest.mark.parametrize("M,d,H,tile", [(64, 64, 128, SMALL),  # tiles divide every dimension: unmasked path
                                        (96, 48, 160, SMALL),  # ragged N and K: masked path
                                        (50, 40, 72, None),  # the H100 tile on a shape smaller than one tile
                                        (96, 48, 160, TMA),  # descriptor loads, persistent programs
                                        (96, 48, 160, TMA_FLAT)])  # the same, tile and k loops flattened
@pytest.mark.parametrize("slope", [0.5, 0.0])
def test_up_act_writes_the_gemm_and_its_activation(kernel, M, d, H, tile, slope):
    x, w_up, _, _ = _operands(M, d, H, seed=M + H)
    h, a = kernel.up_act(x, w_up, slope, tile)
    assert h.shape == a.shape == (M, H) and h.dtype == a.dtype == torch.bfloat16
    exact = x.float() @ w_up.float().t()
    _close_bf16(h, exact)  # the fp32 accumulator, rounded (truncated in the interpreter) once
    # the activation is computed from the bf16 h, as the plain path computes it from its bf16 GEMM output
    want = F.leaky_relu(h.float(), slope).square().to(torch.bfloat16)
    if CUDA:
        assert torch.equal(a, want)
    else:
        _close_bf16(a, want)
    if slope == 0.0:
        assert torch.equal(a[h <= 0], torch.zeros_like(a[h <= 0]))


@pytest.mark.parametrize("M,d,H,tile", [(64, 64, 128, SMALL), (96, 48, 160, SMALL), (96, 48, 160, TMA),
                                        (96, 48, 160, TMA_FLAT)])
@pytest.mark.parametrize("slope", [0.5, 0.0])
def test_down_dact_multiplies_by_the_activation_derivative(kernel, M, d, H, tile, slope):
    x, w_up, w_down, dy = _operands(M, d, H, seed=7 + M)
    h = (x.float() @ w_up.float().t()).to(torch.bfloat16)
    dh = kernel.down_dact(dy, w_down, h, slope, tile)
    hf = h.float()
    want = (dy.float() @ w_down.float()) * torch.where(hf > 0, 2 * hf, 2 * slope * slope * hf)
    assert dh.dtype == torch.bfloat16 and dh.shape == h.shape
    _close_bf16(dh, want, atol=1e-5)
    # a non-contiguous h (a transposed copy's view) is read correctly
    dh2 = kernel.down_dact(dy, w_down, h.t().contiguous().t(), slope, tile)
    assert torch.equal(dh2, dh)


@pytest.mark.parametrize("tma", TMA_VARIANTS, ids=lambda t: "tma{tma}-split{split}-early{early_aux}".format(
    **{"split": 1, "early_aux": 0, **t}))
def test_tma_kernel_equals_the_pointer_kernel(kernel, tma):
    """The GEMM variants sum each output in the same k order, so on the same tile they agree bit for bit."""
    x, w_up, w_down, dy = _operands(96, 64, 160, seed=21)
    h0, a0 = kernel.up_act(x, w_up, 0.5, SMALL)
    h1, a1 = kernel.up_act(x, w_up, 0.5, tma)
    assert torch.equal(h0, h1) and torch.equal(a0, a1)
    assert torch.equal(kernel.down_dact(dy, w_down, h0, 0.5, SMALL), kernel.down_dact(dy, w_down, h0, 0.5, tma))


def test_descriptor_kernel_only_where_the_gpu_has_tma(kernel, monkeypatch):
    """The default tile asks for the flattened descriptor kernel; CUDA GPUs before Hopper get the pointer kernel."""
    assert kernel.DEFAULT_TILE["tma"] == 2
    cuda = torch.device("cuda", 0)
    for major, want in ((8, 0), (9, 2), (10, 2)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        assert kernel.kernel_variant(kernel.DEFAULT_TILE, cuda) == want
        assert kernel.kernel_variant({**kernel.DEFAULT_TILE, "tma": 0}, cuda) == 0
    assert kernel.kernel_variant(kernel.DEFAULT_TILE, torch.device("cpu")) == 2  # the interpreter runs it


def test_tiles_shrink_to_fit_shared_memory(kernel):
    """The H100 refused the bf16 default tile with fp32 operands (288 KB of shared memory, 227 KB allowed)."""
    bf16 = kernel.fit_tile(kernel.DEFAULT_TILE, 2)
    assert bf16 == kernel.DEFAULT_TILE  # measured as the best tile: left alone
    fp32 = kernel.fit_tile(kernel.DEFAULT_TILE, 4)
    staged = fp32["num_stages"] * (fp32["block_m"] + fp32["block_n"]) * fp32["block_k"] * 4
    assert staged <= kernel.SMEM_BYTES and fp32["num_stages"] >= 2 and fp32["block_k"] >= 16
    assert (fp32["block_m"], fp32["block_n"]) == (bf16["block_m"], bf16["block_n"])


def test_tile_override_from_the_environment(kernel, monkeypatch):
    monkeypatch.setenv("GOLFNB_MLP_TILE", "32,64,32,2,4,1,1")
    assert kernel._env_tile() == {**SMALL, "tma": 1}
    x, w_up, _, _ = _operands(64, 32, 64, seed=2)
    h, _ = kernel.up_act(x, w_up, 0.5)
    _close_bf16(h, x.float() @ w_up.float().t())
    monkeypatch.setenv("GOLFNB_MLP_TILE", "32,64,32,2,4,1,2")
    assert kernel._env_tile() == TMA_FLAT
    monkeypatch.setenv("GOLFNB_MLP_TILE", "32,64,32,2,4,1,3,2,1")
    assert kernel._env_tile() == {**SMALL, "tma": 3, "split": 2, "early_aux": 1}
    monkeypatch.setenv("GOLFNB_MLP_TILE", "32,64,32,2,4,1")  # six numbers: the pointer kernel
    assert kernel.resolve_tile() == {**kernel.DEFAULT_TILE, **SMALL, "tma": 0}
    monkeypatch.delenv("GOLFNB_MLP_TILE")
    assert kernel.resolve_tile() == kernel.DEFAULT_TILE
    # the tests' SMALL tile is the pointer kernel
    assert kernel.resolve_tile(SMALL) == {**kernel.DEFAULT_TILE, **SMALL, "tma": 0}
    assert kernel.resolve_tile(TMA) == {**kernel.DEFAULT_TILE, **TMA}
    with pytest.raises(ValueError, match="unknown tile keys"):
        kernel.resolve_tile({**SMALL, "stages": 3})
    with pytest.raises(ValueError, match="split=3"):
        kernel.resolve_tile({**SMALL, "tma": 2, "split": 3})
    for bad in ("128,256", "32,64,32,2,4,1,4", "32,64,32,2,4,1,2,3", "32,64,32,2,4,1,2,1,0,5"):
        monkeypatch.setenv("GOLFNB_MLP_TILE", bad)
        with pytest.raises(ValueError, match="GOLFNB_MLP_TILE"):
            kernel.up_act(x, w_up, 0.5)


def test_fp32_operands_match_the_formula_tightly(kernel):
    """In fp32 (no output rounding) the kernel is the formula to accumulation order, for both epilogues."""
    if CUDA:
        pytest.skip("on the GPU fp32 dot products run in TF32; the bf16 tests cover the GPU")
    x, w_up, w_down, dy = _operands(64, 64, 128, seed=3, dtype=torch.float32)
    h, a = kernel.up_act(x, w_up, 0.5, SMALL)
    torch.testing.assert_close(h, x @ w_up.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, F.leaky_relu(h, 0.5).square(), rtol=1e-6, atol=1e-6)
    dh = kernel.down_dact(dy, w_down, h, 0.5, SMALL)
    torch.testing.assert_close(dh, (dy @ w_down) * torch.where(h > 0, 2 * h, 0.5 * h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile,H", [(SMALL, 164), (TMA_FLAT, 168), (TMA_FLAT, 164),
                                    ({**SMALL, "tma": 2, "split": 2, "early_aux": 1}, 168), ({**SMALL, "tma": 3}, 168)],
                         ids=["pointer", "flat", "flat-unaligned", "flat-split-early", "ws"])
def test_sign_mask_kernels_match_the_h_kernels(kernel, tile, H):
    """The sign-mask mode writes a (bit for bit as up_act) and one bit per h instead of h; its backward, from
    sqrt(a) and the sign, is the h-based dh to bf16 rounding (sqrt(a) is |leaky_relu(h)| to half a bf16 step).
    H is not a multiple of the tile; 164 is not one of 8 either (the last byte of each row is partly padding),
    nor are its bf16 rows a multiple of 16 bytes, which descriptors need: that shape runs the pointer kernel."""
    M, d = 96, 48
    x, w_up, w_down, dy = _operands(M, d, H, seed=31)
    h, a = kernel.up_act(x, w_up, 0.5, tile)
    a2, signs = kernel.up_act_signs(x, w_up, 0.5, tile)
    assert torch.equal(a2, a)
    assert signs.dtype == torch.uint8 and signs.shape == (M, (H + 7) // 8)
    bits = ((signs[:, :, None].int() >> torch.arange(8, device=signs.device)) & 1).reshape(M, -1)[:, :H]
    assert torch.equal(bits.bool(), h > 0)
    dh = kernel.down_dact(dy, w_down, h, 0.5, tile)
    _close_bf16(kernel.down_dact_signs(dy, w_down, a2, signs, 0.5, tile), dh, steps=2.0)
    with pytest.raises(ValueError, match="signs uint8"):
        kernel.down_dact_signs(dy, w_down, a2, signs[:, 1:], 0.5, tile)


def test_sign_mask_backward_is_the_derivative_in_fp32(kernel):
    if CUDA:
        pytest.skip("on the GPU fp32 dot products run in TF32; the bf16 test covers the GPU")
    x, w_up, w_down, dy = _operands(64, 64, 128, seed=32, dtype=torch.float32)
    for slope in (0.5, 0.0):  # leaky_relu^2 and relu^2
        a, signs = kernel.up_act_signs(x, w_up, slope, SMALL)
        h = x @ w_up.t()
        want = (dy @ w_down) * torch.where(h > 0, 2 * h, 2 * slope * slope * h)
        torch.testing.assert_close(kernel.down_dact_signs(dy, w_down, a, signs, slope, SMALL), want,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("signs", [False, True], ids=["keeps-h", "keeps-signs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_output_and_gradients_match_autograd_of_the_plain_path(kernel, dtype, signs, monkeypatch):
    if CUDA and dtype == torch.float32:
        pytest.skip("on the GPU fp32 dot products run in TF32")
    monkeypatch.setitem(kernel.DEFAULT_TILE, "sign_mask", int(signs))
    launched = []
    for name in ("up_act", "up_act_signs"):
        real = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, _f=real, _n=name, **k: launched.append(_n) or _f(*a, **k))
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(3, 40, 48, generator=g).to(DEV, dtype)  # [B, T, d]: the wrapper flattens the rows
    u0 = (torch.randn(160, 48, generator=g) / 7).to(DEV, dtype)
    d0 = (torch.randn(48, 160, generator=g) / 12).to(DEV, dtype)
    up = torch.randn(3, 40, 48, generator=g).to(DEV, dtype)  # an arbitrary upstream gradient
    out = {}
    for name, f, cast in (("fused", fused_mlp.fused_mlp, dtype), ("plain", fused_mlp.mlp_reference, dtype),
                          ("exact", fused_mlp.mlp_reference, torch.float64)):
        x, u, w = (t.to(cast).clone().requires_grad_() for t in (x0, u0, d0))
        y = f(x, u, w, 0.5)
        (y.double() * up.double()).sum().backward()
        out[name] = {"y": y, "x": x.grad, "w_up": u.grad, "w_down": w.grad}
    for k in out["exact"]:
        assert out["fused"][k].dtype == dtype and out["fused"][k].shape == out["exact"][k].shape, k
        if dtype == torch.float32:
            torch.testing.assert_close(out["fused"][k], out["plain"][k], rtol=1e-4, atol=1e-5, msg=k)
            continue
        # bf16: as close to the float64 truth as the plain bf16 path is (the interpreter truncates where the GPU
        # rounds, which about doubles the error on CPU), relative to the largest entry
        exact = out["exact"][k]
        scale = exact.abs().max().item()
        err = {n: ((out[n][k].double() - exact).abs().max() / scale).item() for n in ("fused", "plain")}
        assert err["fused"] <= max(3 * err["plain"], 2 ** -6), (k, err)
    assert launched == ["up_act_signs" if signs else "up_act"]


def test_fused_mlp_traces_under_torch_compile(kernel):
    """The fake implementations and the autograd.Function trace through Dynamo and AOT autograd."""
    g = torch.Generator().manual_seed(12)
    x0 = torch.randn(24, 32, generator=g).to(DEV)
    u0 = (torch.randn(96, 32, generator=g) / 6).to(DEV)
    d0 = (torch.randn(32, 96, generator=g) / 10).to(DEV)

    def f(x, u, w):
        return fused_mlp.fused_mlp(torch.tanh(x), u, w, 0.5).square().mean()

    results = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        x, u, w = (t.clone().requires_grad_() for t in (x0, u0, d0))
        loss = fn(x, u, w)
        loss.backward()
        results.append((loss.detach(), x.grad, u.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("banked", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_model_loss_and_every_gradient_agree_between_backends(kernel, banked, compiled, monkeypatch):
    cfg = preset("smoke", bank_params=banked)
    V = cfg.vocab_size
    calls = {"up_act": 0, "down_dact": 0}
    for name in calls:  # count the kernel launches: the fused arm must really run them
        real = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, _f=real, _n=name, **k: calls.__setitem__(_n, calls[_n] + 1)
                            or _f(*a, **k))
    losses, grads = [], []
    for backend in ("torch", "triton"):
        m = build_model(cfg, DEV)
        m.set_mlp_backend(backend)
        with torch.no_grad():  # the MLP's output projection starts at zero: give every weight a value
            for i, p in enumerate(m.parameters()):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(DEV))
        if compiled:
            torch._dynamo.reset()
        f = torch.compile(m, dynamic=False) if compiled else m
        g = torch.Generator().manual_seed(4)
        ids = torch.randint(0, V, (2, 64), generator=g).to(DEV)
        tgt = torch.randint(0, V, (2, 64), generator=g).to(DEV)
        loss = f(ids, tgt)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert calls == {"up_act": cfg.num_layers, "down_dact": cfg.num_layers}, calls
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    assert any("fc" in n or "up" in n for n in grads[1]), list(grads[1])
    for n in grads[0]:
        a, b = grads[1][n].float(), grads[0][n].float()
        if CUDA or grads[0][n].dtype == torch.bfloat16:
            # under CUDA autocast the two paths round h and the activation's gradient to bf16 at different
            # points, and the tied embedding's gradient is bf16 everywhere (bf16 master weights): single small
            # elements then differ by more than a bf16 step, so compare the whole tensor, to within one step
            rel = ((a - b).norm() / b.norm()).item()
            assert rel <= BF16_STEP, f"{n}: relative difference {rel:.2e} > {BF16_STEP:.2e}"
        else:
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_without_autograd_the_plain_path_runs_so_gptq_hooks_see_the_inputs(kernel):
    cfg = preset("smoke")
    m = build_model(cfg, DEV)
    m.set_mlp_backend("triton")
    seen = []
    m.blocks[0].mlp.fc.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    ids = torch.randint(0, cfg.vocab_size, (1, 32)).to(DEV)
    with torch.no_grad():
        m.forward_logits(ids)
    assert len(seen) == 1
    m.forward_logits(ids)  # with autograd: the fused path, which calls no nn.Linear
    assert len(seen) == 1


def test_backend_resolution_by_activation_and_bad_inputs():
    # the rules shared with ce_backend: tests/test_fused_ce.py::test_kernel_backend_settings_resolve_alike
    assert fused_mlp.resolve_mlp_backend("torch", "cpu", "relu2") == "torch"
    assert fused_mlp.resolve_mlp_backend("auto", "cuda", "gelu") == "torch"  # auto falls back, never fails
    with pytest.raises(ValueError, match="no fused MLP for activation"):
        fused_mlp.resolve_mlp_backend("triton", "cuda", "gelu")
    with pytest.raises(ValueError, match="share a dtype"):
        fused_mlp.fused_mlp(torch.zeros(4, 8), torch.zeros(16, 8, dtype=torch.bfloat16), torch.zeros(8, 16), 0.5)
    with pytest.raises(ValueError, match=r"w_up \[hidden, d\]"):
        fused_mlp.fused_mlp(torch.zeros(4, 8), torch.zeros(16, 8), torch.zeros(16, 8), 0.5)


def test_kernels_read_only_constexpr_globals(kernel):
    """Compiled Triton refuses a kernel that reads a module global unless it is a tl.constexpr instance; the
    interpreter does not check, so check the kernel's own code object."""
    import types

    import triton
    import triton.language as tl

    jitted = {n: f for n, f in vars(kernel).items() if hasattr(f, "fn") and hasattr(f.fn, "__code__")}
    assert "_mm_act_kernel" in jitted
    for name, f in jitted.items():
        for gname in f.fn.__code__.co_names:
            if gname in vars(kernel):
                val = vars(kernel)[gname]
                assert isinstance(val, (types.ModuleType, tl.constexpr)) or gname in jitted or val in (triton, tl), \
                    f"kernel {name} reads module global {gname!r}"


@pytest.mark.skipif(not CUDA, reason="needs a GPU: pr1514's shapes, compiled kernel")
def test_pr1514_shapes_on_gpu(kernel):
    M, d, H = 98304, 512, 2048
    x, w_up, w_down, dy = _operands(M, d, H, seed=5)
    h, a = kernel.up_act(x, w_up, 0.5)
    h_ref = F.linear(x, w_up)  # cuBLAS, bf16 out
    torch.testing.assert_close(h.float(), h_ref.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(a, F.leaky_relu(h, 0.5).square())  # same rounding as the plain path, from the same h
    dh = kernel.down_dact(dy, w_down, h, 0.5)
    hf = h.float()
    want = (dy.float() @ w_down.float()) * torch.where(hf > 0, 2 * hf, 0.5 * hf)
    _close_bf16(dh, want, steps=1.0, atol=1e-3)


def test_packed_kernel_module_runs(tmp_path):
    """The minified, packed kernel module compiles (Triton reads its source through the packed loader)."""
    import subprocess
    import sys
    import textwrap

    from golfnb import pack

    text, _ = pack.pack_text(pack.submission_config(preset("smoke")))
    mods = pack.payload_modules(pack.unwrap(text))
    assert "golfnb.fused_mlp" in mods and "BACKWARD: tl.constexpr" in mods["golfnb._triton_mlp"][0]
    (tmp_path / "train_gpt.py").write_text(text)
    probe = textwrap.dedent("""
        import runpy, torch
        runpy.run_path("train_gpt.py", run_name="packed")   # installs the in-memory golfnb, runs nothing
        import golfnb._triton_mlp as k
        assert k.__file__.startswith("<packed>"), k.__file__
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        x = torch.randn(64, 32, device=dev).bfloat16()
        u = (torch.randn(128, 32, device=dev) / 6).bfloat16()
        h, a = k.up_act(x, u, 0.5, dict(block_m=32, block_n=64, block_k=32, group_m=2, num_warps=4, num_stages=1))
        print("maxdiff", float((h.float() - x.float() @ u.float().t()).abs().max()))
    """)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if not CUDA:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert float(proc.stdout.split("maxdiff")[1]) < 0.05
