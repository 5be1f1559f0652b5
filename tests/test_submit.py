"""golfnb submit / notebooks/submission.ipynb: three real smoke runs (train + quantize + eval through
golfnb.headless.run_stages on tiny sp1024 shards built from the shared data) exported as a record folder,
checked against the runs' own files, validated, and the refusals for runs that are not one entry.

The runs and the exported folder are built once per test session and shared with tests/test_validate.py
(`smoke_runs_for` / `exported_folder_for` cache them under pytest's base temp folder)."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from golfnb import pack, stats, submit, validate
from golfnb.config import Hyperparameters, preset

SEEDS = (1, 2, 3)
# the smoke stack (recurrence, GPT-J parallel, XSA, GPTQ, sliding + TTT + n-gram tilt) kept short: 8 steps,
# evals on 4,096 validation targets
SMOKE = dict(iterations=8, val_loss_every=0, max_val_tokens=4096, warmup_steps=1, train_log_every=4)
ENTRY = dict(name="Smoke stack check", author="Ada Lovelace", github_id="ada", track="track_10min_16mb",
             record_name="smoke reference", record_bpb=3.6, date="2026-11-22")


def smoke_runs_for(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> list[Path]:
    """Three trained, quantized and evaluated smoke runs (seeds 1, 2, 3), built once per session."""
    from golfnb.data.build import build_shards
    from golfnb.headless import run_stages

    base = tmp_path_factory.getbasetemp() / "submission_runs"
    runs = [base / f"smoke_s{s}" for s in SEEDS]
    if (base / "DONE").is_file():
        return runs
    shutil.rmtree(base, ignore_errors=True)
    tok = base / "data" / "tokenizers" / "fineweb_1024_bpe.model"
    tok.parent.mkdir(parents=True)
    tok.symlink_to(shared_data / "tokenizers" / "fineweb_1024_bpe.model")
    data = base / "data" / "datasets" / "fineweb10B_sp1024"
    build_shards([shared_data / "challenge_docs_sample" / "verify_docs_200.jsonl"], tok, data,
                 val_inputs=[shared_data / "challenge_val_prefix" / "docs_val_prefix_decoded.jsonl"], workers=1,
                 progress=False)
    for s, rd in zip(SEEDS, runs):
        cfg = preset("smoke", seed=s, data_path=str(data), tokenizer_path=str(tok), **SMOKE)
        run_stages(cfg, rd, log=lambda m: None)
    (base / "DONE").write_text("ok\n")
    return runs


def exported_folder_for(tmp_path_factory: pytest.TempPathFactory, runs: list[Path]) -> Path:
    """`golfnb submit` of the smoke runs (once per session); tests copy it before changing anything."""
    out = tmp_path_factory.getbasetemp() / "submission_records"
    folder = out / ENTRY["track"] / f"{ENTRY['date']}_Smoke_stack_check"
    if not (folder / "README.md").is_file():
        assert submit.export_submission(runs, out=out, **ENTRY) == folder
    return folder


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> list[Path]:
    return smoke_runs_for(tmp_path_factory, shared_data)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, smoke_runs: list[Path]) -> Path:
    return exported_folder_for(tmp_path_factory, smoke_runs)


def _json(p: Path) -> dict:
    return json.loads(p.read_text())


# ================================================================================================ the export

def test_export_matches_the_runs_and_validates(smoke_runs, exported):
    files = sorted(p.name for p in exported.iterdir())
    assert files == ["README.md", "requirements.txt", "submission.json", "train_gpt.py", "train_seed1.log",
                     "train_seed2.log", "train_seed3.log"]
    info = _json(exported / "submission.json")
    code = (exported / "train_gpt.py").read_bytes()
    assert info["bytes_code"] == len(code) and info["seeds"] == list(SEEDS)
    assert info["eval_method"] == "ttt+tilt"  # method_key of the smoke config's final pass
    bpbs, losses, totals = [], [], []
    for s, rd in zip(SEEDS, smoke_runs):
        metrics = _json(rd / "metrics.json")
        final = _json(rd / "evals" / "ttt_plus_tilt.json")
        r = info["seed_results"][str(s)]
        assert r["val_bpb"] == round(final["val_bpb"], 8) and r["val_loss"] == round(final["val_loss"], 8)
        assert r["bytes_model"] == metrics["quant.model_bytes"] == (rd / "artifacts" / "model.gnb").stat().st_size
        assert r["bytes_total"] == metrics["quant.model_bytes"] + len(code)
        # the code the run accounted for at quantize time is the shipped file
        assert metrics["quant.code_bytes"] == len(code)
        train_s = metrics["train.train_time_s"] + metrics["quant.calibration_s"]
        assert r["train_time_ms"] == round(train_s * 1000)
        passes = [_json(rd / "evals" / f) for f in ("plain.json", "sliding.json", "ttt_plus_tilt.json")]
        assert r["eval_time_ms"] == round(math.fsum(p["wall_s"] for p in passes) * 1000)
        assert set(r["eval_passes"]) == {"plain", "sliding", "ttt+tilt"}
        bpbs.append(final["val_bpb"])
        losses.append(final["val_loss"])
        totals.append(r["bytes_total"])
        # the log: train.log as written, then the quantize/eval results rendered from the run's files
        log = (exported / f"train_seed{s}.log").read_text()
        assert log.startswith((rd / "train.log").read_text())
        assert f"Code size: {len(code)} bytes" in log
        assert f"final_ttt+tilt_exact val_loss:{final['val_loss']:.8f} val_bpb:{final['val_bpb']:.8f}" in log
    m, sd = stats.mean_std(bpbs)
    assert info["val_bpb"] == round(m, 8) and info["val_bpb_std"] == round(sd, 8)
    assert info["bytes_total"] == max(totals)
    sig = stats.compare_to_record(losses, bpbs, record_val_bpb=ENTRY["record_bpb"])
    assert info["significance"]["p_value"] == pytest.approx(sig.p_value) and info["significance"]["test"] == "one_sample"
    c = info["compliance"]
    assert c["artifact_under_16mb"] and c["train_under_600s"] and c["eval_under_600s"] and c["three_seeds"]
    assert c["eval_leaderboard_legal"] and set(c["legality"]) == {"plain", "sliding", "ttt+tilt"}
    assert all(v["per_seed"] == {"1": True, "2": True, "3": True} for v in c["legality"].values())
    assert c["ran_on_8xH100"] is False  # measured: these ran on a CPU
    readme = (exported / "README.md").read_text()
    for section in ("## Results", "### Significance", "## What changed", "## Phase times", "## Artifact accounting",
                    "## Compliance", "## Reproduction", "## Credits"):
        assert section in readme
    assert "`iterations` | `40` | `8`" in readme  # the config diff against the smoke preset
    assert "#1514" in readme and "torchrun --standalone --nproc_per_node=8 train_gpt.py" in readme
    assert "brotli" in (exported / "requirements.txt").read_text()
    rep = validate.validate_folder(exported)
    assert rep.passed, rep.summary()
    assert rep.seeds == list(SEEDS)


def test_the_packed_script_is_the_runs_code_and_config(smoke_runs, exported):
    text = (exported / "train_gpt.py").read_text()
    info = pack.inspect_packed(text)
    env = _json(smoke_runs[0] / "env.json")
    assert info.wrapper_ok and info.digest_ok and info.source_sha256 == env["code_sha256"]
    cfg = Hyperparameters.from_json(smoke_runs[0] / "config.json")
    assert info.config == pack.submission_config(cfg).to_dict()
    assert info.config["seed"] == Hyperparameters().seed  # per-run: SEED picks it
    assert info.methods == ["plain", "sliding", "ttt+tilt"] and "golfnb.evals.slot" in info.left_out


# ================================================================================================ refusals

def _copy_runs(runs: list[Path], dst: Path) -> list[Path]:
    out = []
    for rd in runs:
        shutil.copytree(rd, dst / rd.name, ignore=shutil.ignore_patterns("final_model.pt"))
        out.append(dst / rd.name)
    return out


def _edit_json(path: Path, **changes) -> None:
    d = _json(path)
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


def _other_config(runs):
    _edit_json(runs[1] / "config.json", qk_gain_init=4.0)


def _other_code(runs):
    _edit_json(runs[2] / "env.json", code_sha256="0" * 64)


def _all_other_code(runs):
    for rd in runs:
        _edit_json(rd / "env.json", code_sha256="0" * 64)


def _missing_eval(runs):
    (runs[0] / "evals" / "ttt_plus_tilt.json").unlink()
    m = _json(runs[0] / "metrics.json")
    (runs[0] / "metrics.json").write_text(json.dumps({k: v for k, v in m.items() if not k.startswith("eval.ttt+tilt")}))


def _not_quantized(runs):
    _edit_json(runs[1] / "metrics.json", **{"quant.model_bytes": None})


def _code_bytes_changed(runs):
    for rd in runs:
        m = _json(rd / "metrics.json")
        _edit_json(rd / "metrics.json", **{"quant.code_bytes": m["quant.code_bytes"] + 7})


def _artifact_changed(runs):
    with open(runs[2] / "artifacts" / "model.gnb", "ab") as f:
        f.write(b"\0")


@pytest.mark.parametrize("breaks,message", [
    (_other_config, r"another config .*qk_gain_init"),
    (_other_code, r"ran other code"),
    (_all_other_code, r"golfnb sources changed since these runs"),
    (_missing_eval, r"no result for eval pass ttt\+tilt"),
    (_not_quantized, r"quantize the run first"),
    (_code_bytes_changed, r"accounted for other code sizes"),
    (_artifact_changed, r"artifact changed after it was evaluated"),
])
def test_submit_refuses_runs_that_are_not_one_entry(smoke_runs, tmp_path, breaks, message):
    runs = _copy_runs(smoke_runs, tmp_path / "runs")
    breaks(runs)
    with pytest.raises(submit.SubmitError, match=message):
        submit.export_submission(runs, out=tmp_path / "records", **ENTRY)
    assert not (tmp_path / "records").exists()  # nothing written


def test_submit_needs_three_distinct_seeds(smoke_runs, tmp_path):
    with pytest.raises(submit.SubmitError, match="at least 3 seeds"):
        submit.export_submission(smoke_runs[:2], out=tmp_path, **ENTRY)
    with pytest.raises(submit.SubmitError, match=r"seed\(s\) \[1\] appear in more than one run"):
        submit.export_submission([smoke_runs[0], smoke_runs[0], smoke_runs[1]], out=tmp_path, **ENTRY)
    with pytest.raises(submit.SubmitError, match="give the record to beat"):
        submit.export_submission(smoke_runs, out=tmp_path, **{**ENTRY, "record_bpb": None})
    with pytest.raises(submit.SubmitError, match="not YYYY-MM-DD"):
        submit.export_submission(smoke_runs, out=tmp_path, **{**ENTRY, "date": "22/11/2026"})


def test_cli_submit_and_validate(smoke_runs, tmp_path, capsys):
    from golfnb.cli import main

    args = ["submit", "--runs", *map(str, smoke_runs), "--name", "CLI entry", "--author", "Ada", "--github-id", "ada",
            "--record-name", "smoke reference", "--record-seeds-bpb", "3.61,3.62,3.60", "--date", "2026-11-23",
            "--out", str(tmp_path)]
    assert main(args) == 0
    folder = tmp_path / "track_10min_16mb" / "2026-11-23_CLI_entry"
    info = _json(folder / "submission.json")
    assert info["significance"]["test"] == "welch" and info["record"]["seeds_val_bpb"] == [3.61, 3.62, 3.60]
    assert main(["validate", str(folder)]) == 0
    assert "passes all" in capsys.readouterr().out
    assert main(args) == 2  # the folder exists: no silent overwrite
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_submission_notebook(smoke_runs, tmp_path):
    papermill = pytest.importorskip("papermill")
    nb = Path(__file__).resolve().parents[1] / "notebooks" / "submission.ipynb"
    out_nb = tmp_path / "submission.ipynb"
    params = {**{k: v for k, v in ENTRY.items() if k != "date"}, "run_dirs": [str(p) for p in smoke_runs],
              "date": "2026-11-24", "out": str(tmp_path / "records")}
    papermill.execute_notebook(str(nb), str(out_nb), parameters=params, kernel_name="python3", progress_bar=False)
    folder = tmp_path / "records" / "track_10min_16mb" / "2026-11-24_Smoke_stack_check"
    assert validate.validate_folder(folder).passed
    cells = json.loads(out_nb.read_text())["cells"]
    outputs = [o for c in cells for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the seeds-vs-record plot
    text = "\n".join("".join(o.get("data", {}).get("text/plain", "")) + "".join(o.get("text", "")) for o in outputs)
    assert re.search(r"val_bpb \d\.\d{5} \+- \d\.\d{5} over 3 seeds", text)
    assert "golfnb validate: all checks pass" in text


def test_submission_notebook_is_committed_clean():
    import ast

    path = Path(__file__).resolve().parents[1] / "notebooks" / "submission.ipynb"
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3" and "papermill" not in nb["metadata"]
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code), "strip the outputs (nbstripout)"
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    for stmt in ast.parse("".join(params[0]["source"])).body:  # primitives only: papermill recomputes nothing
        assert isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name)
        ast.literal_eval(stmt.value)
    assert not any(line.lstrip().startswith("!") for c in code for line in "".join(c["source"]).splitlines())


def test_requirements_name_the_attention_kernels_the_seeds_ran():
    from golfnb.submit import _requirements

    cfg = preset("smoke")
    base = _requirements(cfg, {"environment": {}})
    assert "FlashAttention" not in base and "torch" in base.splitlines()
    fa3 = _requirements(cfg, {"environment": {"attn_backend": "fa3"}})
    assert "FlashAttention-3" in fa3 and "falls back" in fa3
    fa4 = _requirements(cfg, {"environment": {"attn_backend": "fa4"}})
    assert "FlashAttention-4" in fa4 and "attn_backend=auto" in fa4 and "falls back" not in fa4
