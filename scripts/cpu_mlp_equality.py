"""Train the smoke preset twice at equal steps, plain MLP against the fused one in Triton's CPU interpreter, plus
a second plain arm on one thread (its GEMMs sum in another order) as the rounding-noise reference.

    TRITON_INTERPRET=1 python scripts/cpu_mlp_equality.py [--iters 200] [--shared ../shared/data]

The fused arm is slow in the interpreter (~5.6 s per smoke step on a 2-core machine). Prints one RESULT line per arm.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from golfnb.config import preset
from golfnb.data.build import build_shards
from golfnb.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1: the fused arm runs the Triton kernel in its CPU interpreter")
    sd = Path(args.shared)
    tok = sd / "tokenizers" / "fineweb_1024_bpe.model"
    work = Path(tempfile.mkdtemp(prefix="mlp_equality_"))
    build_shards([sd / "challenge_docs_sample" / "verify_docs_200.jsonl"], tok, work / "data",
                 val_inputs=[sd / "challenge_val_prefix" / "docs_val_prefix_decoded.jsonl"], workers=1, progress=False)
    threads = torch.get_num_threads()
    for name, backend, n in (("plain", "torch", threads), ("plain_1_thread", "torch", 1), ("fused", "triton", threads)):
        torch.set_num_threads(n)
        cfg = preset("smoke", data_path=str(work / "data"), tokenizer_path=str(tok), mlp_backend=backend,
                     iterations=args.iters, val_loss_every=0)
        t0 = time.time()
        s = train(cfg, work / name, echo=False)
        print("RESULT " + json.dumps({"arm": name, "threads": n, "seconds": round(time.time() - t0, 1),
                                      "val_loss": s["val_loss"], "val_bpb": s["val_bpb"]}), flush=True)


if __name__ == "__main__":
    main()
