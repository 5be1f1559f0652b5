"""golfnb: a research kit for the Parameter Golf challenge.

Importing the package does nothing but define names: no CUDA, no distributed set-up, no file access.
Each concern lives in its own module (config, data, model, optim, train, quant, artifact, pack, evals,
legality, runs, submit); notebooks and tests import them directly.
"""

__version__ = "0.1.0"

from golfnb.config import Hyperparameters, ConfigError, preset, PRESETS  # noqa: E402,F401
