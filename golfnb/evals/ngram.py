"""Causal n-gram token tilt (#1514 A2; kernel idea from PR #1420, causal fix from its thread).

Two halves:

1. **Precompute** (`NgramTilt.precompute`): one left-to-right scan over the token stream v[0..N) giving,
   for every target index p >= 1, a hint token h_p (-1 = none) and a strength beta_p. Both are functions
   of v[0..p-1] only: every table is updated with v[p] after (h_p, beta_p) is emitted.
2. **Tilt** at scoring time (`tilt_nll`): the model's distribution p at that position becomes
   p'(t) = p(t) exp(beta [t = h]) / Z with Z = 1 + p(h)(e^beta - 1), a normalised distribution over the
   whole vocabulary; NLL' = NLL + log Z - beta [y = h].

Experts (each is a candidate source of (hint, beta); an expert is enabled iff its beta > 0, and a
disabled expert emits nothing at all):

* Token expert, orders k in `orders` (record: 8, 10, 12, 14, 16). Per order a context table
  {count, best_tok, best_count} and a (context, next token) pair-count table. Lookup goes longest order
  first (only k <= p) and takes the first context whose conf = best_count / count and count pass the
  order's gate (`order_gate`); beta = base_beta * conf. Update with t = v[p] for every order k <= p:
  pair count += 1, count += 1; if t == best_tok then best_count += 1, else if the pair count exceeds
  best_count then best_tok = t, best_count = pair count (best_count saturates at 65535).
* Within-word expert (beta = within_beta, gate conf >= 0.25, count >= 1): keyed by the hash of the word
  in progress (the tokens since the last word start) and its length.
* Word-context expert (beta = word_beta, gate conf >= 0.8, count >= 3): keyed by the word in progress
  plus the three words before it (PR #1420's "word-start" expert, read causally).
  A word starts at a token with a leading space or right after a boundary token (BOS/control); a boundary
  token clears the word state. Both word experts fire only when a word is in progress, which is a
  property of v[p-1] (not a boundary token) and never of v[p]; their tables count every token that
  followed the key, so conf estimates P(hint | prefix) under exactly the gate used at lookup. (PR #1420
  gated them on `is_boundary[v[p]]` / `has_leading_space[v[p]]`, leaking 1-2 bits of the target per
  position.) Both are off by default (#1514 runs them at beta 0; the record's kernel still let them emit
  beta-0 candidates that could add the agreement bonus; here off means off).

Combination: every candidate whose hint equals another candidate's gets +agree_bonus (once); the largest
beta wins (ties: token, within, word).

Tables: open addressing, 16-byte slots keyed by full 64-bit hashes (a non-linear fold finished with the
murmur3 finaliser), linear probing over at most 256 slots; an insert that finds no slot is dropped and
counted. Two distinct contexts share a key with probability 2^-64, i.e. ~3e-5 expected collisions per
order over the ~35M distinct contexts of the 40.5M-token validation set. The record's key is an XOR of
token x prime products; with primes below 2^18 (as all of those #1514 uses are) and 13-bit token
ids it has at most 31 significant bits, so by the birthday bound ~3e5 pairs of distinct contexts per
order share a key there. Each context table
has a power-of-two number of slots >= 2x the number of insertions (one per target), capped at
2^table_bits; pair tables grow on demand up to the same size. Memory (`memory_bytes`, an upper bound):
32 B x slots per order, 10 GiB for the record's five orders over the validation set at table_bits 26;
measured peak RSS 6.1 GiB, since pair tables stay small (see the kernel's update rule).

The fast path is a C99 kernel (golfnb/evals/_ngram_kernel.py) compiled on first use with the system C
compiler into `$GOLFNB_CACHE_DIR` (default ~/.cache/golfnb) and loaded with ctypes; `_reference_precompute`
is a plain Python/numpy implementation of the same semantics, used by the tests and as the fallback when
no compiler exists (with a warning: ~50 k tokens/s against ~5 M, i.e. ~15 min for the validation set).
The two agree element for element whenever no insert is dropped; a dropped insert (tables too small for
the stream) raises a warning that names the ngram_table_bits to use. docs/ngram.md has measured speeds.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from golfnb.config import ConfigError
from golfnb.evals import _ngram_kernel as K
from golfnb.io import cache_dir

__all__ = [
    "NgramTilt",
    "NgramHints",
    "order_gate",
    "tilt_nll",
    "tilted_distribution",
    "hint_rate",
    "hint_stats",
    "load_kernel",
    "kernel_path",
    "KernelUnavailable",
]

CFLAGS: tuple[str, ...] = ("-O3", "-std=c99", "-shared", "-fPIC")
_M64 = (1 << 64) - 1
_REF_CHUNK = 1 << 16  # positions per vectorised hashing chunk in the reference (bounds its memory)


# ==================================================================== configuration

def order_gate(order: int) -> tuple[float, int]:
    """(minimum confidence, minimum context count) of the token expert at `order`.

    The record's gates are 8-10: (0.70, 3), 11-13: (0.60, 2), 14-16: (0.50, 2). Outside 8..16 the nearest
    band applies: orders below 8 (the tiny test configs) get the strictest gate, because short contexts
    are the least specific, and orders above 16 keep the loosest one.
    """
    if order <= 10:
        return 0.70, 3
    if order <= 13:
        return 0.60, 2
    return 0.50, 2


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


@dataclass(frozen=True)
class NgramTilt:
    """Settings of the n-gram tilt; build with `NgramTilt.from_config(cfg)` or directly."""

    enabled: bool = True
    base_beta: float = 2.0
    agree_bonus: float = 0.1
    within_beta: float = 0.0
    word_beta: float = 0.0
    orders: tuple[int, ...] = (8, 10, 12, 14, 16)
    table_bits: int = 26
    within_threshold: float = 0.25
    within_min_count: int = 1
    word_threshold: float = 0.8
    word_min_count: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "orders", tuple(int(k) for k in self.orders))
        errs = []
        o = self.orders
        if any(not 1 <= k <= K.MAX_ORDER for k in o) or list(o) != sorted(set(o)):
            errs.append(f"orders {o} must be strictly increasing within 1..{K.MAX_ORDER} "
                        f"(set ngram_order_min/max/stride)")
        for name in ("base_beta", "agree_bonus", "within_beta", "word_beta"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                errs.append(f"ngram_{name}={v!r} must be a finite number >= 0 (0 switches that part off)")
        for name in ("within_threshold", "word_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                errs.append(f"{name}={getattr(self, name)!r} must lie in [0, 1]")
        for name in ("within_min_count", "word_min_count"):
            if getattr(self, name) < 1:
                errs.append(f"{name} must be >= 1")
        if not 10 <= self.table_bits <= 30:
            errs.append(f"ngram_table_bits={self.table_bits} must lie in 10..30")
        if errs:
            raise ConfigError("invalid n-gram tilt settings:\n  - " + "\n  - ".join(errs))

    @classmethod
    def from_config(cls, cfg: Any) -> "NgramTilt":
        """Read the `ngram_*` fields of a golfnb Hyperparameters (or any object carrying them)."""
        orders = tuple(range(int(cfg.ngram_order_min), int(cfg.ngram_order_max) + 1,
                             max(int(cfg.ngram_order_stride), 1)))
        return cls(enabled=bool(cfg.ngram_tilt_enabled), base_beta=float(cfg.ngram_base_beta),
                   agree_bonus=float(cfg.ngram_agree_bonus), within_beta=float(cfg.ngram_within_beta),
                   word_beta=float(cfg.ngram_word_beta), orders=orders, table_bits=int(cfg.ngram_table_bits))

    # ---------------------------------------------------------------- derived
    @property
    def token_expert_on(self) -> bool:
        return self.enabled and self.base_beta > 0 and len(self.orders) > 0

    @property
    def word_experts_on(self) -> bool:
        return self.enabled and (self.within_beta > 0 or self.word_beta > 0)

    def gates(self) -> list[tuple[int, float, int]]:
        """(order, min confidence, min count) for each token-expert order."""
        return [(k, *order_gate(k)) for k in self.orders]

    def table_slots(self, n_tokens: int) -> int:
        """Slots per table: a power of two >= 2x the insertions (one per target), capped at 2^table_bits."""
        return min(1 << self.table_bits, max(1 << 10, _next_pow2(2 * max(int(n_tokens) - 1, 1))))

    def memory_bytes(self, n_tokens: int) -> int:
        """Host memory the precompute allocates for a stream of n_tokens (context + pair tables, 16 B/slot)."""
        n_tables = (len(self.orders) if self.token_expert_on else 0)
        n_tables += int(self.enabled and self.within_beta > 0) + int(self.enabled and self.word_beta > 0)
        return n_tables * 2 * 16 * self.table_slots(n_tokens)

    # ---------------------------------------------------------------- work
    def precompute(self, tokens: Any, *, is_boundary: Any = None, has_leading_space: Any = None,
                   backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """(hints int32 [N], betas float32 [N]) for the stream `tokens`; index p refers to target v[p],
        hints[0] = -1. `is_boundary` / `has_leading_space` are the per-token LUTs of golfnb.bpb,
        needed only when a word expert is on. backend: "auto" (C kernel, else the reference with a
        warning), "c" (C kernel or an error) or "python" (the reference)."""
        r = self.run(tokens, is_boundary=is_boundary, has_leading_space=has_leading_space, backend=backend)
        return r.hints, r.betas

    def run(self, tokens: Any, *, is_boundary: Any = None, has_leading_space: Any = None,
            backend: str = "auto") -> "NgramHints":
        """`precompute` with its bookkeeping: backend used, seconds, table statistics."""
        if backend not in ("auto", "c", "python"):
            raise ValueError(f"backend={backend!r}: use 'auto', 'c' or 'python'")
        tok = _as_tokens(tokens)
        bnd, lsp = self._luts(tok, is_boundary, has_leading_space)
        n = int(tok.shape[0])
        t0, c0 = time.perf_counter(), time.thread_time()
        if not self.enabled or n <= 1 or not (self.token_expert_on or self.word_experts_on):
            hints = np.full(n, -1, dtype=np.int32)
            betas = np.zeros(n, dtype=np.float32)
            return NgramHints(hints, betas, _stats(0, 0, 0, 0), "none", 0.0, 0.0, self)
        lib = None
        if backend != "python":
            try:
                lib = load_kernel()
            except KernelUnavailable as e:
                if backend == "c":
                    raise
                warnings.warn(f"n-gram tilt: C kernel unavailable ({e}); falling back to the pure-Python "
                              f"reference, which is ~50x slower (minutes for the validation set). "
                              f"Install a C compiler (e.g. `apt-get install gcc`) to get the fast path.",
                              RuntimeWarning, stacklevel=2)
        if lib is not None:
            hints, betas, st = _kernel_precompute(lib, tok, self, bnd, lsp)
            used = "c"
        else:
            hints, betas, st = _reference_precompute(tok, self, bnd, lsp)
            used = "python"
        secs, cpu = time.perf_counter() - t0, time.thread_time() - c0
        res = NgramHints(hints, betas, _stats(*st), used, secs, cpu, self)
        dropped = st[0] + st[1] + st[2]
        if dropped:
            need = min(30, max(self.table_bits + 1, (2 * n - 1).bit_length()))
            warnings.warn(f"n-gram tables overflowed: {dropped} inserts dropped over {n} tokens "
                          f"({self.table_slots(n)} slots per table); raise ngram_table_bits from "
                          f"{self.table_bits} to {need}", RuntimeWarning, stacklevel=2)
        return res

    def _luts(self, tok: np.ndarray, is_boundary: Any, has_leading_space: Any
              ) -> tuple[np.ndarray | None, np.ndarray | None]:
        if not self.word_experts_on:
            return None, None
        if is_boundary is None or has_leading_space is None:
            raise ValueError("ngram_within_beta / ngram_word_beta > 0 need the token LUTs: pass "
                             "is_boundary= and has_leading_space= (golfnb.bpb's per-token arrays), or set "
                             "both betas to 0")
        bnd = _as_lut(is_boundary, "is_boundary")
        lsp = _as_lut(has_leading_space, "has_leading_space")
        if bnd.shape != lsp.shape:
            raise ValueError(f"is_boundary has {bnd.shape[0]} entries but has_leading_space has "
                             f"{lsp.shape[0]}; build both from the same tokenizer")
        if tok.size and int(tok.max()) >= bnd.shape[0]:
            raise ValueError(f"token id {int(tok.max())} is outside the LUTs ({bnd.shape[0]} entries); "
                             f"build them from the tokenizer that produced the stream")
        return bnd, lsp


@dataclass
class NgramHints:
    """Output of `NgramTilt.run`: hints/betas aligned with the stream, plus how they were made."""

    hints: np.ndarray
    betas: np.ndarray
    stats: dict[str, int]
    backend: str
    seconds: float  # wall clock
    cpu_seconds: float  # CPU time of the calling thread (the kernel runs on it): robust to busy machines
    settings: NgramTilt = field(repr=False)

    @property
    def hint_rate(self) -> float:
        return hint_rate(self.hints)

    @property
    def tokens_per_second(self) -> float:
        return self.hints.shape[0] / self.seconds if self.seconds > 0 else float("inf")

    @property
    def tokens_per_cpu_second(self) -> float:
        return self.hints.shape[0] / self.cpu_seconds if self.cpu_seconds > 0 else float("inf")


def _stats(ctx_drop: int, pair_drop: int, word_drop: int, n_hints: int) -> dict[str, int]:
    return {"token_ctx_dropped": int(ctx_drop), "token_pair_dropped": int(pair_drop),
            "word_dropped": int(word_drop), "n_hints": int(n_hints)}


def _as_tokens(tokens: Any) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    a = np.asarray(tokens)
    if a.ndim != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {a.shape}; flatten it first")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {a.dtype}")
    if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
        raise ValueError(f"token ids must lie in 0..65535 (got {int(a.min())}..{int(a.max())}); "
                         f"the tables store best_tok as uint16")
    return np.ascontiguousarray(a, dtype=np.int32)


def _as_lut(lut: Any, name: str) -> np.ndarray:
    if isinstance(lut, torch.Tensor):
        lut = lut.detach().cpu().numpy()
    a = np.asarray(lut)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D per-token array, got shape {a.shape}")
    return np.ascontiguousarray(a != 0, dtype=np.uint8)


# ==================================================================== C kernel: build, load, call

class KernelUnavailable(RuntimeError):
    """The C kernel could not be built or loaded; the message says why and what to install."""


_LOADED: dict[str, ctypes.CDLL] = {}


def kernel_path() -> Path:
    """Where the compiled kernel lives: keyed by the sha256 of source, flags and platform, so an edit of
    the source, or another architecture sharing the home directory, builds a new file."""
    ident = "\n".join([K.KERNEL_SOURCE, " ".join(CFLAGS), platform.machine(), sys.platform])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:20]
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    return cache_dir() / f"ngram_kernel_{digest}{suffix}"


def _find_compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)  # an explicit CC that does not exist means "no compiler", not "guess"
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _build(target: Path) -> None:
    cc = _find_compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler found (looked for $CC, cc, gcc, clang on PATH)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
        os.close(fd)
    except OSError as e:
        raise KernelUnavailable(f"cannot write to the kernel cache {target.parent} ({e}); set "
                                f"GOLFNB_CACHE_DIR to a writable folder") from e
    try:
        with tempfile.TemporaryDirectory(prefix="golfnb_ngram_") as td:
            src = Path(td) / "ngram_kernel.c"
            src.write_text(K.KERNEL_SOURCE)
            proc = subprocess.run([cc, *CFLAGS, str(src), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
        if proc.returncode != 0:
            raise KernelUnavailable(f"{cc} failed to compile the kernel:\n{proc.stderr.strip()[-2000:]}")
        # temp file + rename: concurrent builders each publish a complete library, the last one wins
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"building the kernel with {cc} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    f = getattr(lib, K.KERNEL_SYMBOL)
    vp, i32, i64, f64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_double
    f.restype = i64
    f.argtypes = [vp, i64,                       # tokens, n
                  i32, vp, vp, vp,               # n_orders, orders, thresholds, min counts
                  i32, f64, f64,                 # token table bits, base beta, agree bonus
                  vp, vp, i64,                   # is_boundary, leading_space, lut size
                  f64, f64, i32, i32,            # within: beta, threshold, min count, bits
                  f64, f64, i32, i32,            # word:   beta, threshold, min count, bits
                  vp, vp, vp]                    # out hints, out betas, stats
    return lib


def load_kernel() -> ctypes.CDLL:
    """The compiled kernel, building it on first use; raises KernelUnavailable (with the reason)."""
    path = kernel_path()
    key = str(path)
    if key in _LOADED:
        return _LOADED[key]
    for attempt in range(2):
        if not path.exists():
            _build(path)
        try:
            lib = _bind(ctypes.CDLL(key))
            break
        except (OSError, AttributeError) as e:
            if attempt == 1:
                raise KernelUnavailable(f"cannot load {path}: {e}") from e
            path.unlink(missing_ok=True)  # stale or foreign file under our name: rebuild once
    _LOADED[key] = lib
    return lib


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _kernel_precompute(lib: ctypes.CDLL, tok: np.ndarray, s: NgramTilt, bnd: np.ndarray | None,
                       lsp: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    n = int(tok.shape[0])
    orders = np.asarray(s.orders, dtype=np.int32)
    gates = [order_gate(int(k)) for k in orders]
    thr = np.asarray([g[0] for g in gates], dtype=np.float64)
    minc = np.asarray([g[1] for g in gates], dtype=np.int32)
    bits = s.table_slots(n).bit_length() - 1
    hints = np.empty(n, dtype=np.int32)
    betas = np.empty(n, dtype=np.float32)
    stats = np.zeros(4, dtype=np.int64)
    token_beta = s.base_beta if s.token_expert_on else 0.0
    rc = lib.golfnb_ngram_precompute(
        _ptr(tok), n, int(orders.size), _ptr(orders), _ptr(thr), _ptr(minc),
        bits, float(token_beta), float(s.agree_bonus),
        _ptr(bnd), _ptr(lsp), 0 if bnd is None else int(bnd.shape[0]),
        float(s.within_beta), float(s.within_threshold), int(s.within_min_count), bits,
        float(s.word_beta), float(s.word_threshold), int(s.word_min_count), bits,
        _ptr(hints), _ptr(betas), _ptr(stats))
    if rc == -1:
        raise MemoryError(f"n-gram kernel could not allocate {s.memory_bytes(n) / 2**30:.1f} GiB of tables; "
                          f"lower ngram_table_bits or free host memory")
    if rc != 0:
        raise RuntimeError(f"n-gram kernel rejected its arguments (code {rc})")
    return hints, betas, tuple(int(x) for x in stats)


# ==================================================================== Python reference

def _step_np(h: np.ndarray, x: np.ndarray) -> np.ndarray:
    h = (h ^ (x + np.uint64(1))) * np.uint64(K.HASH["STEP_MUL"])
    return h ^ (h >> np.uint64(K.HASH["STEP_SHIFT"]))


def _fmix_np(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(K.HASH["FMIX_MUL1"])
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(K.HASH["FMIX_MUL2"])
    h = h ^ (h >> np.uint64(33))
    return np.where(h == 0, np.uint64(1), h)


def _step(h: int, x: int) -> int:
    h = ((h ^ ((x + 1) & _M64)) * K.HASH["STEP_MUL"]) & _M64
    return h ^ (h >> K.HASH["STEP_SHIFT"])


def _fmix(h: int) -> int:
    h ^= h >> 33
    h = (h * K.HASH["FMIX_MUL1"]) & _M64
    h ^= h >> 33
    h = (h * K.HASH["FMIX_MUL2"]) & _M64
    h ^= h >> 33
    return h or 1


def _pair_key(ctx_key: int, tok: int) -> int:
    return _fmix(ctx_key ^ (((tok + 1) * K.HASH["PAIR_MUL"]) & _M64))


class _Table:
    """One expert order's tables with the kernel's slot layout, linear probing and probe limit. Pair
    counts are kept eagerly (every update writes the pair slot), the plain form of the counting rule
    the kernel implements lazily; the pair table has the context table's size from the start."""

    def __init__(self, slots: int) -> None:
        self.mask = slots - 1
        self.key = array("Q", bytes(8 * slots))
        self.count = array("I", bytes(4 * slots))
        self.best_tok = array("H", bytes(2 * slots))
        self.best_count = array("H", bytes(2 * slots))
        self.pkey = array("Q", bytes(8 * slots))
        self.pcount = array("I", bytes(4 * slots))

    def ctx(self, key: int) -> int:
        """Slot of `key`, inserting it if absent; -1 if no slot within the probe limit."""
        keys, m, s = self.key, self.mask, key & self.mask
        for i in range(K.PROBES):
            j = (s + i) & m
            if keys[j] == key:
                return j
            if keys[j] == 0:
                keys[j] = key
                return j
        return -1

    def pair(self, key: int) -> int:
        keys, m, s = self.pkey, self.mask, key & self.mask
        for i in range(K.PROBES):
            j = (s + i) & m
            if keys[j] == key:
                return j
            if keys[j] == 0:
                keys[j] = key
                return j
        return -1

    def gate(self, j: int, min_count: int, thr: float) -> float | None:
        if j < 0 or self.count[j] < min_count:
            return None
        conf = self.best_count[j] / self.count[j]
        return conf if conf >= thr else None

    def add(self, j: int, pj: int, tok: int) -> None:
        self.count[j] = min(self.count[j] + 1, 0xFFFFFFFF)
        self.pcount[pj] = pc = min(self.pcount[pj] + 1, 0xFFFFFFFF)
        if self.best_tok[j] == tok:
            self.best_count[j] = min(self.best_count[j] + 1, 65535)
        elif pc > self.best_count[j]:
            self.best_tok[j] = tok
            self.best_count[j] = min(pc, 65535)


def _token_keys(tok: np.ndarray, start: int, stop: int, orders: Sequence[int]
                ) -> tuple[list[list[int]], list[list[int]]]:
    """Context and pair keys of positions start..stop-1 for each order (garbage where order > p)."""
    v = tok.astype(np.uint64)
    h = np.full(stop - start, K.HASH["TOKEN_SEED"], dtype=np.uint64)
    pos = np.arange(start, stop)
    nxt = (v[start:stop] + np.uint64(1)) * np.uint64(K.HASH["PAIR_MUL"])
    ck: list[list[int]] = []
    pk: list[list[int]] = []
    oi = 0
    for j in range(1, orders[-1] + 1):
        x = v[np.maximum(pos - j, 0)]
        h = _step_np(h, x)
        if j == orders[oi]:
            c = _fmix_np(h ^ np.uint64((j * K.HASH["ORDER_SALT"]) & _M64))
            ck.append(c.tolist())
            pk.append(_fmix_np(c ^ nxt).tolist())
            oi += 1
    return ck, pk


def _reference_precompute(tok: np.ndarray, s: NgramTilt, bnd: np.ndarray | None, lsp: np.ndarray | None
                          ) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """The kernel's semantics in plain Python (hashing vectorised with numpy, tables as lists)."""
    n = int(tok.shape[0])
    hints = np.full(n, -1, dtype=np.int32)
    betas = np.zeros(n, dtype=np.float32)
    drops = [0, 0, 0, 0]
    use_tok = s.token_expert_on
    use_in = s.enabled and s.within_beta > 0
    use_wd = s.enabled and s.word_beta > 0
    use_words = use_in or use_wd
    if n <= 1 or not (use_tok or use_words):
        return hints, betas, tuple(drops)
    slots = s.table_slots(n)
    orders = list(s.orders)
    gates = [order_gate(k) for k in orders]
    tabs = [_Table(slots) for _ in orders] if use_tok else []
    wt = _Table(slots) if use_in else None
    dt = _Table(slots) if use_wd else None
    bl = bnd.tolist() if use_words else []
    ll = lsp.tolist() if use_words else []
    vt = tok.tolist()
    cur, cur_len, hist = 0, 0, []          # word in progress (hash, length), previous words, newest first
    ck: list[list[int]] = []
    pk: list[list[int]] = []
    base = 0
    for p in range(n):
        t = vt[p]
        if use_tok and (p - base >= _REF_CHUNK or p == 0):
            base = p
            ck, pk = _token_keys(tok, p, min(p + _REF_CHUNK, n), orders)
        cands: list[tuple[int, float]] = []
        ents: list[int] = []
        if use_tok:
            n_av = sum(1 for k in orders if k <= p)
            for i in range(n_av):
                j = tabs[i].ctx(ck[i][p - base])
                if j < 0:
                    drops[0] += 1
                ents.append(j)
            if p >= 1:
                for i in range(n_av - 1, -1, -1):
                    conf = tabs[i].gate(ents[i], gates[i][1], gates[i][0])
                    if conf is not None:
                        cands.append((tabs[i].best_tok[ents[i]], s.base_beta * conf))
                        break
        in_key = wd_key = 0
        in_j = wd_j = -1
        if use_words and cur_len >= 1:     # a word is in progress: a property of v[p-1] alone
            if use_in:
                in_key = _fmix(cur ^ ((cur_len * K.HASH["LEN_SALT"]) & _M64))
                in_j = wt.ctx(in_key)
                if in_j < 0:
                    drops[2] += 1
                if wt.gate(in_j, s.within_min_count, s.within_threshold) is not None:
                    cands.append((wt.best_tok[in_j], s.within_beta))
            if use_wd:
                h = _step(K.HASH["WORDCTX_SEED"], cur)
                for w in hist:
                    h = _step(h, w)
                wd_key = _fmix(h ^ (((len(hist) + 1) * K.HASH["LEN_SALT"]) & _M64))
                wd_j = dt.ctx(wd_key)
                if wd_j < 0:
                    drops[2] += 1
                if dt.gate(wd_j, s.word_min_count, s.word_threshold) is not None:
                    cands.append((dt.best_tok[wd_j], s.word_beta))
        if cands:
            final = []
            for a, (ha, ba) in enumerate(cands):
                agree = any(b != a and hb == ha for b, (hb, _) in enumerate(cands))
                final.append(ba + s.agree_bonus if agree else ba)
            w = max(range(len(cands)), key=lambda a: (final[a], -a))
            hints[p] = cands[w][0]
            betas[p] = final[w]
            drops[3] += 1
        # ---- only now is v[p] read into any table ----
        if use_tok:
            for i, j in enumerate(ents):
                if j < 0:
                    continue
                pj = tabs[i].pair(pk[i][p - base])
                if pj < 0:
                    drops[1] += 1
                    continue
                tabs[i].add(j, pj, t)
        if use_words:
            for tab, key, j in ((wt, in_key, in_j), (dt, wd_key, wd_j)):
                if j >= 0:
                    pj = tab.pair(_pair_key(key, t))
                    if pj < 0:
                        drops[2] += 1
                    else:
                        tab.add(j, pj, t)
            if bl[t]:
                cur, cur_len, hist = 0, 0, []
            elif ll[t] or cur_len == 0:
                if cur_len >= 1:
                    hist = [cur] + hist[:2]
                cur, cur_len = _step(K.HASH["WORD_SEED"], t), 1
            else:
                cur, cur_len = _step(cur, t), cur_len + 1
    return hints, betas, tuple(drops)


# ==================================================================== the tilt at scoring time

def tilt_nll(logits: torch.Tensor, targets: torch.Tensor, hints: Any, betas: Any,
             nll: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position NLL (fp64, nats) under the tilted distribution.

    logits [..., V] (fp32; other dtypes are upcast), targets [...], hints / betas [...] (hint -1 = no
    tilt, those positions keep their NLL bit for bit). `nll`, if given, is the plain per-position NLL the
    caller already computed (e.g. fp32 cross-entropy) and is used as the base; otherwise the base is
    logsumexp(logits) - logit[y]. The tilt term log Z - beta [y = h] is computed in fp64 from
    p(h) = exp(logit_h - logsumexp). Works on CPU and CUDA (everything follows logits.device).
    """
    V = logits.shape[-1]
    lg = logits.reshape(-1, V)
    if lg.dtype != torch.float32:
        lg = lg.float()
    dev = lg.device
    y = targets.reshape(-1).to(device=dev, dtype=torch.long)
    h = torch.as_tensor(hints).reshape(-1).to(device=dev, dtype=torch.long)
    b = torch.as_tensor(betas).reshape(-1).to(device=dev, dtype=torch.float64)
    n = lg.shape[0]
    if not (y.shape[0] == h.shape[0] == b.shape[0] == n):
        raise ValueError(f"tilt_nll: {n} logit rows but {y.shape[0]} targets, {h.shape[0]} hints and "
                         f"{b.shape[0]} betas; pass the hints/betas of exactly the scored positions")
    lse = torch.logsumexp(lg, dim=-1).double()
    has = h >= 0
    hs = h.clamp_min(0)
    if nll is None:
        base = lse - lg.gather(1, y[:, None]).squeeze(1).double()
    else:
        base = nll.reshape(-1).to(device=dev, dtype=torch.float64)
    log_ph = lg.gather(1, hs[:, None]).squeeze(1).double() - lse
    b = torch.where(has, b, torch.zeros_like(b))
    log_z = torch.log1p(torch.exp(log_ph) * torch.expm1(b))
    hit = (hs == y) & has
    delta = torch.where(has, log_z - b * hit.double(), torch.zeros_like(b))
    return (base + delta).reshape(targets.shape)


def tilted_distribution(logits_row: torch.Tensor, hint: int, beta: float) -> torch.Tensor:
    """The full tilted distribution p' over the vocabulary (fp64) for one position: what the legality
    checks sum to 1 and compare tilt_nll against (-log p'[y])."""
    p = torch.softmax(logits_row.reshape(-1).double(), dim=-1)
    if int(hint) < 0:
        return p
    w = math.exp(float(beta))
    z = 1.0 + p[int(hint)] * (w - 1.0)
    q = p.clone()
    q[int(hint)] = q[int(hint)] * w
    return q / z


def hint_rate(hints: Any) -> float:
    """Fraction of targets (indices 1..N-1 of a precompute output) that receive a hint
    (#1514 logged 23.58% on the full SP8192 validation set)."""
    h = np.asarray(hints.detach().cpu() if isinstance(hints, torch.Tensor) else hints)
    return float((h[1:] >= 0).mean()) if h.shape[0] > 1 else 0.0


def hint_stats(hints: Any, tokens: Any) -> dict[str, float]:
    """hint_rate, the fraction of hints that name the true token (precision) and the fraction of targets
    that receive a correct hint. A diagnostic read after scoring; it plays no part in the scores."""
    h = np.asarray(hints)[1:]
    v = _as_tokens(tokens)[1:]
    if h.shape != v.shape:
        raise ValueError(f"hints ({h.shape[0] + 1}) and tokens ({v.shape[0] + 1}) must be the same stream")
    given = h >= 0
    hits = given & (h == v)
    n_given = int(given.sum())
    return {"hint_rate": float(given.mean()) if h.size else 0.0,
            "precision": float(hits.sum() / n_given) if n_given else 0.0,
            "correct_rate": float(hits.mean()) if h.size else 0.0,
            "n_targets": int(h.size), "n_hints": n_given}
