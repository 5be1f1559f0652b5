"""Shards, build, loaders and the validation stream (golfnb.data)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from golfnb.bpb import build_byte_luts, count_stream_bytes
from golfnb.config import ConfigError, preset
from golfnb.data.build import BuildError, build_shards
from golfnb.data.loaders import (LOADERS, MissingDataError, find_data_dir, load_validation_tokens,
                                 make_train_loader, resolve_data_path, train_files)
from golfnb.data.shards import (HEADER_BYTES, MAGIC, ShardError, list_shards, open_shard, opened_shards,
                                read_header, reset_opened_shards, verify_dir, verify_shard, write_shard)
from golfnb.io import sha256_file



def _header(magic=MAGIC, version=1, n=0) -> bytes:
    h = np.zeros(256, dtype="<i4")
    h[0], h[1], h[2] = magic, version, n
    return h.tobytes()


# ==================================================================== shard format


def test_shard_round_trip_and_header(tmp_path):
    toks = np.array([1, 5, 1023, 0, 65535, 7], dtype=np.int64)
    p = write_shard(tmp_path / "fineweb_train_000000.bin", toks)
    raw = p.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * len(toks)
    hdr = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert (hdr[0], hdr[1], hdr[2]) == (20240520, 1, 6) and not hdr[3:].any()
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == toks.tolist()
    mm = open_shard(p)
    assert isinstance(mm, np.memmap) and mm.dtype == np.dtype("<u2") and mm.tolist() == toks.tolist()
    assert read_header(p).n_tokens == 6
    st = verify_shard(p, vocab_size=65536, compute_sha256=True)
    assert st["docs"] == 1 and st["max_id"] == 65535 and st["sha256"] == sha256_file(p)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary behind


def test_write_shard_rejects_bad_tokens(tmp_path):
    with pytest.raises(ShardError, match="outside uint16"):
        write_shard(tmp_path / "a.bin", [1, 70000])
    with pytest.raises(ShardError, match="1-D"):
        write_shard(tmp_path / "a.bin", np.zeros((2, 2), dtype=np.int64))
    assert not (tmp_path / "a.bin").exists()


@pytest.mark.parametrize("case", ["missing", "short", "magic", "version", "truncated", "trailing", "vocab"])
def test_every_malformed_shard_is_a_clear_error(tmp_path, case):
    p = tmp_path / "fineweb_train_000000.bin"
    good = _header(n=4) + np.array([1, 2, 3, 4], dtype="<u2").tobytes()
    if case == "short":
        p.write_bytes(good[:500])
    elif case == "magic":
        p.write_bytes(_header(magic=12345, n=4) + good[HEADER_BYTES:])
    elif case == "version":
        p.write_bytes(_header(version=2, n=4) + good[HEADER_BYTES:])
    elif case == "truncated":
        p.write_bytes(good[:-2])
    elif case == "trailing":
        p.write_bytes(good + b"\0\0")
    elif case == "vocab":
        p.write_bytes(_header(n=4) + np.array([1, 2, 900, 3000], dtype="<u2").tobytes())
    expect = {
        "missing": r"does not exist.*golfnb data download",
        "short": r"shorter than the 1024-byte header.*golfnb data build",
        "magic": r"magic 12345, expected 20240520.*golfnb data",
        "version": r"version 2.*golfnb data",
        "truncated": r"declares 4 tokens.*truncated.*golfnb data",
        "trailing": r"trailing bytes.*golfnb data",
        "vocab": r"token id 900 at index 2.*vocab size is 512.*rebuild",
    }[case]
    with pytest.raises(ShardError, match=expect) as e:
        verify_shard(p, vocab_size=512)
    assert str(p) in str(e.value)


def test_verify_dir_against_manifest(tmp_path, sp1024_model, val_prefix_sp1024):
    out = tmp_path / "shards"
    v = np.asarray(open_shard(val_prefix_sp1024))[:30000]
    src = tmp_path / "src.jsonl"
    sp = spm.SentencePieceProcessor(model_file=str(sp1024_model))
    bos = np.flatnonzero(v == 1)
    docs = [sp.decode(v[a + 1:b].tolist()) for a, b in zip(bos[:-1], bos[1:])]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    build_shards([str(src)], sp1024_model, out, val_docs=2, shard_tokens=4000, workers=1, progress=False)
    rep = verify_dir(out)
    assert rep["manifest"] and rep["vocab_size"] == 1024 and rep["val"]["docs"] == 2
    # a changed byte inside a shard: header still fine, hash is not
    f = sorted(out.glob("fineweb_train_*.bin"))[1]
    raw = bytearray(f.read_bytes())
    raw[HEADER_BYTES + 10] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=f"{f.name} has sha256 .* corrupt"):
        verify_dir(out)
    assert verify_dir(out, check_hashes=False)["train"]["files"] >= 2
    # missing and stray shards
    f.unlink()
    write_shard(out / "fineweb_train_000099.bin", [1, 2, 3])
    with pytest.raises(ShardError) as e:
        verify_dir(out)
    assert "listed in manifest.json but missing" in str(e.value) and "not listed in manifest.json" in str(e.value)
    assert "2 problem(s)" in str(e.value)


def test_verify_dir_empty_and_no_manifest(tmp_path):
    with pytest.raises(ShardError, match="holds no fineweb_train.*golfnb data download"):
        verify_dir(tmp_path)
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    assert verify_dir(tmp_path)["val"]["tokens"] == 3
    with pytest.raises(ShardError, match="no manifest.json"):
        verify_dir(tmp_path, require_manifest=True)


# ==================================================================== build


def _normalized_docs(path: Path, sp) -> list[str]:
    docs = [json.loads(x)["text"] for x in path.read_text().splitlines() if x.strip()]
    # nmt_nfkc output with SentencePiece's visible space turned back into " ": what the shards must decode to
    return [sp.normalize(d).replace("\u2581", " ") for d in docs]


def test_build_round_trip_real_docs(tmp_path, shared_data, sp1024_model):
    src = shared_data / "challenge_docs_sample" / "verify_docs_200.jsonl"
    sp = spm.SentencePieceProcessor(model_file=str(sp1024_model))
    expect = _normalized_docs(src, sp)
    out1, out2 = tmp_path / "w1", tmp_path / "w2"
    # small shards so documents straddle shard boundaries; small chunks so the process pool really splits work
    m1 = build_shards([str(src)], sp1024_model, out1, val_docs=20, shard_tokens=50_000, workers=1,
                      progress=False, chunk_bytes=1 << 17)
    m2 = build_shards([str(src)], sp1024_model, out2, val_docs=20, shard_tokens=50_000, workers=2,
                      progress=False, chunk_bytes=1 << 17)
    files1 = list_shards(out1, "all")
    assert [f.name for f in files1] == [f.name for f in list_shards(out2, "all")]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(files1, list_shards(out2, "all")))
    assert m1["docs"] == {"train": 180, "val": 20} and m1["totals"]["val"]["docs"] == 20
    assert m1["tokenizer"]["sha256"] == sha256_file(sp1024_model) and m1["vocab_size"] == 1024
    assert [s["sha256"] for s in m1["shards"]] == [sha256_file(out1 / s["name"]) for s in m1["shards"]]
    assert len(list_shards(out1, "train")) > 2 and m2["workers"] == 2
    # decode: val docs then train docs, split at BOS, reproduce each document's normalised text
    val = np.concatenate([np.asarray(open_shard(f)) for f in list_shards(out1, "val")])
    train = np.concatenate([np.asarray(open_shard(f)) for f in list_shards(out1, "train")])
    got = []
    for stream in (val, train):
        assert stream[0] == 1
        cuts = list(np.flatnonzero(stream == 1)) + [len(stream)]
        got += [sp.decode(stream[a + 1:b].tolist()) for a, b in zip(cuts[:-1], cuts[1:])]
    assert got == expect
    assert 2 not in train and 2 not in val  # no EOS
    # bytes of the whole stream = UTF-8 length of every normalised document (BOS targets add nothing)
    luts = build_byte_luts(sp)
    assert count_stream_bytes(np.concatenate([val, train]), luts) == sum(len(t.encode()) for t in expect)
    assert verify_dir(out1)["train"]["docs"] == 180


def test_build_val_inputs_and_errors(tmp_path, shared_data, sp1024_model):
    src = shared_data / "challenge_docs_sample" / "verify_docs_200.jsonl"
    lines = src.read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:5]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[5:8]) + "\n")
    (tmp_path / "c.txt").write_text("A plain text file.\nIt is one document.")
    out = tmp_path / "out"
    m = build_shards([str(tmp_path / "*.jsonl"), str(tmp_path / "c.txt")], sp1024_model, out,
                     val_inputs=[str(tmp_path / "b.jsonl")], workers=1, progress=False)
    assert m["docs"] == {"train": 6, "val": 3}  # b.jsonl, also matched by *.jsonl, is validation only
    assert m["inputs"] == [str(tmp_path / "a.jsonl"), str(tmp_path / "c.txt")]
    with pytest.raises(BuildError, match="--overwrite"):
        build_shards([str(tmp_path / "a.jsonl")], sp1024_model, out, progress=False)
    build_shards([str(tmp_path / "a.jsonl")], sp1024_model, out, overwrite=True, workers=1, progress=False)
    assert verify_dir(out)["train"]["docs"] == 5 and not list_shards(out, "val")
    with pytest.raises(BuildError, match="matched no files"):
        build_shards([str(tmp_path / "nope*.jsonl")], sp1024_model, tmp_path / "o2", progress=False)
    with pytest.raises(BuildError, match="lower --val-docs"):
        build_shards([str(tmp_path / "a.jsonl")], sp1024_model, tmp_path / "o3", val_docs=5, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(BuildError, match="bad.jsonl: the line at byte 15"):
        build_shards([str(tmp_path / "bad.jsonl")], sp1024_model, tmp_path / "o4", workers=1, progress=False)
    with pytest.raises(BuildError, match="either val_docs .* or val_inputs"):
        build_shards([str(tmp_path / "a.jsonl")], sp1024_model, tmp_path / "o5", val_docs=1,
                     val_inputs=[str(tmp_path / "b.jsonl")], progress=False)


# ==================================================================== loaders


def _positional_shards(folder: Path, sizes: list[int]) -> int:
    """Train shards whose token at global stream position p is p (all < 65536), so a token identifies
    where it came from."""
    pos = 0
    for i, n in enumerate(sizes):
        write_shard(folder / f"fineweb_train_{i:06d}.bin", np.arange(pos, pos + n))
        pos += n
    return pos


def _cfg(folder: Path, **kw):
    base = dict(data_path=str(folder), vocab_size=65536, train_shards=0, train_seq_len=64)
    base.update(kw)
    return preset("smoke", **base)


KINDS = sorted(LOADERS)
SIX = [3001, 2500, 4100, 3600, 2900, 3333]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world,sizes", [(2, SIX), (4, SIX), (4, [9000, 7000])])
def test_ranks_get_disjoint_data(tmp_path, kind, world, sizes):
    _positional_shards(tmp_path, sizes)
    cfg = _cfg(tmp_path, loader=kind)
    B, T, steps = 3, 64, 5
    seen = []
    for r in range(world):
        ld = make_train_loader(cfg, r, world)
        toks = []
        for _ in range(steps):
            x, y = ld.next_batch(B, T)
            assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
            assert torch.equal(y, x + 1)  # positional data: the target is the next position
            toks.append(x.reshape(-1))
        pos = torch.cat(toks)
        assert pos.unique().numel() == pos.numel()  # no window repeats within a rank either
        seen.append(set(pos.tolist()))
    for a in range(world):
        for b in range(a + 1, world):
            assert not (seen[a] & seen[b]), f"ranks {a} and {b} share inputs ({kind}, world {world})"


@pytest.mark.parametrize("kind", KINDS)
def test_seed_controls_order(tmp_path, kind):
    _positional_shards(tmp_path, [5000, 4000, 4500])

    def draw(seed):
        ld = make_train_loader(_cfg(tmp_path, loader=kind, seed=seed), 0, 2)
        return torch.cat([ld.next_batch(4, 32)[0] for _ in range(3)])

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_resumes_bit_identically(tmp_path, kind):
    # small shards: the run below crosses epoch ends / re-layouts / stream wrap-around
    _positional_shards(tmp_path, [700, 650, 900])
    cfg = _cfg(tmp_path, loader=kind, seed=7)
    ref = make_train_loader(cfg, 1, 2)
    for _ in range(9):
        ref.next_batch(4, 32)
    state = ref.state_dict()
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert loaded == state
    expect = [ref.next_batch(4, 32) for _ in range(25)]
    fresh = make_train_loader(cfg, 1, 2)
    fresh.load_state_dict(loaded)
    for ex, ey in expect:
        x, y = fresh.next_batch(4, 32)
        assert torch.equal(x, ex) and torch.equal(y, ey)
    with pytest.raises(ValueError, match="rank"):
        make_train_loader(cfg, 0, 2).load_state_dict(loaded)


def test_loaders_refuse_validation_files(tmp_path, val_prefix_sp1024):
    _positional_shards(tmp_path, [3000])
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(100))
    cfg = _cfg(tmp_path)
    for kind in KINDS:
        with pytest.raises(ShardError, match="refusing to train on validation shard"):
            make_train_loader(cfg.replace(loader=kind), 0, 1, files=[tmp_path / "fineweb_val_000000.bin"])
    assert [f.name for f in train_files(cfg)] == ["fineweb_train_000000.bin"]


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("GOLFNB_DATA_DIR", raising=False)
    with pytest.raises(MissingDataError) as e:
        make_train_loader(_cfg(tmp_path), 0, 1)
    msg = str(e.value)
    assert "no fineweb_train_*.bin" in msg and "golfnb data download" in msg and "golfnb data build" in msg
    assert "GOLFNB_DATA_DIR" in msg and isinstance(e.value, ConfigError)
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(100))
    with pytest.raises(MissingDataError, match="only validation shards"):
        make_train_loader(_cfg(tmp_path), 0, 1)
    with pytest.raises(MissingDataError, match="does not exist"):
        train_files(_cfg(tmp_path / "nowhere"))


def test_train_shards_and_vocab_check(tmp_path):
    _positional_shards(tmp_path, [2000, 2000, 2000])
    assert len(train_files(_cfg(tmp_path, train_shards=2))) == 2
    with pytest.warns(UserWarning, match="holds only 3 train shards"):
        assert len(train_files(_cfg(tmp_path, train_shards=5))) == 3
    ld = make_train_loader(_cfg(tmp_path, vocab_size=1024, loader="sequential"), 0, 1)
    with pytest.raises(ShardError, match=">= vocab_size=1024"):
        for _ in range(10):
            ld.next_batch(4, 64)


def test_loader_on_real_tokens(tmp_path, val_prefix_sp1024):
    """Real token ids (the validation prefix re-labelled as train shards in a scratch folder)."""
    v = np.asarray(open_shard(val_prefix_sp1024))[:200_000]
    for i, part in enumerate(np.array_split(v, 4)):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", part)
    cfg = _cfg(tmp_path, vocab_size=1024, loader="shuffled", train_seq_len=128)
    x, y = make_train_loader(cfg, 0, 1).next_batch(cfg.micro_batch_seqs(1), cfg.train_seq_len)
    assert x.shape == (cfg.micro_batch_seqs(1), 128) and int(x.max()) < 1024
    assert torch.equal(x[:, 1:], y[:, :-1])
    stream = v.astype(np.int64)
    for row_x, row_y in zip(x.numpy(), y.numpy()):  # each row is a contiguous window of the real stream
        starts = np.flatnonzero(stream[: len(stream) - 128] == row_x[0])
        assert any(np.array_equal(stream[s:s + 128], row_x) and np.array_equal(stream[s + 1:s + 129], row_y)
                   for s in starts)


def test_no_validation_shard_opened_while_training(tmp_path):
    """Legality: training and calibration loaders never open fineweb_val_*."""
    _positional_shards(tmp_path, [3000, 3000])
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(5000) % 1000)
    reset_opened_shards()
    for kind in KINDS:
        ld = make_train_loader(_cfg(tmp_path, loader=kind), 0, 1)
        for _ in range(3):
            ld.next_batch(2, 64)
    opened = opened_shards()
    assert opened and not any(Path(p).name.startswith("fineweb_val_") for p in opened)
    load_validation_tokens(_cfg(tmp_path, eval_seq_len=128, max_val_tokens=0))
    assert any(Path(p).name == "fineweb_val_000000.bin" for p in opened_shards())
    reset_opened_shards()
    assert opened_shards() == []


# ==================================================================== validation stream


def test_validation_truncation(tmp_path, val_prefix_sp1024):
    v = np.asarray(open_shard(val_prefix_sp1024))
    write_shard(tmp_path / "fineweb_val_000000.bin", v[:600_000])
    write_shard(tmp_path / "fineweb_val_000001.bin", v[600_000:])
    T = 2048
    cfg = _cfg(tmp_path, vocab_size=1024, eval_seq_len=T, max_val_tokens=0, eval_stride=64, ttt_chunk_tokens=32768)
    got = load_validation_tokens(cfg)
    U = ((len(v) - 1) // T) * T
    assert got.dtype == torch.int64 and got.numel() == U + 1 and U % T == 0
    assert torch.equal(got, torch.from_numpy(v[: U + 1].astype(np.int64)))  # sorted files, concatenated
    capped = load_validation_tokens(cfg.replace(max_val_tokens=10_000))
    assert capped.numel() == (10_000 // T) * T + 1 and torch.equal(capped, got[: capped.numel()])
    with pytest.raises(ConfigError, match="max_val_tokens=100 is below eval_seq_len"):
        load_validation_tokens(cfg.replace(max_val_tokens=100))
    with pytest.raises(ShardError, match=">= vocab_size=512"):
        load_validation_tokens(cfg.replace(vocab_size=512))
    with pytest.raises(MissingDataError, match="no fineweb_val"):
        load_validation_tokens(cfg.replace(data_path=str(tmp_path / "empty")))


def test_find_data_dir_and_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("GOLFNB_DATA_DIR", raising=False)
    assert find_data_dir() == Path("data")
    monkeypatch.setenv("GOLFNB_DATA_DIR", str(tmp_path))
    assert find_data_dir() == tmp_path and find_data_dir(tmp_path / "x") == tmp_path / "x"
    ds = tmp_path / "datasets" / "fineweb10B_sp1024"
    ds.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "datasets")  # ./data does not exist here
    assert resolve_data_path(preset("smoke")) == ds  # "./data/datasets/fineweb10B_sp1024" under GOLFNB_DATA_DIR


# ==================================================================== benchmark (make test skips it: -m 'not slow')


@pytest.mark.slow
@pytest.mark.benchmark
def test_build_benchmark_wikipedia_sp8192(tmp_path, shared_data, sp8192_model):
    """225 MB of Wikipedia jsonl -> sp8192 shards in under 90 s on the 2-core CPU machine (docs/data.md)."""
    t0 = time.perf_counter()
    man = build_shards([str(shared_data / "wikipedia_en_2015_substitute" / "*.jsonl")], sp8192_model,
                       tmp_path / "wiki", progress=False)
    seconds = time.perf_counter() - t0
    print(f"\nbuild: {seconds:.1f} s, {man['totals']['train']['tokens']:,} tokens, load {os.getloadavg()}")
    assert man["docs"]["train"] == 12757
    assert seconds < 90.0
