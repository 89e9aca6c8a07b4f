"""optimal-sampling: sample from q* ∝ π_θ^(1-α*) · π_t^α* token by token.

The core is a handful of pure tensor functions (`solve_alpha`, `optimal_log_probs`,
`compute_mixture`, `sparse_candidates`); the fronts (transformers generation, the
two-server coordinator, the TRL trainers in the separate `trainers` package) call them.
"""

import transformers as _transformers
from packaging.version import Version as _Version

if _Version(_transformers.__version__) < _Version("5.24"):
    # Older models take `past_key_values=` and silently ignore `cache=`: the teacher cache
    # and the fast path would then run without their KV caches and record wrong log q.
    raise ImportError(
        f"optimal-sampling needs transformers>=5.24,<5.25 (found {_transformers.__version__}); "
        "install it with `pip install 'transformers>=5.24,<5.25'`."
    )

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
