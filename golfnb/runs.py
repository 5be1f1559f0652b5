"""Run directories and the metrics registry.

A run directory holds one run's executed notebooks, resolved `config.json`, logs, `metrics.json`, `env.json`,
and (git-ignored) checkpoints and artifacts. `record(name, value)` merges one metric into
`<run_dir>/metrics.json` (atomically) and, inside a notebook, also displays it with a custom MIME type so the
executed notebook is self-contained; `read_metrics` reads either form back.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from golfnb.io import atomic_write_json

__all__ = ["record", "record_many", "read_metrics", "current_run_dir", "set_current_run_dir", "show_metrics", "METRICS_MIME"]

METRICS_MIME = "application/vnd.golfnb.metrics+json"
_CURRENT: Path | None = None


def set_current_run_dir(run_dir: str | Path | None) -> None:
    global _CURRENT
    _CURRENT = Path(run_dir) if run_dir is not None else None


def current_run_dir() -> Path | None:
    if _CURRENT is not None:
        return _CURRENT
    env = os.environ.get("GOLFNB_RUN_DIR")
    return Path(env) if env else None


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it from the executed notebook") from None


def record_many(run_dir: str | Path | None, values: dict[str, Any], display: bool = False) -> dict[str, Any]:
    rd = Path(run_dir) if run_dir is not None else current_run_dir()
    if rd is None:
        raise ValueError("no run directory: pass run_dir or call set_current_run_dir() first")
    path = rd / "metrics.json"
    data = _load(path)
    data.update({k: _plain(v) for k, v in values.items()})
    atomic_write_json(path, data)
    if display:
        show_metrics(values)
    return data


def record(name: str, value: Any, run_dir: str | Path | None = None, display: bool = True) -> Any:
    """Record one metric of the current run (merged into metrics.json; shown in the notebook)."""
    record_many(run_dir, {name: value}, display=display)
    return value


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        # NaN/inf are not JSON: written bare they break strict readers (jq, JavaScript) and Jupyter's message
        # serialisation. As "nan"/"inf" strings the fact survives and numeric consumers skip the value.
        return str(v)
    return v


def show_metrics(values: dict[str, Any]) -> None:
    """Show metrics as a cell output (a mime bundle the reports read back); a no-op outside IPython."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if get_ipython() is None:
        return
    payload = {k: _plain(v) for k, v in values.items()}
    text = "\n".join(f"{k} = {v}" for k, v in payload.items())
    display({METRICS_MIME: payload, "text/plain": text}, raw=True)


def read_metrics(source: str | Path) -> dict[str, Any]:
    """Metrics of a run: from `<run_dir>/metrics.json`, or collected from an executed notebook's outputs."""
    p = Path(source)
    if p.is_dir():
        return _load(p / "metrics.json")
    if p.suffix == ".ipynb":
        nb = json.loads(p.read_text())
        out: dict[str, Any] = {}
        for cell in nb.get("cells", []):
            for o in cell.get("outputs", []) or []:
                data = o.get("data", {})
                if METRICS_MIME in data:
                    out.update(data[METRICS_MIME])
        return out
    if p.name == "metrics.json":
        return _load(p)
    raise ValueError(f"{p} is neither a run directory nor an executed .ipynb")
