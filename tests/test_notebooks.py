"""Every notebook in notebooks/ executed end to end with papermill on the smoke preset and real data.

Data: tiny sp1024 shards built in a temporary folder from the shared data (200 challenge documents for
training, the real validation-prefix documents for validation; the official sp1024 tokenizer is linked,
not copied). Two trained runs (in the kernel, and under torchrun from the `golfnb run` CLI) are shared
between tests through session fixtures.
"""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from golfnb import launch, runs
from golfnb.config import Hyperparameters

papermill = pytest.importorskip("papermill")
from papermill.exceptions import PapermillExecutionError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NB = REPO / "notebooks"
NOTEBOOKS = ("train", "quantize", "eval_sliding", "eval_ttt", "eval_slot", "eval_ngram_tilt", "ablation")
# a 12-step smoke run with 1,024-token batches, scored on 4,096 validation targets
TINY = {"iterations": 12, "val_loss_every": 6, "max_val_tokens": 4096, "warmup_steps": 1, "train_batch_tokens": 1024}
CODE_BYTES = 80_000  # given to quantize.ipynb so the tests do not spend time packing train_gpt.py


def _nb(name: str) -> Path:
    return NB / f"{name}.ipynb"


def _execute(name: str, run_dir: Path, output_name: str | None = None, **params) -> Path:
    return launch.run_notebook(_nb(name), run_dir, params, output_name=output_name, log_output=False)


def _outputs_text(path: Path) -> str:
    nb = json.loads(path.read_text())
    parts = []
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            parts.append("".join(o.get("text", "")))
            for mime in ("text/plain", "text/markdown"):
                parts.append("".join(o.get("data", {}).get(mime, "")))
            parts.append("".join(o.get("traceback", [])) + o.get("evalue", ""))
    return "\n".join(parts)


def _pngs(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    return [o["data"]["image/png"] for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]


# ================================================================================================ fixtures

@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    from golfnb.data.build import build_shards

    root = tmp_path_factory.mktemp("data")
    (root / "tokenizers").mkdir()
    (root / "tokenizers" / "fineweb_1024_bpe.model").symlink_to(shared_data / "tokenizers" / "fineweb_1024_bpe.model")
    build_shards([shared_data / "challenge_docs_sample" / "verify_docs_200.jsonl"],
                 root / "tokenizers" / "fineweb_1024_bpe.model", root / "datasets" / "fineweb10B_sp1024",
                 val_inputs=[shared_data / "challenge_val_prefix" / "docs_val_prefix_decoded.jsonl"], workers=1,
                 progress=False)
    return root


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def trained_run(runs_root: Path, data_root: Path) -> Path:
    """train.ipynb in this kernel (nproc=0), seed 1, recurrence on."""
    rd = runs_root / "a_loop_s1"
    _execute("train", rd, preset="smoke", seed=1, nproc=0, data_dir=str(data_root), overrides=TINY)
    return rd


@pytest.fixture(scope="session")
def torchrun_run(runs_root: Path, data_root: Path) -> Path:
    """`golfnb run` (the CLI) with nproc=1 and recurrence off: the trainer runs under torchrun in its own
    process group."""
    before = set(runs_root.iterdir())
    rc = launch.main([str(_nb("train")), "-p", "preset", "smoke", "-p", "seed", "2", "-p", "nproc", "1",
                      "-p", "data_dir", str(data_root), "-p", "overrides", json.dumps({**TINY, "num_loops": 0}),
                      "--runs-root", str(runs_root), "--name", "b_noloop", "-q"])
    assert rc == 0
    (new,) = set(runs_root.iterdir()) - before
    return new


@pytest.fixture(scope="session")
def quantized_run(trained_run: Path) -> Path:
    """quantize.ipynb on the trained run, with a cap low enough that the planner has to advise."""
    _execute("quantize", trained_run, limit=150_000, roundtrip_eval=True, verify_plan=False, code_bytes=CODE_BYTES)
    return trained_run


# ================================================================================================ hygiene

def _parameters_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]


def test_expected_notebooks_exist() -> None:
    missing = [n for n in NOTEBOOKS if not _nb(n).is_file()]
    assert not missing, f"notebooks/ lacks {missing}"


@pytest.mark.parametrize("path", sorted(NB.glob("**/*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_committed_clean(path: Path) -> None:
    """Every notebook under notebooks/: what nbstripout enforces through git, checked here because CI
    cannot rely on a git filter."""
    nb = json.loads(path.read_text())
    nbformat.validate(nbformat.reads(path.read_text(), as_version=4))
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] == "code":
            assert c["outputs"] == [], f"{path.name} cell {i} has outputs: strip them (nbstripout {path})"
            assert c["execution_count"] is None, f"{path.name} cell {i} has an execution count"
        assert "papermill" not in c.get("metadata", {}), f"{path.name} cell {i} carries papermill metadata"
    assert "papermill" not in nb["metadata"], f"{path.name} is an executed copy; commit the clean source"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    params = _parameters_cells(nb)
    assert len(params) == 1, f"{path.name} must have exactly one cell tagged 'parameters'"
    tree = ast.parse("".join(params[0]["source"]))
    for stmt in tree.body:  # primitives only: papermill does not recompute derived defaults
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
        ast.literal_eval(stmt.value)
    if path.stem in NOTEBOOKS:
        assert "run_dir" in {s.targets[0].id for s in tree.body}
    for c in nb["cells"]:  # never a shell escape: a failing `!cmd` leaves the notebook "successful"
        if c["cell_type"] == "code":
            assert not any(line.lstrip().startswith(("!", "%%bash", "%%sh")) for line in "".join(c["source"]).splitlines())


def test_gitattributes_strips_notebooks_but_not_runs(tmp_path: Path) -> None:
    git = shutil.which("git")
    import importlib.util

    if git is None or importlib.util.find_spec("nbstripout") is None:  # both ship with `make test`'s set-up
        pytest.fail("needs git on PATH and nbstripout installed (pip install -e .[dev])")
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "runs" / "r").mkdir(parents=True)
    attrs = (REPO / ".gitattributes").read_text()
    (repo / ".gitattributes").write_text(attrs)
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]})
    cell.execution_count = 3
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
    nb.cells = [cell]
    for p in (repo / "notebooks" / "a.ipynb", repo / "runs" / "r" / "a.ipynb"):
        nbformat.write(nb, p)
    env = {"GIT_CONFIG_GLOBAL": str(tmp_path / "gitconfig"), "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path),
           "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    run = lambda *a: subprocess.run(a, cwd=repo, env=env, check=True, capture_output=True, text=True)  # noqa: E731
    run(git, "init", "-q")
    run(sys.executable, "-m", "nbstripout", "--install", "--attributes", ".gitattributes")
    assert (repo / ".gitattributes").read_text() == attrs, "the documented install must leave the scope alone"
    run(git, "add", "-A")
    staged_nb = json.loads(run(git, "show", ":notebooks/a.ipynb").stdout)
    staged_run = json.loads(run(git, "show", ":runs/r/a.ipynb").stdout)
    assert staged_nb["cells"][0]["outputs"] == [] and staged_nb["cells"][0]["execution_count"] is None
    assert staged_nb["cells"][0]["metadata"]["tags"] == ["parameters"]
    assert staged_run["cells"][0]["outputs"] and staged_run["cells"][0]["execution_count"] == 3


# ================================================================================================ train

def test_train_in_process(trained_run: Path) -> None:
    for f in ("config.json", "env.json", "train.log", "logs/rank0.log", "metrics.json", "metrics.jsonl",
              "final_model.pt", "train.ipynb"):
        assert (trained_run / f).is_file(), f
    m = runs.read_metrics(trained_run)
    assert m["train.steps"] == 12 and m["train.world_size"] == 1 and 1.0 < m["train.val_bpb"] < 6.0
    shown = runs.read_metrics(trained_run / "train.ipynb")
    assert shown["train.val_bpb"] == m["train.val_bpb"], "the executed notebook carries its own metrics"
    cfg = Hyperparameters.from_json(trained_run / "config.json")
    assert cfg.seed == 1 and cfg.iterations == 12 and cfg.num_loops == 1
    nb = json.loads((trained_run / "train.ipynb").read_text())
    assert nb["metadata"]["papermill"]["parameters"]["seed"] == 1
    assert len(_pngs(trained_run / "train.ipynb")) == 1
    assert "in this process" in _outputs_text(trained_run / "train.ipynb")


def test_train_under_torchrun_from_the_cli(torchrun_run: Path) -> None:
    assert torchrun_run.name.endswith("_b_noloop_s2")
    m = runs.read_metrics(torchrun_run)
    assert m["train.steps"] == 12 and m["train.world_size"] == 1
    text = _outputs_text(torchrun_run / "train.ipynb")
    assert "torch.distributed.run" in text and "--nproc_per_node=1" in text
    assert "step:12" in text, "rank 0's lines stream into the cell"
    assert list((torchrun_run / "logs" / "torchrun").rglob("stdout.log")), "per-rank torchrun logs"
    cfg = Hyperparameters.from_json(torchrun_run / "config.json")
    assert cfg.seed == 2 and cfg.num_loops == 0


def test_finished_remote_run_is_rendered_by_plain_papermill(trained_run: Path, tmp_path: Path) -> None:
    """A GPU run brought back with config, logs and metrics but without its weights (the real pr1514 run),
    rendered with the plain papermill CLI and no run_dir: the notebook takes the output notebook's folder
    (given as a relative path) and does not train."""
    remote = tmp_path / "remote"
    remote.mkdir()
    for f in ("config.json", "env.json", "metrics.json", "metrics.jsonl", "train.log"):
        shutil.copy2(trained_run / f, remote / f)
    before = (remote / "metrics.jsonl").read_text()
    r = subprocess.run([sys.executable, "-m", "papermill", str(_nb("train")), "remote/train.ipynb",
                        "-p", "seed", "99", "-k", "python3", "--no-progress-bar"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = remote / "train.ipynb"
    assert not (remote / "final_model.pt").exists()
    assert (remote / "metrics.jsonl").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["remote"], "no stray run directory"
    text = _outputs_text(out)
    assert "rendering them only" in text and "were not used" in text
    assert runs.read_metrics(out)["train.val_bpb"] == runs.read_metrics(trained_run)["train.val_bpb"]
    assert len(_pngs(out)) == 1


def test_failing_child_fails_the_notebook(tmp_path: Path) -> None:
    """nproc=1 with a data folder only the child process looks into: its non-zero exit fails papermill."""
    empty = tmp_path / "no_data"
    empty.mkdir()
    with pytest.raises(PapermillExecutionError) as ei:
        _execute("train", tmp_path / "run", seed=1, nproc=1, data_dir=str(empty), overrides=TINY)
    assert ei.value.ename == "TrainingLaunchError" and "training exited with code" in ei.value.evalue
    reason = ei.value.evalue.splitlines()[0]
    assert "golfnb.train: configuration error" in reason and "golfnb data" in reason, "the child's reason leads"
    assert not (tmp_path / "run" / "final_model.pt").exists()


def test_unknown_override_is_rejected_with_suggestion(tmp_path: Path) -> None:
    with pytest.raises(PapermillExecutionError) as ei:
        _execute("train", tmp_path / "run", overrides={"muon_momentun": 0.9})
    assert ei.value.ename == "ConfigError" and "did you mean 'muon_momentum'" in ei.value.evalue
    assert not (tmp_path / "run" / "config.json").exists()


def test_cli_rejects_unknown_parameter_before_any_kernel(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = launch.main([str(_nb("train")), "-p", "sed", "1", "--runs-root", str(tmp_path)])
    assert rc == 2 and "did you mean 'seed'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    rc = launch.main([str(_nb("eval_sliding")), "--runs-root", str(tmp_path)])
    assert rc == 2 and "--run-dir" in capsys.readouterr().err


# ================================================================================================ quantize

def test_quantize_notebook(quantized_run: Path) -> None:
    m = runs.read_metrics(quantized_run)
    art = quantized_run / "artifacts" / "model.gnb"
    assert art.is_file() and m["quant.model_bytes"] == art.stat().st_size
    assert m["artifact.brotli.model_bytes"] == art.stat().st_size
    assert m["artifact.brotli.total_bytes"] == art.stat().st_size + m["artifact.code_bytes"]
    assert m["artifact.brotli.margin_bytes"] == 150_000 - m["artifact.brotli.total_bytes"] < 0
    assert 1.0 < m["eval.plain.val_bpb"] < 6.0  # the roundtrip number
    text = _outputs_text(quantized_run / "quantize.ipynb")
    assert "over the cap by" in text and "matrix_clip_sigmas=" in text, "the planner's advice is shown"
    assert len(_pngs(quantized_run / "quantize.ipynb")) == 1


def test_quantize_reserializes_with_another_compressor(quantized_run: Path) -> None:
    from golfnb.artifact import load_artifact

    art = quantized_run / "artifacts" / "model.gnb"
    mtime = art.stat().st_mtime_ns
    out = _execute("quantize", quantized_run, output_name="quantize_zstd.ipynb", compressor="zstd")
    assert art.stat().st_mtime_ns == mtime, "the existing artifact is kept"
    alt = quantized_run / "artifacts" / "model.zstd.gnb"
    m = runs.read_metrics(out)
    assert m["artifact.zstd.model_bytes"] == alt.stat().st_size
    assert runs.read_metrics(quantized_run)["quant.reserialized.zstd.model_bytes"] == alt.stat().st_size
    assert m["artifact.brotli.model_bytes"] == art.stat().st_size
    a, b = load_artifact(art), load_artifact(alt)
    assert a.tensors.keys() == b.tensors.keys()
    for k, t in a.tensors.items():  # same codes and scales: only the compression differs
        assert t.data.equal(b.tensors[k].data) and (t.scale is None or t.scale.equal(b.tensors[k].scale))


# ================================================================================================ evals

def test_eval_sliding(quantized_run: Path) -> None:
    out = _execute("eval_sliding", quantized_run)
    m = runs.read_metrics(quantized_run)
    res = json.loads((quantized_run / "evals" / "sliding.json").read_text())
    assert m["eval.sliding.val_bpb"] == res["val_bpb"] and m["eval.sliding.targets_scored"] == 4096
    assert m["eval.sliding.phase.score_s"] > 0 and m["eval.sliding.windows"] == res["windows"]
    assert runs.read_metrics(out)["eval.sliding.val_bpb"] == res["val_bpb"]
    assert len(_pngs(out)) == 1


def test_eval_ttt(quantized_run: Path) -> None:
    out = _execute("eval_ttt", quantized_run)
    m = runs.read_metrics(quantized_run)
    res = json.loads((quantized_run / "evals" / "ttt.json").read_text())
    assert m["eval.ttt.val_bpb"] == res["val_bpb"] and m["eval.ttt.n_chunks"] == len(res["chunk_bpb"]) == 4
    assert m["eval.ttt.phase.adapt_s"] > 0 and m["eval.ttt.leaderboard_legal"] is True
    # the unadapted reference scores the same windows as the sliding pass, so their totals agree
    ref = json.loads((quantized_run / "evals" / "ttt_unadapted_chunks.json").read_text())
    sliding = launch.run_eval(quantized_run, "sliding", log=None, display=False)
    assert ref["val_bpb"] == pytest.approx(sliding["val_bpb"], abs=1e-9)
    assert ref["chunk_bpb"][0] == pytest.approx(res["chunk_bpb"][0], abs=1e-9), "chunk 0 is scored before any step"
    assert len(_pngs(out)) == 2


def test_eval_slot_gates_on_the_measured_verdict(quantized_run: Path) -> None:
    with pytest.raises(PapermillExecutionError) as ei:
        _execute("eval_slot", quantized_run, output_name="eval_slot_refused.ipynb", variant="standard")
    assert "allow_illegal" in ei.value.evalue
    refused = _outputs_text(quantized_run / "eval_slot_refused.ipynb")
    assert "NOT leaderboard-legal" in refused, "the verdict is shown before the refusal"
    assert not (quantized_run / "evals" / "slot_standard.json").exists()
    out = _execute("eval_slot", quantized_run, variant="standard", allow_illegal=True)
    m = runs.read_metrics(quantized_run)
    assert m["eval.slot:standard.leaderboard_legal"] is False and m["eval.slot:standard.failed_checks"]
    assert 1.0 < m["eval.slot:standard.val_bpb"] < 6.0
    assert "NOT leaderboard-legal" in _outputs_text(out)


def test_eval_ngram_tilt(quantized_run: Path) -> None:
    out = _execute("eval_ngram_tilt", quantized_run)
    m = runs.read_metrics(quantized_run)
    assert 0.0 < m["eval.sliding+tilt.tilt.hint_rate"] <= 1.0
    assert 0.0 <= m["eval.sliding+tilt.tilt.precision"] <= 1.0
    assert m["eval.sliding+tilt.phase.ngram_precompute_s"] >= 0 and "eval.sliding.val_bpb" in m
    assert len(_pngs(out)) == 2


# ================================================================================================ ablation

def test_ablation_over_smoke_runs(trained_run: Path, torchrun_run: Path, tmp_path: Path) -> None:
    report_dir = tmp_path / "ablation_recurrence"
    out = _execute("ablation", report_dir, runs_root=str(trained_run.parent), metric="train.val_bpb")
    m = runs.read_metrics(report_dir)
    assert m["ablation.by"] == ["num_loops"] and m["ablation.metric"] == "train.val_bpb"
    assert m["ablation.num_loops=1.n"] == 1 and m["ablation.num_loops=0.n"] == 1
    assert m["ablation.num_loops=1.mean"] == runs.read_metrics(trained_run)["train.val_bpb"]
    assert m["ablation.num_loops=0.mean"] == runs.read_metrics(torchrun_run)["train.val_bpb"]
    text = _outputs_text(out)
    assert "Smoke-scale runs on CPU" in text and "static copy" in text
    assert "needs >= 2 values per group" in text, "one seed per setting: the t-test says what is missing"
    assert len(_pngs(out)) == 3
