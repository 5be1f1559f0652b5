"""The single-file submission (golfnb.pack + golfnb.pipeline): module closure, minifier, tree shaking,
wrapper, and the packed train_gpt.py run end to end in a fresh directory with golfnb not importable and
the network blocked."""
from __future__ import annotations

import ast
import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from golfnb import pack
from golfnb.config import preset

# Tiny end-to-end config: the smoke model, 6 steps, 2 calibration batches, plain eval on 4,096 tokens.
E2E = dict(iterations=6, warmup_steps=1, val_loss_every=0, train_log_every=2, gptq_calibration_batches=2,
           sliding_eval=False, ttt_enabled=False, ngram_tilt_enabled=False, final_eval="plain",
           max_val_tokens=4096)

# Installed before anything else in the child: any socket use raises, the network client libraries and
# golfnb itself cannot be imported from disk (the packed file must serve golfnb from memory).
SITECUSTOMIZE = textwrap.dedent('''
    import socket, sys
    def _no_network(*a, **k):
        raise OSError("network access is blocked in this test")
    socket.socket.connect = _no_network
    socket.socket.connect_ex = _no_network
    socket.create_connection = _no_network
    socket.getaddrinfo = _no_network
    class _Block:
        BLOCKED = ("golfnb", "huggingface_hub", "requests", "urllib3", "httpx", "aiohttp")
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, _Block())
''')


def test_closure_has_what_the_submission_needs_and_no_tooling():
    names = pack.module_closure()
    for need in ("golfnb", "golfnb.pipeline", "golfnb.train", "golfnb.quant", "golfnb.artifact", "golfnb.model",
                 "golfnb.data.loaders", "golfnb.evals.runner", "golfnb.bpb"):
        assert need in names
    assert not set(names) & pack.EXCLUDED_MODULES
    pack.check_no_network(pack.module_sources(names))


def test_network_imports_are_refused():
    for src in ("import urllib.request\n", "from huggingface_hub import hf_hub_download\n",
                "def f():\n    import requests\n", "import importlib\nimportlib.import_module('socket')\n"):
        with pytest.raises(pack.PackError, match="network"):
            pack.check_no_network({"golfnb.x": src})


def test_minify_keeps_behaviour_and_names():
    src = textwrap.dedent('''
        """Module doc."""
        import math

        def area(r: float, *, scale: float = 1.0) -> float:
            """Doc."""
            # a comment
            if r < 0:
                "a bare string"
                raise ValueError("negative radius")
            return scale * math.pi * r ** 2

        class Box:
            """Doc."""
            size: int = 3

            def volume(self) -> int:
                return self.size ** 3

        if __name__ == "__main__":
            print(area(1.0))
    ''')
    out = pack.minify_source(src, "m")
    assert '"""' not in out and "comment" not in out and "bare string" not in out and "__main__" not in out
    assert "float" not in out  # function annotations gone
    assert "size: int = 3" in out  # class annotations kept (dataclass fields need them)
    ns: dict = {}
    exec(compile(out, "m", "exec"), ns)
    assert ns["area"](2.0, scale=0.5) == pytest.approx(0.5 * 3.141592653589793 * 4)
    assert ns["Box"]().volume() == 27
    with pytest.raises(ValueError, match="negative radius"):
        ns["area"](-1.0)
    # a module that reads __doc__ keeps its first line
    out2 = pack.minify_source('"""First line.\n\nMore."""\nX = __doc__.split()[0]\n')
    ns2: dict = {}
    exec(out2, ns2)
    assert ns2["X"] == "First"


def test_every_golfnb_module_minifies_to_the_same_tree():
    for name in pack.module_closure():
        src, _pkg = pack.module_sources([name])[name]
        compile(pack.minify_source(src, name), name, "exec")  # minify_source also checks the tree itself


def test_tree_shake_drops_only_unreachable_defs():
    mods = {
        "golfnb.a": "from golfnb.b import used, unused\nTABLE = {'k': 'by_name'}\n\ndef entry():\n    return used()\n"
                    "\ndef dead():\n    return helper()\n\ndef helper():\n    return 1\n\n"
                    "__all__ = ['entry', 'dead']\n",
        "golfnb.b": "import functools\n\ndef used():\n    return 2\n\ndef unused():\n    return 3\n\n"
                    "def by_name():\n    return 4\n\n@register('x')\ndef registered():\n    return 5\n\n"
                    "@functools.lru_cache\ndef cached():\n    return 6\n",
    }
    trees = {k: ast.parse(v) for k, v in mods.items()}
    removed = pack.shake(trees, roots={"entry"})
    assert removed == {"golfnb.a": ["dead", "helper"], "golfnb.b": ["cached", "unused"]}
    a = ast.unparse(trees["golfnb.a"])
    assert "from golfnb.b import used\n" in a and "__all__ = ['entry']" in a
    b = ast.unparse(trees["golfnb.b"])
    assert "def by_name" in b and "def registered" in b  # string reference and registering decorator keep them


@pytest.mark.parametrize("text", ["plain", "ends with quote'", 'ends with "', "has ''' inside", 'has """ too',
                                  "back\\slash\\", "tab\tand\nnewline", "uni ▁ code", "carriage\rreturn"])
def test_literal_is_exact(text):
    assert ast.literal_eval(pack._literal(text)) == text


def test_wrapper_is_the_records_form(tmp_path):
    cfg = pack.submission_config(preset("smoke", **E2E))
    text, st = pack.pack_text(cfg)
    lines = text.splitlines()
    assert len(lines) == 2 and lines[0] == "import lzma as L,base64 as B"
    assert lines[1].startswith('exec(L.decompress(B.b85decode("') and "FORMAT_RAW" in lines[1]
    payload = pack.unwrap(text)
    mods = pack.payload_modules(payload)
    assert set(mods) == set(st["modules"])
    pack.check_no_network(mods)  # the unpacked sources, as shipped
    assert '"data_path":"./data/datasets/fineweb10B_sp1024"' in payload
    assert pack.estimate_code_bytes(cfg) == len(text.encode())
    # the packed sources are smaller than the originals and every one still compiles
    assert st["payload_bytes"] < st["source_bytes"]
    for name, (src, _pkg) in mods.items():
        compile(src, name, "exec")


def _challenge_layout(root: Path, shared_data: Path, sp1024_model: Path, val_prefix_sp1024: Path) -> None:
    """./data/datasets/fineweb10B_sp1024/{train,val} shards and ./data/tokenizers/ as the challenge has them:
    train tokens = the FineWeb-Edu sample tokenized with golfnb's builder, val = the challenge's val prefix."""
    from golfnb.data.build import build_shards
    from golfnb.data.shards import open_shard, write_shard

    d = root / "data" / "datasets" / "fineweb10B_sp1024"
    tok = root / "data" / "tokenizers"
    tok.mkdir(parents=True)
    shutil.copy(sp1024_model, tok / "fineweb_1024_bpe.model")
    src = root / "text" / "fineweb_edu.txt"
    src.parent.mkdir()
    src.write_text((shared_data / "fineweb_edu_sample" / "fineweb_edu_sample10BT_head.txt").read_text()[:200_000])
    build_shards([src], tok / "fineweb_1024_bpe.model", d, workers=1, progress=False)
    write_shard(d / "fineweb_val_000000.bin", np.asarray(open_shard(val_prefix_sp1024)[:20_000]))


def _line(pattern: str, out: str) -> int:
    m = re.search(pattern, out)
    assert m, f"{pattern!r} not in output:\n{out[-3000:]}"
    return int(m.group(1))


def test_packed_submission_runs_end_to_end(tmp_path, shared_data, sp1024_model, val_prefix_sp1024):
    run = tmp_path / "run"
    run.mkdir()
    preset("smoke", **E2E).to_json(run / "config.json")
    sub = tmp_path / "submission"
    sub.mkdir()
    _challenge_layout(sub, shared_data, sp1024_model, val_prefix_sp1024)
    assert pack.main([str(run), "--out", str(sub / "train_gpt.py")]) == 0
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "GOLFNB_"))}
    env["PYTHONPATH"] = str(guard)  # only the guard: the repository is not on the path
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    probe = subprocess.run([sys.executable, "-c", "import golfnb"], cwd=sub, env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked" in probe.stderr  # golfnb is not importable from disk there
    proc = subprocess.run([sys.executable, "train_gpt.py"], cwd=sub, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    code = (sub / "train_gpt.py").stat().st_size
    model = (sub / "final_model.gnb").stat().st_size
    assert _line(r"Code size: (\d+) bytes", out) == code
    assert _line(r"Serialized model int6\+brotli: (\d+) bytes", out) == model
    assert _line(r"Total submission size: (\d+) bytes", out) == code + model
    assert re.search(r"final_plain_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}", out)
    assert "gptq:collected 31 Hessians" in out
    # code identity in the log (header and pipeline line) is the file that ran: what golfnb validate matches
    from golfnb.validate import parse_log

    sha = hashlib.sha256((sub / "train_gpt.py").read_bytes()).hexdigest()
    facts = parse_log((sub / "train.log").read_text())
    assert len(facts.code_hashes) == 2 and set(facts.code_hashes) == {sha}
    assert facts.code_size == code and facts.total_bytes == code + model and "plain" in facts.finals
    # the eval pass ran with the verdict measured at pack time
    assert "legality:plain leaderboard-legal" in out
    # the artifact on disk is a verified golfnb artifact of that model
    from golfnb.artifact import load_artifact

    q = load_artifact(sub / "final_model.gnb")
    assert q.method == "gptq" and q.model_config["num_layers"] == 5


def test_pack_refuses_a_run_without_config(tmp_path):
    with pytest.raises(pack.PackError, match="config.json"):
        pack.pack_submission(tmp_path, tmp_path / "train_gpt.py")
    assert pack.main([str(tmp_path), "--out", str(tmp_path / "x.py")]) == 2


def _trained_run(tmp_path: Path, shared_data: Path, sp1024_model: Path, val_prefix_sp1024: Path):
    """A run directory as golfnb.train leaves it (config.json + final_model.pt), data at absolute paths."""
    import torch

    from golfnb.io import atomic_torch_save
    from golfnb.model import build_model

    root = tmp_path / "data_root"
    root.mkdir()
    _challenge_layout(root, shared_data, sp1024_model, val_prefix_sp1024)
    cfg = preset("smoke", **E2E, data_path=str(root / "data/datasets/fineweb10B_sp1024"),
                 tokenizer_path=str(root / "data/tokenizers/fineweb_1024_bpe.model"))
    run = tmp_path / "run"
    cfg.to_json(run / "config.json")
    model = build_model(cfg)
    with torch.no_grad():  # non-trivial output projections (they start at zero)
        for b in model.blocks:
            b.attn.proj.weight.normal_(0, 0.05)
            b.mlp.proj.weight.normal_(0, 0.05)
    atomic_torch_save(run / "final_model.pt", {"config": cfg.to_dict(), "state_dict": model.state_dict(),
                                                "looping_active": True, "step": 6})
    return cfg, run


def test_quantize_run_and_load_quantized(tmp_path, shared_data, sp1024_model, val_prefix_sp1024):
    import json

    import torch

    from golfnb import pipeline
    from golfnb.artifact import model_from_artifact
    from golfnb.data.shards import is_val_shard, opened_shards, reset_opened_shards

    cfg, run = _trained_run(tmp_path, shared_data, sp1024_model, val_prefix_sp1024)
    reset_opened_shards()
    res = pipeline.quantize_run(run, device="cpu", progress=False, log=lambda m: None)
    opened = opened_shards()
    assert opened and not any(is_val_shard(p) for p in opened)  # calibration read train shards only
    art = run / "artifacts" / "model.gnb"
    assert res["model_bytes"] == art.stat().st_size and res["hessians"] == 31 and res["pruned_entries"] == 0
    assert res["code_bytes"] == pack.estimate_code_bytes(cfg)  # what `golfnb pack` would write for this run
    assert res["total_bytes"] == res["model_bytes"] + res["code_bytes"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["quant.model_bytes"] == res["model_bytes"] and metrics["quant.calibration_s"] >= 0
    cfg2, model = pipeline.load_quantized(run)
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.no_grad():
        assert torch.equal(model.forward_logits(x), model_from_artifact(art, cfg).forward_logits(x))
    assert model.looping_active and cfg2 == cfg

    # a fake cap below the artifact: +-1 pruning makes it fit, or, with pruning off, a clear error
    limit = res["total_bytes"] - 800
    res2 = pipeline.quantize_run(run, device="cpu", code_bytes=res["code_bytes"], progress=False, record=False,
                                 overrides={"bytes_limit": limit}, log=lambda m: None)
    assert res2["pruned_entries"] > 0 and res2["total_bytes"] <= limit
    with pytest.raises(pipeline.SubmissionTooLarge, match="over by"):
        pipeline.quantize_run(run, device="cpu", code_bytes=res["code_bytes"], progress=False, record=False,
                              overrides={"bytes_limit": limit, "prune_to_fit": False}, log=lambda m: None)


def test_autoregressive_calibration_reads_no_data(tmp_path):
    import torch

    from golfnb import pipeline
    from golfnb.data.shards import opened_shards, reset_opened_shards
    from golfnb.model import build_model

    cfg = preset("smoke", gptq_calibration="autoregressive", gptq_calibration_batches=3, train_seq_len=16,
                 data_path=str(tmp_path / "nothing_here"))
    model = build_model(cfg)
    reset_opened_shards()
    lines: list[str] = []
    h = pipeline.calibrate(model, cfg, device="cpu", progress=False, log=lines.append)
    assert opened_shards() == []
    assert h.source == "autoregressive" and len(h) == 31 and h.n_tokens == 3 * 16
    assert any("generated 3x16" in m for m in lines) and any("collected 31 Hessians" in m for m in lines)
    q = pipeline.quantize_and_serialize(model, cfg, h, code_bytes=50_000, progress=False, log=lines.append)
    assert q.label == "int6+brotli" and q.pruned == 0 and len(q.blob) > 0 and torch.is_tensor(
        q.qmodel.tensors["tok_emb.weight"].data)


# ================================================================================================ selection

def _packed_modules(cfg) -> tuple[dict, "pack.PackedInfo"]:
    text, _ = pack.pack_text(pack.submission_config(cfg))
    return pack.payload_modules(pack.unwrap(text)), pack.inspect_packed(text)


def test_selection_packs_only_what_the_eval_passes_use():
    mods, info = _packed_modules(preset("smoke", **E2E))  # plain eval only
    gone = {"golfnb.evals.tilt", "golfnb.evals.ngram", "golfnb.evals._ngram_kernel", "golfnb.evals.slot",
            "golfnb.evals.ttt", "golfnb.evals.sliding"}
    assert gone <= set(info.left_out) and info.methods == ["plain"]
    for m in gone:  # served as small stand-ins, not as their source
        assert len(mods[m][0]) < 400 and "Gone" in mods[m][0]
    assert "def evaluate_plain" in mods["golfnb.evals.plain"][0]
    _full_mods, full = _packed_modules(preset("smoke"))  # sliding + ttt + tilt
    assert full.methods == ["plain", "sliding", "ttt+tilt"] and set(full.left_out) == {"golfnb.evals.slot",
                                                                                      "golfnb._fa4"}
    # the FlashAttention-4 wrapper only where the config asks for that backend
    assert "golfnb._fa4" not in _packed_modules(preset("smoke", attn_backend="fa4"))[1].left_out
    assert "Gone" in _full_mods["golfnb._fa4"][0]
    slot_cfg = preset("smoke", slot_enabled=True, final_eval="slot", ttt_enabled=False, ngram_tilt_enabled=False)
    methods = pack.eval_method_keys(slot_cfg)
    needs = {m for m, why in pack._method_modules(methods).items() if why is None}
    assert methods == ["plain", "sliding", "slot:context_per_window"]
    assert needs == {"golfnb.evals.slot", "golfnb.evals.sliding"}
    # the legality checks themselves are never packed: a table of verdicts measured now stands in
    assert "def check_method" not in mods["golfnb.legality"][0] and "VERDICTS" in mods["golfnb.legality"][0]


def test_selected_pack_is_smaller_and_the_report_accounts_for_it():
    cfg = preset("smoke", **E2E)
    full, _ = pack.pack_text(pack.submission_config(cfg), select=False, level=1)
    small, _ = pack.pack_text(pack.submission_config(cfg))
    assert len(small) < 0.85 * len(full)
    rep = pack.size_report(cfg)
    assert rep["file_before"] == len(full) and rep["file_after"] == len(small)
    rows = {r["module"]: r for r in rep["rows"]}
    assert rows["golfnb.legality"]["status"] == "verdict table"
    assert rows["golfnb.legality"]["after_lzma"] < rows["golfnb.legality"]["before_lzma"] / 2
    assert rows["golfnb.evals.ttt"]["status"] == "stand-in" and rows["golfnb.model"]["status"] == "packed"
    assert "train_gpt.py:" in pack.format_size_report(rep)


def _exec_module(name: str, src: str, monkeypatch) -> dict:
    """Execute one packed module's source as `name` (its golfnb._packed import served by a stand-in)."""
    import types

    ns: dict = {"__name__": name}
    exec(compile(src, f"<packed {name}>", "exec"), ns)
    mod = types.ModuleType(name)
    mod.__dict__.update(ns)
    monkeypatch.setitem(sys.modules, name, mod)
    return ns


def test_standins_fail_loudly_and_keep_isinstance_working(monkeypatch):
    mods, _info = _packed_modules(preset("smoke", **E2E))
    _exec_module("golfnb._packed", mods["golfnb._packed"][0], monkeypatch)
    tilt = _exec_module("golfnb.evals.tilt", mods["golfnb.evals.tilt"][0], monkeypatch)
    gone = tilt["__getattr__"]("evaluate_tilt")
    with pytest.raises(RuntimeError, match=r"golfnb.evals.tilt.evaluate_tilt is not in this train_gpt.py "
                                           r"\(packed without the n-gram tilt"):
        gone(None)
    with pytest.raises(RuntimeError, match="pack again"):
        "sliding" in tilt["__getattr__"]("TILT_BASES")  # noqa: B015 - membership is a use
    # a def the config does not need: the loader classes other than the configured one
    src = mods["golfnb.data.loaders"][0]
    assert "class SequentialLoader:" in src and "def _fill" not in src.split("class SequentialLoader:")[1][:200]
    loaders = _exec_module("golfnb.data.loaders", src, monkeypatch)
    assert not isinstance(object(), loaders["SequentialLoader"])
    with pytest.raises(RuntimeError, match=r"packed for loader='shuffled'"):
        loaders["CoprimeStrideLoader"]([], seed=0)
    assert "ShuffledSequenceLoader" in loaders and loaders["LOADERS"]["shuffled"] is loaders["ShuffledSequenceLoader"]


def test_packed_verdicts_are_the_measured_ones(monkeypatch):
    from golfnb.config import ConfigError
    from golfnb.legality import legality_verdict

    cfg = pack.submission_config(preset("smoke"))
    mods, _info = _packed_modules(cfg)
    leg = _exec_module("golfnb.legality", mods["golfnb.legality"][0], monkeypatch)
    for m in ("plain", "sliding", "ttt+tilt"):
        packed, real = leg["legality_verdict"](m, cfg), legality_verdict(m, cfg)
        assert (packed.legal, packed.failed, packed.settings) == (real.legal, real.failed, real.settings)
        assert set(real.as_dict()) <= set(packed.as_dict()) and "pack time" in packed.as_dict()["how"]
    with pytest.raises(ConfigError, match=r"ttt\+tilt with settings .*'ttt_lr': 0.01.* pack again"):
        leg["legality_verdict"]("ttt+tilt", cfg.replace(ttt_lr=0.01))
    with pytest.raises(ConfigError, match="not among them"):
        leg["legality_verdict"]("slot:standard", cfg)


@pytest.mark.parametrize("env,message", [
    ({"LOADER": "coprime"}, r"packed for .*loader='shuffled'.*asks for loader='coprime'"),
    ({"TTT_ENABLED": "1"}, r"the legality verdicts measured when it was packed .*ttt .*pack again"),
])
def test_packed_file_refuses_settings_it_was_not_packed_for(tmp_path, env, message):
    """Before any data is read or any training starts (there is no data in this folder)."""
    r = pack.pack_submission(preset("smoke", **E2E), tmp_path / "train_gpt.py")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "GOLFNB_"))}
    proc = subprocess.run([sys.executable, str(r.path)], cwd=tmp_path, env={**base, **env}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(message, proc.stdout), proc.stdout + proc.stderr
    assert not (tmp_path / "train.log").exists()


def test_identity_and_tamper_evidence():
    from golfnb.provenance import code_hash

    text, _ = pack.pack_text(pack.submission_config(preset("smoke", **E2E)))
    info = pack.inspect_packed(text)
    assert info.wrapper_ok and info.digest_ok and info.source_sha256 == code_hash()
    payload = pack.unwrap(text)
    assert pack.payload_digest(payload) in payload
    edited = payload.replace("_M['golfnb.io']=(False,r'''", "_M['golfnb.io']=(False,r'''X=1\n", 1)
    assert edited != payload and not pack.inspect_packed(pack.wrap(edited)).digest_ok
    assert not pack.inspect_packed(text + "# trimmed\n").wrapper_ok


def test_level2_minify_drops_variable_annotations_and_unused_imports():
    src = textwrap.dedent('''
        from __future__ import annotations
        from dataclasses import dataclass
        from typing import Any, Optional
        import os

        LIMIT: int = 3
        NAMES: list[str]

        @dataclass
        class Cfg:
            size: int = 3
            name: Optional[str] = None

        def f(x: Any) -> int:
            y: int = x + LIMIT
            z: Any
            if y > 100:
                w: int
            return y
    ''')
    tree = pack._strip(ast.parse(src), src)
    pack.tidy({"golfnb.m": tree})
    out = ast.unparse(tree)
    assert "LIMIT = 3" in out and "NAMES" not in out and "y = x + LIMIT" in out and "z" not in out.split("return")[0][-40:]
    assert "size: int = 3" in out and "name: Optional[str] = None" in out  # dataclass fields keep theirs
    assert "from typing import Optional" in out and "Any" not in out  # Any was only in annotations
    assert "import os" in out  # a bare import may matter on its own: kept
    ns: dict = {}
    exec(compile(pack._unparse_compact(tree, "m"), "m", "exec"), ns)
    assert ns["f"](4) == 7 and ns["Cfg"]().size == 3
    # a name another module takes from this one stays
    a, b = ast.parse("from typing import Any\n"), ast.parse("from golfnb.a import Any\n")
    pack.tidy({"golfnb.a": a, "golfnb.b": b})
    assert "Any" in ast.unparse(a)
