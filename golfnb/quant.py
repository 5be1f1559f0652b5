"""Post-training quantization: Hessian calibration, full-Hessian GPTQ with SDClip scales, round-to-nearest,
fp16 passthrough, and selective +-1 pruning to fit the byte cap.

Pipeline, as in the SP8192 records:

1. `collect_hessians`: forward passes over *training* batches with hooks on every block matrix's input and
   on `model.head_in` (the final-norm output, the input of the tied-embedding logit matmul), summing
   H = (1/n_batches) * sum X^T X in fp32. q/k/v share the attention input, so one sum serves all three
   (the records still count them separately: 6 * 11 + 1 = 67 Hessians). Looped layers are hooked on every
   pass. The seconds this takes are training-data time and count against `gptq_reserve_seconds`.
2. `quantize_model`: every block matrix and the embedding get one SDClip scale per row,
   s_r = fp16(k * std(W_r) / Q_max) (#1394), and integer codes from GPTQ (#535/#634 lineage: act-order,
   lazy block updates, upper Cholesky factor of H^-1) or from round-to-nearest with the same scales.
   Codes live in an int8 container whatever the bit width; Q_max = 2^(b-1) - 1 bounds them.
3. Small float tensors (<= passthrough_max_numel elements: gains, scales, mixes, skip weights) are stored
   as fp16; other large float tensors of the side stacks (BigramHash / value-embedding tables) get int8
   round-to-nearest with per-row absmax scales, as the #549 lineage does.
4. `prune_to_fit`: when code + compressed model exceeds the cap, zero the |q| = 1 codes whose loss is
   smallest (s_r^2 each) until it fits (#1019 / #1533), re-compressing after each batch.

Differences from the records, on purpose:

* Block matrices and the embedding are quantized whatever their size. The records' rule "passthrough when
  <= 65,536 elements" never touches a matrix of the 512-wide stacks, but would leave every matrix of a tiny
  test model in fp16; the roles, not the sizes, decide here.
* The scale floor: the records clamp k*std/Q_max at 1e-10 *before* the fp16 cast, which underflows to 0 for
  an all-zero row (0/0 codes). golfnb floors the fp16 scale at the smallest normal fp16 (6.1e-5) instead;
  rows that small are dead rows, whose codes are 0 either way.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from golfnb.config import Hyperparameters

__all__ = [
    "MODEL_FIELDS", "model_config_of", "config_sha256", "QuantError",
    "Hessians", "collect_hessians", "generate_calibration_tokens", "hessian_input_modules", "unbanked_copy",
    "sdclip_scales", "gptq_quantize", "rtn_quantize", "dequantize_rows", "hessian_error",
    "QuantizedTensor", "QuantizedModel", "tensor_group", "quantize_model", "dequantize", "apply_quantized",
    "PruneResult", "prune_to_fit", "prune_entries", "prune_candidates",
]

# Config fields that decide the state dict's layout or the forward pass: an artifact is only meaningful
# for a model built with the same values (init-only fields such as qk_gain_init and the banked/unbanked
# storage choice are left out, the artifact format is the same for both).
MODEL_FIELDS = (
    "vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "mlp_activation",
    "leaky_relu_slope", "tie_embeddings", "embed_bf16", "logit_softcap", "rope_base", "rope_dims",
    "rope_train_seq_len", "train_seq_len", "ln_scale", "xsa_last_n", "skip_gates_enabled", "num_loops",
    "loop_start", "loop_end", "parallel_residual", "parallel_start_layer", "bigram_vocab_size", "bigram_dim",
    "smear_gate", "ve_dim", "ve_layers",
)

_FP16_FLOOR = torch.finfo(torch.float16).tiny  # smallest normal fp16, the scale floor (see module doc)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(attn|mlp)\.(c_q|c_k|c_v|proj|fc)\.weight$")


class QuantError(ValueError):
    """Quantization cannot proceed as asked; the message says what to change."""


def model_config_of(cfg: Hyperparameters) -> dict[str, Any]:
    d = cfg.to_dict()
    return {k: d[k] for k in MODEL_FIELDS}


def config_sha256(cfg: Hyperparameters) -> str:
    """sha256 of the full resolved config (sorted-key JSON): identifies the run a model came from."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()


def _progress(it: Iterable, total: int | None, desc: str, enable: bool) -> Iterable:
    """A tqdm bar when tqdm is importable and enabled; the bare iterable otherwise (tqdm is optional in a
    packed submission)."""
    if not enable:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, total=total, desc=desc, leave=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _full_fp32_matmul() -> Iterator[None]:
    """TF32 off for the GPTQ solve (training turns it on; error feedback wants full fp32 products)."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# ================================================================================================ calibration

def unbanked_copy(model: nn.Module) -> nn.Module:
    """The same weights in an unbanked GPT (per-layer CastedLinear modules that hooks can see).

    Returns `model` itself when it is already unbanked. The copy keeps the looping state, the attention
    backend and the device.
    """
    if not getattr(model, "banked", False):
        return model
    from golfnb.model import build_model

    dev = next(model.parameters()).device
    copy = build_model(model.cfg.replace(bank_params=False), dev)
    copy.load_state_dict(model.unbanked_state_dict(), strict=True)
    copy.looping_active = model.looping_active
    copy.set_attn_backend(model.attn_backend)
    return copy


def hessian_input_modules(model: nn.Module) -> dict[str, tuple[nn.Module, list[str]]]:
    """Hook point -> (module whose *input* is X, weight names that use this X).

    q/k/v share one hook on c_q; attn.proj sees the post-XSA head outputs; mlp.proj sees the squared
    activation; head_in sees the final-norm output (tied embedding, or lm_head when untied).
    """
    if getattr(model, "banked", False):
        raise QuantError("hooks need the unbanked model; pass unbanked_copy(model) (collect_hessians does this)")
    out: dict[str, tuple[nn.Module, list[str]]] = {}
    for i, b in enumerate(model.blocks):
        p = f"blocks.{i}"
        out[f"{p}.attn.qkv"] = (b.attn.c_q, [f"{p}.attn.c_q.weight", f"{p}.attn.c_k.weight", f"{p}.attn.c_v.weight"])
        out[f"{p}.attn.proj"] = (b.attn.proj, [f"{p}.attn.proj.weight"])
        out[f"{p}.mlp.fc"] = (b.mlp.fc, [f"{p}.mlp.fc.weight"])
        out[f"{p}.mlp.proj"] = (b.mlp.proj, [f"{p}.mlp.proj.weight"])
    head_user = "tok_emb.weight" if model.lm_head is None else "lm_head.weight"
    out["head_in"] = (model.head_in, [head_user])
    return out


@dataclass
class Hessians:
    """Calibration result: `matrices[name]` is H (fp32, [in, in]) for weight `name`; q/k/v of one layer share
    one tensor object. `seconds` is wall time on training data (counts against the GPTQ reserve)."""

    matrices: dict[str, torch.Tensor]
    n_batches: int
    n_tokens: int
    seconds: float
    source: str = "train"

    def __len__(self) -> int:
        return len(self.matrices)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.matrices[name]

    def __contains__(self, name: object) -> bool:
        return name in self.matrices

    def to(self, device: torch.device | str) -> "Hessians":
        moved: dict[int, torch.Tensor] = {}
        mats = {}
        for k, v in self.matrices.items():
            if id(v) not in moved:
                moved[id(v)] = v.to(device)
            mats[k] = moved[id(v)]
        return Hessians(mats, self.n_batches, self.n_tokens, self.seconds, self.source)


def _batch_iter(batches: Any, n_batches: int, batch_seqs: int, seq_len: int) -> Iterator[torch.Tensor]:
    """Input ids from a loader (`next_batch`), a [N, T] tensor (split into rows of batch_seqs), or an iterable
    of x / (x, y)."""
    if hasattr(batches, "next_batch"):
        for _ in range(n_batches):
            x, _y = batches.next_batch(batch_seqs, seq_len)
            yield x
        return
    if isinstance(batches, torch.Tensor):
        if batches.ndim != 2:
            raise QuantError(f"calibration tokens must be [N, T], got shape {tuple(batches.shape)}")
        chunks = list(batches.split(batch_seqs))
        for x in chunks[:n_batches]:
            yield x
        return
    for k, item in enumerate(batches):
        if k >= n_batches:
            return
        yield item[0] if isinstance(item, (tuple, list)) else item


def _accumulate_xtx(h: torch.Tensor, x: torch.Tensor) -> None:
    """h += x^T x in fp32.

    For bf16 activations on CUDA, one bf16 matmul with an fp32 output: the products of bf16 numbers are
    exact in fp32 and accumulate in fp32, so this equals the fp32 product of the upcast inputs (measured:
    max relative difference 5e-4), is faster than upcasting, and does not depend on allow_tf32: 64 record
    batches of pr1514 took 9.8 s on an H100 this way, against 12.5 s upcast with TF32 and 26-28 s upcast
    without (8.0 s of each is the eager forward). Everything else (CPU, fp32): upcast, then addmm.
    """
    if x.dtype == torch.bfloat16 and x.is_cuda:
        try:
            h += torch.mm(x.t(), x, out_dtype=torch.float32)
            return
        except (TypeError, RuntimeError):  # a torch without mm(..., out_dtype=)
            pass
    xf = x.float()
    h.addmm_(xf.t(), xf)


@torch.no_grad()
def collect_hessians(model: nn.Module, cfg: Hyperparameters, batches: Any, n_batches: int | None = None,
                     device: torch.device | str | None = None, *, batch_seqs: int | None = None,
                     seq_len: int | None = None, progress: bool = True, source: str = "train") -> Hessians:
    """H = (1/n_batches) * sum over batches of X^T X (fp32) for every quantized matrix.

    `batches`: a train loader (`make_train_loader(...)`, read with next_batch(batch_seqs, seq_len)), a
    [N, T] tensor of token ids, or an iterable of x or (x, y). Only training data may be used (the loader
    refuses validation shards). Defaults: n_batches = cfg.gptq_calibration_batches, batch_seqs = the
    per-rank micro-batch of one process (48 for the record batch), seq_len = cfg.train_seq_len.

    Looping must be on for a looped model (the looped layers are then hooked on every pass): it is
    switched on here when cfg.num_loops > 0 and restored afterwards. An unbanked model is hooked in place
    (and moved to `device` if it lives elsewhere); a banked one is copied into an unbanked model first.
    """
    from golfnb.train import autocast_for

    n_batches = int(n_batches if n_batches is not None else cfg.gptq_calibration_batches)
    if n_batches < 1:
        raise QuantError(f"n_batches={n_batches}: GPTQ needs at least one calibration batch "
                         f"(set gptq_calibration_batches >= 1)")
    batch_seqs = int(batch_seqs if batch_seqs is not None else cfg.micro_batch_seqs(1))
    seq_len = int(seq_len if seq_len is not None else cfg.train_seq_len)
    net = unbanked_copy(model)
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    if next(net.parameters()).device != dev:
        net = net.to(dev)
    points = hessian_input_modules(net)
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(key: str):
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            # under CUDA autocast the layer multiplies a bf16 copy of its input (the block inputs come out of
            # rms_norm in fp32): that copy is the X of its Hessian
            if x.is_cuda and torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16:
                x = x.to(torch.bfloat16)
            with torch.autocast(x.device.type, enabled=False):  # fp32 sums even inside the bf16 forward
                x2 = x.reshape(-1, x.shape[-1])
                h = sums.get(key)
                if h is None:
                    h = sums[key] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32, device=x2.device)
                _accumulate_xtx(h, x2)
        return hook

    for key, (mod, _names) in points.items():
        handles.append(mod.register_forward_pre_hook(make_hook(key)))
    was_training, was_looping = net.training, net.looping_active
    net.eval()
    if cfg.num_loops > 0:
        net.looping_active = True
    _sync(dev)
    t0 = time.perf_counter()
    n_seen = n_tokens = 0
    try:
        for x in _progress(_batch_iter(batches, n_batches, batch_seqs, seq_len), n_batches,
                           "gptq calibration", progress):
            x = x.to(dev, non_blocking=True)
            with autocast_for(dev):
                # head_in is where the tied-embedding Hessian is taken; the vocab-sized logit matmul after
                # it would only cost time inside the reserve
                net.head_in(net.hidden(x))
            n_seen += 1
            n_tokens += x.numel()
        _sync(dev)
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
        net.looping_active = was_looping
    seconds = time.perf_counter() - t0
    if n_seen == 0:
        raise QuantError("the calibration source yielded no batches; give a train loader or token batches")
    mats: dict[str, torch.Tensor] = {}
    for key, (_mod, names) in points.items():
        if key not in sums:
            raise QuantError(f"hook {key} saw no input during calibration (is the layer skipped?)")
        h = sums[key].div_(n_seen)
        for name in names:
            mats[name] = h
    return Hessians(mats, n_seen, n_tokens, seconds, source)


@torch.no_grad()
def generate_calibration_tokens(model: nn.Module, cfg: Hyperparameters, n_seqs: int = 64, seq_len: int | None = None,
                                batch_size: int = 8, temperature: float = 0.8, seed: int = 0,
                                device: torch.device | str | None = None, progress: bool = True) -> torch.Tensor:
    """Self-generated calibration text (#1019, also #1204): the model samples `n_seqs` sequences, first token
    uniform at random, temperature sampling, a full re-forward per token (no KV cache), fixed seed. Touches
    no train or validation data. Returns int64 [n_seqs, seq_len] on the CPU."""
    from golfnb.train import autocast_for

    seq_len = int(seq_len or cfg.train_seq_len)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    was_training, was_looping = model.training, model.looping_active
    model.eval()
    if cfg.num_loops > 0:
        model.looping_active = True
    out = []
    try:
        for b0 in _progress(range(0, n_seqs, batch_size), math.ceil(n_seqs / batch_size), "ar calibration", progress):
            nb = min(batch_size, n_seqs - b0)
            ids = torch.randint(0, cfg.vocab_size, (nb, 1), generator=g)
            for _ in range(seq_len - 1):
                with autocast_for(dev):
                    logits = model.forward_logits(ids.to(dev))[:, -1].float().cpu()
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=g)
                ids = torch.cat([ids, nxt], dim=1)
            out.append(ids)
    finally:
        model.train(was_training)
        model.looping_active = was_looping
    return torch.cat(out)


# ================================================================================================ GPTQ / RTN

def _qmax(bits: int) -> int:
    if not 2 <= int(bits) <= 8:
        raise QuantError(f"bits={bits}: the int8 container holds 2..8-bit codes; use 5, 6, 7 or 8")
    return 2 ** (int(bits) - 1) - 1


def sdclip_scales(W: torch.Tensor, bits: int, clip_sigmas: float) -> torch.Tensor:
    """One fp16 step per row: k * std(W_r) / Q_max (unbiased std, SDClip #1394); clip_sigmas <= 0 means the
    row's absmax instead (the #549 lineage's int8 rule)."""
    qmax = _qmax(bits)
    Wf = W.detach().float()
    if clip_sigmas > 0:
        c = clip_sigmas * Wf.std(dim=1) if Wf.shape[1] > 1 else Wf.abs()[:, 0]
    else:
        c = Wf.abs().amax(dim=1)
    return (c / qmax).to(torch.float16).clamp_min(_FP16_FLOOR)


def rtn_quantize(W: torch.Tensor, bits: int, clip_sigmas: float,
                 scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest with SDClip scales: (int8 codes [r, c], fp16 scales [r])."""
    qmax = _qmax(bits)
    s16 = scales if scales is not None else sdclip_scales(W, bits, clip_sigmas)
    q = torch.clamp(torch.round(W.detach().float() / s16.float()[:, None]), -qmax, qmax)
    return q.to(torch.int8), s16


def _upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, clip_sigmas: float, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-Hessian GPTQ: returns (int8 codes [r, c], fp16 SDClip scales [r]).

    Dead inputs (diag H = 0) are zeroed; H is damped by damp * mean(diag H); columns are processed in
    descending diag(H) order (act-order) in blocks of `block_size`, each column's rounding error fed back
    into the not-yet-quantized columns of its block through the upper Cholesky factor of H^-1, and the
    block's errors applied to the later columns in one matmul (lazy batch update).
    """
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise QuantError(f"GPTQ needs W [rows, cols] and H [cols, cols]; got {tuple(W.shape)} and {tuple(H.shape)}")
    qmax = _qmax(bits)
    dev = H.device
    with _full_fp32_matmul():
        Wf = W.detach().to(dev, torch.float32).clone()
        s16 = sdclip_scales(Wf, bits, clip_sigmas)  # from the original weights
        s = s16.float()
        H = H.detach().float().clone()
        rows, cols = Wf.shape
        dead = torch.diagonal(H) == 0
        H[dead, dead] = 1.0
        Wf[:, dead] = 0.0
        perm = None
        if act_order:
            perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
            Wf = Wf[:, perm]
            H = H[perm][:, perm]
        Hinv = None
        d = damp
        for _attempt in range(5):
            Hd = H.clone()
            Hd.diagonal().add_(d * torch.diagonal(H).mean())
            try:
                Hinv = _upper_cholesky_of_inverse(Hd)
                break
            except torch.linalg.LinAlgError:  # not positive definite at this damping: damp harder
                d = d * 10 if d > 0 else 1e-4
        if Hinv is None:
            raise QuantError("GPTQ: the Hessian stays singular even with damping 100x gptq_damp; check the "
                             "calibration batches (NaN activations?)")
        Q = torch.zeros_like(Wf)
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            W1 = Wf[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            E1 = torch.zeros_like(W1)
            Hb = Hinv[i1:i2, i1:i2]
            for j in range(i2 - i1):
                w = W1[:, j]
                q = torch.clamp(torch.round(w / s), -qmax, qmax)
                Q1[:, j] = q
                e = (w - q * s) / Hb[j, j]
                W1[:, j:].addr_(e, Hb[j, j:], alpha=-1.0)
                E1[:, j] = e
            Q[:, i1:i2] = Q1
            if i2 < cols:
                Wf[:, i2:].addmm_(E1, Hinv[i1:i2, i2:], alpha=-1.0)
        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.int8), s16


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_hat = q * s_r (row broadcast), computed in fp32 and cast to `dtype`."""
    return (q.float() * scales.float()[:, None]).to(dtype)


def hessian_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T) = mean over calibration batches of ||(W - W_hat) X^T||_F^2."""
    D = (W.float() - W_hat.float()).to(H.device)
    return float(((D @ H) * D).sum())


# ================================================================================================ model level

def tensor_group(name: str, tensor: torch.Tensor, cfg: Hyperparameters) -> str:
    """attn | mlp | embed | head | passthrough | other | raw (the storage class of a state-dict entry)."""
    m = _BLOCK_RE.match(name)
    if m:
        return m.group(2)
    if name == "tok_emb.weight":
        return "embed"
    if name == "lm_head.weight":
        return "head"
    if not torch.is_floating_point(tensor):
        return "raw"
    if tensor.numel() <= cfg.passthrough_max_numel or tensor.ndim != 2:
        return "passthrough"
    return "other"


def layer_of(name: str) -> int | None:
    m = _BLOCK_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass
class QuantizedTensor:
    """One state-dict entry in storage form.

    kind "int": `data` = int8 codes [rows, cols] (|q| <= 2^(bits-1) - 1), `scale` = fp16 [rows];
    kind "fp16": `data` = the fp16 copy; kind "raw": `data` = the tensor as is (non-float).
    `dtype` is the template dtype the model expects back (float32, bfloat16, ...).
    """

    name: str
    group: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    data: torch.Tensor
    scale: torch.Tensor | None = None
    bits: int | None = None
    clip_sigmas: float | None = None
    method: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_bytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        if self.scale is not None:
            n += self.scale.numel() * self.scale.element_size()
        return n


@dataclass
class QuantizedModel:
    """Every state-dict entry in storage form, in state-dict order, plus the model config it belongs to."""

    tensors: dict[str, QuantizedTensor]
    model_config: dict[str, Any]
    config_sha256: str
    method: str
    info: dict[str, Any] = field(default_factory=dict)

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, t in self.tensors.items():
            out.setdefault(t.group, []).append(name)
        return out

    def num_params(self, group: str | None = None) -> int:
        return sum(t.numel for t in self.tensors.values() if group is None or t.group == group)

    def bits_label(self) -> str:
        """"int6" when every block matrix has one width, else e.g. "attn6-mlp5"; the embedding is int8 in
        every record and not named."""
        widths = {g: {t.bits for t in self.tensors.values() if t.group == g} for g in ("attn", "mlp")}
        flat = widths["attn"] | widths["mlp"]
        if len(flat) == 1:
            return f"int{flat.pop()}"
        return "-".join(f"{g}{'/'.join(str(b) for b in sorted(w))}" for g, w in widths.items() if w)

    def copy(self) -> "QuantizedModel":
        ts = {k: QuantizedTensor(**{**v.__dict__, "data": v.data.clone()}) for k, v in self.tensors.items()}
        return QuantizedModel(ts, dict(self.model_config), self.config_sha256, self.method, dict(self.info))


def _group_params(cfg: Hyperparameters, group: str) -> tuple[int, float]:
    """(bits, clip_sigmas) of a quantized group; clip_sigmas 0 = per-row absmax."""
    if group == "attn":
        return cfg.attn_bits, cfg.matrix_clip_sigmas
    if group == "mlp":
        return cfg.mlp_bits, cfg.matrix_clip_sigmas
    if group in ("embed", "head"):
        return cfg.embed_bits, cfg.embed_clip_sigmas
    if group == "other":
        return 8, 0.0
    raise QuantError(f"group {group!r} is not quantized")


def quantize_model(model: nn.Module | Mapping[str, torch.Tensor], cfg: Hyperparameters,
                   hessians: Hessians | Mapping[str, torch.Tensor] | None = None, method: str = "gptq", *,
                   device: torch.device | str | None = None, progress: bool = True) -> QuantizedModel:
    """Quantize a model (or its unbanked state dict) per cfg: GPTQ or round-to-nearest codes for the block
    matrices (attn_bits / mlp_bits, k = matrix_clip_sigmas) and the embedding (embed_bits,
    k = embed_clip_sigmas); fp16 passthrough for small float tensors; int8 absmax RTN for other large ones.

    With method="gptq", `hessians` must cover every block matrix and the tied embedding (or lm_head); an
    untied input embedding has no Hessian and gets round-to-nearest.
    """
    if method not in ("gptq", "rtn"):
        raise QuantError(f"method={method!r}; use 'gptq' or 'rtn'")
    if method == "gptq" and hessians is None:
        raise QuantError("method='gptq' needs Hessians: run collect_hessians(model, cfg, train_loader) first "
                         "(or use method='rtn')")
    if isinstance(model, nn.Module):
        sd = model.unbanked_state_dict() if hasattr(model, "unbanked_state_dict") else model.state_dict()
    else:
        sd = dict(model)
    H = hessians.matrices if isinstance(hessians, Hessians) else (dict(hessians) if hessians is not None else {})
    if method == "gptq":
        missing = [n for n, t in sd.items() if tensor_group(n, t, cfg) in ("attn", "mlp", "head")
                   or (n == "tok_emb.weight" and cfg.tie_embeddings)]
        missing = [n for n in missing if n not in H]
        if missing:
            raise QuantError(f"no Hessian for {len(missing)} matrices ({', '.join(missing[:3])} ...): collect them "
                             f"from a model with the same layout as this one")
    dev = torch.device(device) if device is not None else None
    out: dict[str, QuantizedTensor] = {}
    for name in _progress(list(sd), len(sd), f"quantize ({method})", progress):
        t = sd[name].detach()
        group = tensor_group(name, t, cfg)
        shape = tuple(t.shape)
        if group == "raw":
            out[name] = QuantizedTensor(name, group, "raw", shape, t.dtype, t.cpu().clone())
            continue
        if group == "passthrough":
            out[name] = QuantizedTensor(name, group, "fp16", shape, t.dtype, t.to(torch.float16).cpu().clone())
            continue
        bits, k = _group_params(cfg, group)
        use_h = method == "gptq" and name in H
        if use_h:
            h = H[name] if dev is None else H[name].to(dev)
            q, s = gptq_quantize(t.to(h.device), h, bits, k, block_size=cfg.gptq_block_size, damp=cfg.gptq_damp)
            how = "gptq"
        else:
            q, s = rtn_quantize(t if dev is None else t.to(dev), bits, k)
            how = "rtn"
        out[name] = QuantizedTensor(name, group, "int", shape, t.dtype, q.cpu(), s.cpu(), bits, float(k), how)
    # no wall-clock times in `info`: it is stored in the artifact, whose bytes should depend on the weights only
    info: dict[str, Any] = {}
    if isinstance(hessians, Hessians):
        info.update(calibration_batches=hessians.n_batches, calibration_tokens=hessians.n_tokens,
                    calibration_source=hessians.source, hessians=len(hessians))
    return QuantizedModel(out, model_config_of(cfg), config_sha256(cfg), method, info)


def dequantize(qmodel: QuantizedModel, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Unbanked state dict in the template dtypes (int: q * s_r; fp16: cast back; raw: as stored)."""
    sd: dict[str, torch.Tensor] = {}
    for name, t in qmodel.tensors.items():
        if t.kind == "int":
            w = dequantize_rows(t.data.to(device), t.scale.to(device), t.dtype)
        elif t.kind == "fp16":
            w = t.data.to(device).to(t.dtype)
        else:
            w = t.data.to(device).clone()
        sd[name] = w.reshape(t.shape)
    return sd


def apply_quantized(model: nn.Module, qmodel: QuantizedModel) -> nn.Module:
    """Load the dequantized weights into `model` (re-banking a banked model; strict)."""
    dev = next(model.parameters()).device
    sd = dequantize(qmodel, dev)
    model.load_unbanked_state_dict(sd, strict=True)
    return model


# ================================================================================================ pruning

@dataclass
class PruneResult:
    qmodel: QuantizedModel
    pruned: int  # codes set from +-1 to 0
    candidates: int  # |q| = 1 codes that could have been pruned
    bytes_before: int  # compressed model bytes before pruning
    bytes_after: int
    code_bytes: int
    limit: int
    compressions: int  # how many times the model was compressed (each costs seconds at full size)
    seconds: float
    blob: bytes = b""  # serialize(qmodel) of the returned model

    @property
    def total_after(self) -> int:
        return self.bytes_after + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.total_after <= self.limit


def prune_candidates(qmodel: QuantizedModel, groups: tuple[str, ...] = ("attn", "mlp")
                     ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Per tensor of `groups`: (name, flat indices of |q| = 1 codes, their cost s_r^2)."""
    out = []
    for name, t in qmodel.tensors.items():
        if t.kind != "int" or t.group not in groups:
            continue
        flat = t.data.reshape(-1)
        idx = torch.nonzero(flat.abs() == 1).reshape(-1)
        if idx.numel() == 0:
            continue
        cols = t.data.shape[1]
        cost = t.scale.float()[idx // cols] ** 2
        out.append((name, idx, cost))
    return out


def _order(cands: list[tuple[str, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor id, flat index) of every candidate, cheapest first (stable: ties keep tensor/position order)."""
    if not cands:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    tid = torch.cat([torch.full_like(idx, k) for k, (_n, idx, _c) in enumerate(cands)])
    pos = torch.cat([idx for _n, idx, _c in cands])
    cost = torch.cat([c for _n, _i, c in cands])
    o = torch.argsort(cost, stable=True)
    return tid[o], pos[o]


def prune_entries(qmodel: QuantizedModel, n: int, groups: tuple[str, ...] = ("attn", "mlp")) -> QuantizedModel:
    """A copy with the n cheapest |q| = 1 codes (cost s_r^2) set to 0."""
    cands = prune_candidates(qmodel, groups)
    tid, pos = _order(cands)
    n = min(int(n), int(tid.numel()))
    out = qmodel.copy()
    for k, (name, _idx, _c) in enumerate(cands):
        sel = pos[:n][tid[:n] == k]
        if sel.numel():
            out.tensors[name].data.view(-1)[sel] = 0
    out.info["pruned_entries"] = n
    return out


def prune_to_fit(qmodel: QuantizedModel, code_bytes: int, limit: int,
                 serialize: Callable[[QuantizedModel], bytes], *, groups: tuple[str, ...] = ("attn", "mlp"),
                 log: Callable[[str], None] | None = None, max_rounds: int = 12, workers: int = 1,
                 blob: bytes | None = None) -> PruneResult:
    """Selective +-1 pruning until code_bytes + len(serialize(model)) <= limit (decimal bytes).

    The |q| = 1 codes of `groups` are ranked by the loss of zeroing them, s_r^2, and a prefix of that ranking
    is zeroed. Instead of fixed 5 % batches (#1533) or a blind binary search (#1019), the prefix length comes
    from the bytes saved per pruned code so far (a secant step, 10 % extra). A full-size brotli-11 compression
    takes a minute or more, so:

    * `blob` (= serialize(qmodel), when the caller has it) saves the first compression, and the result carries
      the compressed bytes of the model it returns (`PruneResult.blob`): no compression is repeated;
    * `workers` > 1 compresses that many prefix lengths at once (threads: brotli, lzma and zstd release the
      GIL), spread from 0.35x to 2x the secant estimate; once one fits, one more round tries `workers` lengths
      between the longest that did not fit and the shortest that did, and the shortest fitting one wins: two
      rounds, i.e. two compression times of wall clock, where the plain secant search (workers=1) usually
      needs 2-4. `max_rounds` bounds the rounds (= compressions with one worker).

    Raises QuantError when even pruning every candidate does not fit.
    """
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    say = log or (lambda _m: None)
    if limit <= 0:
        raise QuantError(f"limit={limit} must be a positive number of bytes")
    compressions = 0
    if blob is None:
        blob, compressions = serialize(qmodel), 1
    size0 = len(blob)
    cands = prune_candidates(qmodel, groups)
    n_cand = int(sum(int(i.numel()) for _n, i, _c in cands))
    if size0 + code_bytes <= limit:
        return PruneResult(qmodel, 0, n_cand, size0, size0, code_bytes, limit, compressions,
                           time.perf_counter() - t0, blob)
    target = limit - code_bytes
    if target <= 0:
        raise QuantError(f"the code alone is {code_bytes} bytes, at or over the {limit}-byte limit; no pruning helps")
    k = max(1, int(workers))
    say(f"prune: model {size0} + code {code_bytes} = {size0 + code_bytes} > {limit}; "
        f"{n_cand} candidate codes with |q| = 1; {k} compression(s) at a time")

    def attempt(n: int) -> tuple[int, QuantizedModel, bytes]:
        cand = prune_entries(qmodel, n, groups)
        return n, cand, serialize(cand)

    lo_n, lo_size = 0, size0  # the longest prefix known not to fit
    per_code = 1.0 / 6.0  # bytes saved per pruned code: first guess measured on int6 GPTQ weights
    best: tuple[int, QuantizedModel, bytes] | None = None
    refined = False
    with ThreadPoolExecutor(max_workers=k) as pool:
        for _round in range(max_rounds):
            if best is None:
                center = lo_n + (lo_size - target) / per_code * 1.1
                factors = [1.0] if k == 1 else [0.35 * (2.0 / 0.35) ** (i / (k - 1)) for i in range(k)]
                ns = [lo_n + (center - lo_n) * f for f in factors]
            elif k > 1 and not refined and best[0] - lo_n > 1:
                ns = [lo_n + (best[0] - lo_n) * (i + 1) / (k + 1) for i in range(k)]
                refined = True
            else:
                break
            hi = best[0] - 1 if best is not None else n_cand
            ns = sorted({min(hi, max(lo_n + 1, int(math.ceil(n)))) for n in ns})
            results = list(pool.map(attempt, ns))
            compressions += len(ns)
            for n, _c, b in results:
                say(f"prune: {n} codes zeroed -> model {len(b)} bytes (target <= {target})")
            fits = [r for r in results if len(r[2]) <= target]
            if fits and (best is None or fits[0][0] < best[0]):
                best = fits[0]
            below = best[0] if best is not None else n_cand + 1  # sizes are not strictly monotone in n
            fails = [r for r in results if len(r[2]) > target and lo_n < r[0] < below]
            if fails:
                n, _c, b = fails[-1]
                if lo_size - len(b) > 0:
                    per_code = (lo_size - len(b)) / (n - lo_n)
                lo_n, lo_size = n, len(b)
            if best is None and ns[-1] >= n_cand:
                break
    if best is None:
        raise QuantError(
            f"pruning {lo_n} of {n_cand} |q|=1 codes still leaves model {lo_size} + code {code_bytes} bytes over the "
            f"{limit}-byte limit; raise matrix_clip_sigmas or lower mlp_bits/attn_bits "
            f"(`golfnb artifact inspect` suggests values that fit)")
    n, cand, b = best
    return PruneResult(cand, n, n_cand, size0, len(b), code_bytes, limit, compressions, time.perf_counter() - t0, b)
