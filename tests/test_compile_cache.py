"""golfnb.compile_cache: compiled artifacts persisted by one training run make the next start-up warm, on a
fresh Inductor cache, without changing what is computed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from golfnb import compile_cache
from golfnb.config import preset

REPO = Path(__file__).resolve().parents[1]


def test_key_ignores_schedule_and_data_but_not_the_model():
    base = preset("smoke")
    k = compile_cache.cache_key(base, "cpu", 1)
    assert compile_cache.cache_key(base.replace(seed=9, iterations=7, data_path="/elsewhere"), "cpu", 1) == k
    assert compile_cache.cache_key(base.replace(eval_stride=16, ttt_lr=0.5), "cpu", 1) == k
    assert compile_cache.cache_key(base.replace(model_dim=base.model_dim * 2), "cpu", 1) != k
    assert compile_cache.cache_key(base, "cpu", 2) != k


def test_cache_root_follows_the_environment(tmp_path):
    assert compile_cache.cache_root({"GOLFNB_CACHE_DIR": str(tmp_path)}) == tmp_path / "compile"
    assert compile_cache.cache_root({"GOLFNB_COMPILE_CACHE": "off", "GOLFNB_CACHE_DIR": str(tmp_path)}) is None
    assert compile_cache.cache_root({}) == Path.home() / ".cache" / "golfnb" / "compile"


def test_an_unreadable_cache_file_means_a_cold_start(tmp_path, monkeypatch):
    monkeypatch.setenv("GOLFNB_CACHE_DIR", str(tmp_path))
    cfg = preset("smoke")
    bad = tmp_path / "compile" / f"{compile_cache.cache_key(cfg, 'cpu', 1)}.bin"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a cache")
    state = compile_cache.load(cfg, "cpu", 1)
    assert not state.warm and state.source == bad and state.error
    assert "cold" in state.describe()
    assert compile_cache.load(preset("smoke", model_dim=32), "cpu", 1).source is None  # other key: nothing found


# the compiling tests build a three-layer smoke model (every block kind still present: looped, XSA, parallel):
# Inductor's CPU compile of the five-layer one made these four tests a quarter of the suite's time
THREE_LAYERS = dict(num_layers=3, xsa_last_n=3, parallel_start_layer=2)

_TRAIN = """
import json, sys
from golfnb.config import preset
from golfnb.train import train
cfg = preset("smoke", num_layers=3, xsa_last_n=3, parallel_start_layer=2,  # three layers: a shorter CPU compile
             compile_mode="default", num_loops=0, iterations=2, warmup_steps=1, val_loss_every=0,
             max_val_tokens=1024, data_path=sys.argv[2], tokenizer_path=sys.argv[3])
s = train(cfg, sys.argv[1])
print("SUMMARY " + json.dumps({k: s[k] for k in ("warmup_s", "compile_cache", "val_loss", "val_bpb")}))
"""


def _train(run_dir: Path, inductor_dir: Path, cache_dir: Path, data: Path, tok: Path) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(inductor_dir), GOLFNB_CACHE_DIR=str(cache_dir),
               PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _TRAIN, str(run_dir), str(data), str(tok)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY "):])


def test_second_run_starts_warm_from_the_persisted_artifacts(tmp_path, shared_data):
    from golfnb.data.build import build_shards

    tok = shared_data / "tokenizers" / "fineweb_1024_bpe.model"
    data = tmp_path / "data"
    build_shards([shared_data / "challenge_docs_sample" / "verify_docs_200.jsonl"], tok, data,
                 val_inputs=[shared_data / "challenge_val_prefix" / "docs_val_prefix_decoded.jsonl"], workers=1,
                 progress=False)
    cache = tmp_path / "cache"
    # each process gets its own empty Inductor cache: only golfnb's persisted file can make the second warm
    cold = _train(tmp_path / "run1", tmp_path / "inductor1", cache, data, tok)
    assert cold["compile_cache"] == "cold"
    assert (tmp_path / "run1" / compile_cache.RUN_CACHE_RELPATH).is_file()
    assert len(list((cache / "compile").glob("*.bin"))) == 1
    warm = _train(tmp_path / "run2", tmp_path / "inductor2", cache, data, tok)
    assert warm["compile_cache"] == "warm"
    assert (warm["val_loss"], warm["val_bpb"]) == (cold["val_loss"], cold["val_bpb"])  # same computation
    assert warm["warmup_s"] < cold["warmup_s"], (warm, cold)
    log = (tmp_path / "run2" / "train.log").read_text()
    assert "compile_cache:warm" in log and "compile cache warm" in log


def test_eval_key_follows_the_eval_shapes_not_the_optimizer_or_the_world_size():
    base = preset("smoke")
    k = compile_cache.cache_key(base, "cpu", 1, purpose="eval")
    assert k != compile_cache.cache_key(base, "cpu", 1)  # never the training file
    same = base.replace(matrix_lr=0.5, muon_momentum=0.9, ema_decay=0.0, eval_stride=8, ttt_lr=0.5, seed=3,
                        ce_backend="torch", train_batch_tokens=base.train_batch_tokens * 2)
    assert compile_cache.cache_key(same, "cpu", 1, purpose="eval") == k
    assert compile_cache.cache_key(base, "cpu", 8, purpose="eval") == k  # no collectives in the scoring forward
    for other in (dict(eval_seq_len=base.eval_seq_len * 2), dict(eval_batch_seqs=base.eval_batch_seqs + 1),
                  dict(ttt_batch_seqs=base.ttt_batch_seqs + 1), dict(model_dim=base.model_dim * 2),
                  dict(train_seq_len=base.train_seq_len * 2)):  # the NTK rotary tables depend on it
        assert compile_cache.cache_key(base.replace(**other), "cpu", 1, purpose="eval") != k, other
    try:
        compile_cache.cache_key(base, "cpu", 1, purpose="quantize")
    except ValueError as e:
        assert "purpose" in str(e)
    else:
        raise AssertionError("an unknown purpose must be rejected")


_EVAL = """
import json, sys, time
import numpy as np, torch
from golfnb.bpb import build_byte_luts
from golfnb.config import preset
from golfnb.data.shards import open_shard
from golfnb.evals.runner import run_method
from golfnb.legality import make_check_model
cfg = preset("smoke", num_layers=3, xsa_last_n=3, parallel_start_layer=2, eval_compile="on", eval_seq_len=64,
             eval_stride=32, eval_batch_seqs=4, eval_budget_seconds=0.0)
stream = torch.from_numpy(np.asarray(open_shard(sys.argv[1])[:513]).astype(np.int64))
luts = build_byte_luts(sys.argv[2], 1024)
t0 = time.perf_counter()
res = run_method("sliding", make_check_model(cfg, seed=0), stream, cfg, luts, log=print)
print("SUMMARY " + json.dumps({"val_bpb": res["val_bpb"], "seconds": time.perf_counter() - t0}))
"""


def _eval(inductor_dir: Path, cache_dir: Path, val: Path, tok: Path) -> tuple[dict, str]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(inductor_dir), GOLFNB_CACHE_DIR=str(cache_dir),
               PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _EVAL, str(val), str(tok)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY "):]), out.stdout


def test_second_eval_starts_warm_from_the_persisted_eval_artifacts(tmp_path, val_prefix_sp1024, sp1024_model):
    cache = tmp_path / "cache"
    cold, log_cold = _eval(tmp_path / "inductor1", cache, val_prefix_sp1024, sp1024_model)
    files = list((cache / "compile").glob("eval-*.bin"))
    assert len(files) == 1 and "eval_compile_cache:saved" in log_cold
    warm, log_warm = _eval(tmp_path / "inductor2", cache, val_prefix_sp1024, sp1024_model)
    assert warm["val_bpb"] == cold["val_bpb"]  # same computation
    assert warm["seconds"] < cold["seconds"], (warm, cold)
    assert "eval_compile_cache:cold" in log_cold and "eval_compile_cache:warm" in log_warm, log_warm
    print(f"sliding eval, smoke model, compiled forward: cold {cold['seconds']:.1f} s, warm {warm['seconds']:.1f} s")


def _compile_seeing(monkeypatch, model, cfg, *inputs, read=lambda: None):
    """Compile `model` as the trainer does and run it on `inputs`; returns (output, [read() as seen by each
    Inductor scheduler]), so a test can check an option is in force where Inductor decides its fusions. A cache
    hit would skip the scheduler, so Inductor's and AOTAutograd's caches are off here; patch(), not monkeypatch,
    for them: a config module's entries are not plain attributes, and undoing a monkeypatch would delete them."""
    import torch
    import torch._inductor.config as inductor_config
    import torch._inductor.scheduler as scheduler

    from golfnb.train import compile_training_graph

    torch._dynamo.reset()
    seen = []
    real = scheduler.Scheduler.__init__

    def spy(self, *a, **k):
        seen.append(read())
        return real(self, *a, **k)

    monkeypatch.setattr(scheduler.Scheduler, "__init__", spy)
    with inductor_config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        out = compile_training_graph(model, cfg)(*inputs)
        if out.requires_grad:
            out.backward()
    return out, seen


def test_fusion_io_limit_reaches_inductor_and_changes_nothing_computed(monkeypatch):
    """compile_fusion_io_limit is handed to Inductor (as max_fusion_unique_io_buffers, alongside the mode's own
    options), keys the training cache but not the eval one, and the limited graph computes the eager loss and
    gradients."""
    import pytest
    import torch
    import torch._inductor.config as inductor_config

    from golfnb.config import ConfigError
    from golfnb.model import build_model
    from golfnb.train import TrainingError, compile_options

    base = preset("smoke", **THREE_LAYERS).replace(compile_mode="default", compile_mix_order_reduction=True)
    assert compile_options(base) == {}
    assert compile_options(base.replace(compile_mode="max-autotune-no-cudagraphs")) == {
        "mode": "max-autotune-no-cudagraphs"}
    lim = base.replace(compile_fusion_io_limit=24)
    assert compile_options(lim) == {"options": {"max_fusion_unique_io_buffers": 24}}
    opts = compile_options(lim.replace(compile_mode="max-autotune-no-cudagraphs"))["options"]
    assert opts["max_fusion_unique_io_buffers"] == 24 and opts["max_autotune"] is True
    assert compile_cache.cache_key(lim, "cpu", 1) != compile_cache.cache_key(base, "cpu", 1)
    assert compile_cache.cache_key(lim, "cpu", 1, purpose="eval") == compile_cache.cache_key(base, "cpu", 1,
                                                                                              purpose="eval")
    with pytest.raises(ConfigError, match="compile_fusion_io_limit=2 must be 0"):
        base.replace(compile_fusion_io_limit=2)

    torch.manual_seed(0)
    model = build_model(lim, "cpu")
    ids = torch.randint(0, lim.vocab_size, (2, 64))
    tg = torch.randint(0, lim.vocab_size, (2, 64))
    ref = model(ids, tg)
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    got, seen = _compile_seeing(monkeypatch, model, lim, ids, tg,
                                read=lambda: inductor_config.max_fusion_unique_io_buffers)
    assert seen and all(v == 24 for v in seen)
    assert inductor_config.max_fusion_unique_io_buffers is None  # the global default is untouched
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), ref_grads):  # summed in another order: relative to each tensor's scale
        tol = 1e-2 if g.dtype == torch.bfloat16 else 1e-3  # the bf16 embedding keeps a bf16 gradient
        torch.testing.assert_close(p.grad, g, rtol=tol, atol=tol * g.abs().max().item() + 1e-7)

    import golfnb.train

    assert golfnb.train._inductor_has_option("max_fusion_unique_io_buffers")
    assert not golfnb.train._inductor_has_option("triton.no_such_option")
    monkeypatch.setattr(golfnb.train, "_inductor_has_option", lambda name: False)  # an older torch
    with pytest.raises(TrainingError, match="set compile_fusion_io_limit=0"):
        compile_options(lim)


def test_mix_order_reduction_switch_reaches_inductor(monkeypatch):
    """compile_mix_order_reduction=False (the default) turns Inductor's triton.mix_order_reduction off for the
    training graph only (in force inside the scheduler, global default untouched), keys the training cache but not
    the eval one, combines with the fusion limit and a mode, and computes the eager loss; True leaves Inductor's
    setting alone, and a torch without the option gets nothing to turn off."""
    import torch
    import torch._inductor.config as inductor_config

    import golfnb.train
    from golfnb.model import build_model
    from golfnb.train import compile_options

    off = preset("smoke", **THREE_LAYERS).replace(compile_mode="default")
    assert off.compile_mix_order_reduction is False and preset("pr1514").compile_mix_order_reduction is False
    base = off.replace(compile_mix_order_reduction=True)
    assert compile_options(base) == {}
    assert compile_options(off) == {"options": {"triton.mix_order_reduction": False}}
    both = compile_options(off.replace(compile_fusion_io_limit=16, compile_mode="max-autotune-no-cudagraphs"))
    assert both["options"]["triton.mix_order_reduction"] is False
    assert both["options"]["max_fusion_unique_io_buffers"] == 16 and both["options"]["max_autotune"] is True
    assert compile_cache.cache_key(off, "cpu", 1) != compile_cache.cache_key(base, "cpu", 1)
    assert compile_cache.cache_key(off, "cpu", 1, purpose="eval") == compile_cache.cache_key(base, "cpu", 1,
                                                                                              purpose="eval")
    default = inductor_config.triton.mix_order_reduction  # on outside fbcode unless the environment says otherwise

    torch.manual_seed(0)
    model = build_model(off, "cpu")
    ids = torch.randint(0, off.vocab_size, (2, 64))
    ref = model(ids, ids).detach()
    got, seen = _compile_seeing(monkeypatch, model, off, ids, ids,
                                read=lambda: inductor_config.triton.mix_order_reduction)
    assert seen and not any(seen)
    assert inductor_config.triton.mix_order_reduction is default  # the global setting is untouched
    torch.testing.assert_close(got.detach(), ref, rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(golfnb.train, "_inductor_has_option", lambda name: name != "triton.mix_order_reduction")
    assert compile_options(off) == {}  # an older torch: no mix-order fusion exists to turn off
    assert compile_options(off.replace(compile_fusion_io_limit=16)) == {
        "options": {"max_fusion_unique_io_buffers": 16}}
