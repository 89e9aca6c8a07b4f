"""`OptimalSamplingGRPOTrainer`: GRPO whose rollouts come from q*, corrected by importance weights."""

from __future__ import annotations

from typing import Any, Callable

import torch
from trl import GRPOTrainer

from ._common import (
    OptimalSamplingMixin,
    check_generation_options,
    check_sampler_backend,
    check_teacher_given,
)
from .config import OptimalSamplingArguments, OptimalSamplingGRPOConfig
from .seam import check_trl_seam


class _NoVLLMEngine:
    """Stands at `trainer.vllm_generation`: TRL's vLLM paths must never run here."""

    def __getattr__(self, name):
        if name.startswith("__"):  # copy / pickle / hasattr probes
            raise AttributeError(name)
        raise RuntimeError(
            f"OptimalSamplingGRPOTrainer reached TRL's vLLM code (`vllm_generation.{name}`); rollouts come from the "
            "q* sampler. This is a TRL seam change: please report it with your TRL version."
        )


class OptimalSamplingGRPOTrainer(OptimalSamplingMixin, GRPOTrainer):
    """`GRPOTrainer` whose rollouts are sampled from q* ∝ π_θ^(1-α) · π_t^α, token by token.

    A drop-in for `GRPOTrainer`: rewards, advantages and the loss (every `loss_type`) stay
    TRL's. Only the sampler changes, at TRL's narrowest seam (`_generate_single_turn`), which
    returns log q of every sampled token. TRL's importance-sampling correction (the one it
    runs for vLLM rollouts) then weights the per-token loss by π_θ/q — truncated at
    `vllm_importance_sampling_clip_max` with the default `token_truncate` mode — so training
    stays on-policy in expectation. α, KL(q‖π_θ), KL(q‖π_t) and importance-weight statistics go
    to `trainer.state.log_history` and every `report_to` integration under `optimal_sampling/`.

    The teacher is placed like TRL's reference model (ZeRO-3 / FSDP sharded, else on the
    device), kept in eval mode and never given gradients.

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
        >>> from trainers import OptimalSamplingGRPOConfig, OptimalSamplingGRPOTrainer
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
        check_trl_seam("grpo")
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or type(model).__name__
            args = OptimalSamplingGRPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-OptimalSampling-GRPO")
        if not isinstance(args, OptimalSamplingArguments):
            raise TypeError(
                f"`args` is a {type(args).__name__}; pass an `OptimalSamplingGRPOConfig` (a GRPOConfig with the "
                "teacher and α fields)."
            )
        check_teacher_given(teacher_model, args)
        check_sampler_backend(args)
        check_generation_options(args)
        if kwargs.get("rollout_func") is not None:
            raise ValueError("`rollout_func` replaces TRL's sampler, and so q*; it cannot be combined with this trainer.")
        if kwargs.get("environment_factory") is not None:
            raise NotImplementedError("`environment_factory` is not supported by OptimalSamplingGRPOTrainer yet.")
        if kwargs.get("tools") and (args.teacher_prompt_template or args.teacher_prompt_fn or teacher_prompt_fn):
            raise NotImplementedError(
                "Tool calling with a separate teacher prompt is not supported: tool-result turns would need the "
                "teacher's view of the conversation. Drop the teacher prompt, or the tools."
            )

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

        # TRL computes, applies and logs its importance-sampling correction only when `use_vllm` is
        # set (`check_trl_seam` verifies that). `args.use_vllm` stayed False, so no engine was built;
        # our `_generate_single_turn` never calls one, and the stand-in raises if anything else does.
        self.use_vllm = True
        self.vllm_mode = "server"  # never "colocate": the tool loop would query an engine's max length
        self.vllm_generation = _NoVLLMEngine()
        self._last_loaded_step = -1

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is not None or multimodal_fields or has_tool_images:
            raise NotImplementedError("Multimodal prompts are not supported by the q* sampler.")
        rollouts = self._sample_optimal(prompt_ids)
        return rollouts.completion_ids, rollouts.logq

    def _generate_and_score_completions(self, inputs):
        output = self._with_rollout_rows(inputs, lambda: super(OptimalSamplingGRPOTrainer, self)._generate_and_score_completions(inputs))
        self._log_rollout_metrics(self._importance_weight_stats(output))
        return output

    def _importance_weight_stats(self, output: dict) -> dict[str, torch.Tensor]:
        """Raw per-token weights π_θ/q and the fraction TRL truncated or masked."""
        if not (self.vllm_importance_sampling_correction and "old_per_token_logps" in output):
            return {}
        mask = output["completion_mask"].bool()
        if "tool_mask" in output:
            mask = mask & output["tool_mask"].bool()
        log_w = torch.nan_to_num(output["old_per_token_logps"] - output["sampling_per_token_logps"], nan=0.0)
        weights = log_w.exp()[mask]
        applied = output["importance_sampling_ratio"]
        if applied.shape[1] == 1:  # sequence modes: one ratio per completion
            raw = (log_w * mask).sum(-1).exp()
            changed = applied.squeeze(1) != raw
        else:
            changed = (applied != log_w.exp())[mask]
        return {"is_weight": weights, "is_clipped_frac": changed.float()}
