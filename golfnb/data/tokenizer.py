"""Train a SentencePiece tokenizer with the challenge's settings (`golfnb data tokenizer`).

Settings of every official `sp<N>` model: BPE, character_coverage 0.999, byte fallback, digits
split, nmt_nfkc normalisation, no dummy prefix, pad/bos/eos/unk = 0/1/2/3, hard_vocab_limit off. Training
text maps NUL to a space and strips each document; empty documents are skipped (the challenge does the
same; shard export, in contrast, encodes the raw text).

After training, the model must contain "▁" as a standalone piece (challenge issue #897): without it a
lone space is encoded as three byte-fallback tokens, which the bpb byte count credits as 3 bytes.

Like the challenge's trainer call, `max_sentence_length` stays at SentencePiece's default (4192 bytes), so
the trainer skips longer documents; pass `max_sentence_length=...` to train on them too.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from golfnb.data.build import expand_inputs

__all__ = ["TokenizerError", "CHALLENGE_TRAINER_SETTINGS", "iter_training_texts", "train_tokenizer"]

CHALLENGE_TRAINER_SETTINGS: dict[str, Any] = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}


class TokenizerError(ValueError):
    """Tokenizer training input or result is unusable; the message says what to change."""


def iter_training_texts(inputs: Sequence[str | os.PathLike], max_docs: int | None = None) -> Iterator[str]:
    """Documents of .jsonl ("text" field per line) / .txt (one document per file) inputs, cleaned the way the
    challenge cleans tokenizer training text: NUL -> space, strip, skip empty."""
    n = 0
    for p in expand_inputs(inputs):
        if p.suffix == ".txt":
            docs: Iterator[str] = iter([p.read_text(encoding="utf-8", errors="replace")])
        else:
            docs = _jsonl_texts(p)
        for text in docs:
            if max_docs is not None and n >= max_docs:
                return
            text = text.replace("\x00", " ").strip()
            if text:
                n += 1
                yield text


def _jsonl_texts(p: Path) -> Iterator[str]:
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TokenizerError(f"{p}:{lineno} is not a JSON object with a 'text' field") from None


def train_tokenizer(inputs: Sequence[str | os.PathLike], vocab_size: int, out_prefix: str | os.PathLike, *,
                    max_docs: int | None = None, num_threads: int | None = None, quiet: bool = True,
                    **trainer_overrides: Any) -> Path:
    """Train `<out_prefix>.model` / `.vocab` on the inputs with the challenge settings (overridable by keyword)
    and check the result. Both files appear atomically. Returns the .model path."""
    import sentencepiece as spm

    if vocab_size < 262:  # 4 special ids + 256 byte-fallback pieces + at least a couple of merges
        raise TokenizerError(f"vocab_size={vocab_size} is too small: byte fallback alone takes 260 ids; use >= 512")
    if vocab_size > 65536:
        raise TokenizerError(f"vocab_size={vocab_size} does not fit uint16 shard tokens; use <= 65536")
    out_prefix = Path(out_prefix)
    if out_prefix.suffix == ".model":
        out_prefix = out_prefix.with_suffix("")
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    texts = iter_training_texts(inputs, max_docs=max_docs)
    try:
        first = next(texts)
    except StopIteration:
        raise TokenizerError(f"the inputs {list(map(str, inputs))} hold no non-empty documents") from None

    def all_texts() -> Iterator[str]:
        yield first
        yield from texts

    settings = dict(CHALLENGE_TRAINER_SETTINGS)
    settings["vocab_size"] = int(vocab_size)
    settings["num_threads"] = int(num_threads or os.cpu_count() or 1)
    if quiet:
        settings["minloglevel"] = 2
    settings.update(trainer_overrides)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_prefix.name}.", dir=str(out_prefix.parent)))
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=all_texts(), model_prefix=str(tmp / out_prefix.name),
                                       **settings)
        model_tmp = tmp / f"{out_prefix.name}.model"
        sp = spm.SentencePieceProcessor(model_file=str(model_tmp))
        if sp.piece_to_id("\u2581") == sp.unk_id():
            raise TokenizerError(
                "the trained tokenizer has no standalone '\u2581' piece, so val_bpb would count a lone space as 3 "
                "bytes (challenge issue #897); train on more text or with a larger vocab_size")
        if int(sp.vocab_size()) != vocab_size:
            raise TokenizerError(f"the trainer produced {sp.vocab_size()} pieces instead of {vocab_size} "
                                 f"(hard_vocab_limit is off and the text is too small); train on more text or "
                                 f"ask for fewer pieces")
        os.replace(tmp / f"{out_prefix.name}.vocab", out_prefix.with_suffix(".vocab"))
        os.replace(model_tmp, out_prefix.with_suffix(".model"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_prefix.with_suffix(".model")
