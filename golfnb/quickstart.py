"""`golfnb quickstart`: the main job on a fresh machine, data included.

1. Preset: the one asked for, else ``pr1514`` on a CUDA machine and ``smoke`` on a CPU-only one (said so).
2. Data, first that works:
   a. shards already under the data root (`--data-dir`, else `$GOLFNB_DATA_DIR`, else `./data`);
   b. the challenge's shards from the Hugging Face Hub (needs network; skipped with `--offline` or
      `HF_HUB_OFFLINE=1`);
   c. shards built from a local folder of text (`--text-dir`, else `$GOLFNB_TEXT_DIR`, else `../shared/data`
      when present): its `tokenizers/fineweb_<V>_bpe.model`, training text from `wikipedia_en_2015_substitute/`
      (or any `*.jsonl` / `*.txt` there), validation documents from
      `challenge_val_prefix/docs_val_prefix_decoded.jsonl` when present (the real FineWeb validation prefix).
3. The notebooks, executed with papermill into one run directory `runs/<stamp>_quickstart_<preset>_s<seed>/`:
   train -> quantize -> eval_sliding (each an executed report you can open in JupyterLab).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from golfnb.config import ConfigError, Hyperparameters, preset

__all__ = ["ensure_data", "quickstart", "add_quickstart_parser", "main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE_WIKI_FILES = 2  # a smoke run needs a few MB of text, not all 225 MB


def _variant(cfg: Hyperparameters) -> str:
    return f"sp{cfg.vocab_size}"


def _have_shards(cfg: Hyperparameters) -> bool:
    d = Path(cfg.data_path)
    return (Path(cfg.tokenizer_path).is_file() and any(d.glob("fineweb_train_*.bin"))
            and any(d.glob("fineweb_val_*.bin")))


def _default_text_dir() -> Path | None:
    env = os.environ.get("GOLFNB_TEXT_DIR")
    if env:
        return Path(env)
    for cand in (Path.cwd().parent / "shared" / "data", REPO_ROOT.parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def build_from_text(cfg: Hyperparameters, root: Path, text_dir: Path, log: Any = print) -> None:
    from golfnb.data.build import build_shards

    tok_name = Path(cfg.tokenizer_path).name
    tok_src = text_dir / "tokenizers" / tok_name
    if not tok_src.is_file():
        raise ConfigError(f"{text_dir} has no tokenizers/{tok_name}; put the tokenizer there or train one with "
                          f"`golfnb data tokenizer --input ... --vocab-size {cfg.vocab_size} --out ...`")
    (root / "tokenizers").mkdir(parents=True, exist_ok=True)
    shutil.copy2(tok_src, root / "tokenizers" / tok_name)
    wiki = sorted((text_dir / "wikipedia_en_2015_substitute").glob("*.jsonl"))
    if wiki:
        inputs = [str(p) for p in (wiki[:SMOKE_WIKI_FILES] if cfg.run_id == "smoke" else wiki)]
    else:
        inputs = [str(p) for p in sorted(text_dir.rglob("*.jsonl")) + sorted(text_dir.rglob("*.txt"))
                  if "val" not in p.name]
    if not inputs:
        raise ConfigError(f"no .jsonl/.txt text found under {text_dir}")
    val = text_dir / "challenge_val_prefix" / "docs_val_prefix_decoded.jsonl"
    log(f"quickstart: building {_variant(cfg)} shards from {len(inputs)} local text file(s) in {text_dir}")
    build_shards(inputs, root / "tokenizers" / tok_name, Path(cfg.data_path),
                 val_inputs=[str(val)] if val.is_file() else None, val_docs=0 if val.is_file() else 50)


def ensure_data(cfg: Hyperparameters, root: Path, *, text_dir: Path | None = None, offline: bool = False,
                train_shards: int = 1, log: Any = print) -> str:
    """Make sure cfg's shards and tokenizer exist; returns how ("present", "downloaded" or "built")."""
    if _have_shards(cfg):
        return "present"
    offline = offline or os.environ.get("HF_HUB_OFFLINE") == "1"
    if not offline:
        from golfnb.data.download import DownloadError, download_challenge_data

        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "15")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
        try:
            download_challenge_data(_variant(cfg), train_shards=train_shards, data_dir=root)
            if _have_shards(cfg):
                return "downloaded"
        except DownloadError as e:
            log(f"quickstart: download not possible ({str(e).splitlines()[0]}); trying local text")
    text_dir = text_dir or _default_text_dir()
    if text_dir is None or not text_dir.is_dir():
        raise ConfigError("no data: no shards under the data root, no network, and no local text folder. Get "
                          "shards with `golfnb data download`, or pass --text-dir DIR (a folder with "
                          "tokenizers/ and .jsonl/.txt text) or set GOLFNB_DATA_DIR to a folder with shards")
    build_from_text(cfg, root, text_dir, log=log)
    return "built"


def quickstart(preset_name: str | None = None, *, data_dir: str | None = None, text_dir: str | None = None,
               offline: bool = False, seed: int = 1337, notebooks: bool = True, log: Any = print) -> Path:
    import torch

    if preset_name is None:
        preset_name = "pr1514" if torch.cuda.is_available() else "smoke"
        if preset_name == "smoke":
            log("quickstart: no CUDA GPU found: running the smoke preset on CPU (pass --preset to choose)")
    elif preset_name != "smoke" and not torch.cuda.is_available():
        raise ConfigError(f"preset {preset_name} needs a CUDA GPU and none is visible; use --preset smoke on CPU")
    root = Path(data_dir or os.environ.get("GOLFNB_DATA_DIR") or "data").resolve()
    cfg = preset(preset_name, seed=seed).with_data_root(root)
    how = ensure_data(cfg, root, text_dir=Path(text_dir) if text_dir else None, offline=offline,
                      train_shards=1 if preset_name == "smoke" else 80, log=log)
    log(f"quickstart: data {how}: {cfg.data_path}")
    from golfnb.launch import new_run_dir, run_notebook

    run_dir = new_run_dir("runs", f"quickstart_{preset_name}", seed)
    params = {"preset": preset_name, "seed": seed, "data_dir": str(root), "run_dir": str(run_dir)}
    if not notebooks:
        from golfnb.headless import run_stages

        run_stages(cfg, run_dir, methods=["sliding"])
        return run_dir
    run_notebook(REPO_ROOT / "notebooks" / "train.ipynb", run_dir, params)
    run_notebook(REPO_ROOT / "notebooks" / "quantize.ipynb", run_dir, {"run_dir": str(run_dir)})
    run_notebook(REPO_ROOT / "notebooks" / "eval_sliding.ipynb", run_dir, {"run_dir": str(run_dir)})
    log(f"quickstart: done. Executed reports in {run_dir} (open them with `jupyter lab {run_dir}`)")
    return run_dir


def add_quickstart_parser(sub: Any) -> None:
    p = sub.add_parser("quickstart", help="the main job: data, then the train/quantize/eval notebooks")
    p.add_argument("--preset", default=None, help="default: pr1514 with a GPU, smoke without")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--data-dir", default=None, help="data root (default $GOLFNB_DATA_DIR or ./data)")
    p.add_argument("--text-dir", default=None, help="local text + tokenizers to build shards from when offline")
    p.add_argument("--offline", action="store_true", help="do not try the Hugging Face Hub")
    p.add_argument("--no-notebooks", action="store_true", help="run the stages headless instead of papermill")
    p.set_defaults(func=_run)


def _run(a: argparse.Namespace) -> int:
    quickstart(a.preset, data_dir=a.data_dir, text_dir=a.text_dir, offline=a.offline, seed=a.seed,
               notebooks=not a.no_notebooks)
    return 0


def main(argv: list[str] | None = None) -> int:
    from golfnb.cli import run_subcommand

    return run_subcommand("quickstart", add_quickstart_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
