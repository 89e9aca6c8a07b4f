"""TRL integration for optimal-sampling (installed with `pip install optimal-sampling[trl]`).

This is the only package that imports `trl`. Public names:

- `OptimalSamplingGRPOConfig`, `OptimalSamplingGRPOTrainer`: GRPO with q* rollouts and
  TRL's per-token importance-sampling correction (every GRPO `loss_type`).
- `OptimalSamplingRLOOConfig`, `OptimalSamplingRLOOTrainer`: RLOO with q* rollouts and a
  truncated sequence-level importance weight on the advantage.
- `TESTED_TRL_RANGE`, `check_trl_seam`: the TRL versions tested, and the check (run at
  trainer init) that the TRL internals the trainers use are still there.
"""

from .config import OptimalSamplingGRPOConfig, OptimalSamplingRLOOConfig
from .grpo import OptimalSamplingGRPOTrainer
from .rloo import OptimalSamplingRLOOTrainer
from .seam import TESTED_TRL_RANGE, check_trl_seam

__all__ = [
    "OptimalSamplingGRPOConfig",
    "OptimalSamplingGRPOTrainer",
    "OptimalSamplingRLOOConfig",
    "OptimalSamplingRLOOTrainer",
    "TESTED_TRL_RANGE",
    "check_trl_seam",
]
