"""Exact val_bpb accounting: per-token UTF-8 byte counts from the SentencePiece model.

The challenge scores bits per byte of the *normalised text the tokenizer sees*, so the denominator is not
a file size but a sum over scored targets of the bytes each target token adds to the decoded text:

    bytes(t) = base_bytes[y_t] + (has_leading_space[y_t] and not is_boundary[x_t])

where x_t is the previous token (the input at that position). A piece "▁abc" adds the 3 bytes of "abc"
plus one byte for the space, except right after BOS (or another control token), where SentencePiece's
decoder drops the leading space of a document's first piece as well; byte-fallback pieces "<0xNN>" add
exactly one byte; control and unknown pieces add none. With this rule, summing bytes(t) over the targets
of a complete document equals len(utf8(sp.decode(document))) exactly (tests/test_bpb.py checks this on
the challenge's real validation tokens).

Aggregation (fp64, SUM over ranks): val_loss = L / N_t (nats per token), val_bpb = L / (B ln 2).
Every scoring scheme must score each of the U targets exactly once, so N_t = U and B is the total of
`count_stream_bytes` over the truncated validation stream (151,078,222 bytes for SP8192).

Requirement (challenge issue #897): the tokenizer must have "▁" as a standalone piece, otherwise a lone
space is emitted as three byte-fallback tokens and counted as 3 bytes instead of 1, deflating bpb.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from golfnb.config import ConfigError, PRESETS, Hyperparameters

__all__ = ["ByteLUTs", "build_byte_luts", "load_sentencepiece", "target_bytes", "count_stream_bytes",
           "BpbAccumulator", "check_tokenizer", "resolve_tokenizer_path", "SPACE_PIECE"]

SPACE_PIECE = "\u2581"  # "▁", SentencePiece's visible space


class ByteLUTs(NamedTuple):
    """Per-token-id tables: UTF-8 bytes of the piece without its leading "▁", whether it has one, and
    whether the id is a boundary (control / unknown / unused, or beyond the SentencePiece vocab)."""

    base_bytes: torch.Tensor  # int32 [V]
    has_leading_space: torch.Tensor  # bool [V]
    is_boundary: torch.Tensor  # bool [V]

    def to(self, device: torch.device | str) -> "ByteLUTs":
        return ByteLUTs(*(t.to(device) for t in self))

    @property
    def vocab_size(self) -> int:
        return int(self.base_bytes.numel())


def load_sentencepiece(sp_or_path: Any):
    """A SentencePieceProcessor from a path or an already loaded processor."""
    import sentencepiece as spm

    if isinstance(sp_or_path, spm.SentencePieceProcessor):
        return sp_or_path
    p = Path(sp_or_path)
    if not p.is_file():
        raise ConfigError(f"tokenizer model {p} not found; download it with `golfnb data download --variant "
                          f"sp8192` (or sp1024), train one with `golfnb data tokenizer`, or set tokenizer_path")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(p))
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"{p} is not a SentencePiece model ({e}); set tokenizer_path to a .model file") from None
    return sp


def build_byte_luts(sp_or_path: Any, vocab_size: int | None = None, device: torch.device | str = "cpu") -> ByteLUTs:
    """Byte look-up tables for every id in [0, vocab_size) (default: the SentencePiece vocab size)."""
    sp = load_sentencepiece(sp_or_path)
    n_sp = int(sp.vocab_size())
    V = n_sp if vocab_size is None else int(vocab_size)
    if V < n_sp:
        raise ConfigError(f"vocab_size={V} is smaller than the tokenizer's {n_sp} pieces; the model could not "
                          f"score every id the tokenizer emits. Use vocab_size={n_sp} or a matching tokenizer")
    space_id = sp.piece_to_id(SPACE_PIECE)
    if space_id == sp.unk_id():
        raise ConfigError(
            "the tokenizer has no standalone '\u2581' piece, so a lone space becomes three byte-fallback tokens "
            "counted as 3 bytes instead of 1 and val_bpb comes out too low (challenge issue #897). Retrain it with "
            "`golfnb data tokenizer` (which checks for the piece) or use the challenge's sp1024/sp8192 model")
    base = np.zeros(V, dtype=np.int32)
    lead = np.zeros(V, dtype=bool)
    boundary = np.ones(V, dtype=bool)  # ids beyond the SentencePiece vocab stay boundary / 0 bytes
    for i in range(n_sp):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_PIECE):
            lead[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteLUTs(torch.from_numpy(base), torch.from_numpy(lead), torch.from_numpy(boundary)).to(device)


def target_bytes(prev_tokens: torch.Tensor, target_tokens: torch.Tensor, luts: ByteLUTs) -> torch.Tensor:
    """Bytes credited to each target (same shape as target_tokens, int32)."""
    if prev_tokens.shape != target_tokens.shape:
        raise ValueError(f"prev_tokens {tuple(prev_tokens.shape)} and target_tokens {tuple(target_tokens.shape)} "
                         f"must have the same shape (prev = the input at each scored position)")
    dev = target_tokens.device
    if luts.base_bytes.device != dev:
        luts = luts.to(dev)
    y = target_tokens.long()
    x = prev_tokens.long()
    space = luts.has_leading_space[y] & ~luts.is_boundary[x]
    return luts.base_bytes[y] + space.to(torch.int32)


def count_stream_bytes(tokens: Any, luts: ByteLUTs, *, prev_token: int | None = None,
                       chunk: int = 1 << 22) -> int:
    """Total bytes of the targets tokens[1:] with previous tokens tokens[:-1], i.e. the val_bpb denominator
    when every target v[1..N) of the stream is scored once. With `prev_token` (the last token of a preceding
    piece of the same stream) tokens[0] is a target too, so a long stream can be counted piece by piece."""
    arr = tokens if isinstance(tokens, torch.Tensor) else torch.from_numpy(np.asarray(tokens).astype(np.int64))
    arr = arr.reshape(-1)
    if prev_token is not None:
        arr = torch.cat([torch.tensor([int(prev_token)], dtype=arr.dtype, device=arr.device), arr])
    n = int(arr.numel())
    total = 0
    for s in range(0, max(n - 1, 0), chunk):
        e = min(s + chunk, n - 1)
        total += int(target_bytes(arr[s:e], arr[s + 1:e + 1], luts).sum(dtype=torch.int64).item())
    return total


class BpbAccumulator:
    """fp64 sums of NLL (nats), scored-token count and bytes; one per eval pass per rank.

    `add` takes per-target NLL with the matching previous/target tokens (and an optional mask of the
    positions this rank scores); `add_sums` takes pre-reduced sums. Sums stay on the device (no host sync
    per batch). `all_reduce()` SUMs across ranks once, when torch.distributed is initialised.
    """

    def __init__(self, luts: ByteLUTs, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else luts.base_bytes.device
        self.luts = luts.to(self.device)
        self._sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, tokens, bytes
        self._reduced = False

    def add(self, nll: torch.Tensor, prev_tokens: torch.Tensor, target_tokens: torch.Tensor,
            mask: torch.Tensor | None = None) -> None:
        if self._reduced:
            raise RuntimeError("BpbAccumulator.add after all_reduce(); use a fresh accumulator per pass")
        if nll.shape != target_tokens.shape:
            raise ValueError(f"nll {tuple(nll.shape)} must match target_tokens {tuple(target_tokens.shape)}")
        b = target_bytes(prev_tokens, target_tokens, self.luts)
        nll = nll.to(torch.float64)
        if mask is not None:
            mask = mask.to(torch.bool)
            nll, b = nll[mask], b[mask]
        upd = torch.stack([nll.sum(), torch.tensor(float(nll.numel()), dtype=torch.float64, device=nll.device),
                           b.sum(dtype=torch.float64)])
        self._sums += upd.to(self.device)

    def add_sums(self, loss_sum: float | torch.Tensor, n_tokens: int | torch.Tensor,
                 n_bytes: int | torch.Tensor) -> None:
        if self._reduced:
            raise RuntimeError("BpbAccumulator.add_sums after all_reduce(); use a fresh accumulator per pass")
        vals = [torch.as_tensor(v, dtype=torch.float64).to(self.device).reshape(())
                for v in (loss_sum, n_tokens, n_bytes)]
        self._sums += torch.stack(vals)

    def all_reduce(self) -> "BpbAccumulator":
        """SUM the three totals over ranks (no-op without an initialised process group). Call once."""
        if self._reduced:
            raise RuntimeError("BpbAccumulator.all_reduce() called twice; the totals would be multiplied")
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._sums, op=dist.ReduceOp.SUM)
        self._reduced = True
        return self

    @property
    def loss_sum(self) -> float:
        return float(self._sums[0].item())

    @property
    def tokens(self) -> int:
        return int(round(self._sums[1].item()))

    @property
    def bytes(self) -> int:
        return int(round(self._sums[2].item()))

    @property
    def val_loss(self) -> float:
        n = self._sums[1].item()
        if n <= 0:
            raise ValueError("no tokens were scored; nothing to average")
        return float(self._sums[0].item() / n)

    @property
    def val_bpb(self) -> float:
        b = self._sums[2].item()
        if b <= 0:
            raise ValueError("the scored targets carry 0 bytes; val_bpb is undefined")
        return float(self._sums[0].item() / (b * math.log(2.0)))

    def as_dict(self) -> dict[str, float | int]:
        return {"val_loss": self.val_loss, "val_bpb": self.val_bpb, "loss_sum": self.loss_sum,
                "tokens": self.tokens, "bytes": self.bytes}


# ---------------------------------------------------------------- tokenizer / config agreement


def resolve_tokenizer_path(cfg: Hyperparameters) -> Path:
    """cfg.tokenizer_path; a relative default under ./data is looked up under GOLFNB_DATA_DIR when set."""
    p = Path(cfg.tokenizer_path)
    if p.is_absolute() or p.exists():
        return p
    root = os.environ.get("GOLFNB_DATA_DIR")
    if root:
        rel = Path(*p.parts[1:]) if p.parts and p.parts[0] == "data" else p
        cand = Path(root) / rel
        if cand.exists():
            return cand
    return p


def _presets_for_vocab(v: int) -> list[str]:
    base_v = Hyperparameters.__dataclass_fields__["vocab_size"].default
    return [name for name, vals in PRESETS.items() if int(vals.get("vocab_size", base_v)) == v]


def check_tokenizer(cfg: Hyperparameters):
    """Load cfg's tokenizer and check it agrees with cfg.vocab_size. Returns the SentencePieceProcessor.

    Raises ConfigError, before any expensive work, when the file is missing or its vocab size differs.
    """
    path = resolve_tokenizer_path(cfg)
    if not path.is_file():
        variant = f"sp{cfg.vocab_size}"
        raise ConfigError(
            f"tokenizer {path} not found (cfg.tokenizer_path={cfg.tokenizer_path!r}). Get it with "
            f"`golfnb data download --variant {variant}` (sp1024 / sp8192), set GOLFNB_DATA_DIR to the folder "
            f"holding tokenizers/, or set tokenizer_path to the .model file")
    sp = load_sentencepiece(path)
    n = int(sp.vocab_size())
    if n != cfg.vocab_size:
        same = _presets_for_vocab(n)
        hint = (f"use a preset made for it ({', '.join(same)})" if same
                else f"set vocab_size={n}")
        wanted = _presets_for_vocab(cfg.vocab_size)
        raise ConfigError(
            f"tokenizer {path} has {n} pieces but cfg.vocab_size={cfg.vocab_size}: the model's embedding would "
            f"not match the token ids. Either {hint} with this tokenizer, or keep vocab_size={cfg.vocab_size} "
            f"and set tokenizer_path to a {cfg.vocab_size}-piece model (fineweb_{cfg.vocab_size}_bpe.model"
            + (f"; presets: {', '.join(wanted)}" if wanted else "") + ")")
    return sp
