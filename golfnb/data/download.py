"""Download the challenge's pre-tokenized FineWeb shards from the Hugging Face Hub (`golfnb data download`).

Remote layout (the challenge's published exports, read from its `data/cached_challenge_fineweb.py` and
`data/download_hf_docs_and_tokenize.py`): a dataset repo holds, under a root folder (`datasets` by
default),

    <root>/manifest.json      datasets[] {name, tokenizer_name, stats{files_train, files_val}}
                              tokenizers[] {name, model_path, vocab_path, vocab_size}
    <root>/datasets/fineweb10B_<variant>/fineweb_val_000000.bin ...
    <root>/datasets/fineweb10B_<variant>/fineweb_train_000000.bin ...
    <root>/tokenizers/fineweb_<N>_bpe.model / .vocab

sp1024 is published by the challenge (`willdepueoai/parameter-golf`); the SP8192 data of the record stacks
by clarkkev (`kevclark/parameter-golf`, #1394). Files land in the challenge's local layout:
`<data>/datasets/fineweb10B_<variant>/` and `<data>/tokenizers/`, with <data> = --data-dir, else
$GOLFNB_DATA_DIR, else ./data.

Resumable: a file already present with the Hub's size (and sha256, for LFS files) and, for shards, a valid
header is skipped; anything else is fetched again into a staging folder and moved into place atomically.
Afterwards the shard folder gets golfnb's manifest.json (shard sizes, hashes, document counts, tokenizer
hash, the command), so `golfnb data verify` can check it later.

Offline, every Hub error becomes a DownloadError that says how to point golfnb at local data instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from golfnb.data.loaders import find_data_dir
from golfnb.data.shards import (BOS_ID, HEADER_BYTES, ShardError, list_shards, make_manifest, read_header,
                                 write_manifest)
from golfnb.io import atomic_write_json

__all__ = ["DownloadError", "VARIANTS", "DEFAULT_REMOTE_ROOT", "download_challenge_data"]

VARIANTS: dict[str, dict[str, Any]] = {
    "sp1024": {"dataset_dir": "fineweb10B_sp1024", "repo_id": "willdepueoai/parameter-golf", "vocab_size": 1024},
    "sp8192": {"dataset_dir": "fineweb10B_sp8192", "repo_id": "kevclark/parameter-golf", "vocab_size": 8192},
}
DEFAULT_REMOTE_ROOT = "datasets"
HUB_MANIFEST_NAME = "hub_manifest.json"
STAGING_NAME = ".golfnb_download"


class DownloadError(RuntimeError):
    """The Hub could not deliver what was asked; the message says why and what to do instead."""


# ---------------------------------------------------------------- the two Hub calls (tests replace these)


def _hf_hub_download(repo_id: str, filename: str, local_dir: Path) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", local_dir=str(local_dir)))


def _hf_paths_info(repo_id: str, paths: list[str]) -> dict[str, dict[str, Any]]:
    """{remote path: {"size": int | None, "sha256": str | None}} for the files that exist."""
    from huggingface_hub import HfApi

    out: dict[str, dict[str, Any]] = {}
    for item in HfApi().get_paths_info(repo_id, paths, repo_type="dataset"):
        lfs = getattr(item, "lfs", None)
        sha = None
        if lfs is not None:
            sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        out[item.path] = {"size": getattr(item, "size", None), "sha256": sha}
    return out


# ---------------------------------------------------------------- helpers


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _local_hint(variant: str) -> str:
    ds = VARIANTS.get(variant, {}).get("dataset_dir", f"fineweb10B_{variant}")
    return (f"To use local data instead: set GOLFNB_DATA_DIR to a folder holding datasets/{ds}/"
            f"fineweb_{{train,val}}_*.bin and tokenizers/ (or set data_path / tokenizer_path in the config), or "
            f"tokenize local text with `golfnb data build --input 'texts/*.jsonl' --tokenizer MODEL --out DIR`. "
            f"Files already downloaded are kept; run the same command again when online to resume.")


def _hub_error(exc: BaseException, repo_id: str, what: str, variant: str) -> DownloadError:
    names = {c.__name__ for c in type(exc).__mro__}
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    # LocalEntryNotFoundError subclasses EntryNotFoundError but means "offline and not cached": test it first.
    if "LocalEntryNotFoundError" in names or "OfflineModeIsEnabled" in names:
        return DownloadError(f"could not reach the Hugging Face Hub to fetch {what} from {repo_id} ({detail}). "
                             + _local_hint(variant))
    if "RepositoryNotFoundError" in names:
        return DownloadError(f"dataset repo {repo_id!r} not found on the Hub ({detail}); check --repo-id "
                             f"(sp1024: {VARIANTS['sp1024']['repo_id']}, sp8192: {VARIANTS['sp8192']['repo_id']})")
    if "GatedRepoError" in names:
        return DownloadError(f"{repo_id} needs access rights ({detail}); log in with `hf auth login` or pick "
                             f"another --repo-id")
    if "EntryNotFoundError" in names or "RemoteEntryNotFoundError" in names:
        return DownloadError(f"{what} is not in {repo_id} ({detail}); check --repo-id and --remote-root "
                             f"(the folder holding manifest.json inside the repo, default {DEFAULT_REMOTE_ROOT!r})")
    return DownloadError(f"could not fetch {what} from {repo_id} ({detail}); the Hub may be unreachable. "
                         + _local_hint(variant))


def _file_stats(path: Path) -> dict[str, Any]:
    """sha256 of the file and, for shards, the BOS (document) count, in one read."""
    h = hashlib.sha256()
    docs = 0
    is_shard = path.suffix == ".bin"
    with open(path, "rb") as f:
        if is_shard:
            head = f.read(HEADER_BYTES)
            h.update(head)
        while True:
            block = f.read(1 << 23)  # even size, so token pairs never straddle blocks
            if not block:
                break
            h.update(block)
            if is_shard:
                docs += int(np.count_nonzero(np.frombuffer(block, dtype="<u2") == BOS_ID))
    out: dict[str, Any] = {"sha256": h.hexdigest(), "bytes": path.stat().st_size}
    if is_shard:
        out["docs"] = docs
    return out


def _complete(dest: Path, info: dict[str, Any] | None, verify_hashes: bool) -> dict[str, Any] | None:
    """The file's stats when it is present and matches the Hub's size / sha256 (and has a valid header)."""
    if not dest.is_file():
        return None
    if info and info.get("size") is not None and dest.stat().st_size != int(info["size"]):
        return None
    if dest.suffix == ".bin":
        try:
            read_header(dest)
        except ShardError:
            return None
    stats = _file_stats(dest)
    if verify_hashes and info and info.get("sha256") and stats["sha256"] != info["sha256"]:
        return None
    return stats


# ---------------------------------------------------------------- main entry


def download_challenge_data(variant: str = "sp8192", train_shards: int = 80, data_dir: str | os.PathLike | None = None,
                            repo_id: str | None = None, remote_root: str = DEFAULT_REMOTE_ROOT, *,
                            skip_manifest: bool = False, verify_hashes: bool = True, progress: bool = True,
                            command: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Fetch the validation shards, the first `train_shards` train shards and the tokenizer of `variant`.
    Returns a summary: folders, files fetched / skipped, token totals."""
    if variant not in VARIANTS:
        raise DownloadError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    if train_shards < 0:
        raise DownloadError(f"train_shards={train_shards} must be >= 0")
    spec = VARIANTS[variant]
    repo = repo_id or spec["repo_id"]
    root = find_data_dir(data_dir)
    ds_dir = root / "datasets" / spec["dataset_dir"]
    tok_dir = root / "tokenizers"
    staging = root / STAGING_NAME
    ds_dir.mkdir(parents=True, exist_ok=True)
    tok_dir.mkdir(parents=True, exist_ok=True)

    # 1. the remote manifest tells how many shards exist and which tokenizer files belong to the dataset
    hub_manifest_path = ds_dir / HUB_MANIFEST_NAME
    remote_manifest = _join(remote_root, "manifest.json")
    if skip_manifest and hub_manifest_path.is_file():
        hub = json.loads(hub_manifest_path.read_text())
    else:
        try:
            got = _hf_hub_download(repo, remote_manifest, staging)
        except Exception as e:  # noqa: BLE001 - every Hub failure is translated into a clear DownloadError
            raise _hub_error(e, repo, remote_manifest, variant) from e
        try:
            hub = json.loads(Path(got).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DownloadError(f"{remote_manifest} from {repo} is not valid JSON ({e}); check --repo-id") from None
        atomic_write_json(hub_manifest_path, hub)
    entry = next((d for d in hub.get("datasets", []) if d.get("name") == spec["dataset_dir"]), None)
    if entry is None:
        names = [d.get("name") for d in hub.get("datasets", [])]
        raise DownloadError(f"{repo} has no dataset {spec['dataset_dir']} (it has {names}); for {variant} use "
                            f"--repo-id {spec['repo_id']}")
    stats = entry.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards > n_train:
        raise DownloadError(f"{repo} has {n_train} {variant} train shards; asked for {train_shards}. "
                            f"Use --train-shards {n_train} or fewer")
    tok_entry = next((t for t in hub.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tok_entry is None:
        raise DownloadError(f"{remote_manifest} in {repo} names tokenizer {entry.get('tokenizer_name')!r} but does "
                            f"not describe it; the remote manifest is incomplete")
    tok_files = [str(tok_entry[k]) for k in ("model_path", "vocab_path") if tok_entry.get(k)]
    if not tok_files:
        raise DownloadError(f"tokenizer {tok_entry.get('name')!r} in {repo} lists no model file")

    # 2. the plan: (remote path, local destination)
    remote_ds = _join(remote_root, "datasets", spec["dataset_dir"])
    plan: list[tuple[str, Path]] = []
    for i in range(n_val):
        plan.append((f"{remote_ds}/fineweb_val_{i:06d}.bin", ds_dir / f"fineweb_val_{i:06d}.bin"))
    for i in range(train_shards):
        plan.append((f"{remote_ds}/fineweb_train_{i:06d}.bin", ds_dir / f"fineweb_train_{i:06d}.bin"))
    for rel in tok_files:
        plan.append((_join(remote_root, rel), tok_dir / Path(rel).name))

    try:
        infos = _hf_paths_info(repo, [r for r, _ in plan])
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, repo, f"the file list of {remote_ds}", variant) from e
    missing = [r for r, _ in plan if r not in infos]
    if missing:
        raise DownloadError(f"{repo} lacks {len(missing)} file(s) its manifest promises, e.g. {missing[0]}; "
                            f"check --remote-root or ask for fewer shards")

    # 3. fetch what is missing or wrong
    from tqdm.auto import tqdm

    fetched, skipped = [], []
    file_stats: dict[str, dict[str, Any]] = {}
    for remote, dest in tqdm(plan, desc=f"{variant} files", unit="file", disable=not progress, file=sys.stderr):
        info = infos.get(remote)
        st = _complete(dest, info, verify_hashes)
        if st is not None:
            skipped.append(dest.name)
            file_stats[dest.name] = st
            continue
        try:
            got = Path(_hf_hub_download(repo, remote, staging))
        except Exception as e:  # noqa: BLE001
            raise _hub_error(e, repo, remote, variant) from e
        st = _complete(got, info, verify_hashes)
        if st is None:
            raise DownloadError(f"{remote} from {repo} arrived damaged (size, sha256 or shard header mismatch); "
                                f"run the command again to re-fetch it")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, dest)
        fetched.append(dest.name)
        file_stats[dest.name] = st
    shutil.rmtree(staging, ignore_errors=True)

    # 4. golfnb's manifest for the shard folder
    shards = []
    for _, dest in plan:
        if dest.suffix != ".bin":
            continue
        st = file_stats[dest.name]
        shards.append({"name": dest.name, "split": "val" if dest.name.startswith("fineweb_val_") else "train",
                       "tokens": read_header(dest).n_tokens, "bytes": st["bytes"], "sha256": st["sha256"],
                       "docs": st["docs"]})
    planned = {dest.name for _, dest in plan}
    for extra in list_shards(ds_dir, "all"):  # shards of an earlier, larger download stay listed
        if extra.name not in planned:
            st = _file_stats(extra)
            shards.append({"name": extra.name, "split": "val" if extra.name.startswith("fineweb_val_") else "train",
                           "tokens": read_header(extra).n_tokens, "bytes": st["bytes"], "sha256": st["sha256"],
                           "docs": st["docs"]})
    if command is None:
        command = (f"golfnb.data.download.download_challenge_data({variant!r}, {train_shards}, repo_id={repo!r}, "
                   f"remote_root={remote_root!r})")
    model_path = tok_dir / Path(str(tok_entry["model_path"])).name if tok_entry.get("model_path") else None
    vocab = int(tok_entry.get("vocab_size") or entry.get("vocab_size") or spec["vocab_size"])
    man = make_manifest(ds_dir, tokenizer_path=model_path, vocab_size=vocab, command=command, shards=shards,
                        extra={"source": {"repo_id": repo, "remote_root": remote_root, "dataset": spec["dataset_dir"],
                                          "files_train_available": n_train, "files_val": n_val}})
    write_manifest(ds_dir, man)
    return {"variant": variant, "repo_id": repo, "data_dir": str(root), "dataset_dir": str(ds_dir),
            "tokenizer": str(model_path) if model_path else None, "fetched": fetched, "skipped": skipped,
            "totals": man["totals"]}
