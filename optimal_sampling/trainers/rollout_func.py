"""q* rollouts for TRL's plain `GRPOTrainer`, through its public (experimental) `rollout_func`.

`GRPOTrainer(..., rollout_func=f)` calls `f(prompts, trainer)` instead of its own generator and
trains on what `f` returns: `{"prompt_ids", "completion_ids", "logprobs", ...}`, one completion per
prompt it receives (TRL repeats each prompt `num_generations` times before the call; extra keys
reach the reward functions as columns). `q_star_rollout_func` builds such an `f` from the same
sampler as `OptimalSamplingGRPOTrainer` (`optimal_sampling.trainers.rollout.sample_rollouts`: the package's decode
engine, exact, full vocabulary): the first `num_on_policy_generations` rows of each group are
sampled from π_θ, the others from q* ∝ π_θ^(1-α) · π_t^α.

Its limits, all from what `rollout_func` can do in TRL 1.16:

- **No importance weights.** TRL puts the returned log-probs (here log q) into its importance ratio
  only when `use_vllm=True`; with `use_vllm=False` they are ignored, so the q* rows are trained on
  as if sampled from π_θ (what `importance_weighting="none"` with the group baseline does). For
  weights, a baseline that matches them, α / KL / weight metrics, a teacher schedule, or a sharded
  teacher, use `OptimalSamplingGRPOTrainer`. Do not set `use_vllm=True` for this function: TRL
  would then also need a vLLM engine, and its default `sequence_mask` correction drops most
  off-policy rows.
- **No tools.** TRL's tool loop samples every later turn with its own generator, not with
  `rollout_func`, so tool calls and `environment_factory` are refused; use
  `OptimalSamplingGRPOTrainer(tools=...)` for q* across turns.
- **The teacher's prompt depends on the prompt only**: `rollout_func` receives the prompts, not the
  dataset rows, so `teacher_prompt_fn` maps a prompt to the teacher's prompt.
- **One process or DDP.** The teacher is moved to the trainer's device and used as it is; under
  FSDP / DeepSpeed the policy is sharded and every forward is a collective, which this function
  does not keep in step (`OptimalSamplingGRPOTrainer` does).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from optimal_sampling.options import QStarOptions
from optimal_sampling.records import check_same_vocabulary, model_eos_ids

from .rollout import sample_rollouts


def q_star_rollout_func(
    teacher_model: torch.nn.Module,
    *,
    teacher_processing_class=None,
    teacher_prompt_fn: Callable[[Any], Any] | None = None,
    num_on_policy_generations: int = 0,
    q_star: QStarOptions | None = None,
    **q_star_options,
) -> Callable[[list, Any], dict[str, list]]:
    """A TRL `rollout_func` that samples completions from q* (or from π_θ for the first k rows of a group).

    Args:
        teacher_model: the teacher π_t, a loaded causal LM sharing the policy's vocabulary.
        teacher_processing_class: the teacher's tokenizer, if it formats prompts differently
            (default: the trainer's).
        teacher_prompt_fn: `prompt -> teacher prompt` (a string, or chat messages the teacher's
            chat template formats); default: the teacher sees the policy's prompt tokens.
        num_on_policy_generations: k, the rows of each group of `num_generations` sampled from π_θ
            itself (α = 0).
        q_star, **q_star_options: the `QStarOptions` (or its fields, e.g. `alpha_method="fixed",
            alpha=1.0`); the temperature is always the trainer's.

    The returned function gives TRL `prompt_ids`, `completion_ids`, `logprobs` (log q of each
    sampled token) and a column `on_policy` (one bool per completion) for the reward functions.
    See the module docstring for what TRL does (not) do with them.

    Example:
        >>> from datasets import Dataset
        >>> from trl import GRPOConfig, GRPOTrainer
        >>> from optimal_sampling.testing import tiny_causal_lm, tiny_tokenizer
        >>> from optimal_sampling.trainers import q_star_rollout_func
        >>> tokenizer = tiny_tokenizer()
        >>> policy, teacher = tiny_causal_lm(len(tokenizer), seed=0), tiny_causal_lm(len(tokenizer), seed=1)
        >>> args = GRPOConfig(output_dir="/tmp/os-rollout-func-doctest", per_device_train_batch_size=4,
        ...     num_generations=4, max_completion_length=4, max_steps=1, report_to="none", use_cpu=True, bf16=False,
        ...     save_strategy="no", disable_tqdm=True)
        >>> trainer = GRPOTrainer(policy, reward_funcs=lambda completions, **kw: [1.0] * len(completions), args=args,
        ...     train_dataset=Dataset.from_dict({"prompt": ["the cat"] * 4}), processing_class=tokenizer,
        ...     rollout_func=q_star_rollout_func(teacher, num_on_policy_generations=2, alpha_method="kl_symmetry"))
        >>> _ = trainer.train()  # doctest: +ELLIPSIS
        {...}
    """
    options = QStarOptions.build(q_star, **q_star_options)
    teacher_model.requires_grad_(False)
    checked: dict[int, bool] = {}  # id(trainer) -> its set-up was checked

    def rollout_func(prompts: list, trainer) -> dict[str, list]:
        if id(trainer) not in checked:
            _check_trainer(trainer, teacher_model, teacher_processing_class, num_on_policy_generations)
            checked[id(trainer)] = True
        device = trainer.accelerator.device
        if next(teacher_model.parameters()).device != torch.device(device):
            teacher_model.to(device)
        tokenizer = trainer.processing_class
        prompt_ids = [_tokenize(tokenizer, p, trainer.chat_template_kwargs) for p in prompts]
        teacher_prompt_ids = None
        if teacher_prompt_fn is not None:
            teacher_tokenizer = teacher_processing_class or tokenizer
            teacher_prompt_ids = [_tokenize(teacher_tokenizer, teacher_prompt_fn(p), {}) for p in prompts]
        group = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        k = min(num_on_policy_generations, group)
        start = trainer.accelerator.process_index * len(prompts)
        on_policy = (torch.arange(len(prompts)) + start) % group < k
        stop_ids = sorted(set(trainer.eos_token_ids) | set(model_eos_ids(teacher_model)))
        from trl.models import unwrap_model_for_generation

        from .seam import generation_unwrap_kwargs  # (TRL 1.14 / 1.15 take no gradient_checkpointing_kwargs)

        with (
            unwrap_model_for_generation(
                trainer.model_wrapped, trainer.accelerator, **generation_unwrap_kwargs(trainer.args)
            ) as policy,
            torch.no_grad(),
        ):
            rollouts = sample_rollouts(
                policy,
                teacher_model,
                prompt_ids,
                teacher_prompt_ids=teacher_prompt_ids,
                max_new_tokens=trainer.max_completion_length,
                pad_token_id=trainer._tokenizer.pad_token_id,
                stop_token_ids=stop_ids,
                vocab_size=len(trainer._tokenizer),
                device=device,
                q_star=options.replace(temperature=trainer.temperature),
                on_policy=on_policy,
            )
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": rollouts.completion_ids,
            "logprobs": rollouts.logq,
            "on_policy": on_policy.tolist(),
        }

    return rollout_func


def _tokenize(tokenizer, prompt, chat_template_kwargs: dict) -> list[int]:
    """A prompt's ids as TRL's own generator would see them (chat messages through the chat template)."""
    if isinstance(prompt, str):
        return list(tokenizer(text=prompt)["input_ids"])
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, **chat_template_kwargs)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    raise TypeError(f"A prompt is a {type(prompt).__name__}; q_star_rollout_func takes strings or chat messages.")


def _check_trainer(trainer, teacher, teacher_processing_class, num_on_policy_generations: int) -> None:
    if trainer.tools or getattr(trainer, "environment_factories", None) is not None:
        raise ValueError(
            "q_star_rollout_func cannot be combined with `tools` / `environment_factory`: TRL's tool loop samples "
            "every later turn with its own generator, not with `rollout_func`. Use OptimalSamplingGRPOTrainer, which "
            "samples every turn from q*."
        )
    if trainer.use_vllm:
        raise ValueError(
            "q_star_rollout_func samples on the trainer's own device; with `use_vllm=True` TRL would also sync a vLLM "
            "engine and apply its sequence-level correction to the q* rows. Set `use_vllm=False` (or use "
            "OptimalSamplingGRPOTrainer for weighted q* rows)."
        )
    if (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled) and trainer.accelerator.num_processes > 1:
        raise NotImplementedError(
            "q_star_rollout_func does not keep sharded (FSDP / DeepSpeed) forwards in step across ranks; use "
            "OptimalSamplingGRPOTrainer, which does."
        )
    if trainer.top_k or (trainer.top_p is not None and trainer.top_p != 1.0) or trainer.min_p is not None:
        raise ValueError("q_star_rollout_func samples q* untruncated: set top_k=0, top_p=1.0 and min_p=None.")
    if not 0 <= num_on_policy_generations <= trainer.num_generations:
        raise ValueError(
            f"num_on_policy_generations (={num_on_policy_generations}) must lie in [0, num_generations="
            f"{trainer.num_generations}]."
        )
    try:
        check_same_vocabulary(trainer._tokenizer, teacher_processing_class or trainer._tokenizer)
    except ValueError as error:
        raise ValueError(f"Incompatible teacher: {error}") from None
    width = teacher.get_output_embeddings().weight.shape[0]
    if width < len(trainer._tokenizer):
        raise ValueError(
            f"Incompatible teacher: its output layer has {width} rows but the policy's tokenizer has "
            f"{len(trainer._tokenizer)} tokens; the teacher must share the policy's vocabulary."
        )
