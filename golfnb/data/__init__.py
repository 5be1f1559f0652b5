"""golfnb.data: challenge token shards, train loaders, the validation stream, and the `golfnb data` tools.

Modules: `shards` (format, manifest, verification, opened-shard record), `loaders` (the three train
loaders of the records and the validation stream), `build` (local text -> shards), `tokenizer`
(SentencePiece training with the challenge's settings), `download` (challenge shards from the Hugging Face
Hub), `cli` (`golfnb data ...`).

The names below are re-exported lazily: importing `golfnb.data` (or `golfnb.data.build` in a tokenizer
worker process) does not import torch until a loader name is used.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # shards
    "ShardError": "shards", "ShardHeader": "shards", "write_shard": "shards", "read_header": "shards",
    "open_shard": "shards", "verify_shard": "shards", "verify_dir": "shards", "list_shards": "shards",
    "is_val_shard": "shards", "make_manifest": "shards", "write_manifest": "shards", "read_manifest": "shards",
    "opened_shards": "shards", "reset_opened_shards": "shards",
    # loaders
    "MissingDataError": "loaders", "find_data_dir": "loaders", "resolve_data_path": "loaders",
    "train_files": "loaders", "make_train_loader": "loaders", "load_validation_tokens": "loaders",
    "SequentialLoader": "loaders", "CoprimeStrideLoader": "loaders", "ShuffledSequenceLoader": "loaders",
    # build / tokenizer / download
    "BuildError": "build", "build_shards": "build",
    "TokenizerError": "tokenizer", "train_tokenizer": "tokenizer",
    "DownloadError": "download", "download_challenge_data": "download",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'golfnb.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"golfnb.data.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
