"""golfnb.distributed and the distributed optimizer paths.

The two-process tests start this file as a script twice, with the environment torchrun would set (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so `init_distributed` is exercised as in real runs. Each
rank feeds its own synthetic gradients; the parent process replays the same steps in one process with the
averaged gradients and checks the round-robin and sharded Parallel Muon paths against
it, with global-norm clipping, per-rank clipping, both collective implementations and a resume from a
gathered state dict. The same worker runs on two GPUs with NCCL when they exist (marked gpu).
"""
from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from golfnb.config import ConfigError, preset
from golfnb.distributed import (DistContext, all_reduce_max, all_reduce_sum_, barrier, broadcast_object, destroy,
                                init_distributed)
from golfnb.optim import build_optimizers, zeropower_via_newtonschulz5

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
V, D, L, KV, HID = 40, 16, 3, 8, 24  # L = 3: the MLP banks (3 slices) need padding to 4, qo/kv (6) do not


# --------------------------------------------------------------------------- single process


def test_single_process_when_torchrun_variables_are_absent():
    ctx = init_distributed("cpu", environ={})
    assert ctx == DistContext() and ctx.is_main and not ctx.enabled and ctx.world_size == 1
    ctx1 = init_distributed("cpu", environ={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert not ctx1.enabled and ctx1.world_size == 1
    # helpers are no-ops without a process group
    t = torch.arange(3.0)
    assert all_reduce_sum_(t) is t and torch.equal(t, torch.arange(3.0))
    assert all_reduce_max(2.5) == 2.5
    assert broadcast_object({"a": 1}) == {"a": 1}
    barrier()
    destroy()


def test_bad_launch_environments_are_rejected_before_any_work():
    with pytest.raises(ConfigError, match="1, 2, 4 or 8"):
        init_distributed("cpu", environ={"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="RANK"):
        init_distributed("cpu", environ={"WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="not an integer"):
        init_distributed("cpu", environ={"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="outside"):
        init_distributed("cpu", environ={"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="device_pref"):
        init_distributed("gpu", environ={})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            init_distributed("cuda", environ={})


# --------------------------------------------------------------------------- toy model and gradients


class Toy(nn.Module):
    """Parameter names and roles as golfnb.model uses them (no forward: the gradients are synthetic)."""

    def __init__(self, banked: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tok_emb = nn.Embedding(V, D).to(torch.bfloat16)
        if banked:
            self.qo_bank = nn.Parameter(torch.empty(2 * L, D, D))
            self.kv_bank = nn.Parameter(torch.empty(2 * L, KV, D))
            self.mlp_up_bank = nn.Parameter(torch.empty(L, HID, D))
            self.mlp_down_bank = nn.Parameter(torch.empty(L, D, HID))
        else:
            for i in range(L):
                for name, shape in (("c_q", (D, D)), ("c_k", (KV, D)), ("c_v", (KV, D)), ("proj", (D, D)),
                                    ("fc", (HID, D)), ("down", (D, HID))):
                    self.register_parameter(f"w{i}_{name}", nn.Parameter(torch.empty(shape)))
        self.scales = nn.Parameter(torch.ones(L, D))  # 2-D but a control tensor: role decides, not ndim
        self.gain = nn.Parameter(torch.ones(D))
        with torch.no_grad():
            for _, p in sorted(self.named_parameters()):
                p.copy_((torch.randn(p.shape, generator=g) * 0.3).to(p.dtype))

    def param_roles(self) -> dict[str, str]:
        return {n: ("matrix" if (n.endswith("_bank") or n.startswith("w")) else
                    "embed" if n == "tok_emb.weight" else "scalar") for n, _ in self.named_parameters()}


def rank_grads(model: nn.Module, rank: int, step: int) -> dict[str, torch.Tensor]:
    """Deterministic per-rank gradients; rank 1's are larger so per-rank clip factors differ."""
    out = {}
    for n, p in model.named_parameters():
        seed = zlib.crc32(f"{n}/{rank}/{step}".encode())
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * (0.05 * (1 + 2 * rank))
        out[n] = g.to(p.dtype)
    return out


def sq_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(g.float().square().sum() for g in grads))


# Newton-Schulz in float64 for the checks of the distribution logic: in bf16 the result of a batched product
# depends on the batch size on some CPUs (oneDNN/AMX kernels), and five iterations amplify that to ~1 %,
# which would hide real errors behind a loose tolerance. The update is still rounded to bf16 as in training.
NS64 = functools.partial(zeropower_via_newtonschulz5, dtype=torch.float64)
SCENARIOS = {
    # name: (banked, cfg overrides, bundle kwargs)
    "rr_global": (False, dict(grad_clip_norm=0.5, grad_clip_mode="global"), dict(ns_fn=NS64)),
    "bank_global_fallback": (True, dict(grad_clip_norm=0.5, grad_clip_mode="global"),
                             dict(native_collectives=False, ns_fn=NS64)),
    "bank_global_native": (True, dict(grad_clip_norm=0.5, grad_clip_mode="global"),
                           dict(native_collectives=True, ns_fn=NS64)),
    "bank_per_rank": (True, dict(grad_clip_norm=0.5, grad_clip_mode="per_rank"), dict(ns_fn=NS64)),
    "rr_per_rank": (False, dict(grad_clip_norm=0.5, grad_clip_mode="per_rank"), dict(ns_fn=NS64)),
    # the training defaults (bf16 Newton-Schulz) with bf16 bank communication: a loose check only
    "bank_bf16_comm": (True, dict(grad_clip_norm=0.0), dict(bank_comm_dtype=torch.bfloat16)),
}
LOOSE = {"bank_bf16_comm"}
STEPS = 3


def make_cfg(banked: bool, **kw):
    base = dict(bank_params=banked, matrix_lr=0.03, scalar_lr=0.02, tied_embed_lr=0.05, muon_wd=0.05,
                embed_wd=0.04, adam_wd=0.02, muon_momentum=0.95, muon_momentum_warmup_start=0.85,
                muon_momentum_warmup_steps=2, compile_mode="none", device="cpu")
    base.update(kw)
    return preset("smoke", **base)


def lr_at(step: int) -> float:
    return 1.0 - 0.2 * step


def reference_run(name: str, steps: range = range(STEPS), model: nn.Module | None = None,
                  opt_state: dict | None = None, device: str = "cpu"):
    """One process, gradients averaged by hand; per-rank clipping also done by hand."""
    banked, over, kw = SCENARIOS[name]
    cfg = make_cfg(banked, **over)
    per_rank = cfg.grad_clip_mode == "per_rank" and cfg.grad_clip_norm > 0
    if per_rank:
        cfg = cfg.replace(grad_clip_norm=0.0)  # done by hand below, before averaging
    model = (model or Toy(banked)).to(device)
    bundle = build_optimizers(model, cfg, ns_fn=kw.get("ns_fn"))
    if opt_state is not None:
        bundle.load_state_dict(opt_state)
    for s in steps:
        per = [rank_grads(model, r, s) for r in range(WORLD)]
        if per_rank:
            for gr in per:
                coef = (over["grad_clip_norm"] / (sq_norm(list(gr.values())) + 1e-6)).clamp(max=1.0)
                for g in gr.values():
                    g.mul_(coef)
        for n, p in model.named_parameters():
            p.grad = (per[0][n] + per[1][n]).div_(WORLD).to(device)
        bundle.step(s, lr_at(s))
        bundle.zero_grad()
    return model, bundle


# --------------------------------------------------------------------------- the worker (one per rank)


def worker_main(out_dir: str, device_pref: str) -> None:
    ctx = init_distributed(device_pref)
    assert ctx.enabled and ctx.world_size == WORLD
    dev = ctx.device
    results: dict = {"checks": {
        "max": all_reduce_max(float(ctx.rank)),
        "bcast": broadcast_object({"from": ctx.rank}),
        "sum": all_reduce_sum_(torch.full((2,), float(ctx.rank + 1), device=dev)).cpu(),
    }}
    barrier()

    def run(name: str, model: nn.Module, steps: range, opt_state: dict | None = None):
        banked, over, kw = SCENARIOS[name]
        bundle = build_optimizers(model, make_cfg(banked, **over), ctx, **kw)
        if opt_state is not None:
            bundle.load_state_dict(opt_state)
        for s in steps:
            for n, g in rank_grads(model, ctx.rank, s).items():
                model.get_parameter(n).grad = g.to(dev)
            bundle.step(s, lr_at(s))
            bundle.zero_grad()
        return bundle

    def cpu(d: dict) -> dict:
        return {k: v.detach().cpu().clone() for k, v in d.items()}

    for name, (banked, _, _) in SCENARIOS.items():
        model = Toy(banked).to(dev)
        bundle = run(name, model, range(STEPS))
        results[name] = {"params": cpu(dict(model.named_parameters())),
                         "momentum": cpu(bundle.state_dict()["muon_momentum"])}

    # Resume from a gathered (world-size independent) state dict, sharded path: bit-identical continuation.
    m1 = Toy(True).to(dev)
    b1 = run("bank_global_native", m1, range(2))
    ck_model = {k: v.clone() for k, v in m1.state_dict().items()}
    ck_opt = b1.state_dict()
    for s in range(2, 4):
        for n, g in rank_grads(m1, ctx.rank, s).items():
            m1.get_parameter(n).grad = g.to(dev)
        b1.step(s, lr_at(s))
        b1.zero_grad()
    m2 = Toy(True).to(dev)
    m2.load_state_dict(ck_model)
    run("bank_global_native", m2, range(2, 4), opt_state=ck_opt)
    results["resume"] = {"continuous": cpu(dict(m1.named_parameters())),
                         "resumed": cpu(dict(m2.named_parameters())),
                         "ck_opt": ck_opt,
                         "ck_model": cpu(ck_model)}

    # Compile warm-up restore: a step-0 snapshot must clear the momentum shards.
    m3 = Toy(True).to(dev)
    b3 = build_optimizers(m3, make_cfg(True), ctx)
    snap = b3.state_dict()
    for n, g in rank_grads(m3, ctx.rank, 0).items():
        m3.get_parameter(n).grad = g.to(dev)
    b3.step(0, 1.0)
    dirty = max(float(t.abs().max()) for t in b3.state_dict()["muon_momentum"].values())
    b3.load_state_dict(snap)
    clean = max(float(t.abs().max()) for t in b3.state_dict()["muon_momentum"].values())
    results["restore"] = {"dirty": dirty, "clean": clean,
                          "local_shard_max": max(float(st["momentum_buffer"].abs().max())
                                                 for st in b3.parallel.state.values())}

    torch.save(results, Path(out_dir) / f"rank{ctx.rank}.pt")
    destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, device_pref: str) -> list[dict]:
    port = _free_port()
    procs = []
    for r in range(WORLD):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        if device_pref == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(tmp_path), device_pref], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-4000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in range(WORLD)]


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    # bf16 master weights (the tied embedding) round every update to 8 bits, so an fp32 input to the update
    # that differs in its last bit (another reduction order, CPU vs GPU norm) can leave them a rounding step
    # or two apart after a few steps: they get a band of 4 ulps. A wrong lr or weight decay moves them by
    # ~lr = 0.05 per step, far outside it.
    atol, rtol = (max(tol, 2.0 ** -9), max(tol, 2.0 ** -5)) if got.dtype == torch.bfloat16 else (tol, tol)
    diff = float((got.float() - want.float()).abs().max())
    assert torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol), f"{what}: max |diff| {diff:.3g}"


def _check(results: list[dict], device: str) -> None:
    # The workers run single-threaded (OMP_NUM_THREADS=1); so does the reference, so that CPU kernels match.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_results(results, device)
    finally:
        torch.set_num_threads(threads)


def _check_results(results: list[dict], device: str) -> None:
    """Parameters within 1e-4 (a bf16 rounding flip of one update element moves a parameter by ~3e-5;
    real mistakes such as a missed weight decay or a wrong clip factor move them by 1e-3 and more),
    momentum within 1e-5, replicas bit-identical, resume bit-identical."""
    r0, r1 = results
    assert r0["checks"]["max"] == 1.0 and r1["checks"]["max"] == 1.0
    assert r0["checks"]["bcast"] == {"from": 0} and r1["checks"]["bcast"] == {"from": 0}
    assert torch.equal(r0["checks"]["sum"], torch.full((2,), 3.0))

    for name in SCENARIOS:
        # replicas stay identical
        for k in r0[name]["params"]:
            assert torch.equal(r0[name]["params"][k], r1[name]["params"][k]), (name, k)
        for k in r0[name]["momentum"]:
            assert torch.equal(r0[name]["momentum"][k], r1[name]["momentum"][k]), (name, k)
        model, bundle = reference_run(name, device=device)
        loose = name in LOOSE  # bf16 Newton-Schulz and bf16 gradient communication: rounding differs
        moved = 0.0
        init = Toy(SCENARIOS[name][0])
        for n, p in model.named_parameters():
            want = p.detach().cpu()
            _close(r0[name]["params"][n], want, 5e-3 if loose else 1e-4, f"{name}: {n}")
            moved = max(moved, float((want.float() - init.get_parameter(n).detach().float()).abs().max()))
        assert moved > 1e-3  # the steps did something
        ref_mom = {k: v.cpu() for k, v in bundle.state_dict()["muon_momentum"].items()}
        assert ref_mom.keys() == r0[name]["momentum"].keys()
        for k in ref_mom:
            _close(r0[name]["momentum"][k], ref_mom[k], 2e-2 if loose else 1e-5, f"{name}: momentum {k}")

    # resume across processes is bit-identical; the gathered state also resumes a single process
    res = r0["resume"]
    for k in res["continuous"]:
        assert torch.equal(res["continuous"][k], res["resumed"][k]), k
    m = Toy(True)
    m.load_state_dict(res["ck_model"])
    m, _ = reference_run("bank_global_native", range(2, 4), model=m, opt_state=res["ck_opt"], device=device)
    for n, p in m.named_parameters():
        _close(res["continuous"][n], p.detach().cpu(), 1e-4, f"resumed in one process: {n}")

    for r in results:
        assert r["restore"]["dirty"] > 0 and r["restore"]["clean"] == 0.0 and r["restore"]["local_shard_max"] == 0.0


def test_two_gloo_processes_match_one_process(tmp_path):
    results = _launch(tmp_path, "cpu")
    _check(results, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_nccl_processes_match_one_process(tmp_path):
    # the reference runs on cuda:0 too, so fused AdamW and cuBLAS are on both sides
    results = _launch(tmp_path, "cuda")
    _check(results, "cuda")


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "--worker":
    worker_main(sys.argv[2], sys.argv[3])
