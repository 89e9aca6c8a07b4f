"""optimal-sampling: sample from q* ∝ π_θ^(1-α*) · π_t^α* token by token.

The core is a handful of pure tensor functions (`solve_alpha`, `optimal_log_probs`,
`compute_mixture`, `sparse_candidates`); the fronts (transformers generation, the
two-server coordinator, the in-process vLLM engines in `engines`, the TRL trainers in
`optimal_sampling.trainers`, the only subpackage that imports `trl`) call them. Every front runs on every transformers from the one
vLLM pins (>=5.16.1) to the newest; the transformers front checks what it needs of a model as
capabilities (`compat.py`).

Names are imported on first use (PEP 562), so `import optimal_sampling` and the command
line's `--help` do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ALPHA_METHODS": "options",
    "QStarOptions": "options",
    "AlphaSolution": "alpha",
    "solve_alpha": "alpha",
    "teacher_nucleus_mask": "alpha",
    "Mixture": "mixture",
    "MixtureDiagnostics": "mixture",
    "compute_mixture": "mixture",
    "log_probs_from_logits": "mixture",
    "mixture_diagnostics": "mixture",
    "optimal_log_probs": "mixture",
    "truncate_log_probs": "mixture",
    "SparseCandidates": "sparse",
    "sample_candidates": "sparse",
    "sparse_candidates": "sparse",
    "GenerationOutput": "generation",
    "OptimalGenerateOutput": "generation",
    "OptimalSampler": "generation",
    "optimal_generate": "generation",
    "OptimalSamplingLogitsProcessor": "processor",
    "OptimalSamplingRecord": "processor",
    "CoordinatorConfig": "servers",
    "DualVLLMCoordinator": "servers",
    "generate_with_optimal_sampling": "servers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'optimal_sampling' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
