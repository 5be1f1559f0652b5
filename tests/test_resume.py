"""Resuming a killed run (golfnb.train checkpoints): a run killed with SIGKILL or stopped with SIGTERM and
resumed with `python -m golfnb.train --resume` matches an uninterrupted run of the same seed bit for bit
(losses of every step and the final weights); the clock, the LR schedule and the wall-clock cap continue from
the time already spent; a checkpoint write that dies half-way leaves the previous checkpoint in charge.

Every training run here is a separate `python -m golfnb.train` process on one CPU thread (the same thread
count for every run: float reductions then happen in the same order) over tiny sp1024 shards built in
tmp_path from the shared data."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import golfnb.train as T
from golfnb.config import preset
from golfnb.data.build import build_shards
from golfnb.io import torch_load
from golfnb.optim import lr_multiplier

ITERATIONS = 16
# The smoke model with small batches so a step takes tens of milliseconds; warm-up, in-loop validation and
# the recurrence switch (at step 8) all happen, so a resume has to get each of them right.
TINY = dict(iterations=ITERATIONS, train_batch_tokens=512, grad_accum_steps=2, warmup_steps=1, train_log_every=1,
            val_loss_every=8, max_val_tokens=256, muon_momentum_warmup_steps=6, checkpoint_every_seconds=0.15)


@pytest.fixture(scope="module")
def data(shared_data: Path, sp1024_model: Path, tmp_path_factory) -> dict[str, str]:
    """Train shards from the FineWeb-Edu sample, validation from the challenge's validation documents."""
    root = tmp_path_factory.mktemp("resume_data")
    train_txt = root / "train.txt"
    train_txt.write_text((shared_data / "fineweb_edu_sample" / "fineweb_edu_sample10BT_head.txt").read_text()[:80_000])
    val_docs = (shared_data / "challenge_val_prefix" / "docs_val_prefix_decoded.jsonl").read_text().splitlines()[:8]
    val_jsonl = root / "val.jsonl"
    val_jsonl.write_text("\n".join(val_docs) + "\n")
    out = root / "shards"
    build_shards([train_txt], sp1024_model, out, val_inputs=[val_jsonl], shard_tokens=8_000, workers=1,
                 progress=False)
    return {"data_path": str(out), "tokenizer_path": str(sp1024_model)}


def _args(data: dict[str, str], **extra) -> list[str]:
    out = ["--preset", "smoke"]
    for k, v in {**data, **TINY, **extra}.items():
        out += ["--set", f"{k}={v}"]
    return out


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOLFNB_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _train(argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "golfnb.train", *argv], env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _records(run: Path, kind: str | None = None) -> list[dict]:
    out = []
    p = run / "metrics.jsonl"
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind is None or rec.get("kind") == kind:
            out.append(rec)
    return out


def _wait_for(proc: subprocess.Popen, cond, what: str, timeout: float = 180) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"training exited (rc {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.004)


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch_load(run / "final_model.pt")["state_dict"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """The uninterrupted run: {step: train_loss} of every step, and its directory."""
    run = tmp_path_factory.mktemp("reference") / "run"
    r = _train(_args(data) + ["--run-dir", str(run)])
    assert r.returncode == 0, r.stderr[-3000:]
    losses = {rec["step"]: rec["train_loss"] for rec in _records(run, "train")}
    assert sorted(losses) == list(range(1, ITERATIONS + 1))
    return run, losses


def _interrupt(data, run: Path, sig: int, seed: int) -> tuple[subprocess.Popen, int]:
    """Start a run, wait for its first checkpoint, then send `sig` once a random later step is logged."""
    proc = subprocess.Popen([sys.executable, "-m", "golfnb.train", *_args(data), "--run-dir", str(run)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = run / "checkpoints" / "LATEST"
    _wait_for(proc, latest.is_file, "the first checkpoint")
    first = int(latest.read_text().strip().split("_")[1])
    target = random.Random(seed).randint(first + 1, ITERATIONS - 3)
    _wait_for(proc, lambda: any(r["step"] >= target for r in _records(run, "train")), f"step {target}")
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc, target


def _assert_same_as_reference(run: Path, reference, note: str) -> None:
    ref_run, ref = reference
    got = _records(run, "train")
    bad = [(r["step"], r["train_loss"], ref[r["step"]]) for r in got if r["train_loss"] != ref[r["step"]]]
    assert not bad, f"{note}: losses differ from the uninterrupted run (step, got, want): {bad[:5]}"
    resume_at = [r["step"] for r in _records(run, "resume")]
    assert resume_at, f"{note}: no resume record in metrics.jsonl"
    # every step after the resume point was trained (and logged) by the resumed session
    after = [r["step"] for r in _records(run, "train")[-(ITERATIONS - resume_at[-1]):]]
    assert after == list(range(resume_at[-1] + 1, ITERATIONS + 1)), note
    a, b = _final_weights(run), _final_weights(ref_run)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{note}: final weights differ from the uninterrupted run in {differ[:5]}"


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(data, reference, tmp_path):
    seed = random.randrange(1 << 30)
    run = tmp_path / "run"
    proc, target = _interrupt(data, run, signal.SIGKILL, seed)
    note = f"(kill seed {seed}, killed at step >= {target})"
    assert proc.returncode == -signal.SIGKILL, note
    assert not (run / "final_model.pt").exists(), note
    ckpt = T.latest_checkpoint(run)
    logged = max(r["step"] for r in _records(run, "train"))
    assert ckpt is not None and ckpt["step"] <= logged, note
    # what a SIGKILL can leave behind: a half-written checkpoint folder LATEST does not name, and a
    # metrics line cut short
    torn = run / "checkpoints" / f"step_{ckpt['step'] + 1:06d}"
    torn.mkdir(exist_ok=True)
    (torn / "shared.pt").write_bytes(b"PK\x03\x04 torn")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 99, "train_lo')
    before_log = (run / "train.log").read_bytes()
    before_metrics = (run / "metrics.jsonl").read_bytes()

    r = _train(["--resume", str(run)])
    assert r.returncode == 0, f"{note}\n{r.stderr[-3000:]}"
    _assert_same_as_reference(run, reference, note)
    # the history is appended to, not rewritten, and says where the resume happened
    assert (run / "train.log").read_bytes().startswith(before_log)
    assert (run / "metrics.jsonl").read_bytes().startswith(before_metrics)
    res = _records(run, "resume")
    assert [x["step"] for x in res] == [ckpt["step"]], note
    assert res[0]["superseded_steps"] == logged - ckpt["step"]
    assert res[0]["elapsed_s"] == pytest.approx(ckpt["elapsed_s"], abs=1e-3)
    assert f"resumed:step_{ckpt['step']:06d}" in (run / "train.log").read_text()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    unreadable = [ln for ln in lines if not ln.startswith("{") or not ln.endswith("}")]
    assert unreadable == ['{"kind": "train", "step": 99, "train_lo'], unreadable  # the cut line stays alone
    # the torn folder is gone, and the run ends on its end-of-loop checkpoint
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [f"step_{ITERATIONS:06d}"]
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["train.steps"] == ITERATIONS and summary["train.resumed_from_step"] == ckpt["step"]


def test_sigterm_writes_a_checkpoint_exits_143_and_resumes_bit_identical(data, reference, tmp_path):
    seed = random.randrange(1 << 30)
    run = tmp_path / "run"
    proc, target = _interrupt(data, run, signal.SIGTERM, seed)
    note = f"(signal seed {seed}, SIGTERM at step >= {target})"
    err = proc.stderr.read()
    assert proc.returncode == T.INTERRUPT_EXIT_CODE == 143, f"{note}\n{err[-3000:]}"
    assert "resume with python -m golfnb.train --resume" in err
    ckpt = T.latest_checkpoint(run)
    # the checkpoint holds the step the signal interrupted: nothing trained is lost
    assert ckpt["reason"] == f"signal {int(signal.SIGTERM)}"
    assert ckpt["step"] == max(r["step"] for r in _records(run, "train")) >= target, note
    assert f"stopped on a signal at step {ckpt['step']} " in err

    r = _train(["--resume", str(run)])
    assert r.returncode == 0, f"{note}\n{r.stderr[-3000:]}"
    _assert_same_as_reference(run, reference, note)
    assert _records(run, "resume")[0]["superseded_steps"] == 0


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _stop_after_first_checkpoint(monkeypatch) -> None:
    """Deliver a stop signal (as the SIGTERM handler does) on the step after the first checkpoint."""
    real = T.train_step

    def step(tr, lr_scale, update_ema=True):
        out = real(tr, lr_scale, update_ema)
        if update_ema and tr.checkpoint_step is not None and tr.resumed_from is None:
            tr.stop_signal = int(signal.SIGTERM)
        return out

    monkeypatch.setattr(T, "train_step", step)


def test_resume_keeps_the_clock_schedule_and_cap(data, tmp_path, monkeypatch, one_thread):
    """With a wall-clock budget the resumed run gets only the time that is left, and its LR schedule picks up
    at the same elapsed time: the first resumed step uses lr_multiplier(step, elapsed at the checkpoint)."""
    cap = 1.5
    # warmdown_frac=1: the LR falls linearly with elapsed time from the first step, so it shows the clock
    cfg = preset("smoke", **data, **{**TINY, "iterations": 100_000, "max_wallclock_seconds": cap,
                                     "warmdown_frac": 1.0, "checkpoint_every_seconds": 0.2, "val_loss_every": 0})
    assert cfg.training_cap_seconds == cap
    run = tmp_path / "run"
    _stop_after_first_checkpoint(monkeypatch)
    with pytest.raises(T.TrainingInterrupted):
        T.train(cfg, run, echo=False)
    monkeypatch.undo()
    ckpt = T.latest_checkpoint(run)
    shared = torch_load(Path(ckpt["dir"]) / "shared.pt")
    step0, elapsed0 = shared["step"], shared["elapsed_s"]
    assert 0.2 <= elapsed0 < cap
    n0 = shared["phase_steps"]["pre"] + shared["phase_steps"]["post"]

    summary = T.train(cfg, run, resume=True, echo=False)
    resumed = [r for r in _records(run, "train") if r["step"] > step0][-(summary["steps"] - step0):]
    assert resumed[0]["step"] == step0 + 1
    assert resumed[0]["lr_scale"] == lr_multiplier(cfg, step0, elapsed0, elapsed0 / n0)
    assert resumed[0]["lr_scale"] == pytest.approx(1 - elapsed0 / cap)
    assert resumed[-1]["lr_scale"] < resumed[0]["lr_scale"]
    # the cap counts the time spent before the interruption: the run stops within one step of `cap`
    longest = max(r["step_ms"] for r in resumed) / 1000
    assert cap <= summary["train_time_s"] <= cap + longest + 1e-3
    trained_after_resume = summary["train_time_s"] - elapsed0
    assert trained_after_resume < cap - 0.2 + longest + 1e-3
    assert _records(run, "resume")[0]["elapsed_s"] == pytest.approx(elapsed0, abs=1e-3)


def test_a_checkpoint_write_killed_before_its_commit_leaves_the_previous_one(data, tmp_path, monkeypatch, one_thread):
    """LATEST is the commit point: files of a checkpoint that never got there are ignored (and cleaned up),
    the previous checkpoint loads and verifies."""
    cfg = preset("smoke", **data, **{**TINY, "iterations": 6, "checkpoint_every_seconds": 1e-9, "val_loss_every": 0})
    run = tmp_path / "run"
    real = T.atomic_write_text
    commits = []

    class Killed(BaseException):
        pass

    def dying(path, text):
        if Path(path).name == "LATEST":
            commits.append(text.strip())
            if len(commits) == 3:
                raise Killed()  # the process dies after the rank files and manifest, before LATEST
        return real(path, text)

    monkeypatch.setattr(T, "atomic_write_text", dying)
    with pytest.raises(Killed):
        T.train(cfg, run, echo=False)
    monkeypatch.undo()
    assert commits == ["step_000001", "step_000002", "step_000003"]
    ckpt = T.latest_checkpoint(run)
    assert ckpt["step"] == 2 and (run / "checkpoints" / "step_000003" / "shared.pt").is_file()

    summary = T.train(cfg, run, resume=True, echo=False)
    assert summary["steps"] == 6 and summary["resumed_from_step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000006"]


@pytest.mark.slow
def test_two_process_run_stopped_by_sigterm_resumes_bit_identical(data, tmp_path):
    """torchrun with 2 CPU processes (gloo): the sharded optimizer state is gathered into one checkpoint, each
    rank's loader position is its own file, and the resumed run matches an uninterrupted 2-process run."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "golfnb.train"]
    args = _args(data, iterations=10, val_loss_every=5, checkpoint_every_seconds=0.2)
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    r = subprocess.run(torchrun + args + ["--run-dir", str(ref_run)], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    proc = subprocess.Popen(torchrun + args + ["--run-dir", str(run)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(proc, (run / "checkpoints" / "LATEST").is_file, "the first checkpoint", timeout=300)
    first = T.latest_checkpoint(run)["step"]
    _wait_for(proc, lambda: any(x["step"] > first for x in _records(run, "train")), "a step after it", timeout=300)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as a pre-empted machine does: workers get it twice
    proc.wait(timeout=120)
    ckpt = T.latest_checkpoint(run)
    assert ckpt["reason"] == f"signal {int(signal.SIGTERM)}" and ckpt["world_size"] == 2
    assert set(ckpt["sha256"]) == {"shared.pt", "rank0.pt", "rank1.pt"}
    r = subprocess.run(torchrun + ["--resume", str(run)], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = {x["step"]: x["train_loss"] for x in _records(ref_run, "train")}
    got = _records(run, "train")
    assert [x["step"] for x in got][-(10 - ckpt["step"]):] == list(range(ckpt["step"] + 1, 11))
    bad = [(x["step"], x["train_loss"], ref[x["step"]]) for x in got if x["train_loss"] != ref[x["step"]]]
    assert not bad, bad
    a, b = _final_weights(run), _final_weights(ref_run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_torch_load_in_the_package_is_weights_only(tmp_path):
    """Checkpoints, final models and loader states are read without running pickled code: every torch.load in
    golfnb passes weights_only=True (golfnb.io.torch_load), and nothing unpickles by other means."""
    import ast
    import pickle

    from golfnb.io import atomic_torch_save

    root = Path(T.__file__).resolve().parent
    bad = []
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner, name = getattr(node.func.value, "id", ""), node.func.attr
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{f.relative_to(root.parent)}:{node.lineno}"
            if (owner, name) == ("torch", "load") and not (
                    isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                bad.append(f"{where} torch.load without weights_only=True")
            if owner == "pickle" and name in ("load", "loads", "Unpickler"):
                bad.append(f"{where} pickle.{name}")
            if (owner, name) == ("np", "load") and isinstance(kw.get("allow_pickle"), ast.Constant) \
                    and kw["allow_pickle"].value:
                bad.append(f"{where} np.load(allow_pickle=True)")
    assert not bad, bad

    class Payload:  # what a tampered checkpoint could carry
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickled code ran')",))

    atomic_torch_save(tmp_path / "evil.pt", {"step": 3, "x": Payload()})
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch_load(tmp_path / "evil.pt")
