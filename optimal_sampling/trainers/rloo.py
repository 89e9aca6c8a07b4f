"""`OptimalSamplingRLOOTrainer`: RLOO whose rollouts come from q* and π_θ, with sequence-level weights."""

from __future__ import annotations

from typing import Any, Callable

import torch
from trl import RLOOTrainer

from ._common import OptimalSamplingMixin
from .checks import checked_args, refuse_multimodal_processor
from .config import OptimalSamplingRLOOConfig
from .estimators import TRUNCATING, importance_weights, recentre_advantages


class OptimalSamplingRLOOTrainer(OptimalSamplingMixin, RLOOTrainer):
    """`RLOOTrainer` whose rollouts are sampled from q* ∝ π_θ^(1-α) · π_t^α, mixed with on-policy rows.

    RLOO's loss is sequence level: −min(r·A, clip(r)·A) with r = π_θ(y)/π_old(y), where
    π_old is the policy that *would* have sampled. Of each prompt's G completions,
    `num_on_policy_generations` come from π_θ, the rest from q*. Each q* completion's
    advantage is multiplied by a stop-gradient weight c (`importance_weighting`: 1,
    min(π_old(y)/q(y), C), the masked ratio, or the multiple-importance-sampling weight). Since
    c > 0, −min(r·cA, clip(r)·cA) = −c·min(r·A, clip(r)·A): the weighted RLOO objective,
    without touching TRL's loss. `advantage_baseline` replaces RLOO's leave-one-out baseline
    by the on-policy rows' mean or the importance-weighted estimate of π_θ's success, changing
    only the centre of TRL's advantages (`optimal_sampling.trainers.estimators.recentre_advantages`), so RLOO's
    KL-in-reward and clipping stay as they are. π_old(y) is TRL's own `old_logps`; q(y) is the
    recorded Σ log q.

    Arguments are those of `RLOOTrainer` plus `teacher_model`, `teacher_processing_class`
    and `teacher_prompt_fn` (see `OptimalSamplingGRPOTrainer`); `args` must be an
    `OptimalSamplingRLOOConfig`. Metrics: as the GRPO trainer's, with `is_weight_*` over
    the q* rows' sequence weights.
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
        args = checked_args("rloo", OptimalSamplingRLOOConfig, model, args, teacher_model, processing_class)
        super().__init__(
            model,
            reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        refuse_multimodal_processor(self.processing_class)
        self._setup_teacher(teacher_model, teacher_processing_class, teacher_prompt_fn)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
        if images is not None or multimodal_fields:
            raise NotImplementedError("Multimodal prompts are not supported by the q* sampler.")
        return self._sample_optimal(prompt_ids).completion_ids

    def _generate_and_score_completions(self, inputs):
        output = self._with_rollout_rows(
            inputs, lambda: super(OptimalSamplingRLOOTrainer, self)._generate_and_score_completions(inputs)
        )
        self._log_rollout_metrics(self._reweight(output))
        return output

    def _reweight(self, output: dict) -> dict[str, torch.Tensor]:
        """Re-centre and weight TRL's RLOO advantages for the q* rows; return metric values."""
        args = self.args
        device = output["advantages"].device
        completion_mask = output["completion_mask"]
        self._check_rollout_rows(completion_mask.shape[0])
        on_policy = self._pending_on_policy(device)
        width = completion_mask.shape[1]
        logq = (self._pending_padded("logq", width, device) * completion_mask).sum(-1)
        logq_star = (self._pending_padded("logq_star", width, device) * completion_mask).sum(-1)
        seq_log_ratio = torch.where(on_policy, 0.0, output["old_logps"] - logq)  # log π_old(y)/q(y)
        log_ratio_star = output["old_logps"] - logq_star
        on_policy_all, seq_log_ratio_all, log_mixture_weight = self._gather_group_inputs(
            on_policy, seq_log_ratio, log_ratio_star
        )
        rewards = self._batch_rewards(device)
        n, rank = completion_mask.shape[0], self.accelerator.process_index
        advantages = recentre_advantages(
            self.accelerator.gather(output["advantages"]),
            rewards,
            on_policy_all,
            log_mixture_weight,
            num_generations=self._group_size(),
            baseline=args.advantage_baseline,
        )[rank * n : (rank + 1) * n]
        weights = importance_weights(
            seq_log_ratio.unsqueeze(-1),
            torch.ones_like(seq_log_ratio).unsqueeze(-1),
            on_policy,
            weighting=args.importance_weighting,
            cap=args.importance_weight_cap,
            gamma=args.shaping_gamma,
            log_ratio_star=log_ratio_star,
            on_policy_fraction=self._on_policy_per_group() / self._group_size(),
        ).squeeze(-1)
        output["advantages"] = advantages * weights.to(advantages.dtype)
        self._log_group_statistics(rewards, on_policy_all, seq_log_ratio_all, log_mixture_weight)
        raw = seq_log_ratio[~on_policy].exp()
        extra = {"is_weight": raw}
        if args.importance_weighting in TRUNCATING:
            extra["is_clipped_frac"] = (weights[~on_policy] != raw).float()
        return extra
