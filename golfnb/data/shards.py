"""Token shards in the challenge's binary format, their manifest, and a record of which shards were opened.

Format: a 1024-byte header of 256 little-endian int32 (`[0]` = 20240520 magic, `[1]` = 1
version, `[2]` = token count, the rest 0), then the token ids as little-endian uint16. Every document
starts with BOS (id 1); there is no EOS, so BOS is the only document boundary.

Every malformed file raises `ShardError` naming the file, what is wrong and what to do about it, before
any training time is spent on it. Shards are written atomically (temporary file, fsync, rename), so a
killed build never leaves a half-written shard that looks complete.

A shard folder may hold `manifest.json` (written by `golfnb data build` / `golfnb data download`): shard
names, token counts, sha256, document counts, the tokenizer path and hash, the vocab size and the command
that made it. `verify_dir` checks a folder against it.

Opened-shard record: `open_shard` and `read_header` note every path they open in a process-wide list, so a
legality test can assert that no `fineweb_val_*` file was opened during training or GPTQ calibration. Every reader in golfnb goes through these two functions.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from golfnb.io import atomic_write_json, sha256_file

__all__ = [
    "MAGIC", "VERSION", "HEADER_INTS", "HEADER_BYTES", "TOKEN_DTYPE", "BOS_ID", "MANIFEST_NAME",
    "ShardError", "ShardHeader", "write_shard", "read_header", "open_shard", "verify_shard",
    "list_shards", "is_val_shard", "make_manifest", "write_manifest", "read_manifest", "verify_dir",
    "opened_shards", "reset_opened_shards",
]

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
BOS_ID = 1
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "golfnb-shards/1"

_REGEN_HINT = ("re-create it (`golfnb data build ...`) or download it again (`golfnb data download ...`; "
               "files that fail the check are fetched again)")


class ShardError(ValueError):
    """A missing or malformed shard (or shard folder); the message names the file and the fix."""


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    n_tokens: int
    version: int
    file_bytes: int


# ---------------------------------------------------------------- opened-shard record

_OPENED: list[str] = []
_OPENED_SET: set[str] = set()
_OPENED_LOCK = threading.Lock()


def _note_opened(path: Path) -> None:
    key = str(Path(path).resolve())
    with _OPENED_LOCK:
        if key not in _OPENED_SET:
            _OPENED_SET.add(key)
            _OPENED.append(key)


def opened_shards() -> list[str]:
    """Absolute paths of every shard opened by this process since the last reset, in first-open order."""
    with _OPENED_LOCK:
        return list(_OPENED)


def reset_opened_shards() -> None:
    with _OPENED_LOCK:
        _OPENED.clear()
        _OPENED_SET.clear()


def is_val_shard(path: str | os.PathLike) -> bool:
    """Validation shards are recognised by name, as the challenge does (`fineweb_val_*`)."""
    return Path(path).name.startswith("fineweb_val_")


# ---------------------------------------------------------------- write / read


def write_shard(path: str | os.PathLike, tokens: Any) -> Path:
    """Write `tokens` (1-D, ids in [0, 65535]) as a challenge shard, atomically. Returns the path."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ShardError(f"cannot write {path}: tokens must be a 1-D sequence, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ShardError(f"cannot write {path}: tokens must be integers, got dtype {arr.dtype}")
    if arr.size >= 2**31:
        raise ShardError(f"cannot write {path}: {arr.size} tokens exceed the int32 header field; "
                         f"split them over several shards")
    if arr.dtype != TOKEN_DTYPE:
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFF):
            bad = int(np.flatnonzero((arr < 0) | (arr > 0xFFFF))[0])
            raise ShardError(f"cannot write {path}: token {bad} has id {int(arr[bad])}, outside uint16; "
                             f"shards hold ids 0..65535 only (use a vocabulary of at most 65536)")
        arr = arr.astype(TOKEN_DTYPE)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, arr.size
    path.parent.mkdir(parents=True, exist_ok=True)
    # Streamed rather than golfnb.io.atomic_write_bytes: a 10^8-token shard would otherwise be copied
    # into one 200 MB bytes object first.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header.tobytes())
            f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Read and check a shard's header and size. Raises ShardError for every malformed case."""
    path = Path(path)
    if not path.exists():
        raise ShardError(f"shard {path} does not exist; check data_path / GOLFNB_DATA_DIR, or get the data "
                         f"with `golfnb data download --variant sp8192` or `golfnb data build ...`")
    if not path.is_file():
        raise ShardError(f"shard {path} is not a regular file; point data_path at a folder of .bin shards")
    _note_opened(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"shard {path} is {size} bytes, shorter than the {HEADER_BYTES}-byte header "
                         f"(truncated or not a shard); {_REGEN_HINT}")
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    magic, version, n = int(header[0]), int(header[1]), int(header[2])
    if magic != MAGIC:
        raise ShardError(f"shard {path} has magic {magic}, expected {MAGIC}: not a challenge token shard "
                         f"(wrong file, or written big-endian); {_REGEN_HINT}")
    if version != VERSION:
        raise ShardError(f"shard {path} has format version {version}; golfnb reads version {VERSION} only; "
                         f"{_REGEN_HINT}")
    if n < 0:
        raise ShardError(f"shard {path} declares a negative token count ({n}); {_REGEN_HINT}")
    expected = HEADER_BYTES + 2 * n
    if size != expected:
        what = "truncated (an interrupted download or copy?)" if size < expected else "has trailing bytes"
        raise ShardError(f"shard {path} is {size} bytes but its header declares {n} tokens "
                         f"(= {expected} bytes): the file {what}; {_REGEN_HINT}")
    return ShardHeader(path=path, n_tokens=n, version=version, file_bytes=size)


def open_shard(path: str | os.PathLike) -> np.memmap:
    """Check the header, then memory-map the tokens (read-only uint16, offset 1024)."""
    h = read_header(path)
    if h.n_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)  # np.memmap cannot map zero bytes
    return np.memmap(h.path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(h.n_tokens,))


def _check_ids(path: Path, tokens: np.ndarray, vocab_size: int | None) -> int:
    """Max id of the shard; raises ShardError at the first id >= vocab_size."""
    if tokens.size == 0:
        return -1
    max_id = int(tokens.max())
    if vocab_size is not None and max_id >= vocab_size:
        idx = int(np.flatnonzero(tokens >= vocab_size)[0])
        raise ShardError(f"shard {path} holds token id {int(tokens[idx])} at index {idx}, but the vocab size is "
                         f"{vocab_size} (max id {max_id}): the shard was made with a different tokenizer; use the "
                         f"matching vocab_size/tokenizer or rebuild the shard with this tokenizer")
    return max_id


def verify_shard(path: str | os.PathLike, vocab_size: int | None = None, *, compute_sha256: bool = False,
                 bos_id: int = BOS_ID) -> dict[str, Any]:
    """Header, size and (if vocab_size is given) every id < vocab_size. Returns the shard's statistics."""
    h = read_header(path)
    tokens = open_shard(h.path)
    max_id = _check_ids(h.path, tokens, vocab_size)
    out: dict[str, Any] = {
        "name": h.path.name,
        "split": "val" if is_val_shard(h.path) else "train",
        "tokens": h.n_tokens,
        "bytes": h.file_bytes,
        "docs": int(np.count_nonzero(tokens == bos_id)) if tokens.size else 0,
        "max_id": max_id,
    }
    if compute_sha256:
        out["sha256"] = sha256_file(h.path)
    return out


def list_shards(folder: str | os.PathLike, split: str = "train") -> list[Path]:
    """Sorted `fineweb_{split}_*.bin` files of a folder (split: train | val | all)."""
    folder = Path(folder)
    if split == "all":
        return sorted(folder.glob("fineweb_train_*.bin")) + sorted(folder.glob("fineweb_val_*.bin"))
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}; use 'train', 'val' or 'all'")
    return sorted(folder.glob(f"fineweb_{split}_*.bin"))


# ---------------------------------------------------------------- manifest


def _tokenizer_entry(tokenizer_path: str | os.PathLike | None) -> dict[str, Any] | None:
    if tokenizer_path is None:
        return None
    p = Path(tokenizer_path)
    entry: dict[str, Any] = {"path": str(p)}
    if p.is_file():
        entry["sha256"] = sha256_file(p)
    return entry


def make_manifest(folder: str | os.PathLike, *, tokenizer_path: str | os.PathLike | None = None,
                  vocab_size: int | None = None, command: str | Sequence[str] | None = None,
                  shards: Iterable[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None,
                  ) -> dict[str, Any]:
    """Manifest for a shard folder. `shards` (name/tokens/bytes/sha256/docs per file) may be given by a
    caller that already knows them (the builder hashes while writing); otherwise every shard is read."""
    folder = Path(folder)
    if shards is None:
        shards = [verify_shard(p, vocab_size, compute_sha256=True) for p in list_shards(folder, "all")]
    shard_list = [dict(s) for s in shards]
    for s in shard_list:
        s.pop("max_id", None)
    if command is None:
        command = sys.argv
    if not isinstance(command, str):
        command = " ".join(str(c) for c in command)
    totals: dict[str, Any] = {}
    for split in ("train", "val"):
        sel = [s for s in shard_list if s.get("split") == split]
        totals[split] = {"files": len(sel), "tokens": sum(int(s["tokens"]) for s in sel),
                         "docs": sum(int(s.get("docs", 0)) for s in sel)}
    man: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "vocab_size": vocab_size,
        "bos_id": BOS_ID,
        "append_eos": False,
        "tokenizer": _tokenizer_entry(tokenizer_path),
        "totals": totals,
        "shards": shard_list,
    }
    if extra:
        man.update(extra)
    return man


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    return atomic_write_json(Path(folder) / MANIFEST_NAME, manifest)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's manifest, None when there is none; ShardError when it is unreadable."""
    p = Path(folder) / MANIFEST_NAME
    if not p.exists():
        return None
    try:
        man = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"manifest {p} is unreadable ({e}); delete it and re-create it with "
                         f"`golfnb data build` (or verify without one)") from None
    if not isinstance(man, dict) or not isinstance(man.get("shards"), list):
        raise ShardError(f"manifest {p} is not a golfnb shard manifest (no 'shards' list); delete or rebuild it")
    return man


def verify_dir(folder: str | os.PathLike, vocab_size: int | None = None, *, check_hashes: bool = True,
               require_manifest: bool = False) -> dict[str, Any]:
    """Check every shard of a folder: header, size, ids < vocab size and, when the folder has a manifest,
    that the set of shards, their token counts and sha256 match it. Collects every problem and raises one
    ShardError listing them all; returns a summary (files, tokens and docs per split) when all is well.

    vocab_size defaults to the manifest's value; without either, ids are not range-checked.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"{folder} is not a folder; give the folder that holds fineweb_*.bin shards")
    man = read_manifest(folder)
    if man is None and require_manifest:
        raise ShardError(f"{folder} has no {MANIFEST_NAME}; rebuild the folder with `golfnb data build` or "
                         f"download it with `golfnb data download` (both write one)")
    if vocab_size is None and man is not None and man.get("vocab_size"):
        vocab_size = int(man["vocab_size"])
    files = list_shards(folder, "all")
    if not files:
        raise ShardError(f"{folder} holds no fineweb_train_*.bin / fineweb_val_*.bin shards; get data with "
                         f"`golfnb data download --variant sp8192` or `golfnb data build --input ... --out {folder}`")
    problems: list[str] = []
    stats: dict[str, dict[str, Any]] = {}
    for p in files:
        try:
            stats[p.name] = verify_shard(p, vocab_size, compute_sha256=check_hashes and man is not None)
        except ShardError as e:
            problems.append(str(e))
    if man is not None:
        listed = {s["name"]: s for s in man["shards"] if isinstance(s, dict) and "name" in s}
        for name in sorted(set(listed) - {p.name for p in files}):
            problems.append(f"{folder / name} is listed in {MANIFEST_NAME} but missing; download or rebuild it")
        for name, st in stats.items():
            entry = listed.get(name)
            if entry is None:
                problems.append(f"{folder / name} is not listed in {MANIFEST_NAME} (a stray shard from another "
                                f"build?); remove it or regenerate the manifest")
                continue
            if int(entry.get("tokens", -1)) != st["tokens"]:
                problems.append(f"{folder / name} holds {st['tokens']} tokens but {MANIFEST_NAME} says "
                                f"{entry.get('tokens')}; the file was replaced — rebuild or re-download it")
            if check_hashes and entry.get("sha256") and st.get("sha256") != entry["sha256"]:
                problems.append(f"{folder / name} has sha256 {st.get('sha256')} but {MANIFEST_NAME} says "
                                f"{entry['sha256']}: the file is corrupt or was changed; {_REGEN_HINT}")
    if problems:
        raise ShardError(f"{len(problems)} problem(s) in {folder}:\n  - " + "\n  - ".join(problems))
    summary: dict[str, Any] = {"folder": str(folder), "vocab_size": vocab_size, "manifest": man is not None}
    for split in ("train", "val"):
        sel = [s for s in stats.values() if s["split"] == split]
        summary[split] = {"files": len(sel), "tokens": sum(s["tokens"] for s in sel),
                          "docs": sum(s["docs"] for s in sel)}
    summary["max_id"] = max((s["max_id"] for s in stats.values()), default=-1)
    return summary

