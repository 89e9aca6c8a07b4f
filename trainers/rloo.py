"""`OptimalSamplingRLOOTrainer`: RLOO whose rollouts come from q*, with sequence-level importance weights."""

from __future__ import annotations

from typing import Any, Callable

import torch
from trl import RLOOTrainer

from ._common import OptimalSamplingMixin, check_generation_options, check_sampler_backend, check_teacher_given
from .config import OptimalSamplingArguments, OptimalSamplingRLOOConfig
from .seam import check_trl_seam


class OptimalSamplingRLOOTrainer(OptimalSamplingMixin, RLOOTrainer):
    """`RLOOTrainer` whose rollouts are sampled from q* ∝ π_θ^(1-α) · π_t^α.

    RLOO's loss is sequence level: −min(r·A, clip(r)·A) with r = π_θ(y)/π_old(y), where
    π_old is the policy that *would* have sampled. The samples come from q instead, so each
    completion's advantage is multiplied by the stop-gradient weight
    w = min(π_old(y)/q(y), C) (C = `importance_sampling_clip_max`). Since w > 0,
    −min(r·wA, clip(r)·wA) = −w·min(r·A, clip(r)·A): the truncated importance-weighted RLOO
    objective, without touching TRL's loss. π_old(y) is TRL's own `old_logps`; q(y) is the
    recorded Σ log q. Sequence weights have high variance on long completions; prefer
    `OptimalSamplingGRPOTrainer` (per-token weights) unless you need RLOO's baseline.

    Arguments are those of `RLOOTrainer` plus `teacher_model`, `teacher_processing_class`
    and `teacher_prompt_fn` (see `OptimalSamplingGRPOTrainer`); `args` must be an
    `OptimalSamplingRLOOConfig`. Metrics: as the GRPO trainer's, with `is_weight_*` over
    sequence weights.
    """

    def __init__(
        self,
        model,
        reward_funcs,
        args: OptimalSamplingRLOOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        teacher_model: torch.nn.Module | str | None = None,
        teacher_processing_class=None,
        teacher_prompt_fn: Callable[[dict], Any] | None = None,
        **kwargs,
    ):
        check_trl_seam("rloo")
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or type(model).__name__
            args = OptimalSamplingRLOOConfig(f"{str(name).rstrip('/').split('/')[-1]}-OptimalSampling-RLOO")
        if not isinstance(args, OptimalSamplingArguments):
            raise TypeError(f"`args` is a {type(args).__name__}; pass an `OptimalSamplingRLOOConfig`.")
        check_teacher_given(teacher_model, args)
        check_sampler_backend(args)
        check_generation_options(args)
        super().__init__(
            model,
            reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if self._is_vlm:
            raise NotImplementedError("Vision-language policies are not supported by the q* sampler yet.")
        self._setup_teacher(teacher_model, teacher_processing_class, teacher_prompt_fn)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
        if images is not None or multimodal_fields:
            raise NotImplementedError("Multimodal prompts are not supported by the q* sampler.")
        return self._sample_optimal(prompt_ids).completion_ids

    def _generate_and_score_completions(self, inputs):
        output = self._with_rollout_rows(inputs, lambda: super(OptimalSamplingRLOOTrainer, self)._generate_and_score_completions(inputs))
        extra = {}
        if self.args.importance_sampling_correction:
            log_w = output["old_logps"] - self._sequence_logq(output["completion_mask"])  # [B]
            weights = log_w.exp()
            truncated = weights.clamp(max=self.args.importance_sampling_clip_max)
            output["advantages"] = output["advantages"] * truncated.to(output["advantages"].dtype)
            extra = {"is_weight": weights, "is_clipped_frac": (weights > truncated).float()}
        self._log_rollout_metrics(extra)
        return output

    def _sequence_logq(self, completion_mask: torch.Tensor) -> torch.Tensor:
        """Σ_t log q(y_t) over the tokens TRL scores (`completion_mask`), `[B]`."""
        logq = [lq for r in self._pending_rollouts for lq in r.logq]
        if len(logq) != completion_mask.shape[0]:
            raise RuntimeError(
                f"{len(logq)} recorded completions for {completion_mask.shape[0]} rows: a TRL seam change."
            )
        padded = torch.zeros(completion_mask.shape, dtype=torch.float32, device=completion_mask.device)
        for i, row in enumerate(logq):
            padded[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        return (padded * completion_mask).sum(-1)
