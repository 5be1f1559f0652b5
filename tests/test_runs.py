"""The run registry (record / read_metrics), run directories, the launcher's process handling, parameter
typing, and the ablation statistics. No notebook kernels here (tests/test_notebooks.py executes them)."""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import nbformat
import pytest

from golfnb import ablation, launch, report, runs
from golfnb.config import ConfigError, Hyperparameters, preset


# ================================================================================================ registry

def test_record_merges_atomically_and_reads_back(tmp_path: Path) -> None:
    runs.record("train.val_bpb", 1.25, run_dir=tmp_path, display=False)
    merged = runs.record_many(tmp_path, {"quant.model_bytes": 123, "path": tmp_path / "a"})
    assert merged == {"train.val_bpb": 1.25, "quant.model_bytes": 123, "path": str(tmp_path / "a")}
    assert runs.read_metrics(tmp_path) == merged
    assert runs.read_metrics(tmp_path / "metrics.json") == merged
    assert not list(tmp_path.glob("*.tmp*")), "atomic writes leave no temporary files"


def test_non_finite_metrics_stay_strict_json(tmp_path: Path) -> None:
    import numpy as np

    runs.record_many(tmp_path, {"a": math.nan, "b": np.float64(math.inf), "c": 1.5})
    text = (tmp_path / "metrics.json").read_text()
    # strict parsers reject bare NaN/Infinity; the values survive as strings and numeric readers skip them
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.json"))
    assert data == {"a": "nan", "b": "inf", "c": 1.5}
    rows = [{"num_loops": 0, "n": 1, "mean": 1.7, "std": math.nan}, {"num_loops": 2, "n": 2, "mean": 1.8, "std": 0.01}]
    m = report.ablation_metrics(rows, ["num_loops"], "train.val_bpb")
    assert m["ablation.num_loops=0.std"] is None and m["ablation.num_loops=2.std"] == 0.01
    assert "nan" not in report.groups_table([dict(r, values=[r["mean"]], seeds=[1]) for r in rows], ["num_loops"],
                                            "train.val_bpb").to_text()


def test_record_uses_current_run_dir_and_needs_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOLFNB_RUN_DIR", raising=False)
    runs.set_current_run_dir(None)
    with pytest.raises(ValueError, match="no run directory"):
        runs.record("x", 1)
    runs.set_current_run_dir(tmp_path)
    try:
        runs.record("x", 2, display=False)
    finally:
        runs.set_current_run_dir(None)
    assert runs.read_metrics(tmp_path)["x"] == 2


def test_read_metrics_from_executed_notebook(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    c1 = nbformat.v4.new_code_cell("")
    c1.outputs = [nbformat.v4.new_output("display_data", data={runs.METRICS_MIME: {"a": 1, "b": 2}, "text/plain": "a"})]
    c2 = nbformat.v4.new_code_cell("")
    c2.outputs = [nbformat.v4.new_output("display_data", data={runs.METRICS_MIME: {"b": 3}, "text/plain": "b"}),
                  nbformat.v4.new_output("stream", name="stdout", text="not a metric")]
    nb.cells = [c1, c2]
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    assert runs.read_metrics(path) == {"a": 1, "b": 3}


def test_read_metrics_errors(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        runs.read_metrics(tmp_path)
    with pytest.raises(ValueError, match="neither a run directory"):
        runs.read_metrics(tmp_path / "notes.txt")


# ================================================================================================ run dirs

def test_new_run_dir_layout_and_collisions(tmp_path: Path) -> None:
    a = launch.new_run_dir(tmp_path, "smoke loop", 7, stamp="20260101-000000")
    b = launch.new_run_dir(tmp_path, "smoke loop", 7, stamp="20260101-000000")
    c = launch.new_run_dir(tmp_path, "ablation_recurrence")
    assert a.name == "20260101-000000_smoke-loop_s7" and a.is_dir()
    assert b.name == "20260101-000000_smoke-loop_s7-2" and b.is_dir()
    stamp, _, rest = c.name.partition("_")
    assert len(stamp) == 15 and stamp[8] == "-" and rest == "ablation_recurrence"


def test_parse_papermill_argv() -> None:
    got = launch.parse_papermill_argv(["/venv/bin/python3", "/venv/bin/papermill", "nb/train.ipynb",
                                       "runs/x/train.ipynb", "-p", "seed", "1", "--cwd", "/tmp", ""])
    assert got == {"notebook_path": "nb/train.ipynb", "output_path": "runs/x/train.ipynb", "cwd": "/tmp"}
    got = launch.parse_papermill_argv(["python", "-m", "papermill", "-k", "python3", "a.ipynb", "out/b.ipynb"])
    assert got is not None and got["output_path"] == "out/b.ipynb"
    assert launch.parse_papermill_argv(["python", "-m", "ipykernel_launcher", "-f", "x.json"]) is None
    assert launch.parse_papermill_argv(["/venv/bin/papermill", "--help"]) is None


def test_resolve_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "papermill_context", lambda pid=None: None)
    given = launch.resolve_run_dir(tmp_path / "given")
    assert given == tmp_path / "given" and given.is_dir()
    out = tmp_path / "runs" / "r1"
    out.mkdir(parents=True)
    assert launch.resolve_run_dir("", papermill_output_path=str(out / "train.ipynb")) == out
    with pytest.raises(ConfigError, match="holds no config.json"):
        launch.resolve_run_dir("", papermill_output_path=str(out / "eval.ipynb"), must_exist=True)
    with pytest.raises(ConfigError, match="does not exist"):
        launch.resolve_run_dir(tmp_path / "missing", must_exist=True)
    with pytest.raises(ConfigError, match="set run_dir"):
        launch.resolve_run_dir("", must_exist=True)
    assert launch.resolve_run_dir("", new=False) is None
    fresh = launch.resolve_run_dir("", name="smoke", seed=3, runs_root=tmp_path / "new")
    assert fresh.parent == tmp_path / "new" and fresh.name.endswith("_smoke_s3")
    # under the papermill CLI writing next to the source notebook: refused with the fix
    src = tmp_path / "notebooks"
    src.mkdir()
    monkeypatch.setattr(launch, "papermill_context", lambda pid=None: {
        "notebook_path": src / "train.ipynb", "output_path": src / "out.ipynb", "cwd": None})
    with pytest.raises(ConfigError, match="next to its source"):
        launch.resolve_run_dir("")


def test_parse_param_value() -> None:
    p = launch.parse_param_value
    assert p("false") is False and p("True") is True and p("none") is None
    assert p("0012") == 12 and isinstance(p("0012"), int)
    assert p("1e3") == 1000.0 and p("-0.5") == -0.5
    assert p("{num_loops: 0, ve_layers: [9, 10]}") == {"num_loops": 0, "ve_layers": [9, 10]}
    assert p('{"a": "b"}') == {"a": "b"}
    assert p("smoke") == "smoke"
    with pytest.raises(ConfigError, match="not valid YAML"):
        p("{a: [}")


def test_training_done(tmp_path: Path) -> None:
    assert not launch.training_done(tmp_path)
    runs.record_many(tmp_path, {"quant.model_bytes": 1})
    assert not launch.training_done(tmp_path)
    runs.record_many(tmp_path, {"train.val_bpb": 2.0})
    assert launch.training_done(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "final_model.pt").write_bytes(b"x")
    assert launch.training_done(other)


# ================================================================================================ planning

def test_plan_training_validates_before_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'muon_momentum'"):
        launch.plan_training("smoke", 1, 0, str(tmp_path / "a"), overrides={"muon_momentun": 0.9})
    assert not (tmp_path / "a").exists(), "nothing is created when the parameters are wrong"
    with pytest.raises(ConfigError, match="must divide 8"):
        launch.plan_training("smoke", 1, 3, str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="seed"):
        launch.plan_training("smoke", 1, 0, str(tmp_path / "c"), overrides={"seed": 4})
    with pytest.raises(ConfigError, match="unknown preset"):
        launch.plan_training("smokey", 1, 0, str(tmp_path / "d"))
    with pytest.raises(ConfigError, match="no checkpoints/LATEST"):
        launch.plan_training("smoke", 1, 0, str(tmp_path / "e"), resume=True)


def test_plan_training_writes_config_and_renders_finished_runs(tmp_path: Path) -> None:
    rd = tmp_path / "r"
    plan = launch.plan_training("smoke", 5, 0, str(rd), str(tmp_path / "data"), {"num_loops": 0})
    assert plan.action == "train" and plan.nproc == 0
    cfg = Hyperparameters.from_json(rd / "config.json")
    assert cfg.seed == 5 and cfg.num_loops == 0
    assert cfg.data_path == str(tmp_path / "data" / "datasets" / "fineweb10B_sp1024")
    # a remote run brought back: metrics with train.* and its own config; rendered, config untouched
    before = (rd / "config.json").read_text()
    runs.record_many(rd, {"train.val_bpb": 2.5, "train.steps": 3})
    plan = launch.plan_training("pr1514", 1, -1, str(rd))
    assert plan.action == "render" and plan.cfg.num_loops == 0 and plan.cfg.seed == 5
    assert "not used" in plan.describe()
    assert (rd / "config.json").read_text() == before
    assert launch.run_training(plan) == {"train.val_bpb": 2.5, "train.steps": 3}


def test_torchrun_command(tmp_path: Path) -> None:
    cmd = launch.torchrun_command(tmp_path, 2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc_per_node=2" in cmd
    assert cmd[cmd.index("--local-ranks-filter") + 1] == "0"
    assert cmd[cmd.index("-m", 3) + 1] == "golfnb.train"
    assert cmd[-4:] == ["--config", str(tmp_path / "config.json"), "--run-dir", str(tmp_path)]
    assert launch.torchrun_command(tmp_path, 1, resume=True)[-2:] == ["--resume", str(tmp_path)]


# ================================================================================================ processes

def test_launch_training_raises_on_nonzero_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")  # NCCL settings of the parent reach the child
    code = ("import os, sys; print('child', os.environ['NCCL_SOCKET_IFNAME'], os.environ['PYTHONUNBUFFERED']); "
            "print('boom', file=sys.stderr); sys.exit(3)")
    lines: list[str] = []
    with pytest.raises(launch.TrainingLaunchError, match="exited with code 3") as ei:
        launch.launch_training(tmp_path, command=[sys.executable, "-c", code], echo=lines.append)
    assert ei.value.returncode == 3
    assert "child lo 1" in lines and "boom" in lines
    assert "boom" in str(ei.value)
    assert launch.launch_training(tmp_path, command=[sys.executable, "-c", "print(1)"], echo=lines.append) == 0
    with pytest.raises(ConfigError, match="config.json does not exist"):
        launch.launch_training(tmp_path / "nothing", 1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0); it is dead for our purpose
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return True


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_interrupt_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
            "print('ready', flush=True)\n"
            "time.sleep(120)\n")

    def echo(line: str) -> None:
        if line == "ready":
            raise KeyboardInterrupt  # what an interrupted notebook cell raises

    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        launch.stream_process([sys.executable, "-c", code], echo=echo, grace_s=2.0)
    grandchild = int(pidfile.read_text())
    deadline = time.time() + 10
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the grandchild (a torchrun worker's role) must die with the group"
    assert time.perf_counter() - t0 < 30


# ================================================================================================ ablation

def _fake_run(root: Path, name: str, metrics: dict, **cfg_changes) -> Path:
    d = root / name
    d.mkdir(parents=True)
    preset("smoke", **cfg_changes).to_json(d / "config.json")
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def test_ablation_grouping(tmp_path: Path) -> None:
    vals = {(1, 1): 2.10, (1, 2): 2.14, (1, 3): 2.12, (0, 1): 2.20, (0, 2): 2.25, (0, 3): 2.19}
    for (loops, seed), v in vals.items():
        _fake_run(tmp_path, f"x_l{loops}_s{seed}", {"eval.sliding.val_bpb": v, "train.steps": 40},
                  num_loops=loops, seed=seed)
    _fake_run(tmp_path, "x_l1_s9", {"train.steps": 40}, num_loops=1, seed=9)  # no eval: counted as missing
    (tmp_path / "ablation_report").mkdir()  # not a run: no config.json
    rs = ablation.load_runs(tmp_path, "x_*")
    assert len(rs) == 7
    assert ablation.differing_keys(rs) == ["seed", "num_loops"]
    assert ablation.grouping_keys(rs) == ["num_loops"]
    assert "eval.sliding.val_bpb" in ablation.metric_names(rs)
    rows = ablation.group(rs, "num_loops", "eval.sliding.val_bpb")
    assert [r["num_loops"] for r in rows] == [0, 1]
    on = [v for (l, _), v in vals.items() if l == 1]
    assert rows[1]["n"] == 3 and rows[1]["missing"] == 1
    assert rows[1]["mean"] == pytest.approx(statistics.fmean(on))
    assert rows[1]["std"] == pytest.approx(statistics.stdev(on))
    assert sorted(rows[1]["seeds"]) == [1, 2, 3]
    assert len(ablation.load_runs(tmp_path, "x_*", require="eval.sliding.val_bpb")) == 6
    single = ablation.group(rs[:1], ["num_loops"], "eval.sliding.val_bpb")
    assert single[0]["n"] == 1 and math.isnan(single[0]["std"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ablation.load_runs(tmp_path / "nope")


def test_welch_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    a, b = [2.10, 2.14, 2.12, 2.13], [2.20, 2.25, 2.19]
    w = ablation.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w["t"] == pytest.approx(ref.statistic) and w["p"] == pytest.approx(ref.pvalue)
    assert w["diff"] == pytest.approx(statistics.fmean(a) - statistics.fmean(b))
    with pytest.raises(ValueError, match="more seeds"):
        ablation.welch([1.0], [1.0, 2.0])


def test_paired_matches_scipy_and_matches_seeds() -> None:
    stats = pytest.importorskip("scipy.stats")
    a, a_seeds = [2.10, 2.14, 2.12, 2.30], [1, 2, 3, 7]
    b, b_seeds = [2.15, 2.11, 2.18], [3, 1, 2]  # other order; seed 7 only in a
    pr = ablation.paired(a, a_seeds, b, b_seeds)
    ref = stats.ttest_rel([2.10, 2.14, 2.12], [2.11, 2.18, 2.15])
    assert pr["n"] == 3 and pr["t"] == pytest.approx(ref.statistic) and pr["p"] == pytest.approx(ref.pvalue)
    with pytest.raises(ValueError, match="both settings"):
        ablation.paired([1.0, 2.0], [1, 2], [1.0], [1])


# ================================================================================================ report

def test_table_and_png() -> None:
    t = report.Table([{"method": "sliding", "val_bpb": 1.23456789, "bytes": 1234567, "legal": True}], title="r")
    text = t.to_text()
    assert "1.2346" in text and "1,234,567" in text and "yes" in text and text.startswith("r\n")
    assert "<td>sliding</td>" in t._repr_html_()
    fig, ax = report._figure(1, 1, width=4, height=2)
    ax[0][0].plot([0, 1], [1, 0])
    png = report.to_png(fig, dpi=50)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 20_000


def test_read_history_keeps_the_last_session(tmp_path: Path) -> None:
    recs = [{"kind": "val", "step": 0, "val_bpb": 4.0}, {"kind": "train", "step": 1, "train_loss": 7.0},
            {"kind": "train", "step": 5, "train_loss": 6.0},
            {"kind": "val", "step": 0, "val_bpb": 4.1}, {"kind": "train", "step": 1, "train_loss": 7.1},
            {"kind": "train", "step": 2, "train_loss": 6.9}, {"kind": "val", "step": 2, "label": "final", "val_bpb": 3.9}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n{\"kind\": \"tr")
    h = report.read_history(tmp_path)
    assert [r["train_loss"] for r in h["train"]] == [7.1, 6.9]
    assert [r["val_bpb"] for r in h["val"]] == [4.1, 3.9]


def test_read_history_replaces_steps_run_again_after_a_resume(tmp_path: Path) -> None:
    # trained to step 30, killed, resumed from the step-20 checkpoint: steps 25 and 30 were run twice
    recs = [{"kind": "val", "step": 0, "label": "val", "val_bpb": 4.0}]
    recs += [{"kind": "train", "step": s, "train_loss": 10 - s / 10} for s in (1, 10, 20, 25, 30)]
    recs += [{"kind": "val", "step": 20, "label": "val", "val_bpb": 3.5}]
    recs += [{"kind": "train", "step": s, "train_loss": 9 - s / 10} for s in (25, 30, 40)]
    recs += [{"kind": "val", "step": 40, "label": "final", "val_bpb": 3.1},
             {"kind": "val", "step": 40, "label": "post_ema", "val_bpb": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    h = report.read_history(tmp_path)
    assert [r["step"] for r in h["train"]] == [1, 10, 20, 25, 30, 40]
    assert [r["train_loss"] for r in h["train"]][3:] == [9 - 2.5, 9 - 3.0, 9 - 4.0]
    assert [(r["step"], r["label"]) for r in h["val"]] == [(0, "val"), (20, "val"), (40, "final"), (40, "post_ema")]


def test_training_notes() -> None:
    notes = report.training_notes({"ema_decay": 0.997, "max_wallclock_seconds": 92.0, "train_batch_tokens": 786432},
                                  {"train.steps": 85, "train.val_bpb": 2.09, "train.post_ema_val_bpb": 3.40,
                                   "train.world_size": 1})
    assert any("EMA weights score worse" in n and "~333 steps" in n for n in notes)
    assert any("92 s" in n for n in notes) and any("8 micro-batches" in n for n in notes)
    assert report.training_notes({"ema_decay": 0.9}, {"train.val_bpb": 2.0, "train.post_ema_val_bpb": 1.9}) == []


def test_quant_notes_point_at_a_smaller_compressor() -> None:
    rep = {"header": {"compressor": "zstd"}, "model_bytes": 15_905_379,
           "variants": [{"compressor": "zstd", "model_bytes": 15_905_379, "margin_bytes": 7_869},
                        {"compressor": "brotli", "model_bytes": 14_088_156, "margin_bytes": 1_825_092}]}
    notes = report.quant_notes({"quant.pruned_entries": 5_944_032}, rep)
    assert "5,944,032" in notes[0] and "1,817,223 bytes smaller with brotli" in notes[1]
    assert report.quant_notes({"quant.pruned_entries": 0}, rep) == []


def test_fmt() -> None:
    assert report.fmt(1337) == "1337" and report.fmt(786432) == "786,432"
    assert report.fmt(646361.23) == "646,361.2" and report.fmt(1020281.9) == "1,020,282"
    assert report.fmt(2.0906143) == "2.0906" and report.fmt(3.2e-05) == "3.200e-05"
    assert report.fmt(None) == "-" and report.fmt(False) == "no" and report.fmt(float("nan")) == "nan"
