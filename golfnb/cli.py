"""The `golfnb` command line: one entry point, one sub-command per concern.

    golfnb quickstart                 # the main job: data, then the train/quantize/eval notebooks
    golfnb presets                    # list the presets
    golfnb config pr1514 --set seed=42
    golfnb data download|build|tokenizer|verify|stats ...
    golfnb train --preset smoke --run-dir runs/x      (same as python -m golfnb.train)
    golfnb run notebooks/train.ipynb -p preset smoke
    golfnb artifact inspect FILE
    golfnb pack RUN_DIR --out DIR/train_gpt.py
    golfnb submit ... / golfnb validate FOLDER
    golfnb bench --preset pr1514

Sub-command modules are imported when their parser is built; none of them does work at import time.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Callable

from golfnb.config import PRESET_NOTES, PRESETS, ConfigError, resolve

# (command, module, function that adds the sub-parser); each sub-parser sets `func` via set_defaults
_SUBCOMMANDS = [
    ("data", "golfnb.data.cli", "add_data_parser"),
    ("artifact", "golfnb.artifact", "add_artifact_parser"),
    ("pack", "golfnb.pack", "add_pack_parser"),
    ("run", "golfnb.launch", "add_run_parser"),
    ("submit", "golfnb.submit", "add_submit_parser"),
    ("validate", "golfnb.validate", "add_validate_parser"),
    ("bench", "golfnb.bench", "add_bench_parser"),
    ("quickstart", "golfnb.quickstart", "add_quickstart_parser"),
]


def _cmd_presets(args: argparse.Namespace) -> int:
    for name in PRESETS:
        print(f"{name:9s} {PRESET_NOTES.get(name, '')}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from golfnb.train import parse_overrides

    cfg = resolve(args.preset, parse_overrides(args.set), args.file)
    print(cfg.to_json(), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from golfnb.train import main as train_main

    return train_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="golfnb", description="Parameter Golf research kit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sp = sub.add_parser("presets", help="list the named presets")
    sp.set_defaults(func=_cmd_presets)
    sp = sub.add_parser("config", help="print a resolved config as JSON")
    sp.add_argument("preset", nargs="?", help="preset name")
    sp.add_argument("--file", help="config .json/.yaml instead of a preset")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.set_defaults(func=_cmd_config)
    sp = sub.add_parser("train", help="train (arguments as python -m golfnb.train)", add_help=False)
    sp.add_argument("rest", nargs=argparse.REMAINDER)
    sp.set_defaults(func=_cmd_train)
    for _name, module, fn in _SUBCOMMANDS:
        mod = importlib.import_module(module)
        getattr(mod, fn)(sub)
    return p


def _dispatch(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        rc = args.func(args)
    except ConfigError as e:
        print(f"golfnb {args.command}: configuration error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


def run_subcommand(command: str, add_parser: Callable[[Any], Any], argv: list[str] | None = None) -> int:
    """`python -m golfnb.<module> ARGS` behaves as `golfnb <command> ARGS`: the module's own parser, the
    same exit codes (a ConfigError is exit 2 with its message)."""
    parser = argparse.ArgumentParser(prog="golfnb")
    add_parser(parser.add_subparsers(dest="command"))
    return _dispatch(parser, [command, *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        # argparse's REMAINDER drops leading options ("train --preset x"), so the trainer's own parser
        # takes every argument after the word.
        from golfnb.train import main as train_main

        try:
            return int(train_main(argv[1:]) or 0)
        except ConfigError as e:
            print(f"golfnb: configuration error: {e}", file=sys.stderr)
            return 2
    return _dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
