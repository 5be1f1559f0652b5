"""Self-describing run logs: a header that pins code, environment, config and data, then `key:value` lines.

Rank 0 writes `<run_dir>/train.log` (and echoes to stdout); every rank writes `<run_dir>/logs/rank<r>.log`.
Step and eval records also go to `<run_dir>/metrics.jsonl`, one JSON object per line, so notebooks never
parse text logs.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["RunLogger", "format_kv"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.4e}"
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def format_kv(**fields: Any) -> str:
    return " ".join(f"{k}:{_fmt(v)}" for k, v in fields.items())


class RunLogger:
    def __init__(self, run_dir: str | Path | None, rank: int = 0, echo: bool = True,
                 stream: TextIO | None = None, log_name: str = "train.log"):
        self.rank = rank
        self.is_main = rank == 0
        self.echo = echo and self.is_main
        self.stream = stream or sys.stdout
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._main_f = self._rank_f = self._metrics_f = None
        if self.run_dir is not None:
            (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
            self._rank_f = open(self.run_dir / "logs" / f"rank{rank}.log", "a", buffering=1)
            if self.is_main:
                self._main_f = open(self.run_dir / log_name, "a", buffering=1)
                self._metrics_f = open(self.run_dir / "metrics.jsonl", "a", buffering=1)

    def log(self, msg: str, all_ranks: bool = False) -> None:
        if self._rank_f is not None:
            self._rank_f.write(msg + "\n")
        if not self.is_main and not all_ranks:
            return
        if self._main_f is not None and self.is_main:
            self._main_f.write(msg + "\n")
        if self.echo or (all_ranks and not self.is_main):
            print(msg if self.is_main else f"[rank{self.rank}] {msg}", file=self.stream, flush=True)

    def kv(self, kind: str, **fields: Any) -> None:
        """One `key:value` line plus a metrics.jsonl record {"kind": kind, ...}."""
        self.log(format_kv(**fields))
        if self._metrics_f is not None:
            rec = {"kind": kind, "time": time.time(), **{k: _jsonable(v) for k, v in fields.items()}}
            self._metrics_f.write(json.dumps(rec) + "\n")

    def header(self, title: str, sections: dict[str, Any]) -> None:
        self.log("=" * 100)
        self.log(title)
        for name, body in sections.items():
            self.log(f"--- {name}")
            if isinstance(body, dict):
                for k, v in body.items():
                    self.log(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
            else:
                self.log(str(body))
        self.log("=" * 100)

    def close(self) -> None:
        for f in (self._main_f, self._rank_f, self._metrics_f):
            if f is not None:
                f.close()
        self._main_f = self._rank_f = self._metrics_f = None


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return v
