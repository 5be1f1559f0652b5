"""`golfnb quickstart` (what `make demo` runs): offline on a CPU machine it builds shards from a local text
folder and executes the train -> quantize -> eval_sliding notebooks into one run directory."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import torch

from golfnb import quickstart as qs
from golfnb.config import ConfigError, preset


def _text_dir(tmp_path: Path, shared_data: Path) -> Path:
    """A folder shaped like ../shared/data, but small: 200 FineWeb docs as training text."""
    d = tmp_path / "text"
    (d / "tokenizers").mkdir(parents=True)
    (d / "tokenizers" / "fineweb_1024_bpe.model").symlink_to(shared_data / "tokenizers" / "fineweb_1024_bpe.model")
    (d / "wikipedia_en_2015_substitute").mkdir()
    (d / "wikipedia_en_2015_substitute" / "part.jsonl").symlink_to(
        shared_data / "challenge_docs_sample" / "verify_docs_200.jsonl")
    (d / "challenge_val_prefix").mkdir()
    (d / "challenge_val_prefix" / "docs_val_prefix_decoded.jsonl").symlink_to(
        shared_data / "challenge_val_prefix" / "docs_val_prefix_decoded.jsonl")
    return d


def test_no_data_and_no_text_is_an_error_that_names_the_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("GOLFNB_TEXT_DIR", str(tmp_path / "absent"))
    cfg = preset("smoke").with_data_root(tmp_path / "data")
    with pytest.raises(ConfigError) as e:
        qs.ensure_data(cfg, tmp_path / "data", offline=True, log=lambda m: None)
    msg = str(e.value)
    assert "golfnb data download" in msg and "--text-dir" in msg and "GOLFNB_DATA_DIR" in msg
    assert not (tmp_path / "data").exists()


def test_a_text_folder_without_the_tokenizer_names_it(tmp_path):
    (tmp_path / "text").mkdir()
    cfg = preset("smoke").with_data_root(tmp_path / "data")
    with pytest.raises(ConfigError, match="fineweb_1024_bpe.model"):
        qs.ensure_data(cfg, tmp_path / "data", text_dir=tmp_path / "text", offline=True, log=lambda m: None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback to the smoke preset")
def test_offline_cpu_quickstart_runs_the_three_notebooks(tmp_path, shared_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    said: list[str] = []
    run_dir = qs.quickstart(None, data_dir=str(tmp_path / "data"), text_dir=str(_text_dir(tmp_path, shared_data)),
                            offline=True, seed=5, log=said.append)
    assert any("smoke preset on CPU" in m for m in said)  # it says it fell back
    assert any("data built" in m for m in said)
    assert run_dir.parent == Path("runs") and run_dir.name.endswith("_quickstart_smoke_s5")
    for name in ("train.ipynb", "quantize.ipynb", "eval_sliding.ipynb"):
        nb = nbformat.read(run_dir / name, as_version=4)
        assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                    if o.get("output_type") == "error"], name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train.steps"] == preset("smoke").iterations
    assert metrics["quant.total_bytes"] <= 16_000_000
    assert 0.5 < metrics["eval.sliding.val_bpb"] < 8.0  # a real score of the quantized model, in bits per byte
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 5

    # a second call finds the shards and does not rebuild them
    said.clear()
    cfg = preset("smoke").with_data_root(tmp_path / "data")
    assert qs.ensure_data(cfg, tmp_path / "data", offline=True, log=said.append) == "present"
