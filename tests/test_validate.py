"""golfnb validate: the record folder exported from three real smoke runs passes; deliberately broken copies
of it each fail with their own message (and a fix); the log parser reads both log forms (a packed-script
run and a run whose quantize/eval stages ran headless)."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from golfnb import pack, validate
from test_submit import exported_folder_for, smoke_runs_for


@pytest.fixture(scope="session")
def folder(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    return exported_folder_for(tmp_path_factory, smoke_runs_for(tmp_path_factory, shared_data))


@pytest.fixture
def copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst


def _sub(f: Path, text: str, pattern: str, repl: str, count: int = 0) -> str:
    new, n = re.subn(pattern, repl, text, count=count, flags=re.M)
    assert n, f"{pattern!r} not found in {f.name}"
    return new


def _edit(f: Path, pattern: str, repl: str, count: int = 0) -> None:
    f.write_text(_sub(f, f.read_text(), pattern, repl, count))


def _edit_json(f: Path, **changes) -> None:
    d = json.loads(f.read_text())
    for k, v in changes.items():
        if v is None:
            del d[k]
        else:
            d[k] = v
    f.write_text(json.dumps(d, indent=2))


def test_the_exported_folder_passes(folder):
    rep = validate.validate_folder(folder)
    assert rep.passed, rep.summary()
    assert rep.seeds == [1, 2, 3] and len(rep.checks) >= 10
    assert validate.main([str(folder)]) == 0


def test_a_log_of_the_packed_file_itself_is_accepted(copy):
    """A run of the packed train_gpt.py reports the file's own sha256 (golfnb.pack patches code_hash there)."""
    sha = hashlib.sha256((copy / "train_gpt.py").read_bytes()).hexdigest()
    _edit(copy / "train_seed2.log", r"^code_sha256: [0-9a-f]{64}$", f"code_sha256: {sha}")
    assert validate.validate_folder(copy).passed


# ------------------------------------------------------------------------------------ broken folders

def _missing_readme(d: Path) -> None:
    (d / "README.md").unlink()


def _over_size(d: Path) -> None:
    code = (d / "train_gpt.py").stat().st_size
    for log in d.glob("train_seed*.log"):
        _edit(log, r"^Serialized model (\S+): \d+ bytes$", r"Serialized model \1: 15990000 bytes")
        _edit(log, r"^Total submission size: \d+ bytes$", f"Total submission size: {15990000 + code} bytes")


def _script_edited_after_the_run(d: Path) -> None:
    f = d / "train_gpt.py"
    payload = pack.unwrap(f.read_text())
    # incompressible bytes: a short edit can leave the LZMA stream, and so the logged code size, unchanged
    noise = hashlib.sha256(b"edited").hexdigest()
    edited = payload.replace("_M['golfnb.io']=(False,r'''", f"_M['golfnb.io']=(False,r'''X={noise!r}\n", 1)
    assert edited != payload
    f.write_text(pack.wrap(edited))


def _script_trimmed(d: Path) -> None:
    with open(d / "train_gpt.py", "a") as f:
        f.write("# tuned\n")


def _wrong_field_type(d: Path) -> None:
    info = json.loads((d / "submission.json").read_text())
    _edit_json(d / "submission.json", val_bpb=str(info["val_bpb"]))


def _missing_field(d: Path) -> None:
    _edit_json(d / "submission.json", author=None)


def _too_few_seeds(d: Path) -> None:
    (d / "train_seed3.log").unlink()
    info = json.loads((d / "submission.json").read_text())
    del info["seed_results"]["3"]
    info["seeds"] = [1, 2]
    info["val_bpb"] = round((info["seed_results"]["1"]["val_bpb"] + info["seed_results"]["2"]["val_bpb"]) / 2, 8)
    (d / "submission.json").write_text(json.dumps(info))


def _eval_over_budget(d: Path) -> None:
    _edit(d / "train_seed2.log", r"eval_seconds:[\d.]+", "eval_seconds:700.0")


def _train_over_budget(d: Path) -> None:
    _edit(d / "train_seed1.log", r"gptq:train_time:[\d.]+s \+ calibration:([\d.]+)s = [\d.]+s",
          r"gptq:train_time:640.00s + calibration:\1s = 650.00s")


def _code_size_line(d: Path) -> None:
    n = (d / "train_gpt.py").stat().st_size
    _edit(d / "train_seed3.log", rf"^Code size: {n} bytes$", f"Code size: {n - 10} bytes")


def _does_not_compile(d: Path) -> None:
    (d / "train_gpt.py").write_text("import lzma as L,base64 as B\nexec(L.decompress(B.b85decode(\"abc\"\n")


def _log_of_other_code(d: Path) -> None:
    _edit(d / "train_seed1.log", r"^code_sha256: [0-9a-f]{64}$", "code_sha256: " + "ab" * 32)


def _result_differs_from_log(d: Path) -> None:
    info = json.loads((d / "submission.json").read_text())
    info["seed_results"]["2"]["val_bpb"] = round(info["seed_results"]["2"]["val_bpb"] - 0.01, 8)
    (d / "submission.json").write_text(json.dumps(info))


def _other_final_method(d: Path) -> None:
    _edit(d / "train_seed3.log", r"^final_eval:(\S+) method:\S+ ", r"final_eval:\1 method:sliding ")


def _no_byte_lines(d: Path) -> None:
    _edit(d / "train_seed1.log", r"^(Serialized model|Total submission size).*\n", "")


BROKEN = [
    (_missing_readme, "files", r"missing file README\.md"),
    (_over_size, "artifact size", r"over the cap of 16,000,000"),
    (_script_edited_after_the_run, "train_gpt.py", r"edited after it was packed"),
    (_script_trimmed, "code size", r"logged Code size \d+ bytes != len\(train_gpt\.py\)"),
    (_wrong_field_type, "submission.json", r"field 'val_bpb' should be a number, got str"),
    (_missing_field, "submission.json", r"field 'author' is missing"),
    (_too_few_seeds, "seeds", r"seeds: 2 log\(s\) \(1, 2\), at least 3 needed"),
    (_eval_over_budget, "eval time", r"train_seed2\.log: eval time 700\.0 s > 600 s"),
    (_train_over_budget, "train time", r"train_seed1\.log: train time 650\.0 s > 600 s"),
    (_code_size_line, "code size", r"train_seed3\.log: logged Code size \d+ bytes != len"),
    (_does_not_compile, "train_gpt.py", r"does not compile"),
    (_log_of_other_code, "code identity", r"train_seed1\.log: code_sha256 (ab){32} is neither"),
    (_result_differs_from_log, "results", r"train_seed2\.log: val_bpb .* in the log"),
    (_no_byte_lines, "artifact size", r"train_seed1\.log has no 'Serialized model"),
    (_other_final_method, "results", r"train_seed3\.log scored its final number with sliding"),
]


@pytest.mark.parametrize("breaks,check,message", BROKEN, ids=[b[0].__name__.strip("_") for b in BROKEN])
def test_broken_folders_fail_with_their_message(copy, breaks, check, message):
    breaks(copy)
    rep = validate.validate_folder(copy)
    assert not rep.passed
    hits = [p for p in rep.problems if p.check == check and re.search(message, p.message)]
    assert hits, rep.summary()
    assert all(p.fix for p in rep.problems)  # every failure says what to do
    assert validate.main([str(copy)]) == 1


def test_the_edited_script_also_breaks_the_byte_accounting(copy):
    _script_edited_after_the_run(copy)
    checks = {p.check for p in validate.validate_folder(copy).problems}
    assert {"train_gpt.py", "code size"} <= checks


def test_missing_folder_and_no_logs(tmp_path):
    rep = validate.validate_folder(tmp_path / "nope")
    assert not rep.passed and "is not a folder" in rep.problems[0].message
    rep = validate.validate_folder(tmp_path)
    msgs = " | ".join(p.message for p in rep.problems)
    assert "missing file train_gpt.py" in msgs and "no train_seed<N>.log files" in msgs


# ------------------------------------------------------------------------------------ log parsing

PACKED_RUN_LOG = """\
--- code
code_sha256: {h}
steps:4909 train_time_s:588.1200 warmup_s:131.0 world_size:8
code_bytes:61234 code_path:train_gpt.py code_sha256:{h}
gptq:collected 67 Hessians from 64 batches (50,331,648 tokens, train) in 12.70s
gptq:train_time:588.12s + calibration:12.70s = 600.82s (reserve 12.0s, budget 600s EXCEEDED)
Serialized model int6+brotli: 15938766 bytes
Code size: 61234 bytes
Total submission size: 16000000 bytes
final_eval:ttt method:ttt+tilt val_loss:2.78800000 val_bpb:1.07930000 eval_seconds:471.3 legality_check_seconds:0.0
final_sliding_exact val_loss:2.79500000 val_bpb:1.08200000
final_ttt_exact val_loss:2.78800000 val_bpb:1.07930000
"""


def test_parse_log_reads_the_packed_scripts_lines():
    h = "c" * 64
    f = validate.parse_log(PACKED_RUN_LOG.format(h=h))
    assert f.code_hashes == [h, h] and f.code_size == 61234 and f.model_bytes == 15938766
    assert f.total_bytes == 16_000_000 and f.train_s == pytest.approx(600.82) and f.eval_s == pytest.approx(471.3)
    assert f.finals == {"sliding": (2.795, 1.082), "ttt": (2.788, 1.0793)}  # the pipeline names passes
    assert f.final_method == "ttt+tilt" and f.final == (2.788, 1.0793)
    # without GPTQ the loop's own time is the train time
    g = validate.parse_log("steps:10 train_time_s:12.5000 world_size:1\n")
    assert g.train_s == pytest.approx(12.5) and g.code_size is None and g.eval_s is None
