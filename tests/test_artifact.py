"""golfnb's artifact format (golfnb.artifact): exact round trips, integrity, no pickle, inspect and the
budget planner, on a smoke model trained briefly on real sp1024 tokens."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from golfnb import artifact
from golfnb.artifact import ArtifactError, HEADER_BYTES, deserialize, load_artifact, save_artifact, serialize
from golfnb.config import preset
from golfnb.model import build_model
from golfnb.quant import collect_hessians, quantize_model

SEQ = 64


@pytest.fixture(scope="module")
def setup(sp1024_model, shared_data, val_prefix_sp1024):
    """(cfg, float model, hessians, gptq QuantizedModel, val batch): 40 AdamW steps on FineWeb-Edu tokens."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp1024_model))
    text = (shared_data / "fineweb_edu_sample" / "fineweb_edu_sample10BT_head.txt").read_text()[:150_000]
    toks = np.array([1] + sp.encode(text), dtype=np.int64)
    cfg = preset("smoke")
    torch.manual_seed(0)
    model = build_model(cfg)
    model.looping_active = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    rng = np.random.default_rng(0)
    for _ in range(40):
        st = rng.integers(0, len(toks) - SEQ - 1, 8)
        x = torch.from_numpy(np.stack([toks[s:s + SEQ + 1] for s in st]))
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    calib = torch.from_numpy(np.stack([toks[s:s + SEQ] for s in rng.integers(0, len(toks) - SEQ, 32)]))
    h = collect_hessians(model, cfg, calib, n_batches=4, batch_seqs=8, progress=False)
    q = quantize_model(model, cfg, h, progress=False)
    v = torch.from_numpy(np.fromfile(val_prefix_sp1024, dtype="<u2", offset=1024)[: 16 * SEQ + 1].astype(np.int64))
    return cfg, model, h, q, (v[:-1].view(16, SEQ), v[1:].view(16, SEQ))


def _same(a, b) -> bool:
    if set(a.tensors) != set(b.tensors):
        return False
    for n, t in a.tensors.items():
        u = b.tensors[n]
        if (t.kind, t.group, t.shape, t.dtype, t.bits, t.clip_sigmas, t.method) != \
                (u.kind, u.group, u.shape, u.dtype, u.bits, u.clip_sigmas, u.method):
            return False
        if not torch.equal(t.data, u.data) or (t.scale is not None and not torch.equal(t.scale, u.scale)):
            return False
    return True


def test_roundtrip_reproduces_the_quantized_loss_exactly(setup, tmp_path):
    from golfnb.quant import apply_quantized

    cfg, _model, _h, q, (x, y) = setup
    mem = build_model(cfg)
    apply_quantized(mem, q)  # the in-memory quantized model
    mem.looping_active = True
    mem.eval()
    info = save_artifact(tmp_path / "m.gnb", q, "brotli", 2)
    assert info.bytes == (tmp_path / "m.gnb").stat().st_size
    loaded = artifact.model_from_artifact(tmp_path / "m.gnb", cfg)
    with torch.no_grad():
        a, b = mem.forward_logits(x), loaded.forward_logits(x)
        assert torch.equal(a, b)
        assert float(mem(x, y)) == float(loaded(x, y))
    assert loaded.looping_active and not loaded.training
    q2 = load_artifact(tmp_path / "m.gnb")
    assert _same(q, q2) and q2.method == "gptq" and q2.model_config == q.model_config
    assert q2.config_sha256 == q.config_sha256 and q2.info == json.loads(json.dumps(q.info))


def test_banked_config_loads_the_same_artifact(setup, tmp_path):
    cfg, _model, _h, q, (x, y) = setup
    save_artifact(tmp_path / "m.gnb", q)
    plain = artifact.model_from_artifact(tmp_path / "m.gnb", cfg)
    banked = artifact.model_from_artifact(tmp_path / "m.gnb", cfg.replace(bank_params=True))
    assert banked.banked
    with torch.no_grad():
        assert torch.equal(plain.forward_logits(x), banked.forward_logits(x))


@pytest.mark.parametrize("compressor", ["brotli", "lzma", "zstd", "none"])
@pytest.mark.parametrize("stride", [0, 2, 3])
def test_each_compressor_roundtrips(setup, compressor, stride):
    q = setup[3]
    blob = serialize(q, compressor, stride)
    hdr = artifact.read_header(blob)
    assert (hdr["compressor"], hdr["byte_shuffle_stride"], hdr["file_bytes"]) == (compressor, stride, len(blob))
    assert _same(q, deserialize(blob))


def test_byte_shuffle_is_invertible():
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 3, 7, 1000, 1001):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        for stride in (0, 1, 2, 3, 4):
            assert artifact.byte_unshuffle(artifact.byte_shuffle(data, stride), stride) == data
    assert artifact.byte_shuffle(b"abcdef", 2) == b"acebdf"


def test_any_flipped_byte_is_detected(setup):
    q = setup[3]
    blob = serialize(q, "brotli", 2)
    rng = np.random.default_rng(0)
    positions = list(range(HEADER_BYTES)) + sorted(rng.choice(np.arange(HEADER_BYTES, len(blob)), 60, replace=False))
    positions.append(len(blob) - 1)
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 0x01 << int(pos % 8)
        with pytest.raises(ArtifactError):
            deserialize(bytes(bad))
    with pytest.raises(ArtifactError, match="sha256"):
        deserialize(blob[:-1])
    with pytest.raises(ArtifactError, match="sha256"):
        deserialize(blob + b"\0")
    with pytest.raises(ArtifactError, match="not a golfnb artifact"):
        deserialize(b"PK\x03\x04" + blob[4:])
    with pytest.raises(ArtifactError, match="shorter"):
        deserialize(blob[:10])


def test_loading_never_unpickles(setup, tmp_path, monkeypatch):
    q = setup[3]
    save_artifact(tmp_path / "m.gnb", q, "lzma", 2)

    def refuse(*_a, **_k):
        raise AssertionError("pickle used while loading an artifact")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert _same(q, load_artifact(tmp_path / "m.gnb"))


def test_model_config_mismatch_is_refused(setup, tmp_path):
    cfg, *_rest = setup
    q = setup[3]
    save_artifact(tmp_path / "m.gnb", q)
    with pytest.raises(ArtifactError, match="num_layers"):
        artifact.model_from_artifact(tmp_path / "m.gnb", cfg.replace(num_layers=6, parallel_start_layer=3))
    # eval-only settings do not matter
    artifact.model_from_artifact(tmp_path / "m.gnb", cfg.replace(ttt_lr=0.1, eval_stride=64))
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "missing.gnb")


def test_inspect_totals_equal_file_sizes(setup, tmp_path, capsys):
    q = setup[3]
    path = tmp_path / "m.gnb"
    save_artifact(path, q)
    code = tmp_path / "train_gpt.py"
    code.write_text("print('x')\n" * 500)
    r = artifact.inspect_artifact(path, code)
    assert r["model_bytes"] == path.stat().st_size
    assert r["code_bytes"] == code.stat().st_size
    assert r["total_bytes"] == path.stat().st_size + code.stat().st_size
    assert r["margin"] == 16_000_000 - r["total_bytes"] and r["plan"] == []
    groups = {g["group"]: g for g in r["groups"]}
    assert set(groups) == {"embed", "attn", "mlp", "passthrough"}
    assert sum(g["params"] for g in groups.values()) == q.num_params()
    assert groups["attn"]["bits"] == [6] and groups["embed"]["bits"] == [8]
    per_layer = artifact.inspect_artifact(path, code, per_layer=True)
    assert {g["group"] for g in per_layer["groups"]} >= {"attn.0", "mlp.4"}
    assert artifact.main(["inspect", str(path), "--code", str(code)]) == 0
    out = capsys.readouterr().out
    assert f"{r['total_bytes']:,}" in out and "whole-blob" in out
    assert artifact.main(["inspect", str(path), "--code", str(code), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_bytes"] == r["total_bytes"]


def test_planner_advice_fits_when_applied(setup, tmp_path, capsys):
    """Cap the budget 6% under the current size; every option the planner marks as fitting must fit when
    the model is re-quantized from its float weights with that change (GPTQ, as the pipeline would)."""
    cfg, model, h, q, _ = setup
    path = tmp_path / "m.gnb"
    save_artifact(path, q)
    size = path.stat().st_size
    code = 20_000
    limit = int((size + code) * 0.94)
    code_file = tmp_path / "train_gpt.py"
    code_file.write_bytes(b"#" * code)
    r = artifact.inspect_artifact(path, code_file, limit=limit)
    assert r["margin"] < 0
    fits = [o for o in r["plan"] if o.fits]
    assert fits and any("matrix_clip_sigmas" in o.change for o in fits)
    k_opt = next(o for o in fits if "matrix_clip_sigmas" in o.change)
    assert k_opt.change["matrix_clip_sigmas"] > cfg.matrix_clip_sigmas
    assert k_opt.verified_model_bytes is not None and k_opt.verified_model_bytes + code <= limit
    # the verified size belongs to the k the option proposes, not to an earlier try of the search
    k = k_opt.change["matrix_clip_sigmas"]
    ch = {g: (s[0], k) for g in ("attn", "mlp") if (s := artifact._group_setting(q, g)) is not None}
    assert len(serialize(artifact._requantized_model(q, ch), "brotli", 2)) == k_opt.verified_model_bytes
    for o in fits:
        q2 = quantize_model(model, cfg.replace(**o.change), h, progress=False)
        got = len(serialize(q2, "brotli", 2))
        assert got + code <= limit, (o.change, got + code, limit)
    assert artifact.main(["inspect", str(path), "--code", str(code_file), "--limit", str(limit)]) == 1
    out = capsys.readouterr().out
    assert "OVER the limit" in out and "matrix_clip_sigmas=" in out


def test_artifact_bytes_are_deterministic(setup):
    cfg, model, h, q, _ = setup
    again = quantize_model(model, cfg, h, progress=False)
    assert serialize(q) == serialize(again)
