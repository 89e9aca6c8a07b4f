"""TRL integration for optimal-sampling (installed with `pip install 'optimal-sampling[trl]'`).

This is the only subpackage that imports `trl`: `import optimal_sampling` never does, and importing
this one without TRL says how to install it. Public names:

- `OptimalSamplingGRPOConfig`, `OptimalSamplingGRPOTrainer`: GRPO whose groups mix on-policy
  rows with q* (or teacher) rows, weighted and baselined consistently (every GRPO `loss_type`).
- `OptimalSamplingRLOOConfig`, `OptimalSamplingRLOOTrainer`: the same for RLOO, with
  sequence-level weights on the advantage.
- `OptimalSamplingDistillationConfig`, `OptimalSamplingDistillationTrainer`: TRL's on-policy
  distillation (`DistillationTrainer`) with the student's completions sampled from q*.
- `optimal_sampling.trainers.estimators`: the weights, baselines and diagnostics themselves (pure functions).
- `q_star_rollout_func`: q* rollouts for TRL's plain `GRPOTrainer` through its public
  `rollout_func` (no weights, no tools: its limits are in `optimal_sampling.trainers.rollout_func`).
- `TESTED_TRL_RANGE`, `check_trl_seam`: the TRL versions tested, and the check (run at
  trainer init) that the TRL internals the trainers use are still there.
"""

try:
    import trl  # noqa: F401
except ImportError as error:
    raise ImportError(
        f"optimal_sampling.trainers needs TRL, which did not import ({error}). Install the trainers' extra: "
        "pip install 'optimal-sampling[trl]'"
    ) from error

from .config import OptimalSamplingDistillationConfig, OptimalSamplingGRPOConfig, OptimalSamplingRLOOConfig
from .distillation import OptimalSamplingDistillationTrainer
from .grpo import OptimalSamplingGRPOTrainer
from .rloo import OptimalSamplingRLOOTrainer
from .rollout_func import q_star_rollout_func
from .seam import TESTED_TRL_RANGE, check_trl_seam

__all__ = [
    "OptimalSamplingDistillationConfig",
    "OptimalSamplingDistillationTrainer",
    "OptimalSamplingGRPOConfig",
    "OptimalSamplingGRPOTrainer",
    "OptimalSamplingRLOOConfig",
    "OptimalSamplingRLOOTrainer",
    "TESTED_TRL_RANGE",
    "check_trl_seam",
    "q_star_rollout_func",
]
