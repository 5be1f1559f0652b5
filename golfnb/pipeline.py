"""The submission, end to end, and the pieces a notebook calls one at a time.

`run_submission(cfg, code_path)` is what the packed train_gpt.py runs (one process or under torchrun):

1. train (golfnb.train: prepare, warm-up, the clocked loop, EMA, final_model.pt);
2. GPTQ calibration on *training* batches (a fresh train loader: the first gptq_calibration_batches batches
   of this rank, as in #1394) inside the time reserve the loop left (gptq_reserve_seconds), reported next
   to the train time; then GPTQ + SDClip quantization;
3. serialization to golfnb's artifact, with selective +-1 pruning if code + model would exceed the cap;
4. the artifact is read back from the file (every rank), dequantized into a fresh model, and that
   round-tripped model is what every eval method scores (golfnb.evals.run_evals);
5. the challenge's byte accounting and `final_<method>_exact` lines are printed.

Only rank 0 calibrates, quantizes and writes (the records had every rank compute its own Hessians and
wrote rank 0's; the result is the same). Code bytes are the size of the file that is running
(`__file__` of the wrapper), so what is printed is what the challenge counts.

Notebook pieces: `calibrate`, `quantize_and_serialize`, `quantize_run(run_dir)` (a trained run ->
`<run_dir>/artifacts/model.gnb` + metrics), `load_quantized(run_dir)`.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from golfnb.config import ConfigError, Hyperparameters

__all__ = ["SubmissionTooLarge", "ARTIFACT_RELPATH", "SUBMISSION_ARTIFACT", "calibrate", "QuantOutcome",
           "quantize_and_serialize", "quantize_run", "load_quantized", "run_submission", "submission_main",
           "byte_accounting_lines"]

ARTIFACT_RELPATH = Path("artifacts") / "model.gnb"  # inside a run directory (git-ignored)
SUBMISSION_ARTIFACT = "final_model.gnb"  # next to train_gpt.py in a submission run


class SubmissionTooLarge(RuntimeError):
    """Code + compressed model exceeds bytes_limit; the message has the numbers and the way out."""


def _say(log: Any) -> Callable[[str], None]:
    if log is None:
        return print
    return log.log if hasattr(log, "log") else log


# ================================================================================================ pieces

def calibrate(model: torch.nn.Module, cfg: Hyperparameters, *, rank: int = 0, world_size: int = 1,
              device: torch.device | str | None = None, progress: bool = True, log: Any = None):
    """Hessians for GPTQ from cfg.gptq_calibration: "train" = the first gptq_calibration_batches batches of a
    fresh train loader (train shards only); "autoregressive" = gptq_calibration_batches sequences of
    train_seq_len tokens sampled by the model itself (#1019: 64 x 2048, temperature 0.8, batches of 8; no
    data is read, so the generation time is outside the training budget)."""
    from golfnb.quant import collect_hessians, generate_calibration_tokens

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    say = _say(log)
    if cfg.gptq_calibration == "train":
        from golfnb.data.loaders import make_train_loader

        loader = make_train_loader(cfg, rank, world_size, dev)
        h = collect_hessians(model, cfg, loader, cfg.gptq_calibration_batches, dev,
                             batch_seqs=cfg.micro_batch_seqs(world_size), progress=progress)
    else:
        t0 = time.perf_counter()
        toks = generate_calibration_tokens(model, cfg, n_seqs=cfg.gptq_calibration_batches, batch_size=8,
                                           temperature=0.8, seed=cfg.seed, device=dev, progress=progress)
        gen_s = time.perf_counter() - t0
        h = collect_hessians(model, cfg, toks, math.ceil(toks.shape[0] / 8), dev, batch_seqs=8,
                             seq_len=toks.shape[1], progress=progress, source="autoregressive")
        say(f"gptq:generated {toks.shape[0]}x{toks.shape[1]} calibration tokens in {gen_s:.1f}s")
    say(f"gptq:collected {len(h)} Hessians from {h.n_batches} batches ({h.n_tokens:,} tokens, {h.source}) "
        f"in {h.seconds:.2f}s")
    return h


@dataclass
class QuantOutcome:
    qmodel: Any  # golfnb.quant.QuantizedModel (after pruning, if any)
    blob: bytes  # the artifact file's bytes
    pruned: int
    quantize_seconds: float
    serialize_seconds: float
    label: str  # e.g. "int6+brotli"


def quantize_and_serialize(model: torch.nn.Module, cfg: Hyperparameters, hessians: Any, code_bytes: int, *,
                           progress: bool = True, log: Any = None) -> QuantOutcome:
    """GPTQ (or RTN when gptq_enabled is off), serialize with cfg's compressor, prune +-1 codes if code +
    model > bytes_limit and prune_to_fit is on; SubmissionTooLarge otherwise."""
    from golfnb.artifact import serialize
    from golfnb.quant import prune_to_fit, quantize_model

    say = _say(log)
    method = "gptq" if cfg.gptq_enabled else "rtn"
    t0 = time.perf_counter()
    q = quantize_model(model, cfg, hessians if method == "gptq" else None, method, progress=progress)
    tq = time.perf_counter() - t0
    stride = 2 if cfg.byte_shuffle else 0

    def ser(qm: Any) -> bytes:
        return serialize(qm, cfg.compressor, stride)

    t1 = time.perf_counter()
    blob = ser(q)
    pruned = 0
    limit = cfg.bytes_limit
    if len(blob) + code_bytes > limit:
        if not cfg.prune_to_fit:
            raise SubmissionTooLarge(
                f"code {code_bytes} + model {len(blob)} = {code_bytes + len(blob)} bytes > bytes_limit {limit} "
                f"(over by {code_bytes + len(blob) - limit}); set prune_to_fit=True, raise matrix_clip_sigmas or "
                f"lower the bit widths (`golfnb artifact inspect` suggests values)")
        try:
            r = prune_to_fit(q, code_bytes, limit, ser, log=say, workers=cfg.resolved_prune_workers, blob=blob)
        except ValueError as e:
            raise SubmissionTooLarge(str(e)) from None
        q, pruned, blob = r.qmodel, r.pruned, r.blob
        say(f"prune:zeroed {r.pruned} of {r.candidates} |q|=1 codes: model {r.bytes_before} -> {r.bytes_after} "
            f"bytes ({r.compressions} compressions, {r.seconds:.1f}s)")
    ts = time.perf_counter() - t1
    label = f"{q.bits_label()}+{cfg.compressor}"
    return QuantOutcome(q, blob, pruned, tq, ts, label)


def byte_accounting_lines(label: str, model_bytes: int, code_bytes: int) -> list[str]:
    """The challenge's lines (as the records print them)."""
    return [f"Serialized model {label}: {model_bytes} bytes",
            f"Code size: {code_bytes} bytes",
            f"Total submission size: {model_bytes + code_bytes} bytes"]


def quantize_run(run_dir: str | Path, *, device: torch.device | str | None = None, code_bytes: int | None = None,
                 overrides: dict[str, Any] | None = None, progress: bool = True, record: bool = True,
                 log: Any = None) -> dict[str, Any]:
    """Quantize a trained run: final_model.pt -> calibration on train data -> GPTQ -> artifact.

    Writes `<run_dir>/artifacts/model.gnb`; `overrides` changes quantization fields (bits, clip sigmas,
    compressor ...) for this call. code_bytes defaults to the size `golfnb pack` would give this run.
    Returns (and records into metrics.json) times and bytes.
    """
    from golfnb.artifact import save_artifact
    from golfnb.pack import estimate_code_bytes
    from golfnb.train import load_final_model

    run_dir = Path(run_dir)
    say = _say(log)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, model = load_final_model(run_dir, device)
    if overrides:
        cfg = cfg.replace(**overrides)
    if code_bytes is None:
        code_bytes = estimate_code_bytes(cfg)
    h = calibrate(model, cfg, device=device, progress=progress, log=say) if cfg.gptq_enabled else None
    out = quantize_and_serialize(model, cfg, h, code_bytes, progress=progress, log=say)
    info = save_artifact(run_dir / ARTIFACT_RELPATH, out.qmodel, cfg.compressor, 2 if cfg.byte_shuffle else 0,
                         data=out.blob)
    for line in byte_accounting_lines(out.label, info.bytes, code_bytes):
        say(line)
    res = {"artifact": str(info.path), "model_bytes": info.bytes, "code_bytes": code_bytes,
           "total_bytes": info.bytes + code_bytes, "margin_bytes": cfg.bytes_limit - info.bytes - code_bytes,
           "pruned_entries": out.pruned, "quantize_s": round(out.quantize_seconds, 3),
           "serialize_s": round(out.serialize_seconds, 3), "label": out.label,
           "method": out.qmodel.method, "sha256": info.sha256}
    if h is not None:
        res.update(calibration_s=round(h.seconds, 3), calibration_batches=h.n_batches, hessians=len(h))
    if record:
        from golfnb.runs import record_many

        record_many(run_dir, {f"quant.{k}": v for k, v in res.items()})
    return res


def load_quantized(run_dir: str | Path, device: torch.device | str = "cpu", path: str | Path | None = None):
    """(cfg, model) with the run's artifact dequantized into a fresh model (eval mode, looping on)."""
    from golfnb.artifact import model_from_artifact

    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{cfg_file} does not exist; is {run_dir} a golfnb run directory?")
    cfg = Hyperparameters.from_json(cfg_file)
    model = model_from_artifact(Path(path) if path is not None else run_dir / ARTIFACT_RELPATH, cfg, device)
    return cfg, model


# ================================================================================================ submission

def _final_results(results: Any, cfg: Hyperparameters) -> list[tuple[str, dict[str, Any]]]:
    """(method, result) pairs from run_evals' return value, the final method last."""
    if isinstance(results, dict) and "val_bpb" in results:
        return [(str(results.get("method", cfg.final_eval)), results)]
    if isinstance(results, dict):
        pairs = [(k, v) for k, v in results.items() if isinstance(v, dict) and "val_bpb" in v]
        pairs.sort(key=lambda kv: kv[0] == cfg.final_eval)
        return pairs
    return []


def run_submission(cfg: Hyperparameters, code_path: str | Path, run_dir: str | Path = ".", *,
                   progress: bool = False) -> dict[str, Any]:
    """Train, calibrate + quantize inside the reserve, write the artifact, reload it, evaluate, account bytes."""
    from golfnb.artifact import load_artifact, model_from_artifact, save_artifact
    from golfnb.attention import resolve_backend
    from golfnb.distributed import broadcast_object, init_distributed
    from golfnb.evals.runner import run_evals
    from golfnb.train import finish, prepare, run_loop, warmup

    code_bytes = os.path.getsize(code_path)
    if code_bytes >= cfg.bytes_limit:
        raise SubmissionTooLarge(f"the code alone ({code_path}: {code_bytes} bytes) reaches bytes_limit "
                                 f"{cfg.bytes_limit}")
    run_dir = Path(run_dir)
    dist = init_distributed(cfg.device)
    tr = prepare(cfg, run_dir, dist=dist)
    log = tr.log
    try:
        from golfnb.io import sha256_file

        # the identity of the file that runs: golfnb validate matches it against the shipped train_gpt.py
        log.log(f"code_bytes:{code_bytes} code_path:{code_path} code_sha256:{sha256_file(code_path)}")
        warmup(tr)
        run_loop(tr)
        summary = finish(tr)
        device = tr.device
        art_path = run_dir / SUBMISSION_ARTIFACT
        res: dict[str, Any] = {"train": summary, "code_bytes": code_bytes}
        failure: BaseException | None = None
        if dist.is_main:
            try:
                model = tr.model
                h = None
                if cfg.gptq_enabled:
                    h = calibrate(model, cfg, rank=dist.rank, world_size=dist.world_size, device=device,
                                  progress=progress, log=log)
                    total = tr.elapsed_s + h.seconds
                    cap = cfg.max_wallclock_seconds
                    log.log(f"gptq:train_time:{tr.elapsed_s:.2f}s + calibration:{h.seconds:.2f}s = {total:.2f}s "
                            f"(reserve {cfg.gptq_reserve_seconds:.1f}s"
                            + (f", budget {cap:.0f}s{' EXCEEDED' if total > cap else ''})" if cap > 0 else ")"))
                    res["calibration_s"] = h.seconds
                    res["train_plus_calibration_s"] = total
                out = quantize_and_serialize(model, cfg, h, code_bytes, progress=progress, log=log)
                info = save_artifact(art_path, out.qmodel, cfg.compressor, 2 if cfg.byte_shuffle else 0,
                                     data=out.blob)
                log.log(f"artifact:{info.path} sha256:{info.sha256} quantize_s:{out.quantize_seconds:.2f} "
                        f"serialize_s:{out.serialize_seconds:.2f} pruned:{out.pruned}")
                res.update(label=out.label, pruned=out.pruned)
            except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have been told
                failure = e
        # rank 0's outcome reaches every rank (a plain barrier would leave them waiting on a failed rank 0)
        status = broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        if status is not None:
            raise SubmissionTooLarge(f"rank 0 failed while quantizing: {status}")
        # every rank evaluates what is in the FILE (the roundtrip number is the one that counts)
        tr.model = tr.forward = tr.bundle = tr.ema = tr.loader = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model_bytes = art_path.stat().st_size
        q = load_artifact(art_path)
        label = res.get("label") or f"{q.bits_label()}+{cfg.compressor}"
        for line in byte_accounting_lines(label, model_bytes, code_bytes):
            log.log(line)
        total = model_bytes + code_bytes
        if total > cfg.bytes_limit:
            raise SubmissionTooLarge(f"Total submission size {total} bytes (code {code_bytes} + model {model_bytes}) "
                                     f"exceeds bytes_limit {cfg.bytes_limit} by {total - cfg.bytes_limit}")
        model = model_from_artifact(q, cfg, device)
        model.set_attn_backend(resolve_backend(cfg.attn_backend, device))
        results = run_evals(model, tr.val_tokens, cfg, tr.luts, dist, log, run_dir=run_dir)
        finals = _final_results(results, cfg)
        for method, r in finals:
            log.log(f"final_{method}_exact val_loss:{r['val_loss']:.8f} val_bpb:{r['val_bpb']:.8f}")
        res.update(model_bytes=model_bytes, total_bytes=total, evals=results)
        if dist.is_main:
            from golfnb.runs import record_many

            record_many(run_dir, {"submission.model_bytes": model_bytes, "submission.code_bytes": code_bytes,
                                  "submission.total_bytes": total,
                                  **{f"submission.final_{m}.val_bpb": r["val_bpb"] for m, r in finals}})
        return res
    finally:
        log.close()


def submission_main(config_json: str, code_path: str) -> int:
    """Entry point of the packed train_gpt.py: the embedded config, then challenge env vars on top
    (DATA_PATH, SEED, ...); run directory $GOLFNB_RUN_DIR or the working directory."""
    from golfnb.distributed import destroy

    base = Hyperparameters.from_dict(json.loads(config_json))
    try:
        cfg = Hyperparameters.from_env(base=base)
        run_submission(cfg, code_path, os.environ.get("GOLFNB_RUN_DIR") or ".")
    except (ConfigError, SubmissionTooLarge) as e:
        print(f"train_gpt.py: {type(e).__name__}: {e}", flush=True)
        return 2
    finally:
        destroy()
    return 0
