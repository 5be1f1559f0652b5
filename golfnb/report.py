"""Tables and figures the notebooks show, computed from a run directory's structured files.

Every function here takes plain data (a run directory, a metrics dict, an eval result) and returns a
`Table` (HTML in Jupyter, aligned text elsewhere) or a matplotlib Figure; `show(fig)` puts a figure into
the notebook as one modest-DPI PNG and closes it, so executed notebooks stay small. Nothing here trains or
evaluates: the notebooks call golfnb.launch for that. matplotlib is imported inside the functions that
draw (importing this module is free).
"""
from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "FIG_DPI", "Table", "Banner", "fmt", "to_png", "show", "read_history", "env_table", "artifact_metrics",
    "runs_table", "scale_note", "ablation_metrics", "plot_tilt", "plot_training", "train_table", "training_notes",
    "config_table", "artifact_report", "quant_notes", "Note", "UNQUANTIZED", "artifact_tables", "plan_table", "plot_artifact_bytes",
    "method_rows", "methods_table", "plot_bpb_comparison", "eval_table", "phase_table", "plot_ttt_chunks",
    "tilt_table", "verdict_banner", "legality_table", "groups_table", "plot_groups", "plot_group_curves",
    "welch_table", "ablation_picker",
]

FIG_DPI = 90
BYTES_LIMIT = 16_000_000


# ================================================================================================ basics

def fmt(v: Any, digits: int = 4) -> str:
    """A compact string for a table cell: thousands separators for ints, `digits` decimals for floats."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if abs(v) >= 1e4:
            return f"{v:,.0f}" if abs(v) >= 1e6 else f"{v:,.1f}"
        if v != 0 and abs(v) < 10 ** -digits:
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x, digits) for x in v)
    return str(v)


class Table:
    """Rows of dicts shown as an HTML table in Jupyter and as aligned text in a terminal or test."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 title: str | None = None, digits: int = 4):
        self.rows = [dict(r) for r in rows]
        if columns is None:
            columns = []
            for r in self.rows:
                columns += [k for k in r if k not in columns]
        self.columns = list(columns)
        self.title = title
        self.digits = digits

    def cells(self) -> list[list[str]]:
        return [[fmt(r.get(c), self.digits) for c in self.columns] for r in self.rows]

    def to_text(self) -> str:
        cells = self.cells()
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(self.columns)]
        lines = [self.title] if self.title else []
        lines.append("  ".join(c.ljust(w) for c, w in zip(self.columns, widths)))
        lines += ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self.cells())
        cap = f"<caption><b>{html.escape(self.title)}</b></caption>" if self.title else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def __repr__(self) -> str:
        return self.to_text()

    def __len__(self) -> int:
        return len(self.rows)


def _numeric(s: str) -> bool:
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return s == "-"


class Note:
    """A sentence shown as plain text (no quotes, unlike displaying a str)."""

    def __init__(self, text: str):
        self.text = text

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(self.text)}</p>"

    def __repr__(self) -> str:
        return self.text


class Banner:
    """A one-line verdict shown prominently (coloured box in Jupyter, bracketed text elsewhere)."""

    def __init__(self, text: str, ok: bool, detail: str = ""):
        self.text, self.ok, self.detail = text, ok, detail

    def _repr_html_(self) -> str:
        colour = "#1b7f3b" if self.ok else "#b00020"
        det = f"<div style='margin-top:4px'>{html.escape(self.detail)}</div>" if self.detail else ""
        return (f"<div style='border:3px solid {colour};padding:8px;font-size:1.2em'>"
                f"<b style='color:{colour}'>{html.escape(self.text)}</b>{det}</div>")

    def __repr__(self) -> str:
        return f"[{'OK' if self.ok else '!!'}] {self.text}" + (f"\n{self.detail}" if self.detail else "")


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def to_png(fig: Any, dpi: int = FIG_DPI) -> bytes:
    """The figure as PNG bytes at `dpi`; the figure is closed (no second copy from the inline backend)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    try:  # line plots need few colours: a 64-colour palette makes the PNG ~4x smaller, visually the same
        from PIL import Image

        out = io.BytesIO()
        Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(
            colors=64, method=Image.Quantize.FASTOCTREE).save(out, format="PNG", optimize=True)
        return out.getvalue()
    except (ImportError, OSError, ValueError):
        return buf.getvalue()


def show(fig: Any, dpi: int = FIG_DPI) -> None:
    """Display `fig` in the notebook as one PNG at `dpi` and close it (nothing happens for None)."""
    if fig is None:
        return
    png = to_png(fig, dpi)
    if _in_ipython():
        from IPython.display import Image, display

        display(Image(data=png, format="png"))


def _figure(nrows: int = 1, ncols: int = 1, width: float = 9.0, height: float = 3.2, **kw: Any):
    import matplotlib

    if not _in_ipython():
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height * nrows), squeeze=False, **kw)
    return fig, axes


# ================================================================================================ training

def read_history(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """metrics.jsonl of a run grouped by record kind (train, val, summary, error ...).

    If the directory was trained more than once from scratch (the step count restarts), only the last
    session is kept. A run resumed from a checkpoint older than its last logged step logs those steps again:
    the later records replace the earlier ones of the same kind and label from that step on. A half-written last line
    (a run still going) is skipped."""
    p = Path(run_dir) / "metrics.jsonl"
    out: dict[str, list[dict[str, Any]]] = {}
    if not p.is_file():
        return out
    top = 0
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = rec.get("step")
        if isinstance(step, int):
            if step <= 1 < top:  # step 0/1 after later steps: a fresh session in the same directory
                out, top = {}, 0
            top = max(top, step)
            # resumed from an earlier checkpoint: steps run again replace the earlier records of the same kind
            # and label (the final and post-EMA evals share a step but not a label)
            same = out.get(rec.get("kind", "?"), [])
            label = rec.get("label")
            if any(r.get("label") == label and isinstance(r.get("step"), int) and r["step"] >= step for r in same):
                same[:] = [r for r in same
                           if not (r.get("label") == label and isinstance(r.get("step"), int) and r["step"] >= step)]
        out.setdefault(rec.get("kind", "?"), []).append(rec)
    return out


def _looping_point(train: Sequence[Mapping[str, Any]], step: Any) -> tuple[float, float] | None:
    """(step, elapsed_s) where depth recurrence switched on: `step` (train.looping_step) placed on the wall
    clock by interpolating between the logged steps around it."""
    if not isinstance(step, (int, float)) or not train:
        return None
    pts = [(float(r["step"]), float(r["elapsed_s"])) for r in train if "elapsed_s" in r]
    lo = max((p for p in pts if p[0] <= step), default=(0.0, 0.0))
    hi = min((p for p in pts if p[0] >= step), default=pts[-1])
    t = lo[1] if hi[0] == lo[0] else lo[1] + (hi[1] - lo[1]) * (step - lo[0]) / (hi[0] - lo[0])
    return float(step), t


def plot_training(run_dir: str | Path, title: str | None = None):
    """Train loss and val_bpb against step and against training wall time (2 x 2); None without history."""
    h = read_history(run_dir)
    train, val = h.get("train", []), h.get("val", [])
    if not train and not val:
        return None
    from golfnb.runs import read_metrics

    fig, ax = _figure(2, 2, width=9.5, height=2.9, sharex="col")
    summ = (h.get("summary") or [{}])[-1]
    loop = _looping_point(train, read_metrics(run_dir).get("train.looping_step", summ.get("looping_step")))
    for col, xkey, xlabel in ((0, "step", "step"), (1, "elapsed_s", "training wall time (s, on the clock)")):
        a = ax[0][col]
        a.plot([r[xkey] for r in train], [r["train_loss"] for r in train], lw=1.2, color="C0")
        a.set_ylabel("train loss")
        b = ax[1][col]
        for label, style in (("val", dict(marker="o", color="C1")), ("final", dict(marker="s", color="C2")),
                             ("post_ema", dict(marker="D", color="C3"))):
            pts = [r for r in val if r.get("label", "val") == label]
            if pts:
                b.plot([r[xkey] for r in pts], [r["val_bpb"] for r in pts], ls="-" if label == "val" else "none",
                       label={"val": "during training", "final": "final weights",
                              "post_ema": "EMA weights"}[label], **style)
        b.set_ylabel("val_bpb")
        b.set_xlabel(xlabel)
        if loop is not None:
            for x in (a, b):
                x.axvline(loop[col], color="grey", ls="--", lw=0.8)
            a.annotate("recurrence on", (loop[col], a.get_ylim()[1]), fontsize=8, color="grey",
                       va="top", ha="left", xytext=(3, -3), textcoords="offset points")
        if col == 1 and val:
            b.legend(fontsize=8)
        for x in (a, b):
            x.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


_TRAIN_ROWS = [
    ("train.steps", "optimizer steps"), ("train.train_time_s", "training time on the clock (s)"),
    ("train.warmup_s", "compile + warm-up, off the clock (s)"), ("train.looping_step", "recurrence on at step"),
    ("train.tok_s_pre", "tokens/s before recurrence"), ("train.tok_s_post", "tokens/s with recurrence"),
    ("train.world_size", "processes"), ("train.peak_mem_alloc_mib", "peak GPU memory allocated (MiB)"),
    ("train.val_loss", "val_loss, final weights"), ("train.val_bpb", "val_bpb, final weights"),
    ("train.post_ema_val_loss", "val_loss, EMA weights"), ("train.post_ema_val_bpb", "val_bpb, EMA weights"),
]


def train_table(metrics: Mapping[str, Any]) -> Table:
    """The final training numbers of a run (from its train.* metrics)."""
    rows = [{"metric": label, "value": metrics[k], "key": k} for k, label in _TRAIN_ROWS if k in metrics]
    return Table(rows, ["metric", "value", "key"], title="training results")


def training_notes(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[str]:
    """Plain-language remarks a reader needs to interpret the numbers (short runs, EMA, the clock)."""
    notes = []
    steps = metrics.get("train.steps")
    decay = float(config.get("ema_decay", 0) or 0)
    raw, ema = metrics.get("train.val_bpb"), metrics.get("train.post_ema_val_bpb")
    if ema is not None and raw is not None and ema > raw + 0.01 and decay > 0:
        window = 1.0 / (1.0 - decay)
        notes.append(f"The EMA weights score worse than the final weights (val_bpb {ema:.4f} vs {raw:.4f}): with "
                     f"ema_decay={decay} the average spans ~{window:.0f} steps, and this run took {steps} steps, so "
                     f"the average still carries early, untrained weights. The saved final model (and any "
                     f"artifact quantized from it) holds the EMA weights.")
    cap = float(config.get("max_wallclock_seconds", 0) or 0)
    if 0 < cap < 600:
        notes.append(f"The training clock was {cap:.0f} s (the challenge allows 600 s on 8xH100): a short "
                     f"run, not a record attempt.")
    ws = metrics.get("train.world_size")
    if ws and ws < 8:
        notes.append(f"{ws} process(es): each step accumulated {8 // int(ws)} micro-batches, so the batch per "
                     f"step is the 8-GPU one (train_batch_tokens={config.get('train_batch_tokens')}).")
    return notes


_CONFIG_KEYS = ("run_id", "seed", "vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult",
                "num_loops", "loop_start", "loop_end", "enable_looping_at", "parallel_residual", "train_seq_len",
                "train_batch_tokens", "iterations", "max_wallclock_seconds", "matrix_lr", "muon_momentum",
                "ema_decay", "compressor", "data_path")


def config_table(config: Mapping[str, Any], keys: Iterable[str] = _CONFIG_KEYS) -> Table:
    return Table([{"field": k, "value": config[k]} for k in keys if k in config], title="configuration (excerpt)")


def env_table(run_dir: str | Path) -> Table:
    """Where and on what the run trained (env.json): code identity, versions, device, data shards."""
    p = Path(run_dir) / "env.json"
    if not p.is_file():
        return Table([], ["field", "value"], title="environment: no env.json in the run directory")
    e = json.loads(p.read_text())
    env, data, git = e.get("environment", {}), e.get("data", {}), e.get("git", {})
    rows = [("git commit", git.get("commit")), ("git dirty", git.get("dirty")),
            ("code sha256", (e.get("code_sha256") or "")[:16]), ("python", env.get("python")),
            ("torch", env.get("torch")), ("cuda", env.get("cuda")), ("gpu", env.get("gpu") or "none (CPU)"),
            ("gpu count", env.get("gpu_count")), ("attention backend", env.get("attn_backend")),
            ("processes", e.get("world_size")), ("data", data.get("data_path")),
            ("train / val shards", f"{data.get('train_shards')} / {data.get('val_shards')}"),
            ("shard manifest sha256", (data.get("manifest_sha256") or "")[:16])]
    return Table([{"field": k, "value": v} for k, v in rows], title="environment and data (env.json)")


# ================================================================================================ artifact

def artifact_report(run_dir: str | Path, *, limit: int = BYTES_LIMIT, code_bytes: int | None = None,
                    plan: bool = True, verify: bool = True) -> dict[str, Any]:
    """Bytes of a run's artifact per tensor group, the total with the code against `limit`, every other
    compressor's file present (artifacts/model.<c>.gnb), and the planner's options when over `limit`."""
    from golfnb.artifact import deserialize, plan_fit, read_header, size_table
    from golfnb.pipeline import ARTIFACT_RELPATH
    from golfnb.runs import read_metrics

    rd = Path(run_dir)
    path = rd / ARTIFACT_RELPATH
    data = path.read_bytes()
    hdr = read_header(data)
    q = deserialize(data, str(path))
    table = size_table(q, hdr["compressor"], hdr["byte_shuffle_stride"])
    metrics = read_metrics(rd)
    code_src = "recorded when the run was quantized (quant.code_bytes)"
    if code_bytes is None:
        code_bytes = metrics.get("quant.code_bytes")
    else:
        code_src = "given"
    if code_bytes is None:
        from golfnb.config import Hyperparameters
        from golfnb.pack import estimate_code_bytes

        code_bytes = estimate_code_bytes(Hyperparameters.from_json(rd / "config.json"))
        code_src = "estimated: golfnb pack of this config"
    variants = [{"compressor": hdr["compressor"], "file": path.name, "model_bytes": hdr["file_bytes"]}]
    for other in sorted(path.parent.glob(f"{path.stem}.*{path.suffix}")):
        h = read_header(other)
        variants.append({"compressor": h["compressor"], "file": other.name, "model_bytes": h["file_bytes"]})
    for v in variants:
        v["code_bytes"] = code_bytes
        v["total_bytes"] = v["model_bytes"] + code_bytes
        v["margin_bytes"] = limit - v["total_bytes"]
        v["fits"] = v["margin_bytes"] >= 0
    total = hdr["file_bytes"] + code_bytes
    options = []
    if plan and total > limit:
        options = plan_fit(q, limit - code_bytes, hdr["compressor"], hdr["byte_shuffle_stride"], table,
                           hdr["file_bytes"], verify=verify)
    return {"path": str(path), "header": hdr, "method": q.method, "params": q.num_params(), "groups": table,
            "model_bytes": hdr["file_bytes"], "code_bytes": code_bytes, "code_source": code_src,
            "total_bytes": total, "limit": limit, "margin_bytes": limit - total, "variants": variants,
            "plan": options}


def artifact_metrics(rep: Mapping[str, Any]) -> dict[str, Any]:
    """`artifact.*` metrics of an artifact_report: bytes per compressor variant, code bytes, cap."""
    out: dict[str, Any] = {"artifact.code_bytes": rep["code_bytes"], "artifact.limit": rep["limit"],
                           "artifact.compressor": rep["header"]["compressor"]}
    for v in rep["variants"]:
        c = v["compressor"]
        out.update({f"artifact.{c}.model_bytes": v["model_bytes"], f"artifact.{c}.total_bytes": v["total_bytes"],
                    f"artifact.{c}.margin_bytes": v["margin_bytes"]})
    return out


def artifact_tables(rep: Mapping[str, Any]) -> tuple[Table, Table]:
    """(bytes per tensor group, totals per compressor variant) of an artifact_report."""
    groups = Table([{"group": g["group"], "tensors": g["tensors"], "params": g["params"],
                     "bits": "/".join(map(str, g["bits"])) or "fp16/raw", "raw bytes": g["raw_bytes"],
                     "compressed alone": g["compressed_alone"], "bits/param": g["bits_per_param"]}
                    for g in rep["groups"]],
                   title=f"{rep['header']['compressor']} artifact, {rep['method']}, {rep['params']:,} parameters "
                         f"(each group compressed alone; the file compresses them together)", digits=3)
    totals = Table([{"compressor": v["compressor"], "file": v["file"], "model bytes": v["model_bytes"],
                     "code bytes": v["code_bytes"], "total": v["total_bytes"], "limit": rep["limit"],
                     "margin": v["margin_bytes"], "fits": v["fits"]} for v in rep["variants"]],
                   title=f"submission size (code: {rep['code_source']})")
    return groups, totals


def plan_table(rep: Mapping[str, Any]) -> Table | Note:
    """The planner's options when the artifact is over the limit, else one sentence saying it fits."""
    if rep["margin_bytes"] >= 0:
        return Note(f"Fits: code + model = {rep['total_bytes']:,} bytes, {rep['margin_bytes']:,} under the "
                    f"{rep['limit']:,}-byte cap; the planner has nothing to change.")
    rows = [{"change": ", ".join(f"{k}={v}" for k, v in o.change.items()), "predicted model bytes":
             o.predicted_model_bytes, "verified model bytes": o.verified_model_bytes, "fits": o.fits,
             "note": o.note} for o in rep["plan"]]
    rows.append({"change": "prune_to_fit=True (selective +-1 pruning)", "note": "zeroes the cheapest |q|=1 codes"})
    return Table(rows, title=f"over the cap by {-rep['margin_bytes']:,} bytes: options (re-quantize with the change)")


def quant_notes(metrics: Mapping[str, Any], rep: Mapping[str, Any]) -> list[str]:
    """Remarks on the artifact: pruning that another compressor might have made unnecessary."""
    notes = []
    pruned = int(metrics.get("quant.pruned_entries") or 0)
    own = rep["header"]["compressor"]
    if pruned:
        notes.append(f"Selective pruning zeroed {pruned:,} +-1 codes so that the {own} artifact fits the cap.")
        for v in rep["variants"]:
            saved = rep["model_bytes"] - v["model_bytes"]
            if v["compressor"] != own and saved > 0:
                notes.append(f"The same (pruned) model is {saved:,} bytes smaller with {v['compressor']} "
                             f"({v['margin_bytes']:,} bytes of margin): quantizing with compressor={v['compressor']} "
                             f"would likely need far less pruning, or none.")
    return notes


def plot_artifact_bytes(rep: Mapping[str, Any]):
    """Left: compressed bytes per tensor group. Right: code + model per compressor against the cap."""
    fig, ax = _figure(1, 2, width=10, height=3.4, gridspec_kw={"width_ratios": [3, 2]})
    a, b = ax[0]
    gs = rep["groups"]
    a.barh([g["group"] for g in gs][::-1], [g["compressed_alone"] for g in gs][::-1], color="C0")
    for i, g in enumerate(gs[::-1]):
        a.annotate(f"{g['compressed_alone']:,}", (g["compressed_alone"], i), fontsize=8, va="center",
                   xytext=(3, 0), textcoords="offset points")
    a.set_xlabel("bytes (group compressed alone)")
    a.set_title("bytes per tensor group", fontsize=10)
    a.margins(x=0.25)
    vs = rep["variants"]
    names = [v["compressor"] for v in vs]
    b.bar(names, [v["code_bytes"] for v in vs], color="C7", label="code")
    b.bar(names, [v["model_bytes"] for v in vs], bottom=[v["code_bytes"] for v in vs], color="C0", label="model")
    b.axhline(rep["limit"], color="C3", ls="--", lw=1.2, label=f"cap {rep['limit']:,}")
    for i, v in enumerate(vs):
        b.annotate(f"{v['total_bytes']:,}\n({v['margin_bytes']:+,})", (i, v["total_bytes"]), ha="center",
                   va="bottom", fontsize=8)
    b.set_ylim(0, max(rep["limit"], max(v["total_bytes"] for v in vs)) * 1.15)
    b.set_ylabel("bytes")
    b.set_title("code + model against the cap", fontsize=10)
    b.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


# ================================================================================================ evals

UNQUANTIZED = "unquantized saved model (plain)"


def method_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """val_bpb of every stage of a run: the unquantized saved model (the EMA weights when EMA is on: the
    train.post_ema_* numbers), then each eval method recorded."""
    from golfnb.runs import read_metrics

    m = read_metrics(run_dir)
    rows = []
    pre = m.get("train.post_ema_val_bpb", m.get("train.val_bpb"))
    if pre is not None:
        rows.append({"method": UNQUANTIZED, "val_bpb": pre, "legal": None, "seconds": None})
    methods = sorted({k[5:-8] for k in m if k.startswith("eval.") and k.endswith(".val_bpb")})
    for meth in methods:
        rows.append({"method": meth, "val_bpb": m[f"eval.{meth}.val_bpb"],
                     "legal": m.get(f"eval.{meth}.leaderboard_legal"), "seconds": m.get(f"eval.{meth}.seconds")})
    return rows


def methods_table(run_dir: str | Path) -> Table:
    rows = method_rows(run_dir)
    base = next((r["val_bpb"] for r in rows if r["method"] == UNQUANTIZED), None)
    for r in rows:
        r["vs unquantized"] = (r["val_bpb"] - base) if base is not None else None
    return Table(rows, ["method", "val_bpb", "vs unquantized", "legal", "seconds"],
                 title="val_bpb of this run, by stage and method (eval methods score the dequantized artifact)")


def plot_bpb_comparison(rows: Sequence[Mapping[str, Any]], highlight: str | None = None, title: str | None = None):
    """Horizontal bars of val_bpb per method (axis zoomed to the spread; illegal methods hatched)."""
    if not rows:
        return None
    fig, ax = _figure(1, 1, width=8, height=0.45 * len(rows) + 1.2)
    a = ax[0][0]
    names = [r["method"] for r in rows][::-1]
    vals = [float(r["val_bpb"]) for r in rows][::-1]
    colors = ["C1" if n == highlight else "C0" for n in names]
    bars = a.barh(names, vals, color=colors)
    for bar, r in zip(bars, list(rows)[::-1]):
        if r.get("legal") is False:
            bar.set_hatch("//")
            bar.set_edgecolor("C3")
    lo, hi = min(vals), max(vals)
    pad = max((hi - lo) * 0.3, 0.01 * hi)
    a.set_xlim(lo - pad, hi + pad)
    for i, v in enumerate(vals):
        a.annotate(f"{v:.4f}", (v, i), fontsize=8, va="center", xytext=(3, 0), textcoords="offset points")
    a.set_xlabel("val_bpb (lower is better; hatched: not leaderboard-legal)")
    if title:
        a.set_title(title, fontsize=10)
    a.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def eval_table(res: Mapping[str, Any]) -> Table:
    keys = ("method", "source", "val_bpb", "val_loss", "targets_scored", "bytes", "seconds", "leaderboard_legal")
    if res.get("device"):  # results from before devices were recorded have none
        keys = keys[:2] + ("device",) + keys[2:]
    return Table([{k: res.get(k) for k in keys}], list(keys), title="result")


def phase_table(res: Mapping[str, Any]) -> Table:
    """Wall seconds per phase of an eval pass, with the eval budget it ran under."""
    total = float(res.get("seconds") or 0.0)
    rows = [{"phase": p, "seconds": float(s), "share": (float(s) / total if total else None)}
            for p, s in (res.get("phases") or {}).items()]
    b = res.get("budget") or {}
    budget = b.get("budget_s")
    title = f"phase times (total {total:.2f} s; budget {'none' if not budget else f'{budget:.0f} s'})"
    return Table(rows, ["phase", "seconds", "share"], title=title)


def plot_ttt_chunks(res: Mapping[str, Any], baseline: Sequence[float] | None = None):
    """TTT's bpb per chunk (scored before the chunk is trained on), with the unadapted model's per-chunk
    bpb when given (same windows, no adaptation) and the gain between them."""
    cb = [float(x) for x in res.get("chunk_bpb") or []]
    if not cb:
        return None
    fig, ax = _figure(1, 2 if baseline else 1, width=10 if baseline else 7, height=3.2)
    a = ax[0][0]
    xs = list(range(len(cb)))
    a.plot(xs, cb, marker=".", lw=1, color="C1", label=f"{res['method']} (score, then adapt)")
    if baseline:
        a.plot(xs, baseline, marker=".", lw=1, color="C0", label="no adaptation")
    a.axhline(float(res["val_bpb"]), color="C1", ls=":", lw=1, label=f"overall {float(res['val_bpb']):.4f}")
    a.set_xlabel("chunk (in stream order)")
    a.set_ylabel("bpb of the chunk")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    if baseline:
        b = ax[0][1]
        gain = [x - y for x, y in zip(baseline, cb)]
        b.bar(xs, gain, color=["C2" if g >= 0 else "C3" for g in gain])
        b.axhline(0, color="black", lw=0.6)
        b.set_xlabel("chunk")
        b.set_ylabel("bpb gained by TTT")
        b.set_title("gain per chunk (chunk 0 is scored before any adaptation)", fontsize=9)
        b.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def tilt_table(res: Mapping[str, Any]) -> Table:
    t = res.get("tilt") or {}
    rows = [
        {"quantity": "hint rate (targets with a hint)", "value": t.get("hint_rate")},
        {"quantity": "hint rate among scored targets", "value": t.get("scored_hint_rate")},
        {"quantity": "precision (hints naming the true token)", "value": t.get("precision")},
        {"quantity": "hinted and correct, share of all targets", "value": t.get("correct_rate")},
        {"quantity": "hints", "value": t.get("n_hints")},
        {"quantity": "precompute seconds", "value": t.get("precompute_s")},
        {"quantity": "kernel backend", "value": t.get("backend")},
        {"quantity": "base beta", "value": t.get("base_beta")},
        {"quantity": "n-gram orders", "value": t.get("orders")},
    ]
    return Table(rows, ["quantity", "value"], title="n-gram tilt")


def plot_tilt(res: Mapping[str, Any]):
    """Hint rate, precision and hinted-and-correct share of the n-gram tilt, as bars."""
    t = res.get("tilt") or {}
    items = [("hint rate", t.get("hint_rate")), ("precision", t.get("precision")),
             ("hinted and correct", t.get("correct_rate"))]
    items = [(k, float(v)) for k, v in items if v is not None]
    if not items:
        return None
    fig, ax = _figure(1, 1, width=6, height=2.6)
    a = ax[0][0]
    a.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color=["C2", "C0", "C1"][: len(items)][::-1])
    for i, (_, v) in enumerate(items[::-1]):
        a.annotate(f"{v:.3f}", (v, i), fontsize=8, va="center", xytext=(3, 0), textcoords="offset points")
    a.set_xlim(0, 1.1)
    a.set_title(f"{res['method']}: orders {t.get('orders')}, base beta {t.get('base_beta')}", fontsize=10)
    a.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def verdict_banner(verdict: Mapping[str, Any]) -> Banner:
    """golfnb.legality's measured verdict (Verdict.as_dict()) as a banner."""
    method = verdict.get("method")
    if verdict.get("leaderboard_legal"):
        return Banner(f"{method}: leaderboard-legal (passes every golfnb legality check)", True,
                      str(verdict.get("how", "")))
    failed = ", ".join(verdict.get("failed_checks") or [])
    return Banner(f"{method}: NOT leaderboard-legal (fails {failed})", False, str(verdict.get("summary", "")))


def legality_table(verdict: Mapping[str, Any]) -> Table:
    failed = set(verdict.get("failed_checks") or [])
    checks = ("prefix_invariance", "self_exclusion", "normalisation", "score_once", "score_before_update")
    rows = [{"check": c, "passed": c not in failed} for c in checks]
    rows += [{"check": f"setting {k}", "passed": None, "value": v} for k, v in (verdict.get("settings") or {}).items()]
    return Table(rows, ["check", "passed", "value"], title="golfnb legality checks")


# ================================================================================================ ablation

def runs_table(runs: Sequence[Any], keys: Sequence[str], metric: str) -> Table:
    """One row per run: its name, the grouping keys, its seed and the metric."""
    cols = ["run", *[k for k in keys if k != "seed"], "seed", metric]
    rows = [{"run": r.name, **{k: r.config.get(k) for k in keys}, "seed": r.seed, metric: r.metrics.get(metric)}
            for r in runs]
    return Table(rows, cols, title=f"{len(rows)} runs")


def scale_note(runs: Sequence[Any]) -> str | None:
    """A warning when every run is a CPU / smoke-scale run (whose numbers show mechanics, not record-scale
    effects); None otherwise."""
    if not runs:
        return None
    cpu = []
    for r in runs:
        p = Path(r.path) / "env.json"
        gpu = json.loads(p.read_text()).get("environment", {}).get("gpu") if p.is_file() else None
        cpu.append(gpu is None)
    small = all(int(r.config.get("model_dim", 0)) < 256 for r in runs)
    if not (all(cpu) or small):
        return None
    dims = "/".join(str(d) for d in sorted({r.config.get("model_dim") for r in runs}))
    steps = "/".join(str(s) for s in sorted({r.metrics["train.steps"] for r in runs if "train.steps" in r.metrics}))
    where = "on CPU" if all(cpu) else "on GPU"
    return (f"Smoke-scale runs {where}: model_dim {dims}, {steps or '?'} optimizer steps each. These numbers show that "
            f"the mechanics work and how large seed noise is at this scale; they do not predict the effect of a "
            f"technique at record scale (11 layers x 512, 600 s on 8xH100).")


def ablation_metrics(rows: Sequence[Mapping[str, Any]], by: Sequence[str], metric: str) -> dict[str, Any]:
    """`ablation.*` metrics: the metric and keys, and per group its mean, std and n."""
    out: dict[str, Any] = {"ablation.metric": metric, "ablation.by": list(by)}
    for r in rows:
        lab = ",".join(f"{k}={r[k]}" for k in by) or "all"
        std = r["std"] if r["n"] > 1 else None  # one run has no spread: null, not NaN
        out.update({f"ablation.{lab}.mean": r["mean"], f"ablation.{lab}.std": std, f"ablation.{lab}.n": r["n"]})
    return out


def groups_table(rows: Sequence[Mapping[str, Any]], by: Sequence[str], metric: str) -> Table:
    out = []
    for r in rows:
        d = {k: r[k] for k in by}
        d.update({"n": r["n"], "mean": r["mean"], "std": r["std"] if r["n"] > 1 else None, "values": r["values"],
                  "seeds": r["seeds"]})
        if r.get("missing"):
            d["missing"] = r["missing"]
        out.append(d)
    return Table(out, title=f"{metric}: mean and sample std over seeds", digits=4)


def welch_table(rows: Sequence[Mapping[str, Any]], by: Sequence[str]) -> Table | Note:
    """Every group against the first one: Welch's t-test (independent samples) and the paired t-test over
    the seeds both ran (each needs >= 2 values)."""
    from golfnb.ablation import paired, welch

    if len(rows) < 2:
        return Note("One group only: nothing to compare.")
    ref = rows[0]
    ref_label = ", ".join(f"{k}={ref[k]}" for k in by)
    out = []
    for r in rows[1:]:
        row: dict[str, Any] = {"group": ", ".join(f"{k}={r[k]}" for k in by), "vs": ref_label,
                               "mean diff": r["mean"] - ref["mean"]}
        notes = []
        try:
            w = welch(r["values"], ref["values"])
            row.update({"Welch t": w["t"], "Welch p": w["p"]})
        except ValueError as e:
            notes.append(str(e))
        try:
            pr = paired(r["values"], r["seeds"], ref["values"], ref["seeds"])
            row.update({"paired seeds": pr["n"], "paired diff": pr["diff"], "paired diff std": pr["std"],
                        "paired p": pr["p"]})
        except ValueError as e:
            notes.append(str(e))
        if notes:
            row["note"] = "; ".join(notes)
        out.append(row)
    return Table(out, title="each group against the first: Welch (independent) and paired-by-seed t-tests "
                            "(two-sided p)")


def _label(r: Mapping[str, Any], by: Sequence[str]) -> str:
    return ", ".join(f"{k}={r[k]}" for k in by) if by else "all runs"


def plot_groups(rows: Sequence[Mapping[str, Any]], by: Sequence[str], metric: str):
    """Mean +- std per group with each seed's value as a dot; a line plot when grouping by one numeric key."""
    if not rows:
        return None
    fig, ax = _figure(1, 1, width=7, height=3.4)
    a = ax[0][0]
    numeric = len(by) == 1 and all(isinstance(r[by[0]], (int, float)) and not isinstance(r[by[0]], bool)
                                   for r in rows) and len(rows) > 2
    xs = [float(r[by[0]]) for r in rows] if numeric else list(range(len(rows)))
    means = [r["mean"] for r in rows]
    stds = [0.0 if math.isnan(r["std"]) else r["std"] for r in rows]
    if numeric:
        a.errorbar(xs, means, yerr=stds, marker="o", capsize=4, color="C0")
        a.set_xlabel(by[0])
    else:
        a.bar(xs, means, yerr=stds, capsize=5, color="C0", alpha=0.6)
        a.set_xticks(xs)
        a.set_xticklabels([_label(r, by) for r in rows], fontsize=8)
    for x, r in zip(xs, rows):
        a.scatter([x] * len(r["values"]), r["values"], color="black", s=12, zorder=3)
        a.annotate(f"{r['mean']:.4f}\n(n={r['n']})", (x, r["mean"]), fontsize=8, ha="left",
                   xytext=(6, 0), textcoords="offset points")
    vals = [v for r in rows for v in r["values"]]
    if vals:
        lo, hi = min(vals), max(vals)
        pad = max((hi - lo) * 0.5, 0.002 * abs(hi) + 1e-9)
        a.set_ylim(lo - pad, hi + pad)
    a.set_ylabel(metric)
    a.set_title(f"{metric} by {', '.join(by) or 'run'} (mean +- std; dots: seeds)", fontsize=10)
    a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_group_curves(runs: Sequence[Any], by: Sequence[str], key: str = "train_loss"):
    """One curve per run against step, coloured by group (train_loss from train records; val_bpb from val)."""
    if not runs:
        return None
    fig, ax = _figure(1, 1, width=7, height=3.4)
    a = ax[0][0]
    groups: dict[str, tuple[str, str]] = {}
    kind = "val" if key in ("val_bpb", "val_loss") else "train"
    styles = ("-", "--", ":", "-.")
    for r in runs:
        lab = ", ".join(f"{k}={r.config.get(k)}" for k in by) if by else "all runs"
        if lab not in groups:  # colour and line style per group: curves of similar runs lie on top of each other
            groups[lab] = (f"C{len(groups) % 10}", styles[len(groups) % len(styles)])
        color, ls = groups[lab]
        recs = [x for x in read_history(r.path).get(kind, []) if key in x and x.get("label", "val") == "val"]
        if recs:
            a.plot([x["step"] for x in recs], [x[key] for x in recs], color=color, ls=ls, lw=1.2, alpha=0.7)
    for lab, (c, ls) in groups.items():
        a.plot([], [], color=c, ls=ls, label=lab)
    a.set_xlabel("step")
    a.set_ylabel(key)
    a.set_title(f"{key} per run (one line per seed)", fontsize=10)
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def ablation_picker(runs: Sequence[Any], metrics: Sequence[str], keys: Sequence[str], metric: str,
                    by: Sequence[str]):
    """An ipywidgets box (metric and grouping-key dropdowns) that redraws the table and plot; None when
    ipywidgets is missing. Only useful live in JupyterLab: executed copies keep the static cells."""
    try:
        import ipywidgets as w
    except ImportError:
        return None
    from IPython.display import display

    from golfnb.ablation import group

    m_dd = w.Dropdown(options=list(metrics), value=metric if metric in metrics else (metrics[0] if metrics else None),
                      description="metric")
    choices = ([", ".join(keys)] + [k for k in keys if len(keys) > 1] + ["(all runs)"]) if keys else ["(all runs)"]
    start = ", ".join(by) if by else "(all runs)"
    by_dd = w.Dropdown(options=choices, value=start if start in choices else choices[0], description="group by")
    out = w.Output()

    def redraw(_: Any = None) -> None:
        b = [] if by_dd.value == "(all runs)" else [k.strip() for k in by_dd.value.split(",") if k.strip()]
        rows = group(runs, b, m_dd.value)
        with out:
            out.clear_output(wait=True)
            display(groups_table(rows, b, m_dd.value))
            fig = plot_groups(rows, b, m_dd.value)
            if fig is not None:
                show(fig)

    m_dd.observe(redraw, names="value")
    by_dd.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([m_dd, by_dd]), out])
