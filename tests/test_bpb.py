"""Byte accounting for val_bpb (golfnb.bpb) on the challenge's real validation tokens.

Leading-space convention after BOS: the LUT credits a piece's leading "▁" as one byte only when the
previous token is not a boundary (BOS/control/unknown). SentencePiece's decoder likewise drops the
leading space of a document's first piece. So for every complete document
    sum of bytes(t) over its targets (its pieces after BOS, plus the next document's BOS at 0 bytes)
        == len(utf8(sp.decode(document ids)))
exactly, and a "▁" right after BOS costs 0 bytes in both. (In the challenge data no document starts with
a "▁" piece at all: nmt_nfkc strips leading whitespace; the synthetic case below covers it anyway.)
"""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import sentencepiece as spm
import torch

from golfnb.bpb import (SPACE_PIECE, BpbAccumulator, build_byte_luts, check_tokenizer, count_stream_bytes,
                        target_bytes)
from golfnb.config import ConfigError, preset
from golfnb.data.shards import open_shard

BOS = 1


def _sp(path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(params=["sp1024", "sp8192"])
def real_stream(request, sp1024_model, sp8192_model, val_prefix_sp1024, val_prefix_sp8192):
    """(tokenizer, tokens) of the real validation prefix: the official sp1024 tokens, and the same
    documents re-tokenized with sp8192."""
    if request.param == "sp1024":
        return _sp(sp1024_model), np.asarray(open_shard(val_prefix_sp1024), dtype=np.int64)
    return _sp(sp8192_model), np.asarray(open_shard(val_prefix_sp8192), dtype=np.int64)


def test_stream_bytes_equal_decoded_documents(real_stream):
    sp, v = real_stream
    luts = build_byte_luts(sp)
    bos = np.flatnonzero(v == BOS)
    assert bos[0] == 0 and len(bos) > 100
    # Reference: decode every complete document independently and count UTF-8 bytes.
    decoded = sum(len(sp.decode(v[a + 1:b].tolist()).encode("utf-8")) for a, b in zip(bos[:-1], bos[1:]))
    # golfnb: targets v[1..e] with e = the last BOS, i.e. every complete document plus the BOS that follows it.
    e = int(bos[-1])
    assert count_stream_bytes(torch.from_numpy(v[: e + 1]), luts) == decoded
    # Chunked counting (prev_token carry) gives the same total as one pass.
    parts = np.array_split(v[: e + 1], 7)
    total, prev = 0, None
    for p in parts:
        total += count_stream_bytes(p, luts, prev_token=prev)
        prev = int(p[-1])
    assert total == decoded


def test_whole_prefix_matches_published_decoded_text(shared_data, sp1024_model, val_prefix_sp1024):
    """The shared folder's decoded jsonl (902 docs, last one cut off) was produced independently of golfnb:
    the byte total over all targets v[1..N) equals the UTF-8 length of all its texts."""
    luts = build_byte_luts(sp1024_model)
    v = np.asarray(open_shard(val_prefix_sp1024), dtype=np.int64)
    lines = (shared_data / "challenge_val_prefix" / "docs_val_prefix_decoded.jsonl").read_text().splitlines()
    texts = [json.loads(x)["text"] for x in lines]
    assert len(texts) == int((v == BOS).sum())
    assert count_stream_bytes(v, luts) == sum(len(t.encode("utf-8")) for t in texts)


def test_lut_unit_cases(sp1024_model, sp8192_model):
    for path in (sp1024_model, sp8192_model):
        sp = _sp(path)
        luts = build_byte_luts(sp)
        space = sp.piece_to_id(SPACE_PIECE)
        word = sp.piece_to_id(SPACE_PIECE + "the")
        plain = sp.piece_to_id("s")
        assert space != sp.unk_id() and word != sp.unk_id() and plain != sp.unk_id()

        def tb(prev: int, tgt: int) -> int:
            return int(target_bytes(torch.tensor([prev]), torch.tensor([tgt]), luts)[0])

        assert tb(plain, space) == 1  # "▁" after a normal token: one space byte
        assert tb(BOS, space) == 0  # ... right after BOS: dropped
        assert tb(plain, word) == 4 and tb(BOS, word) == 3  # " the" / "the"
        byte_id = sp.piece_to_id("<0x41>")
        assert sp.is_byte(byte_id) and tb(plain, byte_id) == 1 and tb(BOS, byte_id) == 1
        for cid in (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()):
            assert tb(plain, cid) == 0 and bool(luts.is_boundary[cid])
        # multi-byte UTF-8 pieces count their UTF-8 length, not their characters
        multi = [i for i in range(sp.vocab_size()) if not sp.is_byte(i) and not sp.is_control(i)
                 and len(sp.id_to_piece(i).lstrip(SPACE_PIECE).encode()) > len(sp.id_to_piece(i).lstrip(SPACE_PIECE))]
        assert multi, "expected non-ASCII pieces in the challenge tokenizers"
        for i in multi[:20]:
            body = sp.id_to_piece(i)[1:] if sp.id_to_piece(i).startswith(SPACE_PIECE) else sp.id_to_piece(i)
            assert tb(BOS, i) == len(body.encode("utf-8"))
            assert tb(BOS, i) == len(sp.decode([i]).encode("utf-8"))  # decoder agrees (space dropped at start)


def test_space_after_bos_matches_decoder(sp8192_model):
    sp = _sp(sp8192_model)
    luts = build_byte_luts(sp)
    ids = [BOS, sp.piece_to_id(SPACE_PIECE + "the"), sp.piece_to_id(SPACE_PIECE + "cat"), sp.piece_to_id(SPACE_PIECE),
           BOS, sp.piece_to_id(SPACE_PIECE), sp.piece_to_id("s"), BOS]
    doc1, doc2 = ids[1:4], ids[5:7]
    expect = len(sp.decode(doc1).encode()) + len(sp.decode(doc2).encode())
    assert sp.decode(doc1) == "the cat " and sp.decode(doc2) == "s"
    assert count_stream_bytes(torch.tensor(ids), luts) == expect


def test_target_bytes_matches_plain_reference(sp8192_model):
    """Vectorised LUT path against a per-token loop over the SentencePiece API."""
    sp = _sp(sp8192_model)
    luts = build_byte_luts(sp)
    rng = random.Random(0)
    prev = [rng.randrange(sp.vocab_size()) for _ in range(3000)] + [BOS] * 200
    tgt = [rng.randrange(sp.vocab_size()) for _ in range(3200)]

    def ref(x: int, y: int) -> int:
        if sp.is_control(y) or sp.is_unknown(y) or sp.is_unused(y):
            return 0
        if sp.is_byte(y):
            return 1
        piece = sp.id_to_piece(y)
        lead = piece.startswith(SPACE_PIECE)
        body = piece[1:] if lead else piece
        boundary = sp.is_control(x) or sp.is_unknown(x) or sp.is_unused(x)
        return len(body.encode("utf-8")) + int(lead and not boundary)

    got = target_bytes(torch.tensor(prev), torch.tensor(tgt), luts).tolist()
    assert got == [ref(x, y) for x, y in zip(prev, tgt)]


def test_ids_beyond_tokenizer_are_boundaries(sp1024_model):
    luts = build_byte_luts(sp1024_model, vocab_size=1024 + 16)
    assert luts.vocab_size == 1040
    assert bool(luts.is_boundary[1024:].all()) and int(luts.base_bytes[1024:].sum()) == 0
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        build_byte_luts(sp1024_model, vocab_size=512)


def test_missing_space_piece_is_refused(sp1024_model):
    class NoSpace(spm.SentencePieceProcessor):
        def piece_to_id(self, piece):  # noqa: D401 - simulate a tokenizer trained without "▁"
            return self.unk_id() if piece == SPACE_PIECE else super().piece_to_id(piece)

    sp = NoSpace(model_file=str(sp1024_model))
    with pytest.raises(ConfigError, match="#897"):
        build_byte_luts(sp)


def test_accumulator_sums_and_formula(sp1024_model):
    luts = build_byte_luts(sp1024_model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 1024, (4, 64), generator=g)
    y = torch.randint(0, 1024, (4, 64), generator=g)
    nll = torch.rand(4, 64, generator=g, dtype=torch.float32) * 5
    mask = torch.rand(4, 64, generator=g) > 0.3
    acc = BpbAccumulator(luts)
    acc.add(nll, x, y, mask=mask)
    acc.add_sums(1.5, 2, 7)
    L = float(nll.double()[mask].sum()) + 1.5
    N = int(mask.sum()) + 2
    B = int(target_bytes(x, y, luts)[mask].sum()) + 7
    assert acc.tokens == N and acc.bytes == B and acc.loss_sum == pytest.approx(L, rel=1e-12)
    acc.all_reduce()  # no process group: a no-op
    d = acc.as_dict()
    assert d["val_loss"] == pytest.approx(L / N, rel=1e-12)
    assert d["val_bpb"] == pytest.approx(L / (B * math.log(2)), rel=1e-12)
    assert d["val_bpb"] == pytest.approx((L / N) / math.log(2) * (N / B), rel=1e-12)
    with pytest.raises(RuntimeError, match="twice"):
        acc.all_reduce()
    with pytest.raises(RuntimeError, match="after all_reduce"):
        acc.add(nll, x, y)


def test_accumulator_all_reduce_sums_over_ranks(monkeypatch, sp1024_model):
    """With a process group, all_reduce SUMs the (loss, tokens, bytes) triple once. Simulated: a fake
    all_reduce adds a second rank's totals (a real two-process gloo run costs ~15 s of spawn time)."""
    import torch.distributed as dist

    luts = build_byte_luts(sp1024_model)
    v = torch.arange(2, 2 + 2 * 33) % 1024
    halves = (v[:33], v[33:])
    other = BpbAccumulator(luts)
    other.add(torch.full((32,), 2.0, dtype=torch.float64), halves[1][:-1], halves[1][1:])
    calls = []

    def fake_all_reduce(t, op=None):
        calls.append(op)
        t += other._sums

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    acc = BpbAccumulator(luts)
    acc.add(torch.full((32,), 1.0, dtype=torch.float64), halves[0][:-1], halves[0][1:])
    acc.all_reduce()
    assert calls == [dist.ReduceOp.SUM]
    B = sum(int(target_bytes(h[:-1], h[1:], luts).sum()) for h in halves)
    assert acc.tokens == 64 and acc.bytes == B and acc.loss_sum == pytest.approx(96.0)


def test_check_tokenizer(tmp_path, sp1024_model, sp8192_model):
    ok = preset("smoke", tokenizer_path=str(sp1024_model))
    assert check_tokenizer(ok).vocab_size() == 1024
    with pytest.raises(ConfigError, match="golfnb data download --variant sp1024"):
        check_tokenizer(preset("smoke", tokenizer_path=str(tmp_path / "nope.model")))
    with pytest.raises(ConfigError) as e:
        check_tokenizer(preset("smoke", tokenizer_path=str(sp8192_model)))
    msg = str(e.value)
    assert "8192 pieces" in msg and "vocab_size=1024" in msg and "pr1514" in msg and "fineweb_1024_bpe.model" in msg
