"""Tokenize local text into challenge shards (`golfnb data build`).

Same export rules as the challenge's pipeline: each document becomes `[BOS=1] + encode(text)`
with no EOS, its `text` encoded as-is (the tokenizer's nmt_nfkc normaliser does the cleaning); documents
run back to back and shards are cut every `shard_tokens` tokens (10^8 by default), so a document may
straddle two shards. The first `val_docs` documents (or every document of `val_inputs`) go to
`fineweb_val_*.bin`, the rest to `fineweb_train_*.bin`.

Inputs: `.jsonl` files with a "text" field per line (one document per line) and `.txt` files (one document
per file).

Speed: the input is cut into line-aligned byte ranges of a few MB; a process pool encodes the ranges
(each worker holds its own SentencePiece model and reads its own range, so no text crosses process
boundaries) and returns uint16 arrays, which the parent concatenates in input order. Output is therefore
identical for any number of workers. No Python loop ever runs over tokens.
"""
from __future__ import annotations

import glob as _glob
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from golfnb.data.shards import BOS_ID, MANIFEST_NAME, list_shards, make_manifest, write_manifest, write_shard
from golfnb.io import sha256_file

__all__ = ["BuildError", "build_shards", "expand_inputs"]

TEXT_SUFFIXES = (".jsonl", ".txt")


class BuildError(ValueError):
    """Bad build input (no files, wrong format, clashing outputs); the message says what to change."""


@dataclass(frozen=True)
class _Task:
    path: str
    start: int
    end: int
    kind: str  # "jsonl" | "txt"
    val: bool  # every document of this range goes to val (val_inputs)


def expand_inputs(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """Files matched by the patterns (each pattern's matches sorted, order of patterns kept, no repeats)."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out: list[Path] = []
    seen: set[Path] = set()
    for pat in patterns:
        pat = str(pat)
        matches = sorted(_glob.glob(os.path.expanduser(pat), recursive=True))
        if not matches:
            raise BuildError(f"input pattern {pat!r} matched no files; check the path (quote globs so the "
                             f"shell does not expand them)")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                continue
            if p.suffix not in TEXT_SUFFIXES:
                raise BuildError(f"{p}: unsupported input type {p.suffix!r}; give .jsonl (one JSON object with a "
                                 f"'text' field per line) or .txt (one document per file)")
            rp = p.resolve()
            if rp not in seen:
                seen.add(rp)
                out.append(p)
    if not out:
        raise BuildError(f"input patterns {list(map(str, patterns))} matched only folders; match the files")
    return out


def _tasks_for(path: Path, val: bool, chunk_bytes: int) -> list[_Task]:
    size = path.stat().st_size
    if path.suffix == ".txt":
        return [_Task(str(path), 0, size, "txt", val)]
    bounds = [0]
    with open(path, "rb") as f:
        pos = chunk_bytes
        while pos < size:
            f.seek(pos)
            f.readline()  # move to the start of the next line so no line is split
            nxt = f.tell()
            if nxt >= size:
                break
            if nxt > bounds[-1]:
                bounds.append(nxt)
            pos = nxt + chunk_bytes
    bounds.append(size)
    return [_Task(str(path), a, b, "jsonl", val) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _read_docs(task: _Task) -> list[str]:
    with open(task.path, "rb") as f:
        f.seek(task.start)
        data = f.read(task.end - task.start)
    if task.kind == "txt":
        return [data.decode("utf-8", errors="replace")]
    texts = []
    offset = task.start
    for line in data.split(b"\n"):
        if line.strip():
            try:
                obj = json.loads(line)
                texts.append(obj["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BuildError(f"{task.path}: the line at byte {offset} is not a JSON object with a 'text' "
                                 f"field; fix the file or pass it as .txt") from None
            if not isinstance(texts[-1], str):
                raise BuildError(f"{task.path}: the 'text' at byte {offset} is not a string")
        offset += len(line) + 1
    return texts


# Worker state: one SentencePiece model per process, loaded by the pool initializer.
_SP = None


def _init_worker(model_path: str) -> None:
    global _SP
    import sentencepiece as spm

    _SP = spm.SentencePieceProcessor(model_file=model_path)


def _encode_task(task: _Task) -> tuple[np.ndarray, np.ndarray, int]:
    """Tokens of every document of the range, each as [BOS] + ids (uint16), the per-document token counts
    (BOS included) and the bytes read."""
    texts = _read_docs(task)
    ids = _SP.encode(texts, out_type=int) if texts else []
    bos = np.array([BOS_ID], dtype=np.uint16)
    pieces: list[np.ndarray] = []
    for doc in ids:
        pieces.append(bos)
        pieces.append(np.asarray(doc, dtype=np.uint16))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)
    lens = np.fromiter((len(d) + 1 for d in ids), dtype=np.int64, count=len(ids))
    return tokens, lens, task.end - task.start


class _SplitWriter:
    """Accumulates one split's token stream and writes a shard every `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_n = 0
        self.index = 0
        self.shards: list[dict[str, Any]] = []
        self.docs = 0

    def add(self, tokens: np.ndarray, n_docs: int) -> None:
        if tokens.size == 0:
            return
        self.docs += n_docs
        self.pending.append(tokens)
        self.pending_n += tokens.size
        if self.pending_n >= self.shard_tokens:
            cat = np.concatenate(self.pending)
            pos = 0
            while cat.size - pos >= self.shard_tokens:
                self._write(cat[pos:pos + self.shard_tokens])
                pos += self.shard_tokens
            rest = cat[pos:]
            self.pending = [rest] if rest.size else []
            self.pending_n = rest.size

    def close(self) -> None:
        if self.pending_n:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_n = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        path = write_shard(self.out_dir / f"fineweb_{self.split}_{self.index:06d}.bin", tokens)
        self.index += 1
        self.shards.append({"name": path.name, "split": self.split, "tokens": int(tokens.size),
                            "bytes": path.stat().st_size, "sha256": sha256_file(path),
                            "docs": int(np.count_nonzero(tokens == BOS_ID))})


def _count_docs_upto(files: Sequence[Path], limit: int) -> int:
    """Documents in the inputs, counting no further than `limit` (a cheap early check of val_docs)."""
    n = 0
    for p in files:
        if p.suffix == ".txt":
            n += 1
        else:
            with open(p, "rb") as f:
                for line in f:
                    if line.strip():
                        n += 1
                        if n >= limit:
                            return n
        if n >= limit:
            return n
    return n


def _iter_results(tasks: list[_Task], model: str, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(model)
        for t in tasks:
            yield _encode_task(t)
        return
    # spawn, not fork: the caller may be a notebook with torch and its thread pools already running.
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes=workers, initializer=_init_worker, initargs=(model,)) as pool:
        yield from pool.imap(_encode_task, tasks, chunksize=1)


def build_shards(inputs: Sequence[str | os.PathLike], tokenizer: str | os.PathLike, out_dir: str | os.PathLike,
                 val_docs: int = 0, val_inputs: Sequence[str | os.PathLike] | None = None,
                 shard_tokens: int = 100_000_000, workers: int | None = None, *, overwrite: bool = False,
                 progress: bool = True, chunk_bytes: int = 4 << 20,
                 command: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Tokenize `inputs` (globs of .jsonl / .txt) into challenge shards in `out_dir` and write its
    manifest. Returns the manifest (shards, token and document totals, seconds taken)."""
    import sentencepiece as spm

    t0 = time.perf_counter()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if isinstance(val_inputs, (str, os.PathLike)):
        val_inputs = [val_inputs]
    out = Path(out_dir)
    model = Path(tokenizer)
    if not model.is_file():
        raise BuildError(f"tokenizer model {model} not found; pass --tokenizer PATH.model (or train one with "
                         f"`golfnb data tokenizer`)")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    vocab = int(sp.vocab_size())
    if vocab > 65536:
        raise BuildError(f"{model} has {vocab} pieces; shards store uint16 ids, so at most 65536")
    if sp.bos_id() != BOS_ID:
        raise BuildError(f"{model} has BOS id {sp.bos_id()}; challenge shards use BOS={BOS_ID} as the document "
                         f"boundary. Train the tokenizer with the challenge ids (`golfnb data tokenizer` does)")
    if shard_tokens < 1:
        raise BuildError(f"shard_tokens={shard_tokens} must be >= 1")
    if val_docs < 0:
        raise BuildError(f"val_docs={val_docs} must be >= 0")
    if val_docs and val_inputs:
        raise BuildError("give either val_docs (the first N documents become validation) or val_inputs "
                         "(separate validation files), not both")
    train_files = expand_inputs(inputs)
    val_files = expand_inputs(val_inputs) if val_inputs else []
    # A validation file also matched by a training glob ('texts/*.jsonl' + 'texts/val.jsonl') is validation only.
    val_set = {p.resolve() for p in val_files}
    train_files = [p for p in train_files if p.resolve() not in val_set]
    if not train_files and not val_files:
        raise BuildError("no input files left")
    if val_docs:
        have = _count_docs_upto(train_files, val_docs + 1)
        if have <= val_docs:
            raise BuildError(f"val_docs={val_docs} but the inputs hold only {have} documents, leaving none to "
                             f"train on; lower --val-docs")
    existing = list_shards(out, "all") if out.is_dir() else []
    if existing:
        if not overwrite:
            raise BuildError(f"{out} already holds {len(existing)} shards ({existing[0].name} ...); choose an "
                             f"empty --out folder or pass --overwrite to replace them")
        for p in existing:
            p.unlink()
    if overwrite and (out / MANIFEST_NAME).exists():
        (out / MANIFEST_NAME).unlink()
    out.mkdir(parents=True, exist_ok=True)

    tasks = [t for p in val_files for t in _tasks_for(p, True, chunk_bytes)]
    tasks += [t for p in train_files for t in _tasks_for(p, False, chunk_bytes)]
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    writers = {"val": _SplitWriter(out, "val", shard_tokens), "train": _SplitWriter(out, "train", shard_tokens)}
    docs_seen = 0
    total_bytes = sum(t.end - t.start for t in tasks)
    from tqdm.auto import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenizing -> {out.name}",
               disable=not progress, file=sys.stderr)
    try:
        for task, (tokens, lens, nbytes) in zip(tasks, _iter_results(tasks, str(model), workers)):
            if task.val:
                writers["val"].add(tokens, len(lens))
            else:
                n_val = min(len(lens), max(val_docs - docs_seen, 0))
                cut = int(lens[:n_val].sum())
                writers["val"].add(tokens[:cut], n_val)
                writers["train"].add(tokens[cut:], len(lens) - n_val)
                docs_seen += len(lens)
            bar.update(nbytes)
        for w in writers.values():
            w.close()
    finally:
        bar.close()
    shards = writers["val"].shards + writers["train"].shards
    if not shards:
        raise BuildError(f"the inputs held no documents; nothing was written to {out}")
    seconds = time.perf_counter() - t0
    if command is None:  # called from Python (a notebook cell): record the call itself
        command = (f"golfnb.data.build.build_shards({[str(i) for i in inputs]!r}, {str(tokenizer)!r}, "
                   f"{str(out_dir)!r}, val_docs={val_docs}, val_inputs={[str(i) for i in val_inputs or []]!r}, "
                   f"shard_tokens={shard_tokens})")
    manifest = make_manifest(out, tokenizer_path=model, vocab_size=vocab, command=command, shards=shards, extra={
        "inputs": [str(p) for p in train_files],
        "val_inputs": [str(p) for p in val_files],
        "val_docs": int(val_docs),
        "shard_tokens": int(shard_tokens),
        "docs": {"train": writers["train"].docs, "val": writers["val"].docs},
        "workers": workers,
        "build_seconds": round(seconds, 2),
    })
    write_manifest(out, manifest)
    return manifest

