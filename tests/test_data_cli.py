"""`golfnb data ...` commands, tokenizer training and the (mocked) Hub download."""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from golfnb.bpb import build_byte_luts, count_stream_bytes
from golfnb.data import cli, download
from golfnb.data.shards import list_shards, open_shard, read_header, verify_dir, write_shard
from golfnb.data.tokenizer import iter_training_texts

REPO = Path(__file__).resolve().parents[1]


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return rc, out, err


def test_build_verify_stats_round_trip(tmp_path, capsys, shared_data, sp1024_model):
    src = shared_data / "challenge_docs_sample" / "verify_docs_200.jsonl"
    out = tmp_path / "shards"
    rc, text, _ = _run(capsys, "build", "--input", src, "--tokenizer", sp1024_model, "--out", out,
                       "--val-docs", 10, "--shard-tokens", 200_000, "--no-progress")
    assert rc == 0
    built = json.loads(text)
    assert built["docs"] == {"train": 190, "val": 10} and "fineweb_val_000000.bin" in built["shards"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"].startswith("golfnb data build --input") and man["val_docs"] == 10

    rc, text, _ = _run(capsys, "verify", out)
    assert rc == 0 and json.loads(text)["train"]["docs"] == 190

    files = list_shards(out, "val") + list_shards(out, "train")
    rc, text, _ = _run(capsys, "stats", *files, "--tokenizer", sp1024_model, "--eval-seq-len", 1024)
    assert rc == 0
    st = json.loads(text)
    stream = np.concatenate([np.asarray(open_shard(f), dtype=np.int64) for f in files])
    luts = build_byte_luts(sp1024_model)
    assert st["tokens"] == stream.size and st["targets"] == stream.size - 1 and st["docs"] == 200
    assert st["bytes"] == count_stream_bytes(stream, luts)  # the evaluator's denominator for v[1..N)
    sp = spm.SentencePieceProcessor(model_file=str(sp1024_model))
    docs = [json.loads(x)["text"] for x in src.read_text().splitlines()]
    assert st["bytes"] == sum(len(sp.normalize(d).replace("\u2581", " ").encode()) for d in docs)
    U = ((stream.size - 1) // 1024) * 1024
    assert st["eval_targets"] == U and st["eval_bytes"] == count_stream_bytes(stream[: U + 1], luts)


def test_verify_reports_errors_with_exit_code(tmp_path, capsys):
    (tmp_path / "fineweb_train_000000.bin").write_bytes(b"\0" * 100)
    rc, _, err = _run(capsys, "verify", tmp_path)
    assert rc == 2 and "error:" in err and "shorter than the 1024-byte header" in err
    rc, _, err = _run(capsys, "stats", tmp_path, "--tokenizer", "x.model")
    assert rc == 2 and "is a folder" in err


def test_wired_into_a_top_level_parser(tmp_path, capsys, val_prefix_sp1024, sp1024_model):
    top = argparse.ArgumentParser(prog="golfnb")
    sub = top.add_subparsers(dest="command", required=True)
    cli.add_data_parser(sub)
    args = top.parse_args(["data", "stats", str(val_prefix_sp1024), "--tokenizer", str(sp1024_model)])
    assert args.func(args) == 0
    st = json.loads(capsys.readouterr().out)
    v = np.asarray(open_shard(val_prefix_sp1024), dtype=np.int64)
    assert st["bytes"] == count_stream_bytes(v, build_byte_luts(sp1024_model))


def test_module_entry_point(val_prefix_sp1024, sp1024_model):
    res = subprocess.run([sys.executable, "-m", "golfnb.data.cli", "stats", str(val_prefix_sp1024), "--tokenizer",
                          str(sp1024_model)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["tokens"] == read_header(val_prefix_sp1024).n_tokens


def test_tokenizer_command(tmp_path, capsys, shared_data):
    src = shared_data / "challenge_docs_sample" / "verify_docs_200.jsonl"
    rc, text, _ = _run(capsys, "tokenizer", "--input", src, "--vocab-size", 512, "--out", tmp_path / "tok" / "t512")
    assert rc == 0
    model = Path(text.strip())
    assert model == tmp_path / "tok" / "t512.model" and model.with_suffix(".vocab").is_file()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.vocab_size() == 512 and (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.piece_to_id("\u2581") != sp.unk_id()
    assert sp.encode("2024", out_type=str) == ["2", "0", "2", "4"]  # split_digits
    ids = sp.encode("\u4e00")  # an unseen CJK character falls back to its 3 UTF-8 bytes
    assert len(ids) == 3 and all(sp.is_byte(i) for i in ids)
    assert not sp.encode("Hello", out_type=str)[0].startswith("\u2581")  # add_dummy_prefix=False
    assert sp.normalize("\uff21\u3000B") == "A\u2581B"  # nmt_nfkc: fullwidth A, ideographic space
    # shards built with it pass the bpb tokenizer check
    assert build_byte_luts(model).vocab_size == 512


def test_training_text_cleaning(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in ["  a\x00b  ", "", "\x00", "c"]) + "\n")
    assert list(iter_training_texts([str(p)])) == ["a b", "c"]
    assert list(iter_training_texts([str(p)], max_docs=1)) == ["a b"]


# ==================================================================== download (Hub mocked, no network)


class FakeHub:
    """Serves files from a local folder laid out like the challenge's dataset repo."""

    def __init__(self, root: Path):
        self.root = root
        self.downloads: list[str] = []
        self.offline = False

    def download(self, repo_id: str, filename: str, local_dir: Path) -> Path:
        if self.offline:
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
        self.downloads.append(filename)
        dest = Path(local_dir) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / filename, dest)
        return dest

    def paths_info(self, repo_id: str, paths: list[str]) -> dict:
        if self.offline:
            raise ConnectionError("[Errno -2] Name or service not known")
        out = {}
        for p in paths:
            f = self.root / p
            if f.is_file():
                out[p] = {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        return out


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, sp1024_model, val_prefix_sp1024):
    remote = tmp_path / "remote"
    ds = remote / "datasets" / "datasets" / "fineweb10B_sp1024"
    v = np.asarray(open_shard(val_prefix_sp1024))
    write_shard(ds / "fineweb_val_000000.bin", v[:50_000])
    for i in range(3):
        write_shard(ds / f"fineweb_train_{i:06d}.bin", v[50_000 + i * 40_000: 90_000 + i * 40_000])
    tok = remote / "datasets" / "tokenizers"
    tok.mkdir(parents=True)
    shutil.copyfile(sp1024_model, tok / "fineweb_1024_bpe.model")
    shutil.copyfile(Path(sp1024_model).with_suffix(".vocab"), tok / "fineweb_1024_bpe.vocab")
    manifest = {"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                              "stats": {"files_train": 3, "files_val": 1}}],
                "tokenizers": [{"name": "sp_bpe_1024", "vocab_size": 1024,
                                "model_path": "tokenizers/fineweb_1024_bpe.model",
                                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}]}
    (remote / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    hub = FakeHub(remote)
    monkeypatch.setattr(download, "_hf_hub_download", hub.download)
    monkeypatch.setattr(download, "_hf_paths_info", hub.paths_info)
    return hub


def test_download_layout_resume_and_repair(tmp_path, capsys, fake_hub):
    data = tmp_path / "data"
    rc, text, _ = _run(capsys, "download", "--variant", "sp1024", "--train-shards", 2, "--data-dir", data,
                       "--no-progress")
    assert rc == 0
    res = json.loads(text)
    ds = data / "datasets" / "fineweb10B_sp1024"
    assert res["repo_id"] == "willdepueoai/parameter-golf"
    assert sorted(p.name for p in ds.glob("*.bin")) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                         "fineweb_val_000000.bin"]
    assert (data / "tokenizers" / "fineweb_1024_bpe.model").is_file()
    assert (data / "tokenizers" / "fineweb_1024_bpe.vocab").is_file()
    assert not (data / download.STAGING_NAME).exists()
    rep = verify_dir(ds, require_manifest=True)
    assert rep["vocab_size"] == 1024 and rep["train"]["files"] == 2 and rep["val"]["tokens"] == 50_000
    # second run: nothing fetched but the remote manifest
    fake_hub.downloads.clear()
    assert cli.main(["download", "--variant", "sp1024", "--train-shards", "2", "--data-dir", str(data),
                     "--no-progress"]) == 0
    capsys.readouterr()
    assert fake_hub.downloads == ["datasets/manifest.json"]
    # a truncated shard and a corrupted one (same size) are fetched again; a third shard is added
    f0, f1 = ds / "fineweb_train_000000.bin", ds / "fineweb_train_000001.bin"
    f0.write_bytes(f0.read_bytes()[:5000])
    raw = bytearray(f1.read_bytes())
    raw[-1] ^= 0xFF
    f1.write_bytes(bytes(raw))
    fake_hub.downloads.clear()
    assert cli.main(["download", "--variant", "sp1024", "--train-shards", "3", "--data-dir", str(data),
                     "--no-progress", "--skip-manifest"]) == 0
    capsys.readouterr()
    assert sorted(fake_hub.downloads) == sorted(f"datasets/datasets/fineweb10B_sp1024/fineweb_train_00000{i}.bin"
                                                for i in range(3))
    assert verify_dir(ds, require_manifest=True)["train"]["files"] == 3


def test_download_errors(tmp_path, capsys, fake_hub):
    data = tmp_path / "data"
    rc, _, err = _run(capsys, "download", "--variant", "sp1024", "--train-shards", 9, "--data-dir", data)
    assert rc == 2 and "has 3 sp1024 train shards; asked for 9" in err
    rc, _, err = _run(capsys, "download", "--variant", "sp8192", "--train-shards", 1, "--data-dir", data)
    assert rc == 2 and "no dataset fineweb10B_sp8192" in err
    fake_hub.offline = True
    rc, _, err = _run(capsys, "download", "--variant", "sp1024", "--train-shards", 1, "--data-dir", data)
    assert rc == 2 and "could not reach the Hugging Face Hub" in err
    assert "GOLFNB_DATA_DIR" in err and "golfnb data build" in err
