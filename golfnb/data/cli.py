"""`golfnb data download|build|tokenizer|verify|stats`.

Wiring: the top-level `golfnb` console script calls `add_data_parser(subparsers)`; every leaf command sets
`func`, which runs the command and returns the exit status (0 ok, 2 for a data/config error whose message
is printed as `error: ...`). `python -m golfnb.data.cli ...` runs the same commands via `main`.

`stats` prints the bpb denominator golfnb's evaluator uses: `bytes` sums the byte credit (golfnb.bpb) of
every target v[1..N) of the concatenated shards, each scored once; with --eval-seq-len T it also prints the
truncated split the evaluator scores (`eval_targets` = U = floor((N-1)/T)*T, `eval_bytes`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from golfnb.config import ConfigError

__all__ = ["add_data_parser", "main", "stream_stats"]

_EPILOG = ("Data root: --data-dir, else $GOLFNB_DATA_DIR, else ./data (the challenge's layout: "
           "datasets/fineweb10B_<variant>/ and tokenizers/).")


def stream_stats(paths: Sequence[str | Path], tokenizer: str | Path, eval_seq_len: int | None = None,
                 chunk: int = 1 << 22) -> dict[str, Any]:
    """Token, target and byte totals of the shards concatenated in the given order (see module doc)."""
    import numpy as np
    import torch

    from golfnb.bpb import build_byte_luts, target_bytes
    from golfnb.data.shards import BOS_ID, ShardError, open_shard, read_header

    files = [Path(p) for p in paths]
    if not files:
        raise ShardError("no shard files given; pass e.g. DATA/datasets/fineweb10B_sp8192/fineweb_val_*.bin")
    for f in files:
        if f.is_dir():
            raise ShardError(f"{f} is a folder; pass shard files, e.g. {f}/fineweb_val_*.bin")
    luts = build_byte_luts(tokenizer)
    V = luts.vocab_size
    N = sum(read_header(f).n_tokens for f in files)
    U = ((N - 1) // eval_seq_len) * eval_seq_len if eval_seq_len else None
    total = 0
    eval_total = 0
    docs = 0
    max_id = -1
    pos = 0  # global index of the next token to read
    prev: int | None = None
    for f in files:
        mm = open_shard(f)
        for s in range(0, mm.size, chunk):
            arr = np.asarray(mm[s:s + chunk], dtype=np.int64)
            m = int(arr.max())
            if m >= V:
                j = int(np.flatnonzero(arr >= V)[0])
                raise ShardError(f"{f} holds token id {int(arr[j])} at index {s + j}, outside the {V}-piece "
                                 f"tokenizer {tokenizer}; pass the tokenizer the shards were made with")
            max_id = max(max_id, m)
            docs += int(np.count_nonzero(arr == BOS_ID))
            t = torch.from_numpy(arr)
            if prev is None:
                x, y, first_target = t[:-1], t[1:], pos + 1
            else:
                x, y, first_target = torch.cat([torch.tensor([prev]), t[:-1]]), t, pos
            b = target_bytes(x, y, luts).to(torch.int64)
            total += int(b.sum())
            if U is not None:
                keep = max(min(U - first_target + 1, b.numel()), 0)  # targets with global index <= U
                eval_total += int(b[:keep].sum())
            prev = int(arr[-1])
            pos += arr.size
    out: dict[str, Any] = {
        "files": [str(f) for f in files],
        "tokenizer": str(tokenizer),
        "vocab_size": V,
        "tokens": N,
        "targets": max(N - 1, 0),
        "bytes": total,
        "docs": docs,
        "max_id": max_id,
        "bytes_per_token": total / (N - 1) if N > 1 else None,
    }
    if U is not None:
        out.update({"eval_seq_len": eval_seq_len, "eval_targets": U, "eval_bytes": eval_total})
    return out


# ---------------------------------------------------------------- commands


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _cmd_download(a: argparse.Namespace) -> int:
    from golfnb.data.download import download_challenge_data

    res = download_challenge_data(a.variant, a.train_shards, data_dir=a.data_dir, repo_id=a.repo_id,
                                  remote_root=a.remote_root, skip_manifest=a.skip_manifest,
                                  verify_hashes=not a.no_verify_hashes, progress=not a.no_progress,
                                  command=_command(a))
    _print_json(res)
    return 0


def _cmd_build(a: argparse.Namespace) -> int:
    from golfnb.data.build import build_shards

    man = build_shards(a.input, a.tokenizer, a.out, val_docs=a.val_docs, val_inputs=a.val_input,
                       shard_tokens=a.shard_tokens, workers=a.workers, overwrite=a.overwrite,
                       progress=not a.no_progress, command=_command(a))
    _print_json({"out": a.out, "totals": man["totals"], "docs": man["docs"], "build_seconds": man["build_seconds"],
                 "shards": [s["name"] for s in man["shards"]]})
    return 0


def _cmd_tokenizer(a: argparse.Namespace) -> int:
    from golfnb.data.tokenizer import train_tokenizer

    path = train_tokenizer(a.input, a.vocab_size, a.out, max_docs=a.max_docs, num_threads=a.threads)
    print(path)
    return 0


def _cmd_verify(a: argparse.Namespace) -> int:
    from golfnb.data.shards import verify_dir

    _print_json(verify_dir(a.dir, a.vocab_size, check_hashes=not a.no_hashes, require_manifest=a.require_manifest))
    return 0


def _cmd_stats(a: argparse.Namespace) -> int:
    _print_json(stream_stats(a.shards, a.tokenizer, eval_seq_len=a.eval_seq_len))
    return 0


def _command(a: argparse.Namespace) -> str:
    argv = getattr(a, "_argv", None)
    return "golfnb data " + " ".join(argv) if argv is not None else " ".join(sys.argv)


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(a: argparse.Namespace) -> int:
        from golfnb.data.build import BuildError
        from golfnb.data.download import DownloadError
        from golfnb.data.shards import ShardError
        from golfnb.data.tokenizer import TokenizerError

        try:
            return int(fn(a) or 0)
        except (ShardError, BuildError, TokenizerError, DownloadError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    run.__name__ = fn.__name__
    return run


def _add_commands(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    d = sub.add_parser("download", help="fetch challenge shards + tokenizer from the Hugging Face Hub",
                       description="Fetch the validation shards, the first N train shards and the tokenizer of a "
                                   "variant (resumable). " + _EPILOG)
    d.add_argument("--variant", choices=["sp1024", "sp8192"], default="sp8192")
    d.add_argument("--train-shards", type=int, default=80,
                   help="first N train shards (default 80; 128 exist for sp8192)")
    d.add_argument("--repo-id", default=None, help="dataset repo (default: willdepueoai/parameter-golf for sp1024, "
                                                   "kevclark/parameter-golf for sp8192)")
    d.add_argument("--remote-root", default="datasets", help="folder of manifest.json inside the repo")
    d.add_argument("--data-dir", default=None)
    d.add_argument("--skip-manifest", action="store_true", help="reuse the remote manifest fetched last time")
    d.add_argument("--no-verify-hashes", action="store_true", help="check sizes only, not sha256")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_guarded(_cmd_download))

    b = sub.add_parser("build", help="tokenize local .jsonl/.txt into challenge shards",
                       description="Tokenize text into fineweb_{train,val}_*.bin shards plus manifest.json: "
                                   "[BOS] + ids per document, no EOS.")
    b.add_argument("--input", action="append", required=True, metavar="GLOB",
                   help=".jsonl ('text' field per line) or .txt (one document per file); repeatable")
    b.add_argument("--tokenizer", required=True, metavar="MODEL")
    b.add_argument("--out", required=True, metavar="DIR")
    b.add_argument("--val-docs", type=int, default=0, help="the first N documents go to fineweb_val_*")
    b.add_argument("--val-input", action="append", default=None, metavar="GLOB",
                   help="documents of these files go to fineweb_val_* (instead of --val-docs)")
    b.add_argument("--shard-tokens", type=int, default=100_000_000)
    b.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    b.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_guarded(_cmd_build))

    t = sub.add_parser("tokenizer", help="train a SentencePiece BPE tokenizer with the challenge settings")
    t.add_argument("--input", action="append", required=True, metavar="GLOB")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab")
    t.add_argument("--max-docs", type=int, default=None)
    t.add_argument("--threads", type=int, default=None)
    t.set_defaults(func=_guarded(_cmd_tokenizer))

    v = sub.add_parser("verify", help="check every shard of a folder (header, size, ids, manifest hashes)")
    v.add_argument("dir", metavar="DIR")
    v.add_argument("--vocab-size", type=int, default=None, help="default: the manifest's")
    v.add_argument("--no-hashes", action="store_true", help="skip sha256 checks")
    v.add_argument("--require-manifest", action="store_true")
    v.set_defaults(func=_guarded(_cmd_verify))

    s = sub.add_parser("stats", help="tokens, targets and exact bpb byte count of a token stream")
    s.add_argument("shards", nargs="+", metavar="SHARD")
    s.add_argument("--tokenizer", required=True, metavar="MODEL")
    s.add_argument("--eval-seq-len", type=int, default=None,
                   help="also report the evaluator's truncation to a multiple of this many targets")
    s.set_defaults(func=_guarded(_cmd_stats))


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `data` with its sub-commands to a top-level parser's subparsers. Leaf commands set `func`
    (call `args.func(args)`, which returns the exit status)."""
    p = subparsers.add_parser("data", help="download, build, verify and measure token shards",
                              description="Data tools: download | build | tokenizer | verify | stats. " + _EPILOG)
    _add_commands(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="golfnb data", description="Data tools. " + _EPILOG)
    _add_commands(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
