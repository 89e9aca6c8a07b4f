"""Deprecated: the trainers moved to `optimal_sampling.trainers`.

`trainers` was a top-level name that any local `trainers/` folder shadows. This shim keeps old code
running: it re-exports `optimal_sampling.trainers` and its modules (`trainers.rollout` is
`optimal_sampling.trainers.rollout`, the same module object) and warns once per process.
Import `optimal_sampling.trainers` instead.
"""

import importlib
import pkgutil
import sys
import warnings

warnings.warn(
    "The top-level `trainers` package is deprecated: import `optimal_sampling.trainers` instead "
    "(e.g. `from optimal_sampling.trainers import OptimalSamplingGRPOTrainer`).",
    DeprecationWarning,
    stacklevel=2,
)

from optimal_sampling.trainers import *  # noqa: E402, F403
from optimal_sampling.trainers import __all__  # noqa: E402, F401

# Each module under its old name too, as the same module object (a patch through one name reaches the other).
for _module in pkgutil.iter_modules(importlib.import_module("optimal_sampling.trainers").__path__):
    _new = importlib.import_module(f"optimal_sampling.trainers.{_module.name}")
    sys.modules[f"{__name__}.{_module.name}"] = _new
    globals()[_module.name] = _new
del _module, _new
