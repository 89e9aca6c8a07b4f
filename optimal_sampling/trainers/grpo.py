"""`OptimalSamplingGRPOTrainer`: GRPO whose rollouts come from q*, corrected by importance weights."""

from __future__ import annotations

from typing import Any, Callable

import torch
from trl import GRPOTrainer

from ._common import OptimalSamplingMixin
from .checks import check_tool_backend, checked_args, refuse_multimodal_processor
from .config import OptimalSamplingGRPOConfig
from .estimators import TRUNCATING, grpo_advantages, importance_weights
from .turns import ToolLoopMixin


class _NoVLLMEngine:
    """Stands at `trainer.vllm_generation`: TRL's vLLM paths must never run here."""

    def __getattr__(self, name):
        if name.startswith("__"):  # copy / pickle / hasattr probes
            raise AttributeError(name)
        raise RuntimeError(
            f"OptimalSamplingGRPOTrainer reached TRL's vLLM code (`vllm_generation.{name}`); rollouts come from the "
            "q* sampler. This is a TRL seam change: please report it with your TRL version."
        )


class OptimalSamplingGRPOTrainer(ToolLoopMixin, OptimalSamplingMixin, GRPOTrainer):
    """`GRPOTrainer` whose rollouts are sampled from q* ∝ π_θ^(1-α) · π_t^α, token by token.

    A drop-in for `GRPOTrainer`: rewards, the reward scale and the loss (every `loss_type`)
    stay TRL's. The sampler changes at TRL's narrowest seam (`_generate_single_turn`): of each
    prompt's G completions, `num_on_policy_generations` are sampled from π_θ itself (α = 0) and
    the rest from q*, in one batch. Then two things are set per row from the recorded log q:
    the stop-gradient weight that multiplies each token's loss (`importance_weighting`: 1 on
    on-policy rows) and the baseline of the advantage (`advantage_baseline`); combinations
    known to bias the update toward the policy's own mistakes are refused
    (`optimal_sampling.trainers.estimators`). α, KL(q‖π_θ), KL(q‖π_t), the weights, the policy mass truncation
    drops, zero-variance groups by row kind and the policy's own (importance-weighted) success
    go to `trainer.state.log_history` and every `report_to` integration under
    `optimal_sampling/`.

    The teacher is placed like TRL's reference model (ZeRO-3 / FSDP sharded, else on the
    device), kept in eval mode and never given gradients.

    Tools (`tools=`, `environment_factory=`) run through TRL's own tool loop: every assistant
    turn of a row is sampled by the row's rule (an on-policy row stays on-policy, a q* row stays
    q*), the teacher sees the conversation from its own prompt on, and log q, log π_θ, log π_t
    are recorded for every generated token and for no tool-result token, so the weights,
    baselines and metrics cover generated tokens only (`optimal_sampling.trainers.turns`).

    Args:
        model, reward_funcs, args, train_dataset, eval_dataset, processing_class, **kwargs:
            as for `GRPOTrainer` (`args` must be an `OptimalSamplingGRPOConfig`).
        teacher_model: the teacher, a causal LM or its path / Hub id (default:
            `args.teacher_model_name_or_path`). It must share the policy's vocabulary. Passing
            the policy itself works (self-distillation with a privileged teacher prompt).
        teacher_processing_class: the teacher's tokenizer if it differs (e.g. its own chat
            template); default: loaded next to a teacher path, else the policy's.
        teacher_prompt_fn: a callable `row -> prompt` for the teacher (overrides
            `args.teacher_prompt_fn`).

    Example:
        >>> from datasets import Dataset
        >>> from optimal_sampling.testing import tiny_causal_lm, tiny_tokenizer
        >>> from optimal_sampling.trainers import OptimalSamplingGRPOConfig, OptimalSamplingGRPOTrainer
        >>> tokenizer = tiny_tokenizer()
        >>> policy, teacher = tiny_causal_lm(len(tokenizer), seed=0), tiny_causal_lm(len(tokenizer), seed=1)
        >>> args = OptimalSamplingGRPOConfig(output_dir="/tmp/os-grpo-doctest", per_device_train_batch_size=4,
        ...     num_generations=4, max_completion_length=4, max_steps=1, report_to="none", use_cpu=True, bf16=False,
        ...     logging_steps=1, save_strategy="no", disable_tqdm=True)
        >>> trainer = OptimalSamplingGRPOTrainer(policy, reward_funcs=lambda completions, **kw: [1.0] * len(completions),
        ...     args=args, train_dataset=Dataset.from_dict({"prompt": ["the cat"] * 4}), processing_class=tokenizer,
        ...     teacher_model=teacher)
        >>> _ = trainer.train()  # doctest: +ELLIPSIS
        {'loss': ...}
        >>> "optimal_sampling/alpha_mean" in trainer.state.log_history[0]
        True
    """

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: OptimalSamplingGRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        teacher_model: torch.nn.Module | str | None = None,
        teacher_processing_class=None,
        teacher_prompt_fn: Callable[[dict], Any] | None = None,
        **kwargs,
    ):
        args = checked_args("grpo", OptimalSamplingGRPOConfig, model, args, teacher_model, processing_class)
        if kwargs.get("rollout_func") is not None:
            raise ValueError(
                "`rollout_func` replaces TRL's sampler, and so q*; it cannot be combined with this trainer."
            )
        uses_tools = bool(kwargs.get("tools")) or kwargs.get("environment_factory") is not None
        check_tool_backend(args, uses_tools)

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
        if uses_tools:
            self._refuse_sharded_tool_loop()
        self._setup_teacher(teacher_model, teacher_processing_class, teacher_prompt_fn)

        # TRL computes and applies an importance-sampling ratio only when `use_vllm` is set
        # (`check_trl_seam` verifies that). `args.use_vllm` stayed False, so no engine was built;
        # our `_generate_single_turn` never calls one, and the stand-in raises if anything else does.
        # TRL's ratio is then replaced by the q* weights (`_reweight`).
        self.use_vllm = True
        self.vllm_mode = "server"  # never "colocate": the tool loop would query an engine's max length
        self.vllm_generation = _NoVLLMEngine()  # type: ignore[assignment]  # a stand-in that raises on any use
        self._last_loaded_step = -1
        self.vllm_importance_sampling_mode = "token_truncate"
        self.vllm_importance_sampling_clip_max = float("inf")
        self.vllm_importance_sampling_clip_min = None

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is not None or multimodal_fields or has_tool_images:
            raise NotImplementedError("Multimodal prompts are not supported by the q* sampler.")
        rollouts = self._sample_turn(prompt_ids)  # a first turn, or a tool-loop continuation
        # Copies: TRL's tool loop extends and replaces these lists in place, and the records must stay as sampled.
        return [list(ids) for ids in rollouts.completion_ids], [list(logq) for logq in rollouts.logq]

    def _generate_and_score_completions(self, inputs):
        # A batch whose rows are all π_θ's (k = G, α = 0, or the teacher schedule at 0) takes TRL's
        # on-policy path: no recomputed log-probs, no ratio (weight exactly 1, as vanilla GRPO).
        self.vllm_importance_sampling_correction = self._on_policy_per_group() < self._group_size()
        output = self._with_rollout_rows(
            inputs, lambda: super(OptimalSamplingGRPOTrainer, self)._generate_and_score_completions(inputs)
        )
        self._log_rollout_metrics(self._reweight(output))
        return output

    def _compute_loss(self, model, inputs):
        # Batches are buffered (`steps_per_generation`) and eval batches interleave: TRL's flag
        # must describe the batch at hand, which carries weights exactly when it has q* rows.
        self.vllm_importance_sampling_correction = "importance_sampling_ratio" in inputs
        return super()._compute_loss(model, inputs)

    def _reweight(self, output: dict) -> dict[str, torch.Tensor]:
        """Put the q* weights and baseline into TRL's batch; return per-token metric values."""
        args = self.args
        device = output["completion_mask"].device
        mask = output["completion_mask"].bool()
        if "tool_mask" in output:
            mask = mask & output["tool_mask"].bool()
        self._check_rollout_rows(mask.shape[0])
        on_policy = self._pending_on_policy(device)
        extra: dict[str, torch.Tensor] = {}
        if self.vllm_importance_sampling_correction:
            old = output["old_per_token_logps"]
            log_ratio = torch.nan_to_num((old - output["sampling_per_token_logps"]) * mask, nan=0.0)  # log π_θ/q
            logq_star = self._pending_padded("logq_star", mask.shape[1], device)
            # log π_θ(y)/q*(y); NaN on on-policy rows whose q* the sampler did not record (vLLM backends)
            log_ratio_star = torch.where(mask, old - logq_star, 0.0).sum(-1)
            weights = importance_weights(
                log_ratio,
                mask,
                on_policy,
                weighting=args.importance_weighting,
                cap=args.importance_weight_cap,
                gamma=args.shaping_gamma,
                log_ratio_star=log_ratio_star,
                on_policy_fraction=self._on_policy_per_group() / self._group_size(),
            )
            if weights.shape[1] > 1:  # tool-result tokens and padding carry no weight
                weights = torch.where(mask, weights, torch.zeros_like(weights))
            output["importance_sampling_ratio"] = weights
            self._report_applied_weights(weights, mask)
            q_tokens = mask & ~on_policy.unsqueeze(-1)
            raw = log_ratio.exp()
            extra["is_weight"] = raw[q_tokens]
            # (w − C)₊ averaged over q* tokens estimates Σ_y (π_θ(y) − C q(y))₊: the policy mass
            # that truncation at C drops at a position (it bounds token truncation's bias).
            extra["policy_mass_truncated_token"] = (raw[q_tokens] - args.importance_weight_cap).clamp_min(0)
            if args.importance_weighting in TRUNCATING:
                changed = weights != (raw if weights.shape[1] > 1 else log_ratio.sum(-1, keepdim=True).exp())
                rows = q_tokens if weights.shape[1] > 1 else ~on_policy.unsqueeze(-1)
                extra["is_clipped_frac"] = changed[rows].float()
            seq_log_ratio = log_ratio.sum(-1)
        else:
            seq_log_ratio = log_ratio_star = torch.zeros(mask.shape[0], device=device)
        on_policy_all, seq_log_ratio_all, log_mixture_weight = self._gather_group_inputs(
            on_policy, seq_log_ratio, log_ratio_star
        )
        rewards = self._batch_rewards(device)
        if args.advantage_baseline != "group":
            advantages = grpo_advantages(
                rewards,
                on_policy_all,
                log_mixture_weight,
                num_generations=self._group_size(),
                baseline=args.advantage_baseline,
                scale_rewards=self.scale_rewards,
            )
            n = mask.shape[0]
            rank = self.accelerator.process_index
            output["advantages"] = advantages[rank * n : (rank + 1) * n].to(output["advantages"].dtype)
        self._log_group_statistics(rewards, on_policy_all, seq_log_ratio_all, log_mixture_weight)
        return extra

    def _report_applied_weights(self, weights: torch.Tensor, mask: torch.Tensor) -> None:
        """TRL logged `sampling/importance_sampling_ratio/*` for its own ratio; report the applied one."""
        mode = "train" if self.model.training else "eval"
        values = weights[mask] if weights.shape[1] > 1 else weights.flatten()
        local = torch.stack(
            [
                values.sum(),
                values.new_tensor(float(values.numel())),
                values.min() if values.numel() else values.new_tensor(float("inf")),
                values.max() if values.numel() else values.new_tensor(float("-inf")),
            ]
        )
        total = self.accelerator.gather(local.float().unsqueeze(0)).view(-1, 4)
        summary = {
            "mean": float(total[:, 0].sum() / total[:, 1].sum().clamp_min(1)),
            "min": float(total[:, 2].min()),
            "max": float(total[:, 3].max()),
        }
        for key, value in summary.items():
            series = self._metrics[mode][f"sampling/importance_sampling_ratio/{key}"]
            if series:
                series[-1] = value
            else:
                series.append(value)
