"""optimal-sampling: sample from q* ∝ π_θ^(1-α*) · π_t^α* token by token.

The core is a handful of pure tensor functions (`solve_alpha`, `optimal_log_probs`,
`compute_mixture`, `sparse_candidates`); the fronts (transformers generation, the
two-server coordinator, the in-process vLLM engines, the TRL trainers in the separate
`trainers` package) call them. The package imports with the transformers vLLM pins
(>=5.16.1); the transformers front checks for the one it needs (`compat.py`).
"""

from .alpha import ALPHA_METHODS, AlphaSolution, solve_alpha, teacher_nucleus_mask
from .mixture import (
    Mixture,
    MixtureDiagnostics,
    compute_mixture,
    log_probs_from_logits,
    mixture_diagnostics,
    optimal_log_probs,
    truncate_log_probs,
)
from .sparse import SparseCandidates, sample_candidates, sparse_candidates

__version__ = "0.1.0"

__all__ = [
    "ALPHA_METHODS",
    "AlphaSolution",
    "Mixture",
    "MixtureDiagnostics",
    "SparseCandidates",
    "compute_mixture",
    "log_probs_from_logits",
    "mixture_diagnostics",
    "optimal_log_probs",
    "sample_candidates",
    "solve_alpha",
    "sparse_candidates",
    "teacher_nucleus_mask",
    "truncate_log_probs",
]

from .generation import GenerationOutput, OptimalGenerateOutput, OptimalSampler, optimal_generate  # noqa: E402
from .processor import OptimalSamplingLogitsProcessor, OptimalSamplingRecord  # noqa: E402

__all__ += [
    "GenerationOutput",
    "OptimalGenerateOutput",
    "OptimalSampler",
    "OptimalSamplingLogitsProcessor",
    "OptimalSamplingRecord",
    "optimal_generate",
]

from .servers import CoordinatorConfig, DualVLLMCoordinator, generate_with_optimal_sampling  # noqa: E402

__all__ += ["CoordinatorConfig", "DualVLLMCoordinator", "generate_with_optimal_sampling"]
