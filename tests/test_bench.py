"""The throughput benchmark on CPU (smoke preset, real shards) and its kernel-category breakdown."""
from __future__ import annotations

import json
import time
import math
from pathlib import Path

import pytest
import torch

from golfnb import bench
from golfnb.config import preset, resolve
from golfnb.data.build import build_shards


@pytest.fixture(scope="module")
def smoke_data_root(shared_data: Path, sp1024_model: Path, tmp_path_factory) -> Path:
    """sp1024 train shards from the FineWeb-Edu sample under the layout `with_data_root` expects."""
    root = tmp_path_factory.mktemp("bench_data")
    txt = root / "train.txt"
    txt.write_text((shared_data / "fineweb_edu_sample" / "fineweb_edu_sample10BT_head.txt").read_text()[:60_000])
    build_shards([txt], sp1024_model, root / "datasets" / "fineweb10B_sp1024", shard_tokens=8_000, workers=1,
                 progress=False)
    (root / "tokenizers").mkdir()
    (root / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(sp1024_model.read_bytes())
    return root


def test_kernel_categories_cover_a_training_step() -> None:
    names = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0": "attention",
        "nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matmul",
        "triton_red_fused__to_copy_add_mul_rms_norm_3": "fused reduction (Inductor)",
        "triton_per_fused_add_mul_5": "fused reduction (Inductor)",
        "triton_poi_fused_leaky_relu_pow_7": "fused pointwise (Inductor)",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>": "optimizer (foreach)",
        "Memcpy DtoD (Device -> Device)": "copy / fill",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "communication",
        "void at::native::vectorized_elementwise_kernel<4, at::native::AUnaryFunctor<float>>": "eager ATen (elementwise, reductions)",
    }
    names["Command Buffer Full"] = names["Optimizer.step#RoundRobinMuon.step"] = bench.MARKER
    names["void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*, ...)"] = "attention"
    for name, cat in names.items():
        assert bench.kernel_category(name) == cat, name
    rows = bench.summarize_kernels([(n, 2.0, 3) for n in names], wall_ms=40.0)
    by = {r["category"]: r for r in rows}
    assert by["matmul"]["ms"] == 4.0 and by["matmul"]["calls"] == 6 and by["matmul"]["share"] == 0.1
    # 11 kernels x 2 ms inside a 40 ms step; the markers' 4 ms are no kernel's time
    assert by["GPU idle (wall - kernel time)"]["ms"] == 18.0 and by[bench.MARKER]["ms"] == 4.0
    assert [r["ms"] for r in rows[:-1]] == sorted((r["ms"] for r in rows[:-1]), reverse=True)


def test_bench_runs_the_trainer_step_on_real_shards(tmp_path: Path, smoke_data_root: Path) -> None:
    cfg = resolve("smoke", {"train_batch_tokens": 2048, "train_seq_len": 256}).with_data_root(str(smoke_data_root))
    lines: list[str] = []
    res = bench.run_bench(cfg, steps=2, data="real", log=lines.append, profile_dir=str(tmp_path / "prof"))
    assert res["data"] == "real" and res["device"] and res["params"] > 0
    assert res["attn_backend"] in res["attn_backends_available"] and "math" in res["attn_backends_available"]
    phases = ["pre"] + (["post"] if cfg.num_loops > 0 else [])
    for ph in phases:
        r = res[ph]
        assert r["tok_s"] > 0 and r["ms_min"] <= r["ms_per_step"] <= r["ms_max"]
        assert r["tok_s"] == pytest.approx(cfg.train_batch_tokens / (r["ms_per_step"] / 1000), rel=0.01)
        table = Path(res["profile"][ph]["table"]).read_text()
        assert "Self CPU" in table and res["profile"][ph]["wall_ms"] > 0
    assert any(line.startswith("bench phase:pre ") for line in lines)
    json.dumps(res)  # the --json output is plain JSON


def test_ce_bench_times_each_backend_on_the_same_inputs(capsys) -> None:
    """`--ce-only`: the LM head + CE alone. On CPU only the plain arm can run (Triton needs CUDA); with a GPU both
    arms run on the same inputs and must give the same loss and gradients to bf16 rounding."""
    cfg = preset("smoke").replace(compile_mode="none")
    res = bench.run_ce_bench(cfg, steps=3, tokens=256)
    assert res["tokens"] == 256 and res["vocab_size"] == cfg.vocab_size and res["model_dim"] == cfg.model_dim
    plain = res["arms"]["torch"]
    assert plain["ms"] > 0 and plain["ms_min"] <= plain["ms"]
    # logits with std ~2 over V classes: the loss is log V plus about var/2 = 2, not 0 or inf
    assert math.log(cfg.vocab_size) < plain["loss"] < math.log(cfg.vocab_size) + 4 and plain["grad_w_norm"] > 0
    if torch.cuda.is_available():
        fused = res["arms"]["triton"]
        assert abs(fused["loss"] - plain["loss"]) < 1e-2 * plain["loss"]
        assert abs(fused["grad_h_norm"] / plain["grad_h_norm"] - 1) < 2e-2
        assert res["speedup"] == round(plain["ms"] / fused["ms"], 3)
    else:
        assert set(res["arms"]) == {"torch"} and "speedup" not in res
    assert bench.main(["--preset", "smoke", "--ce-only", "--steps", "2", "--set", "compile_mode=none"]) == 0
    assert "ce_bench arm:torch" in capsys.readouterr().out


def test_kernel_sources_are_found_by_name_and_ranked_per_call(tmp_path: Path) -> None:
    """`--kernel-sources`: a profile's slowest generated kernels (per call) are saved with their source, looked up
    by name in Inductor's cache directory; a name defined in two graphs' files returns both."""
    cache = tmp_path / "inductor"
    (cache / "ab").mkdir(parents=True)
    (cache / "cd").mkdir()
    (cache / "ab" / "c1.py").write_text("@triton.jit\ndef triton_per_fused_add_3(in_ptr0):\n    pass  # graph A\n")
    (cache / "cd" / "c2.py").write_text("@triton.jit\ndef triton_per_fused_add_3(in_ptr0):\n    pass  # graph B\n")
    (cache / "cd" / "c3.py").write_text("def triton_poi_fused_mul_1(x):\n    pass\n")
    found = bench.kernel_sources(["triton_per_fused_add_3", "triton_poi_fused_mul_1", "triton_red_missing_9"], cache)
    assert len(found["triton_per_fused_add_3"]) == 2 and "graph B" in "".join(found["triton_per_fused_add_3"])
    assert found["triton_poi_fused_mul_1"] == ["def triton_poi_fused_mul_1(x):\n    pass\n"]
    assert found["triton_red_missing_9"] == []
    assert bench.kernel_sources(["x"], tmp_path / "nowhere") == {"x": []}
    # 8 calls of 5 ms beat 88 calls of 0.2 ms (17.6 ms in total); cuBLAS kernels have no generated source
    kernels = [("triton_poi_fused_mul_1", 17.6, 88), ("triton_per_fused_add_3", 40.0, 8), ("nvjet_sm90_tst", 90.0, 8)]
    path = bench._write_sources(kernels, 1, tmp_path / "src.py", cache)
    text = path.read_text()
    assert text.startswith("# ==== triton_per_fused_add_3: 40.00 ms in 8 calls (5.000 ms per call), 2 source file(s)")
    assert "graph A" in text and "graph B" in text and "mul_1" not in text and "nvjet" not in text
    both = bench._write_sources(kernels, 5, tmp_path / "src2.py", cache).read_text()
    assert both.index("add_3") < both.index("mul_1") and "nvjet" not in both


def test_median_ms_times_only_fn_after_its_warmup() -> None:
    """setup is outside the timed region, warm-up calls are dropped, and the median is of the timed calls."""
    from golfnb.bench import median_ms

    calls, setups = [], []

    def fn():
        calls.append(1)
        time.sleep(0.02 if len(calls) <= 2 else 0.001)  # two slow warm-up calls

    ms = median_ms(fn, reps=5, warmup=2, setup=lambda: setups.append(1) or time.sleep(0.03), device="cpu")
    assert len(calls) == 7 and len(setups) == 7
    assert 0.5 < ms < 15, ms
