"""Check a record folder the way a reviewer would, before the pull request: `golfnb validate FOLDER`.

Everything is computed from the files in the folder (golfnb is needed only to read its own packed format):

* files: train_gpt.py, submission.json, README.md, requirements.txt and one train_seed<N>.log per seed;
* submission.json: the fields the records use, with their types; per-seed results for every logged seed;
* train_gpt.py compiles; for a golfnb-packed file, the wrapper is golfnb's and the payload is unchanged since
  packing (its digest), and the payload compiles too;
* at least 3 seeds, the same ones in the logs and in submission.json;
* per log: every `code_sha256` it reports is the shipped file's sha256 (a run of the packed file) or the
  golfnb source tree the file was packed from (a run from the notebooks or golfnb.headless); the logged
  `Code size` is exactly len(train_gpt.py); `Total submission size` = code + model and <= 16,000,000 bytes;
  train time (loop + GPTQ calibration) and eval time (all passes) within the track's budgets (600 s each
  for track_10min_16mb); the `final_eval:` line names submission.json's eval_method and its val_bpb;
* submission.json's byte counts and means agree with the logs and the file.

Every failure is listed with its fix; the exit code is 0 only when every check passes.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from golfnb.config import BYTES_LIMIT

__all__ = ["Problem", "ValidationReport", "REQUIRED_FILES", "SUBMISSION_FIELDS", "SEED_FIELDS", "LogFacts",
           "parse_log", "validate_folder", "add_validate_parser", "main"]

REQUIRED_FILES = ("train_gpt.py", "submission.json", "README.md", "requirements.txt")
_NUM = (int, float)
SUBMISSION_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,), "author": (str,), "github_id": (str,), "date": (str,), "track": (str,), "blurb": (str,),
    "val_bpb": _NUM, "val_bpb_std": _NUM, "val_loss": _NUM, "val_loss_std": _NUM,
    "bytes_total": (int,), "bytes_code": (int,), "eval_method": (str,), "seeds": (list,),
    "seed_results": (dict,), "compliance": (dict,),
}
SEED_FIELDS: dict[str, tuple[type, ...]] = {
    "val_bpb": _NUM, "val_loss": _NUM, "bytes_total": (int,), "train_time_ms": _NUM, "eval_time_ms": _NUM,
}
_TYPE_WORD = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}
_LOG_NAME = re.compile(r"train_seed(\d+)\.log")
_HEX = r"[0-9a-f]{64}"


@dataclass
class Problem:
    check: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"FAIL [{self.check}] {self.message}\n     fix: {self.fix}"


@dataclass
class ValidationReport:
    folder: Path
    problems: list[Problem] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # what was checked (for the summary)
    seeds: list[int] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def fail(self, check: str, message: str, fix: str) -> None:
        self.problems.append(Problem(check, message, fix))

    def summary(self) -> str:
        if self.passed:
            return f"OK: {self.folder} passes all {len(self.checks)} checks ({len(self.seeds)} seeds)"
        return "\n".join([f"{self.folder}: {len(self.problems)} problem(s)", *map(str, self.problems)])

    def as_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "passed": self.passed, "seeds": self.seeds, "checks": self.checks,
                "problems": [p.__dict__ for p in self.problems]}


# ================================================================================================ logs

@dataclass
class LogFacts:
    """What a rank-0 log says about its run (None where the log has no such line)."""

    code_hashes: list[str]
    code_size: int | None
    model_bytes: int | None
    total_bytes: int | None
    train_s: float | None
    eval_s: float | None
    finals: dict[str, tuple[float, float]]  # final_<name>_exact lines: name -> (val_loss, val_bpb)
    final_method: str | None = None  # the `final_eval:` line: the scoring method and its result
    final: tuple[float, float] | None = None


def _last(pattern: str, text: str) -> re.Match | None:
    m = None
    for m in re.finditer(pattern, text, re.M):
        pass
    return m


def parse_log(text: str) -> LogFacts:
    """The byte accounting, times, identity and final results of a log (the last of each kind of line)."""
    hashes = re.findall(rf"(?:^|\s)code_sha256:\s?({_HEX})\b", text, re.M)
    cs = _last(r"^Code size: (\d+) bytes", text)
    sm = _last(r"^Serialized model \S+: (\d+) bytes", text)
    tt = _last(r"^Total submission size: (\d+) bytes", text)
    g = _last(r"gptq:train_time:([\d.]+)s \+ calibration:([\d.]+)s = ([\d.]+)s", text)
    train = float(g.group(3)) if g else None
    if train is None:
        s = _last(r"(?:^|\s)train_time_s:([\d.]+)", text)
        train = float(s.group(1)) if s else None
    ev = _last(r"^final_eval:\S+ method:(\S+) val_loss:([\d.]+) val_bpb:([\d.]+) .*\beval_seconds:([\d.]+)", text)
    finals = {m.group(1): (float(m.group(2)), float(m.group(3)))
              for m in re.finditer(r"^final_(\S+)_exact val_loss:([\d.]+) val_bpb:([\d.]+)", text, re.M)}
    return LogFacts(hashes, int(cs.group(1)) if cs else None, int(sm.group(1)) if sm else None,
                    int(tt.group(1)) if tt else None, train, float(ev.group(4)) if ev else None, finals,
                    ev.group(1) if ev else None, (float(ev.group(2)), float(ev.group(3))) if ev else None)


# ================================================================================================ checks

def _is(v: Any, types: tuple[type, ...]) -> bool:
    return isinstance(v, types) and not (isinstance(v, bool) and bool not in types)


def _check_fields(rep: ValidationReport, info: dict[str, Any]) -> None:
    rep.checks.append("submission.json fields and types")
    for k, types in SUBMISSION_FIELDS.items():
        if k not in info:
            rep.fail("submission.json", f"field {k!r} is missing",
                     f"add {k!r} ({_TYPE_WORD[types[-1]]}); golfnb submit writes every field")
        elif not _is(info[k], types):
            rep.fail("submission.json", f"field {k!r} should be {_TYPE_WORD[types[-1]]}, got "
                     f"{type(info[k]).__name__} {info[k]!r}", f"write {k!r} as {_TYPE_WORD[types[-1]]}")
    if isinstance(info.get("date"), str):
        try:
            _dt.date.fromisoformat(info["date"])
        except ValueError:
            rep.fail("submission.json", f"date {info['date']!r} is not YYYY-MM-DD", "write the date as YYYY-MM-DD")
    if isinstance(info.get("seeds"), list) and not all(_is(s, (int,)) for s in info["seeds"]):
        rep.fail("submission.json", f"seeds {info['seeds']!r} are not all integers", "list the seeds as integers")
    for k in ("name", "author", "github_id"):
        if isinstance(info.get(k), str) and not info[k].strip():
            rep.fail("submission.json", f"field {k!r} is empty", f"fill in {k!r}")
    res = info.get("seed_results")
    if isinstance(res, dict):
        for seed, r in res.items():
            if not isinstance(r, dict):
                rep.fail("submission.json", f"seed_results[{seed!r}] is not an object", "write per-seed results as objects")
                continue
            for k, types in SEED_FIELDS.items():
                if k not in r:
                    rep.fail("submission.json", f"seed_results[{seed!r}] has no {k!r}", f"add {k!r} for seed {seed}")
                elif not _is(r[k], types):
                    rep.fail("submission.json", f"seed_results[{seed!r}][{k!r}] should be {_TYPE_WORD[types[-1]]}, "
                             f"got {type(r[k]).__name__} {r[k]!r}", f"write it as {_TYPE_WORD[types[-1]]}")


def _check_script(rep: ValidationReport, path: Path) -> tuple[bytes, set[str]]:
    """(file bytes, code hashes a log may report for it)."""
    from golfnb.pack import WRAPPER_HEAD, PackError, inspect_packed, unwrap

    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    allowed = {sha}
    rep.checks.append("train_gpt.py compiles")
    try:
        compile(data, "train_gpt.py", "exec")
    except (SyntaxError, ValueError) as e:
        rep.fail("train_gpt.py", f"train_gpt.py does not compile: {e}",
                 "ship the exact file the runs used (golfnb submit writes it)")
        return data, allowed
    text = data.decode("utf-8", errors="replace")
    if not text.startswith(WRAPPER_HEAD):
        return data, allowed  # someone's own script: only its file hash can identify it
    rep.checks.append("train_gpt.py is an unchanged golfnb-packed file")
    try:
        info = inspect_packed(text)
        compile(unwrap(text), "<train_gpt.py payload>", "exec")
    except (PackError, SyntaxError, ValueError) as e:
        rep.fail("train_gpt.py", f"the packed payload of train_gpt.py is damaged: {e}",
                 "pack again (golfnb pack / golfnb submit) instead of editing the file")
        return data, allowed
    if not info.wrapper_ok:
        rep.fail("train_gpt.py", "train_gpt.py is not golfnb's two-line wrapper any more (edited after packing)",
                 "ship the file golfnb pack wrote, unedited")
    if not info.digest_ok:
        rep.fail("train_gpt.py", "train_gpt.py's payload was edited after it was packed (its digest does not match)",
                 "ship the file golfnb pack wrote; changed code needs new runs")
    elif info.source_sha256:
        allowed.add(info.source_sha256)
    return data, allowed


def validate_folder(folder: str | Path, *, bytes_limit: int = BYTES_LIMIT, min_seeds: int = 3,
                    budgets: tuple[float | None, float | None] | None = None) -> ValidationReport:
    """Run every check on a record folder; the report lists each problem with its fix.

    budgets: (train s, eval s); default from the folder's track (golfnb.submit.TRACK_BUDGETS)."""
    from golfnb.submit import TRACK_BUDGETS

    folder = Path(folder)
    rep = ValidationReport(folder)
    rep.checks.append("folder and files present")
    if not folder.is_dir():
        rep.fail("files", f"{folder} is not a folder", "give the record folder, records/<track>/<date>_<name>")
        return rep
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            rep.fail("files", f"missing file {name}", f"add {name} (golfnb submit writes it)")
    logs = {int(m.group(1)): p for p in sorted(folder.glob("train_seed*.log")) if (m := _LOG_NAME.fullmatch(p.name))}
    if not logs:
        rep.fail("files", "no train_seed<N>.log files", "add the rank-0 log of every seed as train_seed<N>.log")
    rep.seeds = sorted(logs)

    info: dict[str, Any] = {}
    sub = folder / "submission.json"
    if sub.is_file():
        try:
            loaded = json.loads(sub.read_text())
            if isinstance(loaded, dict):
                info = loaded
            else:
                rep.fail("submission.json", "submission.json is not a JSON object", "write an object of fields")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            rep.fail("submission.json", f"submission.json is not valid JSON ({e})", "fix or regenerate it")
        if info:
            _check_fields(rep, info)

    code: bytes | None = None
    allowed: set[str] = set()
    if (folder / "train_gpt.py").is_file():
        code, allowed = _check_script(rep, folder / "train_gpt.py")

    # ---- seeds
    rep.checks.append(f"at least {min_seeds} seeds, the same in logs and submission.json")
    if logs and len(logs) < min_seeds:
        rep.fail("seeds", f"seeds: {len(logs)} log(s) ({', '.join(map(str, sorted(logs)))}), at least {min_seeds} needed",
                 "run more seeds of the same config and export them together")
    sub_seeds = info.get("seeds") if isinstance(info.get("seeds"), list) else None
    if sub_seeds is not None and logs and sorted(map(str, sub_seeds)) != sorted(map(str, logs)):
        rep.fail("seeds", f"submission.json lists seeds {sub_seeds} but the logs are for {sorted(logs)}",
                 "ship one train_seed<N>.log per listed seed (and list every logged seed)")
    results = info.get("seed_results") if isinstance(info.get("seed_results"), dict) else {}

    # ---- budgets
    track = info.get("track") if isinstance(info.get("track"), str) else None
    train_budget, eval_budget = budgets if budgets is not None else TRACK_BUDGETS.get(track or "", (None, None))
    method = info.get("eval_method") if isinstance(info.get("eval_method"), str) else None

    # ---- every log
    rep.checks += ["logs: code identity", "logs: Code size = len(train_gpt.py)", "logs: code + model <= cap",
                   "logs: train and eval times", "logs: final result = submission.json"]
    totals: dict[int, int] = {}
    for seed, path in sorted(logs.items()):
        name = path.name
        text = path.read_text(encoding="utf-8", errors="replace")
        f = parse_log(text)
        if code is not None:
            if not f.code_hashes:
                rep.fail("code identity", f"{name} has no code_sha256 line", "ship the unedited rank-0 log of the run")
            bad = sorted(set(f.code_hashes) - allowed)
            if bad:
                rep.fail("code identity", f"{name}: code_sha256 {', '.join(bad)} is neither train_gpt.py's sha256 nor the "
                         f"golfnb sources it was packed from: the log was produced by other code, or train_gpt.py was "
                         f"edited after the run", "ship the train_gpt.py the runs used (golfnb submit packs it from "
                         "the runs' code), or re-run the seeds with the shipped file")
            if f.code_size is None:
                rep.fail("code size", f"{name} has no 'Code size: N bytes' line",
                         "ship the full log (the byte accounting lines end the run)")
            elif f.code_size != len(code):
                rep.fail("code size", f"{name}: logged Code size {f.code_size} bytes != len(train_gpt.py) {len(code)} "
                         f"bytes", "ship the exact file the run counted (no edits after the run), or re-run the seed")
        if f.model_bytes is None or f.total_bytes is None:
            rep.fail("artifact size", f"{name} has no 'Serialized model ...' / 'Total submission size' line",
                     "ship the full log of a quantized run")
        else:
            if f.code_size is not None and f.total_bytes != f.code_size + f.model_bytes:
                rep.fail("artifact size", f"{name}: Total submission size {f.total_bytes} != code {f.code_size} + "
                         f"model {f.model_bytes}", "ship the unedited log")
            total = (len(code) if code is not None else (f.code_size or 0)) + f.model_bytes
            totals[seed] = total
            if total > bytes_limit:
                rep.fail("artifact size", f"{name}: code {total - f.model_bytes:,} + model {f.model_bytes:,} = "
                         f"{total:,} bytes is over the cap of {bytes_limit:,} by {total - bytes_limit:,}",
                         "shrink the model (prune_to_fit, lower bits or a higher clip) or the code (golfnb pack "
                         "leaves out what the config does not use), then re-run")
        if f.train_s is None:
            rep.fail("train time", f"{name} has no train time line (gptq:train_time or train_time_s)",
                     "ship the full log of the run")
        elif train_budget is not None and f.train_s > train_budget:
            rep.fail("train time", f"{name}: train time {f.train_s:.1f} s > {train_budget:.0f} s",
                     "lower max_wallclock_seconds or leave a larger gptq_reserve_seconds, then re-run")
        if f.eval_s is None:
            rep.fail("eval time", f"{name} has no 'final_eval: ... eval_seconds:' line", "ship the full log of the run")
        elif eval_budget is not None and f.eval_s > eval_budget:
            rep.fail("eval time", f"{name}: eval time {f.eval_s:.1f} s > {eval_budget:.0f} s",
                     "make the eval passes cheaper (fewer TTT epochs, a larger stride, fewer passes), then re-run")
        if method is not None and f.final_method is not None:
            r = results.get(str(seed)) if isinstance(results, dict) else None
            if f.final_method != method:
                rep.fail("results", f"{name} scored its final number with {f.final_method}, submission.json says "
                         f"eval_method {method}", "regenerate submission.json from the runs (golfnb submit)")
            elif isinstance(r, dict) and _is(r.get("val_bpb"), _NUM) and abs(f.final[1] - r["val_bpb"]) > 5e-8:
                rep.fail("results", f"{name}: val_bpb {f.final[1]:.8f} in the log, {r['val_bpb']} in submission.json",
                         "regenerate submission.json from the runs (golfnb submit)")

    # ---- submission.json against the files
    rep.checks.append("submission.json agrees with the files")
    if code is not None and _is(info.get("bytes_code"), (int,)) and info["bytes_code"] != len(code):
        rep.fail("submission.json", f"bytes_code {info['bytes_code']} != len(train_gpt.py) {len(code)}",
                 "regenerate submission.json (golfnb submit)")
    if totals and _is(info.get("bytes_total"), (int,)) and info["bytes_total"] != max(totals.values()):
        rep.fail("submission.json", f"bytes_total {info['bytes_total']} != the largest logged total "
                 f"{max(totals.values())}", "regenerate submission.json (golfnb submit)")
    if _is(info.get("bytes_total"), (int,)) and info["bytes_total"] > bytes_limit:
        rep.fail("artifact size", f"submission.json bytes_total {info['bytes_total']:,} is over the cap of "
                 f"{bytes_limit:,}", "shrink the model or the code and re-run")
    vals = [r.get("val_bpb") for r in results.values() if isinstance(r, dict)] if isinstance(results, dict) else []
    if vals and all(_is(v, _NUM) for v in vals) and _is(info.get("val_bpb"), _NUM):
        mean = math.fsum(vals) / len(vals)
        if abs(mean - info["val_bpb"]) > 1e-7:
            rep.fail("submission.json", f"val_bpb {info['val_bpb']} is not the mean of the per-seed values ({mean:.8f})",
                     "regenerate submission.json (golfnb submit)")
    return rep


# ================================================================================================ CLI

def _cmd_validate(a: argparse.Namespace) -> int:
    rep = validate_folder(a.folder, min_seeds=a.min_seeds)
    if a.json:
        print(json.dumps(rep.as_dict(), indent=2))
    else:
        print(rep.summary())
    return 0 if rep.passed else 1


def add_validate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`golfnb validate FOLDER [--min-seeds 3] [--json]`: exit 0 only when every check passes."""
    p = subparsers.add_parser("validate", help="check a record folder (files, fields, sizes, times, logs)")
    p.add_argument("folder", help="records/<track>/<date>_<name>")
    p.add_argument("--min-seeds", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    from golfnb.cli import run_subcommand

    return run_subcommand("validate", add_validate_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
