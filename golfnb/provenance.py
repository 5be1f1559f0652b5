"""Code, environment and data identity for logs, env.json and submissions.

Reviewers of challenge entries most often question logs that do not match the code or data that made them;
every run therefore records the git commit plus a hash of the uncommitted diff, library versions, the GPU,
the attention backend and the data manifest (shard count and hashes).
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["git_identity", "environment_info", "data_summary", "code_hash", "device_name"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str, cwd: Path = REPO_ROOT) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.decode("utf-8", "replace")


def git_identity(cwd: Path = REPO_ROOT) -> dict[str, Any]:
    """Commit, whether the tree is dirty, and the sha256 of `git diff HEAD` (so a dirty run is still pinned)."""
    commit = _git("rev-parse", "HEAD", cwd=cwd)
    if commit is None:
        return {"commit": None, "dirty": None, "diff_sha256": None}
    diff = _git("diff", "HEAD", "--", ".", ":(exclude)runs", cwd=cwd) or ""
    untracked = _git("ls-files", "--others", "--exclude-standard", "--", "golfnb", "notebooks", cwd=cwd) or ""
    h = hashlib.sha256(diff.encode())
    for rel in sorted(untracked.split()):
        p = cwd / rel
        if p.is_file():
            h.update(rel.encode())
            h.update(p.read_bytes())
    dirty = bool(diff.strip() or untracked.strip())
    return {"commit": commit.strip(), "dirty": dirty, "diff_sha256": h.hexdigest() if dirty else None}


def code_hash(paths: list[Path] | None = None) -> str:
    """sha256 over the golfnb package sources (sorted), the identity of the code that ran."""
    root = Path(__file__).resolve().parent
    files = sorted(paths if paths is not None else root.rglob("*.py"))
    h = hashlib.sha256()
    for f in files:
        h.update(str(Path(f).relative_to(root.parent) if Path(f).is_relative_to(root.parent) else f).encode())
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def environment_info(device: Any = None, attn_backend: str | None = None) -> dict[str, Any]:
    import numpy
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "attn_backend": attn_backend,
    }
    try:
        import sentencepiece

        info["sentencepiece"] = sentencepiece.__version__
    except Exception:  # optional in some environments
        pass
    if torch.cuda.is_available():
        dev = torch.device(device) if device is not None and torch.device(device).type == "cuda" else torch.device("cuda")
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
    return info


def device_name(device: Any) -> str:
    """The GPU's name for a CUDA device (e.g. "NVIDIA H200"), else the device type ("cpu")."""
    import torch

    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


def data_summary(data_path: str | Path, tokenizer_path: str | Path | None = None) -> dict[str, Any]:
    """Shard count, token totals and hashes, from the folder's manifest when present (else sizes only)."""
    d = Path(data_path)
    out: dict[str, Any] = {"data_path": str(d)}
    man = d / "manifest.json"
    train = sorted(d.glob("fineweb_train_*.bin"))
    val = sorted(d.glob("fineweb_val_*.bin"))
    out["train_shards"] = len(train)
    out["val_shards"] = len(val)
    if man.exists():
        try:
            m = json.loads(man.read_text())
            out["manifest_sha256"] = hashlib.sha256(man.read_bytes()).hexdigest()
            out["manifest"] = {k: m[k] for k in m if k not in ("shards",)}
            out["shards"] = m.get("shards")
        except (OSError, json.JSONDecodeError):
            out["manifest_error"] = "manifest.json unreadable"
    else:
        out["shards"] = [{"name": p.name, "bytes": p.stat().st_size} for p in train[:4] + val]
    if tokenizer_path is not None and Path(tokenizer_path).exists():
        out["tokenizer"] = str(tokenizer_path)
        out["tokenizer_sha256"] = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
    return out
