"""The catalogue of bad inputs (docs/reliability.md), each through the entry point a user runs: the
`python -m golfnb.train` command line (its `main`, in process, or a real subprocess where the process matters),
`train()`, the `golfnb artifact` / `golfnb data` commands and the notebook functions `quantize_run` and
`evaluate_run`. Each test asserts the exit code (or exception), a message that names the fix, and, where it
matters, that nothing was trained before the error (the run directory holds no log, config or checkpoint)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import golfnb.train as T
from golfnb.config import ConfigError, preset
from golfnb.data.build import build_shards
from golfnb.data.shards import HEADER_BYTES, make_manifest, write_manifest, write_shard

TINY = dict(iterations=4, train_batch_tokens=512, grad_accum_steps=2, warmup_steps=1, train_log_every=1,
            val_loss_every=0, max_val_tokens=256, muon_momentum_warmup_steps=4)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pristine(shared_data: Path, sp1024_model: Path, tmp_path_factory) -> Path:
    """Tiny sp1024 shards with a manifest: train from the FineWeb-Edu sample, val from the challenge's
    validation documents."""
    root = tmp_path_factory.mktemp("bad_inputs_data")
    train_txt = root / "train.txt"
    train_txt.write_text((shared_data / "fineweb_edu_sample" / "fineweb_edu_sample10BT_head.txt").read_text()[:60_000])
    val_docs = (shared_data / "challenge_val_prefix" / "docs_val_prefix_decoded.jsonl").read_text().splitlines()[:12]
    (root / "val.jsonl").write_text("\n".join(val_docs) + "\n")
    out = root / "shards"
    build_shards([train_txt], sp1024_model, out, val_inputs=[root / "val.jsonl"], shard_tokens=6_000, workers=1,
                 progress=False)
    return out


@pytest.fixture
def shards(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the shard folder a test may damage."""
    d = tmp_path / "shards"
    shutil.copytree(pristine, d)
    return d


def _args(data_path: Path, tokenizer: Path, **extra) -> list[str]:
    out = ["--preset", "smoke", "--set", f"data_path={data_path}", "--set", f"tokenizer_path={tokenizer}"]
    for k, v in {**TINY, **extra}.items():
        out += ["--set", f"{k}={v}"]
    return out


def _main(capsys, argv: list[str]) -> tuple[int, str]:
    rc = T.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _nothing_trained(run: Path) -> None:
    assert not run.exists() or not any(run.iterdir()), sorted(p.name for p in run.iterdir())


@pytest.fixture(scope="module")
def trained(pristine: Path, sp1024_model: Path, tmp_path_factory) -> Path:
    """A finished 4-step run with its end-of-loop checkpoint and final_model.pt (do not modify: copy it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = preset("smoke", data_path=str(pristine), tokenizer_path=str(sp1024_model), checkpoint_every_seconds=1e-9,
                     **TINY)
        T.train(cfg, run, echo=False)
    finally:
        torch.set_num_threads(n)
    return run


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run_copy"
    shutil.copytree(trained, run)
    return run


# ====================================================================================== data

def test_missing_shard_listed_in_the_manifest(capsys, shards, sp1024_model, tmp_path):
    (shards / "fineweb_train_000001.bin").unlink()
    rc, err = _main(capsys, _args(shards, sp1024_model) + ["--run-dir", tmp_path / "run"])
    assert rc == 2
    assert "fineweb_train_000001.bin is listed in" in err and "but missing" in err and "golfnb data download" in err
    _nothing_trained(tmp_path / "run")


def test_data_folder_without_train_shards(capsys, sp1024_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = _main(capsys, _args(empty, sp1024_model))
    assert rc == 2
    assert f"no fineweb_train_*.bin shards in {empty}" in err and "golfnb data download --variant sp1024" in err


def test_corrupt_shard_fails_its_manifest_hash(capsys, shards, sp1024_model, tmp_path):
    f = shards / "fineweb_train_000002.bin"
    raw = bytearray(f.read_bytes())
    raw[HEADER_BYTES + 100] ^= 0x01  # header and size intact: only the hash can tell
    f.write_bytes(bytes(raw))
    rc, err = _main(capsys, _args(shards, sp1024_model) + ["--run-dir", tmp_path / "run"])
    assert rc == 2
    assert f"{f} has sha256" in err and "corrupt" in err and "golfnb data download" in err
    _nothing_trained(tmp_path / "run")


def test_truncated_shard(capsys, shards, sp1024_model, tmp_path):
    f = shards / "fineweb_train_000000.bin"
    f.write_bytes(f.read_bytes()[:-100])
    rc, err = _main(capsys, _args(shards, sp1024_model) + ["--run-dir", tmp_path / "run"])
    assert rc == 2 and "golfnb.train: data error:" in err
    assert f"{f}" in err and "truncated" in err and "golfnb data download" in err
    _nothing_trained(tmp_path / "run")
    # headers are checked even when the full data check is skipped
    rc, err = _main(capsys, _args(shards, sp1024_model) + ["--skip-data-check"])
    assert rc == 2 and "truncated" in err


@pytest.mark.parametrize("field,value,words", [(0, 12345, "has magic 12345, expected 20240520"),
                                               (1, 2, "has format version 2; golfnb reads version 1")])
def test_wrong_magic_or_version(capsys, shards, sp1024_model, field, value, words):
    f = shards / "fineweb_val_000000.bin"
    raw = bytearray(f.read_bytes())
    raw[4 * field:4 * field + 4] = np.int32(value).tobytes()
    f.write_bytes(bytes(raw))
    rc, err = _main(capsys, _args(shards, sp1024_model))
    assert rc == 2 and words in err and "re-create it" in err


def test_token_id_beyond_the_vocab(capsys, shards, sp1024_model):
    tokens = np.ones(3000, dtype=np.int64)
    tokens[1234] = 2000
    write_shard(shards / "fineweb_train_000001.bin", tokens)
    # a manifest that agrees with the files (hashes) but records no vocab size: only the id scan can tell
    write_manifest(shards, make_manifest(shards, tokenizer_path=sp1024_model, vocab_size=None, command="test"))
    rc, err = _main(capsys, _args(shards, sp1024_model))
    assert rc == 2
    assert "fineweb_train_000001.bin holds token id 2000 at index 1234 >= vocab_size=1024" in err
    assert "made with another tokenizer" in err


def test_shards_of_another_vocab(capsys, pristine, sp8192_model):
    rc, err = _main(capsys, _args(pristine, sp8192_model, vocab_size=8192))
    assert rc == 2 and "were made with a 1024-piece tokenizer" in err and "vocab_size=8192" in err


def test_shards_of_another_tokenizer_of_the_same_size(capsys, pristine, shared_data):
    """An unofficial 1024-piece tokenizer passes the vocab-size check; the manifest's tokenizer hash does not."""
    other = shared_data / "tokenizers" / "alternates" / "fineweb_1024_bpe.ciprianflorin_NOT_OFFICIAL.model"
    rc, err = _main(capsys, _args(pristine, other))
    assert rc == 2 and f"made with a different tokenizer than {other}" in err
    assert "set tokenizer_path to the model named in the manifest (" in err and "fineweb_1024_bpe.model)" in err


def test_shard_not_in_the_manifest_is_checked_and_reported(shards, sp1024_model):
    """Not an error (the challenge's validation shard next to locally built train shards is a fine setup),
    but its header and ids are still checked and the run log says its content is not vouched for."""
    shutil.copy(shards / "fineweb_train_000000.bin", shards / "fineweb_train_000099.bin")
    cfg = preset("smoke", data_path=str(shards), tokenizer_path=str(sp1024_model))
    rep = T.verify_data(cfg)
    assert rep["problems"] == [] and rep["unlisted"] == ["fineweb_train_000099.bin"] and rep["hashed"]
    tokens = np.ones(100, dtype=np.int64)
    tokens[7] = 5000
    write_shard(shards / "fineweb_train_000099.bin", tokens)
    assert "fineweb_train_000099.bin holds token id 5000 at index 7" in T.verify_data(cfg)["problems"][0]


# ====================================================================================== tokenizer

def test_tokenizer_missing(capsys, pristine, tmp_path):
    rc, err = _main(capsys, _args(pristine, tmp_path / "nope.model"))
    assert rc == 2 and "nope.model not found" in err and "golfnb data download --variant sp1024" in err


def test_tokenizer_of_another_vocab_size(capsys, pristine, sp8192_model):
    rc, err = _main(capsys, _args(pristine, sp8192_model))
    assert rc == 2 and "has 8192 pieces but cfg.vocab_size=1024" in err and "set tokenizer_path" in err


def test_empty_data_dir_and_no_network(capsys, tmp_path):
    """Nothing downloaded and no network: training says how to get data; the download says it cannot reach
    the Hub and how to use local data instead (a real `golfnb data download` process, sockets blocked)."""
    empty = tmp_path / "data"
    empty.mkdir()
    rc, err = _main(capsys, ["--preset", "smoke", "--data-dir", empty])
    assert rc == 2 and "not found" in err and "golfnb data download --variant sp1024" in err
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(
        "import socket\n"
        "def _no(*a, **k):\n    raise OSError('network access is blocked in this test')\n"
        "socket.socket.connect = socket.socket.connect_ex = _no\n"
        "socket.create_connection = socket.getaddrinfo = _no\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOLFNB_")}
    env.update(PYTHONPATH=str(guard), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "golfnb.data.cli", "download", "--variant", "sp1024", "--data-dir",
                        str(empty), "--train-shards", "1", "--no-progress"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "could not reach the Hugging Face Hub" in r.stderr and "GOLFNB_DATA_DIR" in r.stderr
    assert "golfnb data build" in r.stderr
    assert not list((empty / "datasets").rglob("*.bin"))


# ====================================================================================== configuration

def test_unknown_parameter(capsys, pristine, sp1024_model):
    rc, err = _main(capsys, _args(pristine, sp1024_model) + ["--set", "muon_momentun=0.9"])
    assert rc == 2 and "unknown config key 'muon_momentun'; did you mean 'muon_momentum'" in err


def test_ill_typed_parameter(capsys, pristine, sp1024_model):
    rc, err = _main(capsys, _args(pristine, sp1024_model) + ["--set", "num_layers=eleven"])
    assert rc == 2 and "num_layers='eleven' is not a valid integer" in err and "num_layers=11" in err
    rc, err = _main(capsys, _args(pristine, sp1024_model) + ["--set", "seed"])
    assert rc == 2 and "--set 'seed' must look like key=value" in err


def test_impossible_model_shape(capsys, pristine, sp1024_model):
    rc, err = _main(capsys, _args(pristine, sp1024_model) + ["--set", "num_heads=5"])
    assert rc == 2 and "num_heads=5 does not divide model_dim=64" in err and "choose heads that divide" in err


def test_gpu_preset_without_a_gpu(tmp_path):
    """A real `python -m golfnb.train` process: exit code 2 and the fix, no data needed to get there."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOLFNB_")}
    r = subprocess.run([sys.executable, "-m", "golfnb.train", "--preset", "pr1514", "--run-dir", str(tmp_path / "run")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "needs a CUDA GPU" in r.stderr and "use preset=smoke on CPU" in r.stderr
    _nothing_trained(tmp_path / "run")


def test_world_size_not_dividing_8(capsys, pristine, sp1024_model, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    rc, err = _main(capsys, _args(pristine, sp1024_model))
    assert rc == 2 and "world size 3 does not divide 8" in err and "--nproc_per_node=1|2|4|8" in err


# ====================================================================================== run directory

def test_run_dir_not_writable(capsys, pristine, sp1024_model, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc, err = _main(capsys, _args(pristine, sp1024_model) + ["--run-dir", blocker / "run"])
    assert rc == 2 and "is not writable" in err and "choose another run_dir" in err


def test_run_dir_holding_a_different_run(capsys, trained, pristine, sp1024_model, tmp_path):
    run = _copy_run(trained, tmp_path)
    before = sorted(p.name for p in run.rglob("*"))
    rc, err = _main(capsys, _args(pristine, sp1024_model, seed=7, checkpoint_every_seconds=1e-9) + ["--run-dir", run])
    assert rc == 2 and "already holds a different run (seed: 1337 -> 7)" in err and "choose a new run_dir" in err
    assert sorted(p.name for p in run.rglob("*")) == before


def test_fresh_start_over_a_resumable_run(capsys, trained, pristine, sp1024_model, tmp_path):
    """Same config, no --resume: starting over would throw the checkpoint away; the message says --resume."""
    run = _copy_run(trained, tmp_path)
    rc, err = _main(capsys, ["--config", run / "config.json", "--run-dir", run])
    assert rc == 2 and "already holds a resumable checkpoint" in err and f"--resume {run}" in err


def test_resume_with_another_config(capsys, trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    rc, err = _main(capsys, ["--resume", run, "--set", "matrix_lr=0.01"])
    assert rc == 2 and "cannot resume" in err and "matrix_lr: 0.04 -> 0.01" in err
    # the same through train(): a config that is not the run's own
    cfg = preset("smoke", **{**json.loads((run / "config.json").read_text()), "seed": 5})
    with pytest.raises(ConfigError, match="holds a run of another config .seed: 1337 -> 5"):
        T.train(cfg, run, resume=True, echo=False)
    # fields that do not change what is computed may change: here the data moved to another folder
    moved = tmp_path / "moved"
    shutil.copytree(json.loads((run / "config.json").read_text())["data_path"], moved)
    rc, err = _main(capsys, ["--resume", run, "--set", f"data_path={moved}", "--set", "train_log_every=2"])
    assert rc == 0, err


def test_resume_with_nothing_to_resume(capsys, pristine, sp1024_model, tmp_path):
    run = tmp_path / "run"
    preset("smoke", data_path=str(pristine), tokenizer_path=str(sp1024_model)).to_json(run / "config.json")
    rc, err = _main(capsys, ["--resume", run])
    assert rc == 2 and "nothing to resume" in err and "checkpoint_every_seconds > 0" in err
    rc, err = _main(capsys, ["--resume", tmp_path / "not_a_run"])
    assert rc == 2 and "has no config.json" in err


def test_resume_from_a_corrupt_checkpoint(capsys, trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    ckpt = T.latest_checkpoint(run)
    f = Path(ckpt["dir"]) / "shared.pt"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    f.write_bytes(bytes(raw))
    rc, err = _main(capsys, ["--resume", run])
    assert rc == 2 and f"{f} fails its sha256 check" in err and "start a new run_dir" in err


def test_resume_with_another_world_size(capsys, trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    man_path = Path(T.latest_checkpoint(run)["dir"]) / "manifest.json"
    man = json.loads(man_path.read_text())
    man["world_size"] = 2
    man_path.write_text(json.dumps(man))
    rc, err = _main(capsys, ["--resume", run])
    assert rc == 2 and "written by 2 processes" in err and "--nproc_per_node=2" in err


# ====================================================================================== training

def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(capsys, pristine, sp1024_model, tmp_path):
    run = tmp_path / "run"
    rc, err = _main(capsys, _args(pristine, sp1024_model, matrix_lr=1e30, checkpoint_every_seconds=1e-9,
                                  iterations=8) + ["--run-dir", run])
    assert rc == 1
    assert "training loss became nan at step 2" in err
    assert "the last good checkpoint is" in err and "step_000001 (step 1)" in err and "lower matrix_lr" in err
    ckpt = T.latest_checkpoint(run)
    assert ckpt["step"] == 1 and not (run / "final_model.pt").exists()
    from golfnb.io import torch_load

    weights = torch_load(Path(ckpt["dir"]) / "shared.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    errors = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"error"' in ln]
    assert errors and errors[-1]["step"] == 2 and errors[-1]["train_loss"] == "nan"


# ====================================================================================== artifact and eval

@pytest.fixture(scope="module")
def artifact(trained: Path) -> Path:
    from golfnb.pipeline import quantize_run

    return Path(quantize_run(trained, progress=False, record=False, code_bytes=60_000, log=lambda s: None)["artifact"])


def test_submission_over_16_000_000_bytes(capsys, trained, artifact, tmp_path):
    from golfnb.artifact import main as artifact_main
    from golfnb.pipeline import SubmissionTooLarge, quantize_run

    code = tmp_path / "train_gpt.py"
    code.write_bytes(b"#" * 15_990_000)  # a packed file this large leaves ~10 kB for the model
    rc = artifact_main(["inspect", str(artifact), "--code", str(code), "--no-verify"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "limit 16,000,000" in out and "OVER the limit by" in out and "prune_to_fit=True" in out
    with pytest.raises(SubmissionTooLarge, match=r"> bytes_limit 16000000 .* set prune_to_fit=True"):
        quantize_run(_copy_run(trained, tmp_path), progress=False, record=False, code_bytes=15_990_000,
                     overrides={"prune_to_fit": False}, log=lambda s: None)


def test_corrupted_artifact(capsys, artifact, tmp_path):
    from golfnb.artifact import main as artifact_main
    from golfnb.pipeline import load_quantized

    bad = tmp_path / "model.gnb"
    raw = bytearray(artifact.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    bad.write_bytes(bytes(raw))
    rc = artifact_main(["inspect", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "fails its sha256 check: the file is corrupt" in err and "re-create or re-copy it" in err
    from golfnb.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="sha256"):
        load_quantized(artifact.parent.parent, path=bad)


def test_eval_budget_exceeded(trained, tmp_path):
    from golfnb.evals.common import EvalBudgetExceeded
    from golfnb.headless import eval_path, evaluate_run

    run = _copy_run(trained, tmp_path)
    with pytest.raises(EvalBudgetExceeded, match="exceeds the eval budget .* Raise eval_budget_seconds"):
        evaluate_run(run, methods=["sliding"], source="final", device="cpu", log=None,
                     overrides={"eval_budget_seconds": 1e-3, "max_val_tokens": 8192})
    assert not eval_path(run, "sliding").exists()  # no partial result is stored
