"""The GPT of the record stacks, every technique a config switch.

One module covers the SP8192 stacks (#1394 ... #1533) and the older sp1024 stacks (#549 ... #1217):

- GQA attention with QK-norm, partial RoPE (first `rope_dims` of each head, rotate-half layout, NTK rescale
  only above `rope_reference_len`), a learnable per-head QK-gain (an inverse temperature, since q and k are
  RMS-normalised), XSA on the last `xsa_last_n` layers (arXiv:2603.09078; GQA form credited to #265).
- LeakyReLU(0.5)^2 MLP (#493/#518) or relu^2.
- Layerwise LN scale 1/sqrt(i+1) on block inputs (#315), belonging to the physical layer.
- U-Net skips popped LIFO by decoder step, with sigmoid skip gates (#289/#1172) and resid_mix against x0.
- Depth recurrence (#1204/#1394): the layer range loop_start..loop_end runs num_loops+1 times once
  `looping_active` is set; skip parameters are indexed by decoder step, as the records do.
- Parallel residuals in all three forms the records use: ``two_lane`` (#1477/#1533, two lanes and
  a learned scalar merge), ``gptj`` (#1493/#1514, one lane, attention and MLP read the same input) and
  ``routed`` (#1204/#1530, two lanes with learned 2x2 routing and lane decay).
- Parameter banking (#399): the matrices of one role stacked into one 3-D parameter so Newton-Schulz runs as
  one batched product and Parallel Muon can shard the leading axis. `unbanked_state_dict` /
  `load_unbanked_state_dict` convert to and from the per-layer names, so quantization and the artifact never
  see banks.
- Side-stack pieces of #1060/#1176/#1217: BigramHash embedding (#162), SmearGate (#65), value embeddings.
- Tied embeddings with a logit soft-cap 30*tanh(z/30), cross-entropy on fp32 logits.

Precision follows the records: block matrices, banks and control tensors keep fp32 master
weights and run under bf16 autocast on CUDA; the tied token embedding keeps *bf16* master weights when
`embed_bf16` is set (every SP8192 record does this: it is an nn.Embedding, not a cast linear). On CPU the model
runs in fp32 so tests are exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from golfnb.attention import attention
from golfnb.config import ConfigError, Hyperparameters
from golfnb.fused_ce import head_softcap_ce
from golfnb.fused_mlp import fused_mlp

__all__ = ["GPT", "build_model", "count_parameters", "MATRIX_SUFFIXES", "apply_rotary", "xsa_project"]

# per-layer matrix names, in the order the banks stack them
MATRIX_SUFFIXES = ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight",
                   "mlp.fc.weight", "mlp.proj.weight")


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],))


class CastedLinear(nn.Linear):
    """A bias-free linear with fp32 master weights, computed in the activation dtype.

    A module (not a bare F.linear) so quantization can hook its input to collect Hessians.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class HeadInput(nn.Identity):
    """Marks the input of the logit matmul (the final-norm output) for the embedding's GPTQ Hessian."""


# ------------------------------------------------------------------------------------------------ rotary

class Rotary(nn.Module):
    """cos/sin tables for partial RoPE.

    Tables for lengths up to the reference length are slices of one precomputed buffer (so compiled graphs
    see plain tensors); above it the NTK-style rescale base' = base*(T/ref)^(rd/(rd-2)) applies to the whole
    sequence, as in the #549 lineage whose Rotary was wired to 1024 while training at 2048.
    """

    def __init__(self, rotary_dims: int, base: float, reference_len: int, max_len: int):
        super().__init__()
        self.rotary_dims = rotary_dims
        self.base = base
        self.reference_len = reference_len
        cos, sin = self._tables(min(max_len, reference_len), base, torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, seq_len: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rd = self.rotary_dims
        inv = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float64, device=device) / rd))
        ang = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv)
        return ang.cos().float()[None, :, None, :], ang.sin().float()[None, :, None, :]

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len <= self.cos.shape[1]:
            return self.cos[:, :seq_len].to(dtype), self.sin[:, :seq_len].to(dtype)
        rd = self.rotary_dims
        base = self.base
        if seq_len > self.reference_len and rd > 2:
            base = base * (seq_len / self.reference_len) ** (rd / (rd - 2))
        cos, sin = self._tables(seq_len, base, device)
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2*cos.shape[-1] dims of each head (rotate-half layout); the rest pass through."""
    half = cos.shape[-1]
    rd = 2 * half
    x1, x2, rest = x[..., :half], x[..., half:rd], x[..., rd:]
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return torch.cat((y1, y2, rest), dim=-1)


def xsa_project(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exclusive self-attention: remove from each head's output its component along the token's own value.

    y [B,T,H,D], v [B,T,Hk,D]; query head h pairs with KV head h // (H/Hk). Viewed as [B,T,Hk,G,D] so the unit
    value vector broadcasts over the group without a repeat.
    """
    B, T, H, D = y.shape
    Hk = v.shape[2]
    yg = y.view(B, T, Hk, H // Hk, D)
    vhat = F.normalize(v.float(), dim=-1).to(y.dtype).unsqueeze(3)  # [B,T,Hk,1,D]
    coef = (yg * vhat).sum(dim=-1, keepdim=True)
    return (yg - coef * vhat).view(B, T, H, D)


# ------------------------------------------------------------------------------------------------ layers

@dataclass
class LayerWeights:
    """The six matrices of one layer, passed in from the banks (None in the unbanked model)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


class Attention(nn.Module):
    def __init__(self, cfg: Hyperparameters, banked: bool):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        if not banked:
            d, kv = cfg.model_dim, cfg.kv_dim
            self.c_q = CastedLinear(d, d)
            self.c_k = CastedLinear(d, kv)
            self.c_v = CastedLinear(d, kv)
            self.proj = CastedLinear(d, d)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), float(cfg.qk_gain_init)))
        self.merged = cfg.merge_qkv  # one q/k/v GEMM while training (Hyperparameters.merge_qkv)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], xsa: bool, backend: str,
                w: LayerWeights | None, v_extra: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hk, D = self.num_heads, self.num_kv_heads, self.head_dim
        if self.merged and torch.is_grad_enabled():
            wq, wk, wv = (self.c_q.weight, self.c_k.weight, self.c_v.weight) if w is None else (w.q, w.k, w.v)
            qkv = F.linear(x, torch.cat((wq, wk, wv)).to(x.dtype))
            q, k, v = qkv.split((H * D, Hk * D, Hk * D), dim=-1)
        elif w is None:
            q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        else:
            q, k, v = (F.linear(x, t.to(x.dtype)) for t in (w.q, w.k, w.v))
        if v_extra is not None:
            v = v + v_extra.to(v.dtype)
        q = rms_norm(q.view(B, T, H, D))
        k = rms_norm(k.view(B, T, Hk, D))
        v = v.view(B, T, Hk, D)
        cos, sin = rope
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype).view(1, 1, H, 1)
        y = attention(q, k, v, causal=True, backend=backend)
        if xsa:
            y = xsa_project(y, v)
        y = y.reshape(B, T, H * D)
        return self.proj(y) if w is None else F.linear(y, w.o.to(y.dtype))


class MLP(nn.Module):
    def __init__(self, cfg: Hyperparameters, banked: bool):
        super().__init__()
        self.leaky = cfg.mlp_activation == "leaky_relu2"
        self.slope = cfg.leaky_relu_slope
        self.fused = False  # GPT.set_mlp_backend("triton")
        if not banked:
            self.fc = CastedLinear(cfg.model_dim, cfg.mlp_hidden)
            self.proj = CastedLinear(cfg.mlp_hidden, cfg.model_dim)

    def forward(self, x: torch.Tensor, w: LayerWeights | None) -> torch.Tensor:
        if self.fused and torch.is_grad_enabled():
            # activation inside the GEMMs (golfnb.fused_mlp); without autograd (evals, GPTQ's input hooks on
            # fc and proj) the plain path below runs
            up, down = (self.fc.weight, self.proj.weight) if w is None else (w.up, w.down)
            return fused_mlp(x, up.to(x.dtype), down.to(x.dtype), self.slope if self.leaky else 0.0)
        u = self.fc(x) if w is None else F.linear(x, w.up.to(x.dtype))
        u = F.leaky_relu(u, self.slope) if self.leaky else F.relu(u)
        u = u.square()
        return self.proj(u) if w is None else F.linear(u, w.down.to(u.dtype))


class Block(nn.Module):
    def __init__(self, cfg: Hyperparameters, index: int, banked: bool):
        super().__init__()
        d = cfg.model_dim
        self.index = index
        self.ln = (1.0 / math.sqrt(index + 1)) if cfg.ln_scale else 1.0
        self.xsa = index >= cfg.num_layers - cfg.xsa_last_n
        self.attn = Attention(cfg, banked)
        self.mlp = MLP(cfg, banked)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))
        self.ve_scale = nn.Parameter(torch.ones(1)) if index in cfg.ve_layers else None

    def mix(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        m = self.resid_mix.to(x.dtype)
        return m[0] * x + m[1] * x0

    def attn_out(self, x_in: torch.Tensor, ctx: "_Ctx", w: LayerWeights | None) -> torch.Tensor:
        v_extra = None
        if self.ve_scale is not None and ctx.ve is not None:
            v_extra = ctx.ve * self.ve_scale.to(ctx.ve.dtype)
        a = self.attn(rms_norm(x_in) * self.ln, ctx.rope, self.xsa, ctx.backend, w, v_extra)
        return self.attn_scale.to(a.dtype) * a

    def mlp_out(self, x_in: torch.Tensor, w: LayerWeights | None) -> torch.Tensor:
        f = self.mlp(rms_norm(x_in) * self.ln, w)
        return self.mlp_scale.to(f.dtype) * f

    def forward(self, x: torch.Tensor, x0: torch.Tensor, ctx: "_Ctx", w: LayerWeights | None,
                parallel: bool) -> torch.Tensor:
        x_in = self.mix(x, x0)
        a = self.attn_out(x_in, ctx, w)
        if parallel:  # GPT-J: attention and MLP read the same input (#1514's variant)
            return x_in + a + self.mlp_out(x_in, w)
        u = x_in + a
        return u + self.mlp_out(u, w)


@dataclass
class _Ctx:
    rope: tuple[torch.Tensor, torch.Tensor]
    backend: str
    ve: torch.Tensor | None


class BigramHash(nn.Module):
    """Hashed (previous, current) token-pair embedding (#162; sizes of #1060/#1176), zero-initialised."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.table = nn.Parameter(torch.zeros(buckets, dim))
        self.proj = nn.Parameter(torch.zeros(model_dim, dim)) if dim != model_dim else None
        self.scale = nn.Parameter(torch.tensor(0.05))

    def bucket_ids(self, ids: torch.Tensor) -> torch.Tensor:
        cur = ids.to(torch.int32)
        prev = torch.zeros_like(cur)
        prev[:, 1:] = cur[:, :-1]
        h = torch.bitwise_xor(cur * 36313, prev * 27191) % (self.buckets - 1)
        h[:, 0] = self.buckets - 1  # position 0 has no previous token inside the window
        return h.long()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = F.embedding(self.bucket_ids(ids), self.table)
        if self.proj is not None:
            e = F.linear(e, self.proj)
        return self.scale * e


class ValueEmbedding(nn.Module):
    """Shared token -> value-vector table added to v in chosen layers (#549/#1176 VE128)."""

    def __init__(self, vocab: int, dim: int, kv_dim: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, dim) * 0.01)
        self.proj = nn.Parameter(torch.zeros(kv_dim, dim))
        self.scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.embedding(ids, self.table), self.proj)


# ------------------------------------------------------------------------------------------------ GPT

class GPT(nn.Module):
    def __init__(self, cfg: Hyperparameters):
        super().__init__()
        self.cfg = cfg
        L, d, V = cfg.num_layers, cfg.model_dim, cfg.vocab_size
        self.banked = cfg.bank_params
        self.looping_active = False
        self.attn_backend = "sdpa"
        self.ce_backend = "torch"
        self.mlp_backend = "torch"
        self.par_mode = cfg.parallel_residual
        self.par_start = cfg.parallel_start_layer
        self._check_parallel_layout()

        self.tok_emb = nn.Embedding(V, d)
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(d, V)
        self.bigram = BigramHash(cfg.bigram_vocab_size, cfg.bigram_dim, d) if cfg.bigram_vocab_size else None
        self.smear = nn.Parameter(torch.zeros(d)) if cfg.smear_gate else None
        self.ve = ValueEmbedding(V, cfg.ve_dim, cfg.kv_dim) if (cfg.ve_dim and cfg.ve_layers) else None
        self.blocks = nn.ModuleList(Block(cfg, i, self.banked) for i in range(L))
        n_skip = cfg.num_skips
        self.skip_weights = nn.Parameter(torch.ones(n_skip, d))
        self.skip_gates = nn.Parameter(torch.zeros(n_skip, d)) if cfg.skip_gates_enabled else None
        self.lane_merge = nn.Parameter(torch.tensor(0.5)) if self.par_mode == "two_lane" else None
        if self.par_mode == "routed":
            self.parallel_post_lambdas = nn.Parameter(torch.ones(L, 2, 2))
            self.parallel_resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1))
        if self.banked:
            kv, hid = cfg.kv_dim, cfg.mlp_hidden
            self.qo_bank = nn.Parameter(torch.empty(2 * L, d, d))
            self.kv_bank = nn.Parameter(torch.empty(2 * L, kv, d))
            self.mlp_up_bank = nn.Parameter(torch.empty(L, hid, d))
            self.mlp_down_bank = nn.Parameter(torch.empty(L, d, hid))
        self.rotary = Rotary(cfg.rotary_dims, cfg.rope_base, cfg.rope_reference_len,
                             max(cfg.train_seq_len, cfg.eval_seq_len))
        self.head_in = HeadInput()
        self.reset_parameters()
        if cfg.embed_bf16:
            self.tok_emb.weight.data = self.tok_emb.weight.data.to(torch.bfloat16)

    # ----------------------------------------------------------------------------------------- set-up
    def _check_parallel_layout(self) -> None:
        """Two-lane variants split once and never merge back: no decoder step after the split may be sequential."""
        if self.par_mode not in ("two_lane", "routed"):
            return
        for looping in (False, True):
            if looping and not self.cfg.num_loops:
                continue
            _, dec = self.cfg.encoder_decoder(looping)
            split = False
            for i in dec:
                if i >= self.par_start:
                    split = True
                elif split:
                    raise ConfigError(
                        f"parallel_residual={self.par_mode} from layer {self.par_start} would run layer {i} "
                        f"sequentially after the lanes split (decoder order {dec}); raise parallel_start_layer "
                        f"above loop_end={self.cfg.loop_end} or use parallel_residual=gptj")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Init of the records: tok_emb ~ N(0, std^2); orthogonal for matrices with both dims >= 64 (q, k, v, up);
        zero for the output projections (o, down); control tensors at their neutral values."""
        cfg = self.cfg
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.weight)

        def init_in(w: torch.Tensor) -> None:
            if min(w.shape[-2:]) >= 64:
                nn.init.orthogonal_(w)
            else:
                bound = 1.0 / math.sqrt(w.shape[-1])
                nn.init.uniform_(w, -bound, bound)

        if self.banked:
            L = cfg.num_layers
            for i in range(L):
                init_in(self.qo_bank[i])
                self.qo_bank[L + i].zero_()
                init_in(self.kv_bank[i])
                init_in(self.kv_bank[L + i])
                init_in(self.mlp_up_bank[i])
                self.mlp_down_bank[i].zero_()
        else:
            for b in self.blocks:
                init_in(b.attn.c_q.weight)
                init_in(b.attn.c_k.weight)
                init_in(b.attn.c_v.weight)
                b.attn.proj.weight.zero_()
                init_in(b.mlp.fc.weight)
                b.mlp.proj.weight.zero_()

    def set_attn_backend(self, backend: str) -> None:
        self.attn_backend = backend

    def set_ce_backend(self, backend: str) -> None:
        """`torch` or `triton` (golfnb.fused_ce.resolve_ce_backend turns a config value into one of these)."""
        if backend not in ("torch", "triton"):
            raise ValueError(f"ce_backend {backend!r}: resolve it with golfnb.fused_ce.resolve_ce_backend first")
        self.ce_backend = backend

    def set_mlp_backend(self, backend: str) -> None:
        """`torch` or `triton` (golfnb.fused_mlp.resolve_mlp_backend turns a config value into one of these)."""
        if backend not in ("torch", "triton"):
            raise ValueError(f"mlp_backend {backend!r}: resolve it with golfnb.fused_mlp.resolve_mlp_backend first")
        self.mlp_backend = backend
        for b in self.blocks:
            b.mlp.fused = backend == "triton"

    def param_roles(self) -> dict[str, str]:
        """Optimizer role of every parameter: matrix (Muon), embed, head, or scalar (AdamW groups)."""
        roles = {}
        for name, p in self.named_parameters():
            if name.endswith("_bank") or (name.startswith("blocks.") and p.ndim == 2
                                          and name.split(".", 2)[2] in MATRIX_SUFFIXES):
                roles[name] = "matrix"
            elif name in ("tok_emb.weight", "bigram.table", "ve.table"):
                roles[name] = "embed"
            elif name == "lm_head.weight":
                roles[name] = "head"
            else:
                roles[name] = "scalar"
        return roles

    # ----------------------------------------------------------------------------------------- banks
    def _layer_weights(self, i: int) -> LayerWeights | None:
        if not self.banked:
            return None
        L = self.cfg.num_layers
        return LayerWeights(self.qo_bank[i], self.kv_bank[i], self.kv_bank[L + i], self.qo_bank[L + i],
                            self.mlp_up_bank[i], self.mlp_down_bank[i])

    def unbanked_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict under the per-layer names (`blocks.i.attn.c_q.weight`, ...), banked or not."""
        sd = {k: v.detach() for k, v in self.state_dict().items()}
        if not self.banked:
            return sd
        L = self.cfg.num_layers
        banks = {n: sd.pop(n) for n in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")}
        for i in range(L):
            parts = (banks["qo_bank"][i], banks["kv_bank"][i], banks["kv_bank"][L + i], banks["qo_bank"][L + i],
                     banks["mlp_up_bank"][i], banks["mlp_down_bank"][i])
            for suf, t in zip(MATRIX_SUFFIXES, parts):
                sd[f"blocks.{i}.{suf}"] = t.clone()
        return sd

    def load_unbanked_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Inverse of `unbanked_state_dict` (re-banks when this model is banked)."""
        if not self.banked:
            self.load_state_dict(sd, strict=strict)
            return
        sd = dict(sd)
        L = self.cfg.num_layers
        per = {suf: [sd.pop(f"blocks.{i}.{suf}") for i in range(L)] for suf in MATRIX_SUFFIXES}
        sd["qo_bank"] = torch.stack(per["attn.c_q.weight"] + per["attn.proj.weight"])
        sd["kv_bank"] = torch.stack(per["attn.c_k.weight"] + per["attn.c_v.weight"])
        sd["mlp_up_bank"] = torch.stack(per["mlp.fc.weight"])
        sd["mlp_down_bank"] = torch.stack(per["mlp.proj.weight"])
        self.load_state_dict(sd, strict=strict)

    # ----------------------------------------------------------------------------------------- forward
    def _skip(self, x: torch.Tensor, k: int, skip: torch.Tensor) -> torch.Tensor:
        s = self.skip_weights[k].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + s
        g = torch.sigmoid(self.skip_gates[k].to(x.dtype))
        return torch.lerp(s, x, g)  # g*x + (1-g)*s

    def _embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = self.tok_emb(ids).to(dtype)
        if self.bigram is not None:
            x = x + self.bigram(ids).to(dtype)
        x = rms_norm(x)
        if self.smear is not None:
            g = torch.sigmoid(self.smear.to(dtype))
            prev = F.pad(x[:, :-1], (0, 0, 1, 0))
            x = (1 - g) * x + g * prev
        return x

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Everything up to and including the final RMSNorm: [B, T, d] (the SLOT split point)."""
        dtype = torch.bfloat16 if (ids.is_cuda and torch.is_autocast_enabled("cuda")) else torch.float32
        B, T = ids.shape
        x = self._embed(ids, dtype)
        x0 = x
        ctx = _Ctx(rope=self.rotary(T, ids.device, dtype), backend=self.attn_backend,
                   ve=self.ve(ids).to(dtype) if self.ve is not None else None)
        enc, dec = self.cfg.encoder_decoder(self.looping_active)
        n_skip = min(len(enc), len(dec))
        gptj = self.par_mode == "gptj"
        skips: list[torch.Tensor] = []
        for i in enc:
            x = self.blocks[i](x, x0, ctx, self._layer_weights(i), gptj and i >= self.par_start)
            skips.append(x)
        lanes: list[torch.Tensor] | None = None
        for k, i in enumerate(dec):
            block = self.blocks[i]
            w = self._layer_weights(i)
            skip = skips.pop() if k < n_skip else None
            split_now = self.par_mode in ("two_lane", "routed") and i >= self.par_start
            if lanes is None and not split_now:
                if skip is not None:
                    x = self._skip(x, k, skip)
                x = block(x, x0, ctx, w, gptj and i >= self.par_start)
                continue
            if lanes is None:
                if skip is not None:
                    x = self._skip(x, k, skip)
                lanes = [x, x]
            elif skip is not None:
                lanes[0] = self._skip(lanes[0], k, skip)  # skips enter the attention lane only
            if self.par_mode == "two_lane":
                l0_in = block.mix(lanes[0], x0)
                lanes[0] = l0_in + block.attn_out(l0_in, ctx, w)
                lanes[1] = lanes[1] + block.mlp_out(lanes[1], w)
            else:  # routed: both outputs written to both lanes with learned weights
                a = block.attn_out(block.mix(lanes[0], x0), ctx, w)
                f = block.mlp_out(lanes[1], w)
                P = self.parallel_post_lambdas[i].to(a.dtype)
                r = self.parallel_resid_lambdas[i].to(a.dtype)
                lanes = [r[0] * lanes[0] + P[0, 0] * a + P[1, 0] * f,
                         r[1] * lanes[1] + P[0, 1] * a + P[1, 1] * f]
        if lanes is not None:
            if self.par_mode == "two_lane":
                lam = self.lane_merge.to(lanes[0].dtype)
                x = lam * lanes[0] + (1 - lam) * lanes[1]
            else:
                x = 0.5 * (lanes[0] + lanes[1])
        return rms_norm(x)

    def head_weight(self) -> torch.Tensor:
        """The output projection [V, d]: the tied embedding unless the model has its own head."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def logits_from_hidden(self, h: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Soft-capped fp32 logits 30*tanh(z/30) from final-norm states (plus an optional pre-cap bias)."""
        h = self.head_in(h)
        z = F.linear(h, self.head_weight().to(h.dtype)).float()
        if bias is not None:
            z = z + bias
        c = self.cfg.logit_softcap
        return c * torch.tanh(z / c) if c > 0 else z

    def forward_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logits_from_hidden(self.hidden(ids))

    def nll(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token negative log-likelihood in nats, fp32, shape of `targets`."""
        logits = self.forward_logits(ids)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1),
                               reduction="none").view(targets.shape)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy when targets are given, else the logits."""
        if targets is None:
            return self.forward_logits(ids)
        if self.ce_backend == "triton":
            # head GEMM + soft-capped CE in one custom op: the fp32 logits are never materialised
            h = self.head_in(self.hidden(ids))
            return head_softcap_ce(h.reshape(-1, h.shape[-1]), self.head_weight().to(h.dtype), targets.reshape(-1),
                                   self.cfg.logit_softcap).mean()
        logits = self.forward_logits(ids)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def build_model(cfg: Hyperparameters, device: torch.device | str = "cpu") -> GPT:
    """Construct on `device` with a fixed seed (model init depends only on cfg.seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = GPT(cfg)
    return model.to(device)


def flops_per_token(cfg: Hyperparameters, looping: bool, seq_len: int | None = None) -> float:
    """Model FLOPs per trained token, forward + backward: 6 x matmul parameters touched + causal attention.

    Attention per layer: QK^T and AV are 2*T*d multiply-adds each per token, halved by the causal mask,
    times 3 for forward + backward = 6*T*d. For pr1514 this gives ~284 MFLOP before recurrence and ~426
    after, the figures of the reference measurements.
    """
    T = seq_len or cfg.train_seq_len
    d, kv, hid = cfg.model_dim, cfg.kv_dim, cfg.mlp_hidden
    per_layer = 6 * (2 * d * d + 2 * kv * d + 2 * hid * d) + 6 * T * d
    n_virtual = len(cfg.layer_sequence(looping))
    head = 6 * d * cfg.vocab_size
    return float(n_virtual * per_layer + head)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def matrix_names(cfg: Hyperparameters) -> Iterable[str]:
    """Per-layer matrix names in the unbanked layout, in bank order."""
    for i in range(cfg.num_layers):
        for suf in MATRIX_SUFFIXES:
            yield f"blocks.{i}.{suf}"
