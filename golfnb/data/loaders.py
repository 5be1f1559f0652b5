"""Training loaders of the record stacks and the validation stream.

All three train loaders share one interface::

    loader = make_train_loader(cfg, rank, world_size, device)
    x, y = loader.next_batch(batch_seqs, seq_len)   # int64 [batch_seqs, seq_len] on `device`, y = x shifted by 1
    state = loader.state_dict()                      # plain ints / lists / dicts: torch.load(weights_only=True) safe
    loader.load_state_dict(state)                    # a resumed run continues bit-identically

* `sequential` (baseline, #549 lineage): one cursor over the concatenated sorted shards; each step the
  ranks take consecutive slices of batch_seqs*seq_len+1 tokens.
* `coprime` (#1060, from #726): per shard a random phase and a coprime-stride walk over its blocks; each
  global batch draws blocks from k shards (k grows, the sampling temperature falls over 1800 batches),
  interleaves them, and rank r takes every world_size-th window of the one global list.
* `shuffled` (ShuffledSequenceLoader, #1394): rank r owns shards r, r+W, ...; per owned shard a random
  phase and a random permutation of its sequence starts; each row picks a shard with probability
  proportional to the starts it has left. When every owned shard is exhausted, all are reshuffled.

Differences from the records, by design:

* The RNG is seeded with cfg.seed (the records ignore SEED and seed from rank or the shard paths), so the
  same seed gives the same data order and a different seed a different one. The sequential loader, which
  has no randomness in the records, starts its cursor at a seed-derived position of the stream.
* Shard *names* (not full paths) enter the seed, so moving the data folder does not change the order.
* Every rank gets disjoint data: the shuffled loader needs at least one shard per rank in the records;
  here, with fewer shards than ranks, each shard is cut into world_size contiguous segments and rank r owns
  segment r of every shard.
* Validation shards (`fineweb_val_*`) are refused outright, and every batch is checked against the vocab
  size so a tokenizer/data mismatch is a clear error, not a device-side assert.

`load_validation_tokens` concatenates every `fineweb_val_*.bin` (sorted) and keeps v[0..U] with
U = floor((N-1)/eval_seq_len)*eval_seq_len targets, optionally capped by cfg.max_val_tokens.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from golfnb.config import ConfigError, Hyperparameters
from golfnb.data.shards import ShardError, is_val_shard, list_shards, open_shard, read_header

__all__ = ["MissingDataError", "find_data_dir", "resolve_data_path", "train_files", "make_train_loader",
           "SequentialLoader", "CoprimeStrideLoader", "ShuffledSequenceLoader", "load_validation_tokens",
           "LOADERS"]

STATE_VERSION = 1
_U64 = (1 << 64) - 1


class MissingDataError(ConfigError):
    """No shards where the config points; the message says how to get data."""


def _get_data_hint(variant: str = "sp8192") -> str:
    return (f"get data with `golfnb data download --variant {variant}` (challenge shards from the Hugging Face "
            f"Hub) or `golfnb data build --input 'texts/*.jsonl' --tokenizer MODEL --out DIR` (local text), "
            f"then set GOLFNB_DATA_DIR to the data root or data_path to the shard folder")


def find_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data root (holding datasets/ and tokenizers/): the explicit argument, else $GOLFNB_DATA_DIR,
    else ./data."""
    if explicit is not None and str(explicit) != "":
        return Path(explicit)
    env = os.environ.get("GOLFNB_DATA_DIR")
    return Path(env) if env else Path("data")


def resolve_data_path(cfg: Hyperparameters) -> Path:
    """cfg.data_path as given when it exists (or is absolute); a relative path under ./data is otherwise
    looked up under the data root of find_data_dir() (GOLFNB_DATA_DIR)."""
    p = Path(cfg.data_path)
    if p.is_absolute() or p.is_dir():
        return p
    rel = Path(*p.parts[1:]) if p.parts and p.parts[0] == "data" else p
    cand = find_data_dir() / rel
    return cand if cand.is_dir() else p


def _variant_of(cfg: Hyperparameters) -> str:
    return f"sp{cfg.vocab_size}"


def train_files(cfg: Hyperparameters) -> list[Path]:
    """The train shards a run uses: the first cfg.train_shards sorted `fineweb_train_*.bin` (0 = all)."""
    d = resolve_data_path(cfg)
    if not d.is_dir():
        raise MissingDataError(f"data folder {d} does not exist (data_path={cfg.data_path!r}); "
                               + _get_data_hint(_variant_of(cfg)))
    files = list_shards(d, "train")
    if not files:
        extra = " (it holds only validation shards)" if list_shards(d, "val") else ""
        raise MissingDataError(f"no fineweb_train_*.bin shards in {d}{extra}; " + _get_data_hint(_variant_of(cfg)))
    if cfg.train_shards > 0:
        if len(files) < cfg.train_shards:
            warnings.warn(f"train_shards={cfg.train_shards} but {d} holds only {len(files)} train shards; "
                          f"training on those {len(files)} (download more with `golfnb data download "
                          f"--train-shards {cfg.train_shards}`)", stacklevel=2)
        files = files[: cfg.train_shards]
    return files


# ==================================================================== shared machinery


def _names_hash(names: Sequence[str]) -> int:
    """64-bit FNV-1a over the shard names (the #1060 loader seeds from its shard paths the same way)."""
    h = 0xCBF29CE484222325
    for b in "\n".join(names).encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & _U64
    return h


def _rng(*keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) & _U64 for k in keys])))


_KIND_CODES = {"sequential": 1, "coprime": 2, "shuffled": 3}


class _TrainLoader:
    kind = ""

    def __init__(self, files: Sequence[str | os.PathLike], *, seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", vocab_size: int | None = None):
        paths = [Path(f) for f in files]
        if not paths:
            raise MissingDataError("the train loader got no shard files; " + _get_data_hint())
        for p in paths:
            if is_val_shard(p):
                raise ShardError(f"refusing to train on validation shard {p}: the challenge forbids validation "
                                 f"data in training (and GPTQ calibration); pass fineweb_train_*.bin files only")
        if world_size < 1 or not (0 <= rank < world_size):
            raise ValueError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")
        self.files = paths
        self.names = [p.name for p in paths]
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.lengths = [read_header(p).n_tokens for p in paths]
        self._maps: dict[int, np.ndarray] = {}
        self._key = (self.seed, _KIND_CODES[self.kind], _names_hash(self.names))

    # -- reading
    def _shard(self, i: int) -> np.ndarray:
        mm = self._maps.get(i)
        if mm is None:
            mm = self._maps[i] = open_shard(self.files[i])
        return mm

    def _read(self, i: int, start: int, length: int) -> np.ndarray:
        seg = np.asarray(self._shard(i)[start:start + length], dtype=np.int64)
        if seg.size != length:
            raise ShardError(f"{self.files[i]}: read {seg.size} of {length} tokens at {start}; the shard shrank "
                             f"while in use — re-verify it with `golfnb data verify`")
        if self.vocab_size is not None and seg.size and int(seg.max()) >= self.vocab_size:
            j = int(np.flatnonzero(seg >= self.vocab_size)[0])
            raise ShardError(f"{self.files[i]} holds token id {int(seg[j])} at index {start + j} >= vocab_size="
                             f"{self.vocab_size}: data and tokenizer disagree; use the matching preset/data_path")
        return seg

    def _emit(self, buf: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":
            # one pinned host-to-device copy of the [B, T+1] windows; the shifted views are split on the GPU
            t = torch.from_numpy(buf).pin_memory().to(self.device, non_blocking=True)
            return t[:, :-1].contiguous(), t[:, 1:].contiguous()
        # on the host numpy makes the two copies (torch's strided CPU copy is slower here, and thread-bound)
        x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))
        if self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    @staticmethod
    def _check_shape(batch_seqs: int, seq_len: int) -> None:
        if batch_seqs < 1 or seq_len < 1:
            raise ValueError(f"next_batch(batch_seqs={batch_seqs}, seq_len={seq_len}): both must be >= 1")

    def next_batch(self, batch_seqs: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- resumable state
    def _identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": STATE_VERSION, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "files": list(self.names)}

    def _check_identity(self, state: dict[str, Any]) -> None:
        mine = self._identity()
        for key in ("kind", "version", "seed", "rank", "world_size", "files"):
            if state.get(key) != mine[key]:
                got = state.get(key)
                if key == "files":
                    got = f"{len(got or [])} files ({(got or ['?'])[0]} ...)"
                    want = f"{len(self.names)} files ({self.names[0]} ...)"
                else:
                    want = mine[key]
                raise ValueError(f"loader state does not match this loader: {key} is {got!r} in the state but "
                                 f"{want!r} here; resume with the same loader, seed, world size, rank and shards")

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


def _rng_state(g: np.random.Generator) -> dict[str, Any]:
    st = g.bit_generator.state
    return {"bit_generator": st["bit_generator"], "state": int(st["state"]["state"]), "inc": int(st["state"]["inc"]),
            "has_uint32": int(st["has_uint32"]), "uinteger": int(st["uinteger"])}


def _set_rng_state(g: np.random.Generator, s: dict[str, Any]) -> None:
    g.bit_generator.state = {"bit_generator": s["bit_generator"],
                             "state": {"state": int(s["state"]), "inc": int(s["inc"])},
                             "has_uint32": int(s["has_uint32"]), "uinteger": int(s["uinteger"])}


# ==================================================================== (a) sequential stream


class SequentialLoader(_TrainLoader):
    """One cursor over the concatenated sorted shards, wrapping after the last. Each step
    takes W*(B*T+1) consecutive tokens and rank r uses slice r. The start position is seed-derived."""

    kind = "sequential"

    def __init__(self, files, **kw):
        super().__init__(files, **kw)
        self.total = int(sum(self.lengths))
        if self.total < 2:
            raise ShardError(f"the train shards hold {self.total} tokens in all; need at least 2")
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.pos = int(_rng(*self._key).integers(0, self.total))

    def _read_stream(self, pos: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            pos %= self.total
            i = int(np.searchsorted(self.offsets, pos, side="right") - 1)
            within = pos - int(self.offsets[i])
            take = min(length - filled, self.lengths[i] - within)
            out[filled:filled + take] = self._read(i, within, take)
            filled += take
            pos += take
        return out

    def next_batch(self, batch_seqs: int, seq_len: int):
        self._check_shape(batch_seqs, seq_len)
        per_rank = batch_seqs * seq_len + 1
        if per_rank * self.world_size > self.total:
            raise ShardError(f"one step needs {per_rank * self.world_size} tokens but the train shards hold only "
                             f"{self.total}; use more data or a smaller batch")
        buf = self._read_stream(self.pos + self.rank * per_rank, per_rank)
        self.pos = (self.pos + per_rank * self.world_size) % self.total
        rows = np.empty((batch_seqs, seq_len + 1), dtype=np.int64)
        rows[:, :seq_len] = buf[:-1].reshape(batch_seqs, seq_len)
        rows[:, seq_len] = buf[seq_len::seq_len]  # each row's last target is the next row's first input
        return self._emit(rows)

    def state_dict(self) -> dict[str, Any]:
        return {**self._identity(), "pos": int(self.pos)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_identity(state)
        self.pos = int(state["pos"])


# ==================================================================== (b) coprime-stride multi-shard (#1060)


class CoprimeStrideLoader(_TrainLoader):
    """The `coprime` loader. All ranks run the same RNG and build the same global list of W*batch_seqs windows; rank r
    takes windows r, r+W, ... Per shard the block order is (start + j*stride) mod blocks with gcd = 1, a full
    permutation without storing one; it is re-drawn (new phase, start, stride) when exhausted."""

    kind = "coprime"
    RAMP_BATCHES = 1800

    def __init__(self, files, **kw):
        super().__init__(files, **kw)
        self.rng = _rng(*self._key)
        n = len(self.files)
        self.seq_len = 0
        self.phase = [0] * n
        self.blocks = [0] * n
        self.start = [0] * n
        self.stride = [1] * n
        self.taken = [0] * n
        self.batches_built = 0

    def _layout(self, s: int) -> None:
        T = self.seq_len
        phase = int(self.rng.integers(0, T))
        bc = max((self.lengths[s] - 1 - phase) // T, 0)
        start, stride = 0, 1
        if bc > 0:
            start = int(self.rng.integers(0, bc))
            if bc > 1:
                while True:
                    stride = int(self.rng.integers(1, bc))
                    if math.gcd(stride, bc) == 1:
                        break
        self.phase[s], self.blocks[s], self.start[s], self.stride[s], self.taken[s] = phase, bc, start, stride, 0

    def _pull(self, s: int, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if self.taken[s] >= self.blocks[s]:
                self._layout(s)
            m = min(count - len(out), self.blocks[s] - self.taken[s])
            j = np.arange(self.taken[s], self.taken[s] + m, dtype=np.int64)
            b = (self.start[s] + j * self.stride[s]) % self.blocks[s]
            out.extend((self.phase[s] + b * self.seq_len).tolist())
            self.taken[s] += m
        return out

    def next_batch(self, batch_seqs: int, seq_len: int):
        self._check_shape(batch_seqs, seq_len)
        W = self.world_size
        if seq_len != self.seq_len:
            self.seq_len = seq_len
            for s in range(len(self.files)):
                self._layout(s)
        for s in range(len(self.files)):
            if self.blocks[s] > 0 and self.taken[s] >= self.blocks[s]:
                self._layout(s)  # exhausted by the previous batch: re-draw before sampling by what is left
        usable = [s for s in range(len(self.files)) if self.blocks[s] > 0]
        if not usable:
            raise ShardError(f"every train shard is shorter than seq_len+1={seq_len + 1} tokens; use longer shards")
        G = batch_seqs * W
        progress = min(self.batches_built / self.RAMP_BATCHES, 1.0)
        alpha = 0.90 - 0.40 * progress
        n = len(usable)
        k_lo = min(max(8, W), n, G)
        k_hi = min(max(32, 8 * W), n, G)
        k = int(round(k_lo + progress * (k_hi - k_lo)))
        remaining = np.array([self.blocks[s] - self.taken[s] for s in usable], dtype=np.float64)
        probs = remaining ** alpha
        probs /= probs.sum()
        chosen = self.rng.choice(n, size=k, replace=False, p=probs)
        sub = probs[chosen] / probs[chosen].sum()
        counts = 1 + self.rng.multinomial(G - k, sub)
        buckets: list[list[tuple[int, int]]] = []
        for c, cnt in zip(chosen.tolist(), counts.tolist()):
            s = usable[c]
            starts = self._pull(s, int(cnt))
            order = self.rng.permutation(len(starts))
            buckets.append([(s, starts[o]) for o in order.tolist()])
        windows: list[tuple[int, int]] = []
        heads = [0] * len(buckets)
        active = [b for b in range(len(buckets)) if buckets[b]]
        while active:
            for b in self.rng.permutation(len(active)).tolist():
                bi = active[b]
                windows.append(buckets[bi][heads[bi]])
                heads[bi] += 1
            active = [bi for bi in active if heads[bi] < len(buckets[bi])]
        self.batches_built += 1
        mine = windows[self.rank::W]
        rows = np.empty((batch_seqs, seq_len + 1), dtype=np.int64)
        for r, (s, st) in enumerate(mine):
            rows[r] = self._read(s, st, seq_len + 1)
        return self._emit(rows)

    def state_dict(self) -> dict[str, Any]:
        return {**self._identity(), "rng": _rng_state(self.rng), "seq_len": self.seq_len,
                "phase": list(self.phase), "blocks": list(self.blocks), "start": list(self.start),
                "stride": list(self.stride), "taken": list(self.taken), "batches_built": self.batches_built}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_identity(state)
        _set_rng_state(self.rng, state["rng"])
        self.seq_len = int(state["seq_len"])
        for key in ("phase", "blocks", "start", "stride", "taken"):
            setattr(self, key, [int(v) for v in state[key]])
        self.batches_built = int(state["batches_built"])


# ==================================================================== (c) ShuffledSequenceLoader (#1394)


class ShuffledSequenceLoader(_TrainLoader):
    """The `shuffled` loader. Rank r owns shards r, r+W, ... (or segment r of every shard when there are fewer shards
    than ranks). Each owned unit gets a random phase and a random permutation of its sequence starts
    phase + k*T; each row picks a unit with probability proportional to its remaining starts.

    The permutation of unit u in epoch e is a pure function of (seed, shard names, rank, world size, e, u),
    so the state holds only the RNG state, the epoch, the phases and how many starts each unit has used;
    load_state_dict regenerates the permutations exactly.
    """

    kind = "shuffled"

    def __init__(self, files, **kw):
        super().__init__(files, **kw)
        W, r = self.world_size, self.rank
        if len(self.files) >= W:
            self.units = [(i, 0, self.lengths[i]) for i in range(r, len(self.files), W)]
        else:
            self.units = [(i, self.lengths[i] * r // W, self.lengths[i] * (r + 1) // W) for i in range(len(self.files))]
        self.rng = _rng(*self._key, r, W)
        self.seq_len = 0
        self.epoch = -1
        self.phase = [0] * len(self.units)
        self.count = [0] * len(self.units)
        self.used = [0] * len(self.units)
        self._perms: dict[int, np.ndarray] = {}

    def _new_epoch(self) -> None:
        T = self.seq_len
        self.epoch += 1
        self._perms.clear()
        for u, (_, a, b) in enumerate(self.units):
            ph = int(self.rng.integers(0, T))
            self.phase[u] = ph
            self.count[u] = max((b - a - 1 - ph) // T, 0)
            self.used[u] = 0
        if sum(self.count) == 0:
            raise ShardError(f"rank {self.rank}'s share of the train shards holds no window of seq_len+1="
                             f"{T + 1} tokens; use more/longer shards or fewer ranks")

    def _perm(self, u: int) -> np.ndarray:
        p = self._perms.get(u)
        if p is None:
            p = self._perms[u] = _rng(*self._key, self.rank, self.world_size, self.epoch, u).permutation(self.count[u])
        return p

    def next_batch(self, batch_seqs: int, seq_len: int):
        self._check_shape(batch_seqs, seq_len)
        if seq_len != self.seq_len:
            self.seq_len = seq_len
            self._new_epoch()
        rows = np.empty((batch_seqs, seq_len + 1), dtype=np.int64)
        left = np.array(self.count, dtype=np.int64) - np.array(self.used, dtype=np.int64)
        for r in range(batch_seqs):
            if left.sum() <= 0:
                self._new_epoch()
                left = np.array(self.count, dtype=np.int64)
            # unit u with probability left[u] / sum(left): inverse CDF of one uniform draw
            cdf = np.cumsum(left)
            u = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
            k = int(self._perm(u)[self.used[u]])
            self.used[u] += 1
            left[u] -= 1
            shard, a, _ = self.units[u]
            rows[r] = self._read(shard, a + self.phase[u] + k * seq_len, seq_len + 1)
        return self._emit(rows)

    def state_dict(self) -> dict[str, Any]:
        return {**self._identity(), "rng": _rng_state(self.rng), "seq_len": self.seq_len, "epoch": self.epoch,
                "phase": list(self.phase), "count": list(self.count), "used": list(self.used)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_identity(state)
        _set_rng_state(self.rng, state["rng"])
        self.seq_len = int(state["seq_len"])
        self.epoch = int(state["epoch"])
        self.phase = [int(v) for v in state["phase"]]
        self.count = [int(v) for v in state["count"]]
        self.used = [int(v) for v in state["used"]]
        self._perms.clear()


LOADERS: dict[str, type[_TrainLoader]] = {
    "sequential": SequentialLoader,
    "coprime": CoprimeStrideLoader,
    "shuffled": ShuffledSequenceLoader,
}


def make_train_loader(cfg: Hyperparameters, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                      files: Sequence[str | os.PathLike] | None = None) -> _TrainLoader:
    """The train loader cfg.loader names, over train_files(cfg) (or the given files)."""
    if cfg.loader not in LOADERS:
        raise ConfigError(f"loader={cfg.loader!r} is not one of {', '.join(LOADERS)}")
    paths = train_files(cfg) if files is None else list(files)
    return LOADERS[cfg.loader](paths, seed=cfg.seed, rank=rank, world_size=world_size, device=device,
                               vocab_size=cfg.vocab_size)


# ==================================================================== validation


def load_validation_tokens(cfg: Hyperparameters) -> torch.Tensor:
    """All `fineweb_val_*.bin` (sorted) concatenated into v and truncated to v[0..U] (U+1 tokens, U targets),
    U = floor((N-1)/eval_seq_len)*eval_seq_len, then capped to max_val_tokens targets (a multiple of
    eval_seq_len) when cfg.max_val_tokens > 0. int64 on the CPU."""
    d = resolve_data_path(cfg)
    files = list_shards(d, "val") if d.is_dir() else []
    if not files:
        raise MissingDataError(f"no fineweb_val_*.bin shards in {d} (data_path={cfg.data_path!r}); "
                               + _get_data_hint(_variant_of(cfg)))
    parts = []
    for f in files:
        mm = open_shard(f)
        if mm.size and int(mm.max()) >= cfg.vocab_size:
            j = int(np.flatnonzero(mm >= cfg.vocab_size)[0])
            raise ShardError(f"{f} holds token id {int(mm[j])} at index {j} >= vocab_size={cfg.vocab_size}: the "
                             f"validation data was made with a different tokenizer; use the matching preset/data_path")
        parts.append(np.asarray(mm))
    v = np.concatenate(parts) if len(parts) > 1 else parts[0]
    T = cfg.eval_seq_len
    N = int(v.size)
    U = ((N - 1) // T) * T if N > 0 else 0
    if U <= 0:
        raise ShardError(f"the validation shards in {d} hold {N} tokens, fewer than eval_seq_len+1={T + 1}; "
                         f"use the full validation split or a smaller eval_seq_len")
    if cfg.max_val_tokens > 0:
        cap = (cfg.max_val_tokens // T) * T
        if cap <= 0:
            raise ConfigError(f"max_val_tokens={cfg.max_val_tokens} is below eval_seq_len={T}; "
                              f"use at least {T} (or 0 for the whole split)")
        U = min(U, cap)
    return torch.from_numpy(np.asarray(v[: U + 1], dtype=np.int64))
