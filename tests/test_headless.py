"""golfnb.headless: stored eval results are reused only for the same question, and the CLI's exit codes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from golfnb import headless
from test_submit import smoke_runs_for


@pytest.fixture()
def run_copy(tmp_path_factory, shared_data, tmp_path) -> Path:
    src = smoke_runs_for(tmp_path_factory, shared_data)[0]
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def test_eval_results_are_reused_only_for_the_same_overrides(run_copy):
    first = json.loads(headless.eval_path(run_copy, "sliding").read_text())
    same = headless.evaluate_run(run_copy, methods=["sliding"], device="cpu", log=None)["sliding"]
    assert same["val_bpb"] == first["val_bpb"]  # read back, not recomputed

    calls: list[str] = []
    other = headless.evaluate_run(run_copy, methods=["sliding"], device="cpu", log=calls.append,
                                  overrides={"max_val_tokens": 2048})["sliding"]
    assert calls, "a different override must run the eval again"
    assert other["targets_scored"] == 2048 != first["targets_scored"]
    assert other["overrides"] == {"max_val_tokens": 2048}
    stored = json.loads(headless.eval_path(run_copy, "sliding").read_text())
    assert stored["targets_scored"] == 2048

    calls.clear()
    again = headless.evaluate_run(run_copy, methods=["sliding"], device="cpu", log=calls.append,
                                  overrides={"max_val_tokens": 2048})["sliding"]
    assert not calls and again["val_bpb"] == other["val_bpb"]


def test_cli_round_trip_evals_the_final_model_and_the_artifact(run_copy):
    # the GPU report script's round trip: plain on the unquantized final model, then on the artifact
    args = ["--run-dir", str(run_copy), "--stages", "eval", "--methods", "plain", "--eval-set", "max_val_tokens=4096"]
    assert headless.main(args + ["--source", "final"]) == 0
    final = json.loads(headless.eval_path(run_copy, "plain").read_text())
    assert final["source"] == "final" and final["device"] == "cpu" and final["targets_scored"] == 4096
    assert final["overrides"] == {"max_val_tokens": "4096"} and final["compiled_forward"] is False
    assert headless.main(args) == 0
    art = json.loads(headless.eval_path(run_copy, "plain").read_text())
    assert art["source"] == "artifact" and art["targets_scored"] == 4096
    assert art["val_bpb"] != final["val_bpb"]  # quantization changes the number (a little)
    assert abs(art["val_bpb"] - final["val_bpb"]) < 0.05


def test_cli_bad_stage_and_missing_run_are_exit_2(tmp_path, capsys):
    assert headless.main(["--run-dir", str(tmp_path / "r"), "--stages", "train,polish", "--preset", "smoke"]) == 2
    assert "unknown stage" in capsys.readouterr().err
    # quantizing a directory that holds no trained model: a clear error, not a traceback
    empty = tmp_path / "empty"
    empty.mkdir()
    assert headless.main(["--run-dir", str(empty), "--stages", "quantize"]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err or "config.json" in err or "final_model" in err
