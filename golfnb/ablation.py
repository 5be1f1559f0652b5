"""Ablations over run directories: which config keys differ, and a metric per setting as mean +- std over seeds.

Everything is read from the structured files of each run (`config.json`, `metrics.json`); logs are never
parsed. Typical use (notebooks/ablation.ipynb):

    runs = load_runs("runs", "*_smoke_*")
    keys = differing_keys(runs)                 # e.g. ["num_loops", "seed"]
    rows = group(runs, by=["num_loops"], metric="eval.sliding.val_bpb")
    welch(rows[0]["values"], rows[1]["values"]) # is the difference more than seed noise?
    paired(rows[1]["values"], rows[1]["seeds"], rows[0]["values"], rows[0]["seeds"])  # same seeds, paired

The challenge asks record claims for 3+ seeds and a significance test (p < 0.01 for 0.005 nats); `group`
gives the per-setting samples, `welch` the unequal-variance t-test between two of them, and `paired` the
t-test on per-seed differences (runs of one seed share data order and initial weights).
"""
from __future__ import annotations

import fnmatch
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["Run", "load_runs", "differing_keys", "grouping_keys", "metric_names", "group", "welch", "paired",
           "DEFAULT_IGNORE"]

# keys that differ between runs without being an experimental variable
DEFAULT_IGNORE = ("run_id",)


@dataclass
class Run:
    """One run directory: its name, resolved config and recorded metrics."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


def _hashable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return v


def load_runs(root: str | Path = "runs", pattern: str = "*", *, require: str | None = None) -> list[Run]:
    """Run directories under `root` whose name matches `pattern` (fnmatch) and that hold a config.json,
    sorted by name. `require`: keep only runs whose metrics hold this key."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"runs root {root} does not exist; train some runs first (golfnb run "
                                f"notebooks/train.ipynb ...) or point root at the folder holding them")
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and fnmatch.fnmatch(p.name, pattern)):
        cfg_file = d / "config.json"
        if not cfg_file.is_file():
            continue  # not a training run (e.g. an ablation report folder)
        cfg = json.loads(cfg_file.read_text())
        cfg.pop("_golfnb", None)
        mfile = d / "metrics.json"
        metrics = json.loads(mfile.read_text()) if mfile.is_file() else {}
        if require is not None and require not in metrics:
            continue
        out.append(Run(d, cfg, metrics))
    return out


def differing_keys(runs: Sequence[Run], ignore: Iterable[str] = DEFAULT_IGNORE) -> list[str]:
    """Config keys whose value is not the same in every run (a key missing from a run counts as a value),
    in config order."""
    ignore = set(ignore)
    order: list[str] = []
    for r in runs:
        for k in r.config:
            if k not in order:
                order.append(k)
    out = []
    for k in order:
        if k in ignore:
            continue
        vals = {_hashable(r.config.get(k, "<missing>")) for r in runs}
        if len(vals) > 1:
            out.append(k)
    return out


def grouping_keys(runs: Sequence[Run], ignore: Iterable[str] = DEFAULT_IGNORE) -> list[str]:
    """The differing keys an ablation groups by: everything that differs except the seed."""
    return [k for k in differing_keys(runs, ignore) if k != "seed"]


def metric_names(runs: Sequence[Run]) -> list[str]:
    """Numeric metrics present in at least one run (sorted; train.*, quant.*, eval.* ...)."""
    names = set()
    for r in runs:
        for k, v in r.metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                names.add(k)
    return sorted(names)


def group(runs: Sequence[Run], by: str | Sequence[str], metric: str) -> list[dict[str, Any]]:
    """One row per distinct value of the `by` keys: {**by values, mean, std, n, values, seeds, runs}.

    std is the sample standard deviation (n - 1), NaN for a single run. Runs without `metric` are left
    out of the statistics and counted in `missing`. Rows are sorted by the `by` values."""
    keys = [by] if isinstance(by, str) else list(by)
    buckets: dict[tuple, list[Run]] = {}
    for r in runs:
        buckets.setdefault(tuple(_hashable(r.config.get(k)) for k in keys), []).append(r)
    rows = []
    for kv in sorted(buckets, key=lambda t: tuple((str(type(x)), x if x is not None else "") for x in t)):
        members = buckets[kv]
        have = [r for r in members if isinstance(r.metrics.get(metric), (int, float))
                and not isinstance(r.metrics.get(metric), bool)]
        vals = [float(r.metrics[metric]) for r in have]
        row: dict[str, Any] = dict(zip(keys, kv))
        row.update(metric=metric, n=len(vals),
                   mean=statistics.fmean(vals) if vals else math.nan,
                   std=statistics.stdev(vals) if len(vals) > 1 else math.nan,
                   values=vals, seeds=[r.seed for r in have], runs=[r.name for r in have],
                   missing=len(members) - len(have))
        rows.append(row)
    return rows


def paired(a: Sequence[float], a_seeds: Sequence[Any], b: Sequence[float], b_seeds: Sequence[Any]
           ) -> dict[str, float]:
    """Paired t-test of a - b over the seeds both groups ran: {n, diff, std, t, p}. With golfnb's loaders and
    initialisation keyed by the seed, two settings run with one seed see the same data order and initial
    weights, so the per-seed difference removes most of the seed noise Welch's test has to carry."""
    bmap = dict(zip(b_seeds, b))
    d = [x - bmap[s] for x, s in zip(a, a_seeds) if s in bmap]
    if len(d) < 2:
        raise ValueError(f"a paired test needs >= 2 seeds run in both settings (found {len(d)})")
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    if sd == 0:
        return {"n": len(d), "diff": mean, "std": 0.0, "t": math.inf if mean else 0.0, "p": 0.0 if mean else 1.0}
    t = mean / (sd / math.sqrt(len(d)))
    return {"n": len(d), "diff": mean, "std": sd, "t": t, "p": _two_sided_p(t, len(d) - 1)}


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Welch's unequal-variance t-test of mean(a) - mean(b): {diff, t, df, p} (two-sided p). Needs at least
    two values on each side. (golfnb.stats holds the challenge's one-sided record test with its margin.)"""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's t-test needs >= 2 values per group (got {len(a)} and {len(b)}); run more seeds")
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = ma - mb
    se2 = va + vb
    if se2 == 0:
        t = math.inf if diff else 0.0
        return {"diff": diff, "t": t, "df": float(len(a) + len(b) - 2), "p": 0.0 if diff else 1.0}
    t = diff / math.sqrt(se2)
    df = se2 ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return {"diff": diff, "t": t, "df": df, "p": _two_sided_p(t, df)}


def _two_sided_p(t: float, df: float) -> float:
    from golfnb.stats import t_cdf  # the t distribution without scipy (golfnb.stats)

    return min(1.0, 2.0 * t_cdf(-abs(t), df))
