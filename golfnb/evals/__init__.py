"""Evaluation methods: one module per scoring scheme or eval-time technique (e.g. `ngram`, the causal
n-gram token tilt). Importing the package loads nothing."""

# Entry points of the eval passes, resolved on first use so importing the package stays free of work.
_LAZY = {
    "run_evals": "golfnb.evals.runner",
    "run_method": "golfnb.evals.runner",
    "evaluate_plain": "golfnb.evals.plain",
    "evaluate_sliding": "golfnb.evals.sliding",
    "evaluate_ttt": "golfnb.evals.ttt",
    "evaluate_muon_ttt": "golfnb.evals.ttt",
    "evaluate_slot": "golfnb.evals.slot",
    "evaluate_tilt": "golfnb.evals.tilt",
    "EvalBudgetExceeded": "golfnb.evals.common",
    "IllegalMethodError": "golfnb.evals.common",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'golfnb.evals' has no attribute {name!r}")
