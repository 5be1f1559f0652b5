"""Pack a run into ONE self-contained `train_gpt.py`, the file the challenge counts.

    golfnb pack runs/x --out submission/train_gpt.py [--report] [--full] [--no-minify]

The packed file is the records' self-extracting form: a two-line wrapper

    import lzma as L,base64 as B
    exec(L.decompress(B.b85decode("..."),format=L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}]))

around a payload holding (1) the source of every golfnb module the submission needs, (2) the run's resolved
config as JSON, and (3) a few lines that register the sources as an in-memory package and call
`golfnb.pipeline.submission_main`. Raw LZMA2 (no xz container) and base85 follow #1394 ... #1533.

Why an importlib meta-path finder (and not one concatenated script): golfnb's modules import each other by
name (`from golfnb.model import GPT`) and some import lazily inside functions. A finder placed first on
`sys.meta_path` serves exactly those names from memory, so the library runs unchanged, an installed golfnb
is never consulted, and nothing is written to disk.

Every byte of code is a byte less of model, so the payload carries only what the run's config uses:

* Module selection (`plan_modules`): the static import closure of `golfnb.pipeline`, minus tooling modules
  (CLI, packing, downloads), minus the eval methods no pass of the config runs (the n-gram tilt and its C
  kernel source without a `+tilt` pass, SLOT without a slot pass, TTT without a ttt pass, the sliding
  window without a sliding pass). A module left out is still importable as a stand-in whose every name
  raises a clear error saying which setting it was packed without, so a changed environment variable
  fails loudly instead of running something else; the file also checks this before training starts.
* Legality verdicts measured at pack time. golfnb.legality runs its checks (prefix invariance,
  self-exclusion, normalisation, score-once, score-before-update) on a tiny synthetic CPU setting that
  carries only the method's own settings (`legality.check_config`): the verdict depends on the method's
  code and those settings, never on the trained weights or the data. Running the checks when packing
  therefore gives the verdict the eval would compute, and the packed `golfnb.legality` is a small table of
  those verdicts, keyed by (method, settings), recorded with the sha256 of the golfnb sources that measured
  them. Asking for a method or settings not in the table (e.g. TTT_LR changed through the environment) is
  an error before training, never a silent "legal".
* Minification (`minify_source`): docstrings, other bare string statements, comments, function and
  variable annotations (class-level annotations stay: dataclass and NamedTuple fields need them), the
  `__main__` blocks and `__all__` lists go, imports left unused by that are dropped, indentation is one
  space. Names are never changed; the result is checked to parse to the same tree as the stripped input.
* Tree shaking (`shake`): top-level functions and classes no kept code can name are removed.

Identity: the payload records the sha256 of the golfnb sources it was packed from (`source_sha256`, the
`code_sha256` of env.json and of the run logs of notebook/headless runs) and a digest of itself, so
`golfnb validate` can tell that a log belongs to this file and that the file was not edited after packing.
When the packed file runs, code identity is the file itself: its sha256 is what the log header and
env.json report as `code_sha256`.

The embedded config leaves `seed` and `run_id` at their defaults: they are per-run (set SEED=..., as the
records do), so all seeds of an entry ship byte-identical code and every run accounts the same code bytes.
Nothing in the packed sources may import a network module (`check_no_network`); the weights are read from
golfnb's own pickle-free artifact format.
"""
from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import json
import lzma
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from golfnb.config import ConfigError, Hyperparameters
from golfnb.io import atomic_write_text

__all__ = [
    "PackError", "PackResult", "PackPlan", "PackedInfo", "ROOT_MODULES", "EXCLUDED_MODULES", "FORBIDDEN_IMPORTS",
    "module_closure", "module_sources", "minify_source", "shake", "check_no_network", "challenge_paths",
    "submission_config", "eval_method_keys", "plan_modules", "build_payload", "wrap", "unwrap", "payload_modules",
    "inspect_packed", "pack_config", "pack_text", "pack_submission", "estimate_code_bytes", "size_report",
    "format_size_report", "add_pack_parser", "main",
]

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT_MODULES = ("golfnb.pipeline",)
# tooling a submission never calls; their lazy imports elsewhere stay as they are (and would fail loudly)
EXCLUDED_MODULES = frozenset({
    "golfnb.pack", "golfnb.cli", "golfnb.launch", "golfnb.submit", "golfnb.validate", "golfnb.quickstart",
    "golfnb.bench", "golfnb.data.cli", "golfnb.data.download", "golfnb.data.build", "golfnb.data.tokenizer",
    "golfnb.stats", "golfnb.report", "golfnb.ablation", "golfnb.headless",
})
FORBIDDEN_IMPORTS = ("huggingface_hub", "requests", "urllib", "urllib3", "http", "socket", "ssl", "ftplib",
                     "httpx", "aiohttp", "datasets", "smtplib", "xmlrpc", "webbrowser", "kernels")
WRAPPER_HEAD = "import lzma as L,base64 as B\n"
_WRAP_START = 'exec(L.decompress(B.b85decode("'
_WRAP_END = '"),format=L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}]))\n'
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 0, "pb": 0}]
PACKED_MODULE = "golfnb._packed"  # generated: identity, stand-ins for left-out modules, the pre-flight check
LEGALITY_MODULE = "golfnb.legality"
# per-run fields the embedded config leaves at their defaults (see the module docstring)
PER_RUN_FIELDS = ("seed", "run_id")


class PackError(ValueError):
    """The submission cannot be packed as asked; the message says what to change."""


# ================================================================================================ closure

def _module_path(name: str) -> tuple[Path, bool] | None:
    """(file, is_package) of a golfnb module, None when there is no such module."""
    parts = name.split(".")
    if parts[0] != "golfnb":
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    f = base.with_suffix(".py")
    if parts[1:] and f.is_file():
        return f, False
    return None


def _imports_of(name: str, tree: ast.AST, is_pkg: bool) -> set[str]:
    """golfnb modules named by any import statement (or importlib.import_module("golfnb...") call)."""
    pkg = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            for a in node.names:
                out.add(f"{mod}.{a.name}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            out.add(node.args[0].value)
    found = set()
    for m in out:
        if not m.startswith("golfnb"):
            continue
        # `import golfnb.a.b` also imports golfnb and golfnb.a
        parts = m.split(".")
        for k in range(1, len(parts) + 1):
            sub = ".".join(parts[:k])
            if _module_path(sub) is not None:
                found.add(sub)
    return found


def module_closure(roots: Sequence[str] = ROOT_MODULES, exclude: Iterable[str] = EXCLUDED_MODULES) -> list[str]:
    """Sorted golfnb modules reachable from `roots` through import statements, minus `exclude`."""
    excl = set(exclude)
    todo = list(roots)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name in excl:
            continue
        mp = _module_path(name)
        if mp is None:
            raise PackError(f"module {name} is imported but has no source under {PACKAGE_DIR}")
        seen.add(name)
        path, is_pkg = mp
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        todo.extend(_imports_of(name, tree, is_pkg) - seen)
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)
    return sorted(seen)


def module_sources(names: Iterable[str]) -> dict[str, tuple[str, bool]]:
    """{module: (source text, is_package)} read from the installed golfnb package."""
    out = {}
    for n in names:
        mp = _module_path(n)
        if mp is None:
            raise PackError(f"no source for module {n}")
        out[n] = (mp[0].read_text(encoding="utf-8"), mp[1])
    return out


# ================================================================================================ minify

class _Strip(ast.NodeTransformer):
    """Docstrings, bare strings and function annotations (level 1); variable annotations too (level 2)."""

    def __init__(self, keep_module_doc: bool, level: int = 2):
        self.keep_module_doc = keep_module_doc
        self.level = level

    def _body(self, body: list[ast.stmt], is_module: bool = False) -> list[ast.stmt]:
        out = []
        for k, st in enumerate(body):
            if isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant) and isinstance(st.value.value, str):
                if is_module and k == 0 and self.keep_module_doc:
                    first = st.value.value.strip().split("\n", 1)[0]
                    out.append(ast.Expr(ast.Constant(first)))
                continue
            out.append(st)
        return out or [ast.Pass()]

    def visit_Module(self, node: ast.Module) -> ast.AST:
        self.generic_visit(node)
        node.body = self._body(node.body, is_module=True)
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        # class-level annotations are fields (dataclass, NamedTuple): they stay
        for st in node.body:
            if isinstance(st, ast.AnnAssign):
                st._golfnb_keep = True  # type: ignore[attr-defined]
        self.generic_visit(node)
        node.body = self._body(node.body)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST | None:
        if self.level < 2 or getattr(node, "_golfnb_keep", False):
            return self.generic_visit(node)
        if node.value is None:
            # a bare `x: T` only annotates; the name is bound (or not) by other statements
            return None
        return ast.copy_location(ast.Assign(targets=[node.target], value=self.visit(node.value)), node)

    def _func(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        self.generic_visit(node)
        node.body = self._body(node.body)
        if _reads_annotations(node):
            return node  # for triton.jit (tl.constexpr) and torch.library.custom_op (the op schema) they are semantics
        node.returns = None
        a = node.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
            if arg is not None:
                arg.annotation = None
        return node

    visit_FunctionDef = _func
    visit_AsyncFunctionDef = _func

    def generic_visit(self, node: ast.AST) -> ast.AST:
        # bare string statements inside if/for/while/try/with bodies
        for fld in ("body", "orelse", "finalbody"):
            body = getattr(node, fld, None)
            if isinstance(body, list) and body and isinstance(body[0], ast.stmt) \
                    and not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                kept = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                and isinstance(s.value.value, str))]
                setattr(node, fld, kept or ([ast.Pass()] if fld == "body" else []))
        super().generic_visit(node)
        # a body emptied by dropped annotations still needs a statement
        for fld in ("body", "orelse", "finalbody"):
            body = getattr(node, fld, None)
            if fld == "body" and isinstance(body, list) and not body and not isinstance(node, ast.Module):
                node.body = [ast.Pass()]
        return node


_ANNOTATION_READERS = frozenset({"jit", "custom_op"})


def _reads_annotations(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for d in node.decorator_list:
        f = d.func if isinstance(d, ast.Call) else d
        if (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")) in _ANNOTATION_READERS:
            return True
    return False


def _drop_main_block(tree: ast.Module) -> None:
    """Packed modules never run as __main__: their `if __name__ == "__main__":` blocks are dead code."""
    def is_main(st: ast.stmt) -> bool:
        t = st.test if isinstance(st, ast.If) else None
        return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
                and len(t.comparators) == 1 and isinstance(t.comparators[0], ast.Constant)
                and t.comparators[0].value == "__main__")
    tree.body = [st for st in tree.body if not is_main(st)] or [ast.Pass()]


def _unparse_compact(tree: ast.AST, name: str) -> str:
    text = ast.unparse(tree)
    lines = []
    for line in text.split("\n"):
        stripped = line.lstrip(" ")
        indent = len(line) - len(stripped)
        lines.append(" " * (indent // 4) + stripped)
    out = "\n".join(lines) + "\n"
    if ast.dump(ast.parse(out)) != ast.dump(ast.parse(text)):
        raise PackError(f"minifying {name} changed its syntax tree; pack with --no-minify and report this")
    return out


def _strip(tree: ast.Module, source: str, level: int = 2) -> ast.Module:
    _drop_main_block(tree)
    return ast.fix_missing_locations(_Strip("__doc__" in source, level).visit(tree))


def minify_source(source: str, name: str = "<module>", level: int = 2) -> str:
    """Docstrings, bare strings, comments, function annotations and the `__main__` block removed (level 1);
    also annotations of variables outside class bodies (level 2, the default); one-space indentation.
    Names and behaviour are unchanged (a module that reads `__doc__` keeps its docstring's first line).
    The output is checked to parse back to the same tree as the stripped input."""
    return _unparse_compact(_strip(ast.parse(source, name), source, level), name)


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _refs(node: ast.AST) -> set[str]:
    """Every identifier a subtree could use to reach a top-level name: names, attributes, import names,
    and string constants that ARE a (dotted) name (getattr / by-name tables); words inside prose strings
    (messages, f-string text) name nothing."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            if _DOTTED.fullmatch(n.value):
                out.update(n.value.split("."))
        elif isinstance(n, ast.alias):
            out.add(n.name.split(".")[-1])
            if n.asname:
                out.add(n.asname)
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            out.update(n.names)
    return out


def _is_lazy_table(st: ast.stmt) -> bool:
    """A package's lazy-export table, `NAME = {"name": "module", ...}` (all string keys and values): a name
    in it is reached only through attribute access or `from package import name`, which name it anyway."""
    return (isinstance(st, ast.Assign) and isinstance(st.value, ast.Dict) and bool(st.value.keys)
            and all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in st.value.keys)
            and all(isinstance(v, ast.Constant) and isinstance(v.value, str) for v in st.value.values))


# decorators without side effects at definition time; any other decorator might register the function
# somewhere (a registry), so such a def is always kept
_PURE_DECORATORS = frozenset({"dataclass", "no_grad", "inference_mode", "lru_cache", "cache", "contextmanager",
                              "wraps", "compile", "cached_property", "property", "staticmethod", "classmethod",
                              "total_ordering", "final", "overload", "jit", "disable"})


def _registers(st: ast.stmt) -> bool:
    for d in getattr(st, "decorator_list", []):
        f = d.func if isinstance(d, ast.Call) else d
        name = f.attr if isinstance(f, ast.Attribute) else (f.id if isinstance(f, ast.Name) else "")
        if name not in _PURE_DECORATORS:
            return True
    return False


def _is_def(st: ast.stmt) -> bool:
    return isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not st.name.startswith("__")


def _is_all(st: ast.stmt) -> bool:
    if not isinstance(st, (ast.Assign, ast.AugAssign)):
        return False
    targets = st.targets if isinstance(st, ast.Assign) else [st.target]
    return any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets)


def _is_golfnb_import(st: ast.stmt) -> bool:
    return isinstance(st, ast.ImportFrom) and not st.level and (st.module or "").startswith("golfnb")


def shake(trees: dict[str, ast.Module], roots: Iterable[str] = (), packages: Iterable[str] = ()
          ) -> dict[str, list[str]]:
    """Remove, in place, every top-level function and class that no kept code can name.

    Kept code: every top-level statement that is not a def, not `__all__`, and not a `from golfnb...`
    import, plus the defs it names, transitively (names are matched across all modules, so a name used
    anywhere keeps every def of that name: conservative). String constants that are a name count, so
    by-name lookups through tables of strings keep their targets; the lazy-export tables of `packages`
    do not (see `_is_lazy_table`). Afterwards `from golfnb.x import ...`
    statements and `__all__` lists drop the removed names. Returns {module: removed names}.
    """
    defs: dict[str, list[tuple[str, ast.stmt]]] = {}
    live: set[str] = set(roots)
    pkgs = set(packages)
    for mod, tree in trees.items():
        for st in tree.body:
            if _is_def(st) and not _registers(st):
                defs.setdefault(st.name, []).append((mod, st))
            elif mod in pkgs and _is_lazy_table(st):
                continue
            elif not _is_all(st) and not _is_golfnb_import(st):
                live |= _refs(st)
            if _is_def(st) and _registers(st):
                live.add(st.name)
                live |= _refs(st)
    done: set[str] = set()
    frontier = [n for n in live if n in defs]
    while frontier:
        name = frontier.pop()
        if name in done:
            continue
        done.add(name)
        for _mod, st in defs.get(name, []):
            for r in _refs(st) - done:
                if r in defs:
                    frontier.append(r)
    removed: dict[str, list[str]] = {}
    for mod, tree in trees.items():
        gone = {st.name for st in tree.body if _is_def(st) and st.name not in done and not _registers(st)}
        if gone:
            removed[mod] = sorted(gone)
    for mod, tree in trees.items():
        body = []
        for st in tree.body:
            if _is_def(st) and st.name not in done and not _registers(st):
                continue
            if _is_golfnb_import(st):
                src_removed = set(removed.get(st.module, []))
                st.names = [a for a in st.names if a.name not in src_removed]
                if not st.names:
                    continue
            if _is_all(st) and isinstance(st, ast.Assign) and isinstance(st.value, (ast.List, ast.Tuple)):
                st.value.elts = [e for e in st.value.elts
                                 if not (isinstance(e, ast.Constant) and e.value in set(removed.get(mod, [])))]
            body.append(st)
        tree.body = body or [ast.Pass()]
    return removed


def _star_imported(trees: dict[str, ast.Module]) -> set[str]:
    """Modules some packed module imports with `from m import *` (their __all__ matters)."""
    out = set()
    for tree in trees.values():
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names):
                out.add(n.module or "")
    return out


def _used_elsewhere(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    """{module: names other code could take from it}: every attribute name anywhere (module.name) plus the
    names other modules import from it (`from module import name`)."""
    attrs: set[str] = set()
    taken: dict[str, set[str]] = {m: set() for m in trees}
    for mod, tree in trees.items():
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute):
                attrs.add(n.attr)
            elif isinstance(n, ast.ImportFrom) and n.module in taken and n.module != mod:
                taken[n.module].update(a.name for a in n.names)
    return {m: attrs | names for m, names in taken.items()}


_PURE_IMPORTS = ("typing", "collections.abc", "dataclasses", "pathlib", "golfnb")


def _pure_module(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _PURE_IMPORTS)


def tidy(trees: dict[str, ast.Module], packages: Iterable[str] = ()) -> dict[str, list[str]]:
    """After minification and shaking, in place: drop `__all__` (no packed module star-imports) and import
    names nothing uses any more (`from M import a, b` where importing M has no side effects: typing and
    friends, and golfnb's own modules, which do nothing at import by design; never a bare `import M`; never
    in `packages`, whose imports are their public re-exports). Returns {module: dropped names}."""
    stars = _star_imported(trees)
    taken = _used_elsewhere(trees)
    pkgs = set(packages)
    dropped: dict[str, list[str]] = {}
    for mod, tree in trees.items():
        if mod not in stars:
            tree.body = [st for st in tree.body if not _is_all(st)] or [ast.Pass()]
        used: set[str] = set()
        for st in tree.body:
            if not isinstance(st, (ast.Import, ast.ImportFrom)):
                used |= _refs(st)
        if mod in pkgs:
            continue
        elsewhere = taken[mod]
        gone: list[str] = []
        body = []
        for st in tree.body:
            if (isinstance(st, ast.ImportFrom) and not st.level and _pure_module(st.module or "")
                    and not any(a.name == "*" for a in st.names)):
                keep = [a for a in st.names if (a.asname or a.name) in used or (a.asname or a.name) in elsewhere]
                gone += [a.asname or a.name for a in st.names if a not in keep]
                if not keep:
                    continue
                st.names = keep
            body.append(st)
        tree.body = body or [ast.Pass()]
        if gone:
            dropped[mod] = sorted(gone)
    return dropped


# ================================================================================================ checks

def check_no_network(sources: dict[str, tuple[str, bool]] | dict[str, str]) -> None:
    """Raise PackError when any packed module imports a network module (the rules forbid network access
    during evaluation; golfnb's downloads live in excluded tooling modules)."""
    bad = []
    for name, src in sources.items():
        text = src[0] if isinstance(src, tuple) else src
        for node in ast.walk(ast.parse(text)):
            mods: list[str] = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                mods = [node.module]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
                mods = [str(node.args[0].value)]
            for m in mods:
                if m.split(".")[0] in FORBIDDEN_IMPORTS:
                    bad.append(f"{name} imports {m}")
    if bad:
        raise PackError("the submission would import network modules: " + "; ".join(sorted(set(bad))) +
                        "; move that code into a tooling module (excluded from packing) or import it lazily "
                        "from one")


# ================================================================================================ selection

def challenge_paths(cfg: Hyperparameters) -> Hyperparameters:
    """data_path / tokenizer_path in the challenge repository's layout for cfg's vocabulary."""
    v = cfg.vocab_size
    return cfg.replace(data_path=f"./data/datasets/fineweb10B_sp{v}",
                       tokenizer_path=f"./data/tokenizers/fineweb_{v}_bpe.model")


def submission_config(cfg: Hyperparameters, keep_paths: bool = False) -> Hyperparameters:
    """The config a packed file embeds: challenge data paths (unless keep_paths) and the per-run fields
    (seed, run_id) at their defaults, so every seed of an entry packs to the same bytes."""
    base = Hyperparameters()
    cfg = cfg.replace(**{k: getattr(base, k) for k in PER_RUN_FIELDS})
    return cfg if keep_paths else challenge_paths(cfg)


def eval_method_keys(cfg: Hyperparameters) -> list[str]:
    """Canonical names of the eval methods the packed pipeline runs for cfg, in order."""
    from golfnb.evals.runner import method_key

    return [method_key(p, cfg) for p in cfg.eval_methods()]


# eval modules and the condition under which a config needs them
def _method_modules(methods: Sequence[str]) -> dict[str, str | None]:
    """{module: None if needed else why it is left out} for the optional eval modules."""
    bases = {m.partition("+")[0] for m in methods}
    tilt = any(m.endswith("+tilt") for m in methods)
    no_tilt = "the n-gram tilt (no eval pass is <sliding|ttt>+tilt: ngram_tilt_enabled is off or final_eval is plain)"
    return {
        "golfnb.evals.tilt": None if tilt else no_tilt,
        "golfnb.evals.ngram": None if tilt else no_tilt,
        "golfnb.evals._ngram_kernel": None if tilt else no_tilt,
        "golfnb.evals.slot": None if any(b.startswith("slot:") for b in bases) else "SLOT (slot_enabled is off)",
        "golfnb.evals.ttt": None if bases & {"ttt", "ttt_muon"} else "test-time training (ttt_enabled is off)",
        "golfnb.evals.sliding": None if "sliding" in bases else "the sliding-window eval (sliding_eval is off)",
    }


# Top-level classes and functions only some configs use: (module, name, config fields deciding it, needed?).
# A def a config does not need is replaced by a stand-in of the same name that raises when used, and the
# packed file refuses, before training, an environment that changes those fields.
FEATURES: tuple[tuple[str, str, tuple[str, ...], Callable[[Hyperparameters], bool]], ...] = (
    ("golfnb.data.loaders", "SequentialLoader", ("loader",), lambda c: c.loader == "sequential"),
    ("golfnb.data.loaders", "CoprimeStrideLoader", ("loader",), lambda c: c.loader == "coprime"),
    ("golfnb.data.loaders", "ShuffledSequenceLoader", ("loader",), lambda c: c.loader == "shuffled"),
    ("golfnb.optim", "ParallelMuon", ("bank_params",), lambda c: c.bank_params),
    ("golfnb.model", "BigramHash", ("bigram_vocab_size",), lambda c: c.bigram_vocab_size > 0),
    ("golfnb.model", "ValueEmbedding", ("ve_dim", "ve_layers"), lambda c: bool(c.ve_dim and c.ve_layers)),
    ("golfnb.quant", "generate_calibration_tokens", ("gptq_enabled", "gptq_calibration"),
     lambda c: c.gptq_enabled and c.gptq_calibration == "autoregressive"),
)


@dataclass
class PackPlan:
    """What goes into a packed file for one config."""

    modules: list[str]  # golfnb modules packed from source
    left_out: dict[str, str]  # module -> what the config does not use (served as a stand-in)
    methods: list[str]  # eval methods the config runs (canonical names)
    verdicts: dict[tuple, tuple[bool, tuple[str, ...]]] | None  # (method, settings) -> (legal, failed); None = full
    source_sha256: str  # golfnb.provenance.code_hash() of the sources packed
    dropped: dict[str, str] = field(default_factory=dict)  # "module.name" -> the setting it is not needed under
    requires: tuple[str, ...] = ()  # config fields the environment must leave as packed


def plan_modules(cfg: Hyperparameters, select: bool = True) -> PackPlan:
    """The modules for cfg: the closure of golfnb.pipeline minus what cfg's eval passes do not use, and
    golfnb.legality as a table of verdicts measured now (select=True); everything (select=False)."""
    from golfnb.provenance import code_hash

    full = module_closure()
    methods = eval_method_keys(cfg)
    if not select:
        return PackPlan(full, {}, methods, None, code_hash())
    out = {m: why for m, why in _method_modules(methods).items() if why is not None}
    if cfg.attn_backend != "fa4":  # the FlashAttention-4 wrapper is imported only by that backend
        out["golfnb._fa4"] = f"FlashAttention-4 (attn_backend={cfg.attn_backend!r}, not 'fa4')"
    kept = module_closure(ROOT_MODULES, set(EXCLUDED_MODULES) | set(out) | {LEGALITY_MODULE})
    left = {m: out.get(m, "modules only they import") for m in full if m not in kept and m != LEGALITY_MODULE}
    dropped: dict[str, str] = {}
    requires: set[str] = set()
    for mod, name, fields_, needed in FEATURES:
        if mod in kept and not needed(cfg):
            dropped[f"{mod}.{name}"] = ", ".join(f"{f}={getattr(cfg, f)!r}" for f in fields_)
            requires.update(fields_)
    return PackPlan(kept, left, methods, measured_verdicts(cfg, methods), code_hash(), dropped,
                    tuple(sorted(requires)))


def measured_verdicts(cfg: Hyperparameters, methods: Sequence[str]) -> dict[tuple, tuple[bool, tuple[str, ...]]]:
    """golfnb.legality's verdict for each method under cfg's settings, keyed as the packed table is."""
    from golfnb.legality import _settings, legality_verdict

    out = {}
    for m in methods:
        v = legality_verdict(m, cfg)
        out[(m, _settings(m, cfg))] = (bool(v.legal), tuple(v.failed))
    return out


# ================================================================================================ generated modules

_PACKED_SRC = '''
SOURCE_SHA256 = {source!r}
METHODS = {methods!r}
LEFT_OUT = {left!r}
DROPPED = {dropped!r}
REQUIRES = {requires!r}


class Gone:
    def __init__(self, name, why):
        self._n = name
        self._w = why

    def _fail(self, *a, **k):
        raise RuntimeError(f"{{self._n}} is not in this train_gpt.py ({{self._w}}); pack again (golfnb pack) with "
                           f"the settings you run")
    __call__ = __iter__ = __contains__ = __len__ = __getitem__ = _fail

    def __getattr__(self, a):
        if a.startswith("__"):
            raise AttributeError(a)
        self._fail()


def activate(path, config_json):
    import hashlib
    with open(path, "rb") as f:
        h = hashlib.sha256(f.read()).hexdigest()
    import golfnb.provenance as p
    p.code_hash = lambda paths=None: h
    if {precomputed!r} or REQUIRES:
        preflight(config_json)


def preflight(config_json):
    import json
    from golfnb.config import ConfigError, Hyperparameters as H
    base = H.from_dict(json.loads(config_json))
    try:
        c = H.from_env(base=base)
    except ConfigError:
        return
    bad = [f"{{f}}={{getattr(c, f)!r}}" for f in REQUIRES if getattr(c, f) != getattr(base, f)]
    if bad:
        have = ", ".join(f"{{f}}={{getattr(base, f)!r}}" for f in REQUIRES)
        print(f"train_gpt.py: ConfigError: this file was packed for {{have}} (the code other values need was left "
              f"out); the environment asks for {{', '.join(bad)}}. Pack again (golfnb pack) with those settings",
              flush=True)
        raise SystemExit(2)
    if not {precomputed!r}:
        return
    from golfnb.evals.runner import method_key
    from golfnb.legality import legality_verdict
    try:
        for q in c.eval_methods():
            legality_verdict(method_key(q, c), c)
    except ConfigError as e:
        print(f"train_gpt.py: ConfigError: {{e}}", flush=True)
        raise SystemExit(2)
'''

_STANDIN_SRC = '''
from golfnb._packed import Gone


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return Gone(f"{{__name__}}.{{name}}", {why!r})
'''

_VERDICT_SRC = '''
from golfnb.config import ConfigError
{knobs}

SOURCE_SHA256 = {source!r}
VERDICTS = {verdicts!r}


class Verdict:
    def __init__(self, method, legal, failed, settings):
        self.method = method
        self.legal = legal
        self.failed = tuple(failed)
        self.settings = settings
        self.summary = "passes every check" if legal else "fails " + ", ".join(failed)

    def as_dict(self):
        return {{"method": self.method, "leaderboard_legal": self.legal, "failed_checks": list(self.failed),
                "summary": self.summary, "settings": dict(self.settings),
                "how": "measured by golfnb.legality at pack time on a small model (prefix invariance, self-exclusion, "
                       "normalisation, score-once, score-before-update); golfnb sources sha256 " + SOURCE_SHA256}}


def legality_verdict(method, cfg=None):
    key = (method, _settings(method, cfg))
    if key not in VERDICTS:
        have = "; ".join(f"{{m}} {{dict(s)}}" for m, s in VERDICTS)
        raise ConfigError(f"this train_gpt.py carries the legality verdicts measured when it was packed ({{have}}); "
                          f"{{method}} with settings {{dict(key[1])}} is not among them: pack again (golfnb pack) with the "
                          f"settings you run")
    legal, failed = VERDICTS[key]
    return Verdict(method, legal, failed, key[1])
'''


def _legality_knobs_source() -> str:
    """golfnb.legality's own `_KNOBS`, `_knob_groups` and `_settings` (so the packed table is keyed exactly as
    the checks key their cache)."""
    path = PACKAGE_DIR / "legality.py"
    src = path.read_text(encoding="utf-8")
    want = {"_KNOBS", "_knob_groups", "_settings"}
    parts = []
    for st in ast.parse(src).body:
        name = getattr(st, "name", None)
        if isinstance(st, (ast.Assign, ast.AnnAssign)):
            tgt = st.targets[0] if isinstance(st, ast.Assign) else st.target
            name = tgt.id if isinstance(tgt, ast.Name) else None
        if name in want:
            parts.append(ast.get_source_segment(src, st))
            want.discard(name)
    if want:
        raise PackError(f"golfnb/legality.py no longer defines {sorted(want)}; update golfnb.pack's verdict table")
    return "\n\n".join(parts)


def _standin_defs(tree: ast.Module, module: str, dropped: dict[str, str]) -> list[str]:
    """Replace, in place, the top-level defs of `module` named in `dropped` by stand-ins of the same kind
    (a class stays a class, so isinstance checks keep working) that raise when called. Returns the names."""
    names = {k.rpartition(".")[2]: why for k, why in dropped.items() if k.rpartition(".")[0] == module}
    done = []
    body: list[ast.stmt] = []
    for st in tree.body:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and st.name in names:
            what, why = f"{module}.{st.name}", f"packed for {names[st.name]}"
            if isinstance(st, ast.ClassDef):
                src = f"class {st.name}:\n def __init__(self, *a, **k):\n  _Gone({what!r}, {why!r})()\n"
            else:
                src = f"def {st.name}(*a, **k):\n _Gone({what!r}, {why!r})()\n"
            body.extend(ast.parse(src).body)
            done.append(st.name)
        else:
            body.append(st)
    missing = set(names) - set(done)
    if missing:
        raise PackError(f"golfnb.pack.FEATURES names {sorted(missing)} in {module}, which has no such top-level "
                        f"def any more; update the table")
    if done:
        at = 1 if body and isinstance(body[0], ast.ImportFrom) and body[0].module == "__future__" else 0
        body.insert(at, ast.parse("from golfnb._packed import Gone as _Gone").body[0])
    tree.body = body
    return done


def generated_sources(plan: PackPlan) -> dict[str, tuple[str, bool]]:
    """Sources of the modules pack writes itself: golfnb._packed, the stand-ins, the verdict table."""
    out = {PACKED_MODULE: (_PACKED_SRC.format(source=plan.source_sha256, methods=tuple(plan.methods),
                                              left=dict(sorted(plan.left_out.items())),
                                              dropped=dict(sorted(plan.dropped.items())), requires=plan.requires,
                                              precomputed=plan.verdicts is not None), False)}
    for m, why in sorted(plan.left_out.items()):
        out[m] = (_STANDIN_SRC.format(why=f"packed without {why}"), False)
    if plan.verdicts is not None:
        verdicts = dict(sorted(plan.verdicts.items(), key=repr))
        out[LEGALITY_MODULE] = (_VERDICT_SRC.format(knobs=_legality_knobs_source(), source=plan.source_sha256,
                                                    verdicts=verdicts), False)
    return out


# ================================================================================================ payload

def pack_config(source: str | Path | Hyperparameters, keep_paths: bool = False) -> Hyperparameters:
    """The config to embed: a run directory's config.json (or a config) as `submission_config` leaves it."""
    if isinstance(source, Hyperparameters):
        cfg = source
    else:
        p = Path(source)
        f = p / "config.json" if p.is_dir() else p
        if not f.is_file():
            raise PackError(f"{f} does not exist: pack a run directory that holds config.json (train it first) "
                            f"or give the config file")
        cfg = Hyperparameters.from_json(f)
    return submission_config(cfg, keep_paths)


def _literal(text: str) -> str:
    """A Python literal for `text`: a raw triple-quoted string when that is exact, else repr()."""
    for q in ("'''", '"""'):
        if q not in text and not text.endswith("\\") and "\r" not in text and q[0] not in text[-1:]:
            return f"r{q}{text}{q}"
    return repr(text)


_BOOT = """import sys as _s,importlib.abc as _a,importlib.util as _u
class _F(_a.MetaPathFinder,_a.Loader):
 def find_spec(self,n,p=None,t=None):
  if n in _M:return _u.spec_from_loader(n,self,is_package=_M[n][0])
 def create_module(self,s):return None
 def get_source(self,n):return _M[n][1]
 def exec_module(self,m):
  k,c=_M[m.__name__];f='<packed>/'+m.__name__.replace('.','/')+('/__init__.py'if k else'.py')
  if k:m.__path__=[]
  m.__file__=f;exec(compile(c,f,'exec'),m.__dict__)
_s.meta_path.insert(0,_F())
if __name__=='__main__':
 import golfnb._packed as _P;_P.activate(__file__,_C)
 from golfnb.pipeline import submission_main
 raise SystemExit(submission_main(_C,__file__))
"""
_DIGEST_LINE = re.compile(r"^_D='([0-9a-f]{64})'\n", re.M)


def payload_digest(payload: str) -> str:
    """sha256 of a payload with its own `_D='...'` line removed."""
    return hashlib.sha256(_DIGEST_LINE.sub("", payload, count=1).encode("utf-8")).hexdigest()


def build_payload(sources: dict[str, tuple[str, bool]], config: Hyperparameters) -> str:
    """The source the wrapper executes: module table, config JSON, digest, finder, entry point."""
    lines = ["_M={}"]
    for name in sorted(sources):
        src, is_pkg = sources[name]
        lines.append(f"_M[{name!r}]=({is_pkg},{_literal(src)})")
    cfg_json = json.dumps(config.to_dict(), separators=(",", ":"))
    lines.append(f"_C={_literal(cfg_json)}")
    body = "\n".join(lines) + "\n"
    digest = hashlib.sha256((body + _BOOT).encode("utf-8")).hexdigest()
    return body + f"_D='{digest}'\n" + _BOOT


def wrap(payload: str) -> str:
    """The records' two-line self-extracting wrapper (raw LZMA2 + base85)."""
    comp = lzma.compress(payload.encode("utf-8"), format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    return WRAPPER_HEAD + _WRAP_START + base64.b85encode(comp).decode("ascii") + _WRAP_END


def unwrap(text: str) -> str:
    """The payload source of a packed file (for inspection and tests)."""
    start = text.find('b85decode("')
    if not text.startswith(WRAPPER_HEAD) or start < 0:
        raise PackError("not a golfnb-packed train_gpt.py (no lzma/base85 wrapper)")
    start += len('b85decode("')
    end = text.index('")', start)
    try:
        raw = base64.b85decode(text[start:end])
        return lzma.decompress(raw, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]).decode("utf-8")
    except (ValueError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise PackError(f"the packed payload does not decode ({e}): the file is damaged") from None


def payload_modules(payload: str) -> dict[str, tuple[str, bool]]:
    """{module: (source, is_package)} embedded in a payload (parsed, not executed)."""
    out: dict[str, tuple[str, bool]] = {}
    for node in ast.parse(payload).body:
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript)
                and isinstance(node.value, ast.Tuple)):
            key = ast.literal_eval(node.targets[0].slice)
            is_pkg, src = ast.literal_eval(node.value)
            out[key] = (src, is_pkg)
    return out


@dataclass
class PackedInfo:
    """What a packed train_gpt.py says about itself (read without executing it)."""

    wrapper_ok: bool  # exactly golfnb's two-line wrapper around the payload
    digest_ok: bool  # the payload is unchanged since packing
    source_sha256: str | None  # golfnb sources it was packed from
    modules: list[str]
    left_out: dict[str, str]
    methods: list[str]
    config: dict[str, Any] | None


def inspect_packed(text: str) -> PackedInfo:
    """Read a packed file's identity (PackError when it is not a golfnb-packed file)."""
    payload = unwrap(text)
    lines = text.split("\n")
    wrapper_ok = (len(lines) == 3 and lines[2] == "" and text.startswith(WRAPPER_HEAD + _WRAP_START)
                  and text.endswith(_WRAP_END))
    m = _DIGEST_LINE.search(payload)
    digest_ok = bool(m) and m.group(1) == payload_digest(payload)
    mods = payload_modules(payload)
    source = None
    left: dict[str, str] = {}
    methods: list[str] = []
    if PACKED_MODULE in mods:
        for node in ast.parse(mods[PACKED_MODULE][0]).body:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                name = node.targets[0].id
                if name in ("SOURCE_SHA256", "LEFT_OUT", "METHODS"):
                    val = ast.literal_eval(node.value)
                    if name == "SOURCE_SHA256":
                        source = val
                    elif name == "LEFT_OUT":
                        left = dict(val)
                    else:
                        methods = list(val)
    config = None
    for node in ast.parse(payload).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "_C":
            config = json.loads(ast.literal_eval(node.value))
    return PackedInfo(wrapper_ok, digest_ok, source, sorted(mods), left, methods, config)


@dataclass
class PackResult:
    path: Path | None
    code_bytes: int  # bytes of train_gpt.py as written: what the challenge counts
    payload_bytes: int  # the source the wrapper decompresses
    source_bytes: int  # the modules before minification
    modules: list[str] = field(default_factory=list)
    seconds: float = 0.0
    left_out: dict[str, str] = field(default_factory=dict)
    sha256: str = ""


def _module_texts(plan: PackPlan, minify: bool, tree_shake: bool, level: int = 2
                  ) -> tuple[dict[str, tuple[str, bool]], dict[str, tuple[str, bool]], dict[str, list[str]]]:
    """(raw sources, packed sources, removed defs) for a plan."""
    raw = module_sources(plan.modules)
    gen = generated_sources(plan)
    check_no_network(raw)
    check_no_network(gen)
    allsrc = {**raw, **gen}
    removed: dict[str, list[str]] = {}
    if not minify:
        return raw, allsrc, removed
    trees = {n: _strip(ast.parse(s, n), s, level) for n, (s, _pkg) in allsrc.items()}
    for n in plan.modules:
        _standin_defs(trees[n], n, plan.dropped)
    trees = {n: ast.fix_missing_locations(t) for n, t in trees.items()}
    if tree_shake:
        removed = shake(trees, roots=_refs(ast.parse(_BOOT)), packages=[n for n, (_s, p) in allsrc.items() if p])
    if level >= 2:
        tidy(trees, packages=[n for n, (_s, p) in allsrc.items() if p])
    return raw, {n: (_unparse_compact(trees[n], n), allsrc[n][1]) for n in allsrc}, removed


_PACKED: dict[tuple, tuple[str, dict[str, Any]]] = {}


def pack_text(cfg: Hyperparameters, minify: bool = True, tree_shake: bool = True, select: bool = True,
              level: int = 2) -> tuple[str, dict[str, Any]]:
    """(train_gpt.py text, stats) for `cfg` (embedded as given: pass it through `submission_config`).

    select: only the modules cfg's eval passes use, legality as verdicts measured now (False: everything);
    level: 2 also strips variable annotations, `__all__` and imports left unused (1: the older minifier)."""
    from golfnb.provenance import code_hash

    # a pure function of the golfnb sources and the config: computed once per process (quantize_run asks for
    # it once per seed, golfnb submit once more)
    key = (code_hash(), cfg.to_json(), minify, tree_shake, select, level)
    if key in _PACKED:
        text, stats = _PACKED[key]
        return text, dict(stats)
    plan = plan_modules(cfg, select)
    raw, srcs, removed = _module_texts(plan, minify, tree_shake, level)
    payload = build_payload(srcs, cfg)
    compile(payload, "<payload>", "exec")  # a syntax error here, not on the challenge machine
    text = wrap(payload)
    stats = {"modules": sorted(srcs), "payload_bytes": len(payload.encode()), "removed": removed,
             "source_bytes": sum(len(s.encode()) for s, _ in raw.values()), "left_out": plan.left_out,
             "methods": plan.methods, "source_sha256": plan.source_sha256,
             "verdicts": None if plan.verdicts is None else {m: v for (m, _s), v in plan.verdicts.items()}}
    _PACKED[key] = (text, stats)
    return text, dict(stats)


def pack_submission(run: str | Path | Hyperparameters, out: str | Path, minify: bool = True,
                    keep_paths: bool = False, select: bool = True) -> PackResult:
    """Write the single-file submission for a run directory (or config) to `out`, atomically."""
    t0 = time.perf_counter()
    cfg = pack_config(run, keep_paths)
    text, st = pack_text(cfg, minify, select=select)
    path = atomic_write_text(out, text)
    data = text.encode("utf-8")
    return PackResult(path, len(data), st["payload_bytes"], st["source_bytes"], st["modules"],
                      time.perf_counter() - t0, st["left_out"], hashlib.sha256(data).hexdigest())


def estimate_code_bytes(cfg: Hyperparameters | None = None, minify: bool = True) -> int:
    """Bytes of the train_gpt.py `golfnb pack` would write for cfg (default: the default config)."""
    cfg = submission_config(cfg if cfg is not None else Hyperparameters())
    text, _ = pack_text(cfg, minify)
    return len(text.encode("utf-8"))


def _lzma_len(text: str) -> int:
    return len(lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS))


def size_report(cfg: Hyperparameters) -> dict[str, Any]:
    """Bytes per module before (every module, the older minifier, the full legality checks) and after
    (selection + stronger minification) for cfg: source, minified, and LZMA2 of the minified module alone
    (modules compress better together, so the per-module figures do not add up to the file; the totals are
    the real files)."""
    cfg = submission_config(cfg)
    before_plan = plan_modules(cfg, select=False)
    after_plan = plan_modules(cfg, select=True)
    _raw_b, before, _ = _module_texts(before_plan, True, True, level=1)
    raw_a, after, _ = _module_texts(after_plan, True, True, level=2)
    raw = module_sources(before_plan.modules)
    rows = []
    for name in sorted(set(before) | set(after)):
        b = before.get(name, ("", False))[0]
        a = after.get(name, ("", False))[0]
        if name == LEGALITY_MODULE and after_plan.verdicts is not None:
            status = "verdict table"
        elif name in after_plan.left_out:
            status = "stand-in"
        elif name in raw:
            status = "packed"
        else:
            status = "generated"
        rows.append({"module": name, "status": status, "source_bytes": len(raw.get(name, ("", False))[0].encode()),
                     "before_bytes": len(b.encode()), "after_bytes": len(a.encode()),
                     "before_lzma": _lzma_len(b) if b else 0, "after_lzma": _lzma_len(a) if a else 0})
    text_b, _ = pack_text(cfg, select=False, level=1)
    text_a, _ = pack_text(cfg)
    return {"rows": rows, "file_before": len(text_b.encode()), "file_after": len(text_a.encode()),
            "left_out": after_plan.left_out, "methods": after_plan.methods}


def format_size_report(rep: dict[str, Any]) -> str:
    """A fixed-width table of `size_report`."""
    out = [f"{'module':30s} {'status':13s} {'source':>8s} {'min before':>10s} {'min after':>9s} "
           f"{'lzma before':>11s} {'lzma after':>10s}"]
    for r in rep["rows"]:
        out.append(f"{r['module']:30s} {r['status']:13s} {r['source_bytes']:8d} {r['before_bytes']:10d} "
                   f"{r['after_bytes']:9d} {r['before_lzma']:11d} {r['after_lzma']:10d}")
    out.append(f"train_gpt.py: {rep['file_before']:,} -> {rep['file_after']:,} bytes "
               f"({rep['file_before'] - rep['file_after']:,} fewer) for eval methods {', '.join(rep['methods'])}")
    return "\n".join(out)


# ================================================================================================ CLI

def _cmd_pack(args: argparse.Namespace) -> int:
    try:
        r = pack_submission(args.run_dir, args.out, minify=not args.no_minify, keep_paths=args.keep_paths,
                            select=not args.full)
        rep = size_report(pack_config(args.run_dir, args.keep_paths)) if args.report else None
    except (PackError, ConfigError) as e:
        print(f"golfnb pack: {e}", file=sys.stderr)
        return 2
    print(f"wrote {r.path}: {r.code_bytes:,} bytes (payload {r.payload_bytes:,}, sources {r.source_bytes:,}; "
          f"{len(r.modules)} modules) in {r.seconds:.1f} s; sha256 {r.sha256}")
    for m, why in sorted(r.left_out.items()):
        print(f"  left out {m}: not needed without {why}")
    art = Path(args.run_dir) / "artifacts" / "model.gnb"
    if art.is_file():
        n = art.stat().st_size
        print(f"with {art} ({n:,} bytes): total {n + r.code_bytes:,} bytes")
    if rep is not None:
        print(format_size_report(rep))
    return 0


def add_pack_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`golfnb pack RUN_DIR --out DIR/train_gpt.py [--report] [--full] [--no-minify] [--keep-paths]`."""
    p = subparsers.add_parser("pack", help="write the single-file train_gpt.py submission of a run")
    p.add_argument("run_dir", help="run directory holding config.json")
    p.add_argument("--out", required=True, help="output path, e.g. submission/train_gpt.py")
    p.add_argument("--no-minify", action="store_true", help="embed the sources verbatim (bigger)")
    p.add_argument("--full", action="store_true",
                   help="pack every module and the full legality checks, whatever the config uses (bigger)")
    p.add_argument("--report", action="store_true", help="print bytes per module before/after selection")
    p.add_argument("--keep-paths", action="store_true",
                   help="keep the run's data paths instead of the challenge layout ./data/...")
    p.set_defaults(func=_cmd_pack)
    return p


def main(argv: list[str] | None = None) -> int:
    from golfnb.cli import run_subcommand

    return run_subcommand("pack", add_pack_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
