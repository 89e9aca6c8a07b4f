"""The TRL trainer the mixins are mixed into, as the type checker sees it.

`OptimalSamplingMixin`, its vLLM half `VLLMRolloutsMixin` and `ToolLoopMixin` are combined with a
TRL trainer (`GRPOTrainer`, `RLOOTrainer`, `DistillationTrainer`) and use what it has: transformers'
`Trainer` (`accelerator`, `model`, `state`, ...), TRL's own attributes, and what the other mixins
set up. `TrainerHost` declares them for mypy. It derives from `Trainer` for the checker only; at run
time it is an empty class (annotations create no attributes), so every value comes from the TRL
trainer and the mixins, exactly as before.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import Trainer as _CheckedBase

    from optimal_sampling.options import QStarOptions

    from .rollout import Rollouts
    from .turns import RolloutTurns
else:
    _CheckedBase = object


class TrainerHost(_CheckedBase):
    """What the mixins read of the trainer they are mixed into (annotations only)."""

    # The config: a TRL config with the q* fields (`QStarSamplingArguments`, and for GRPO / RLOO
    # `OptimalSamplingArguments`), two dataclass bases the checker cannot intersect.
    args: Any

    # transformers' `Trainer` types it optional (a model_init); the trainers always have one.
    model: torch.nn.Module

    # TRL's trainers (GRPO / RLOO / Distillation; some only in some of them). `Any` where TRL types a
    # value optional that the trainers always set (the counts, `max_completion_length`).
    _metrics: dict[str, defaultdict[str, list[float]]]
    _tokenizer: Any
    _dist: Any  # TRL's DistributedBackend
    eos_token_ids: list[int]
    max_completion_length: Any
    temperature: float
    num_generations: Any
    num_generations_eval: Any
    tools: list
    _env_tools: Any
    _batch_environments: list
    teacher_model: Any  # TRL's own (distillation) or set by `OptimalSamplingMixin._setup_teacher`

    # Set by `OptimalSamplingMixin._setup_teacher`; read by all three mixins.
    teacher_processing_class: Any
    _turns: RolloutTurns | None
    _vllm_sampler: Any
    _vllm_calls: int
    _engine_dirs: list[str]

    if TYPE_CHECKING:  # `OptimalSamplingMixin`'s, called by its vLLM half and by `ToolLoopMixin`

        def _completion_limits(self) -> tuple[int, list[int]]: ...
        def _scheduled_q_star(self) -> QStarOptions: ...
        def _sample_optimal(self, prompt_ids: list[list[int]]) -> Rollouts: ...
        def _draw(self, prompt_ids, teacher_prompt_ids, on_policy: torch.Tensor) -> Rollouts: ...
