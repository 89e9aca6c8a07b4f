"""`OptimalSamplingDistillationTrainer`: TRL's on-policy distillation, with the student's rollouts drawn from q*."""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import PreTrainedModel
from trl import DistillationTrainer

from ._common import METRIC_PREFIX, OptimalSamplingMixin
from .checks import check_tool_backend, checked_args, refuse_multimodal_processor
from .config import OptimalSamplingDistillationConfig
from .rollout import left_pad
from .turns import ToolLoopMixin

#: The batch keys that carry the teacher's own prompt (one turn) or conversation (tools) into the loss.
TEACHER_LOSS_KEYS = (
    "teacher_prompt_ids",
    "teacher_prompt_mask",
    "teacher_input_ids",
    "teacher_attention_mask",
    "teacher_index",
)


class OptimalSamplingDistillationTrainer(ToolLoopMixin, OptimalSamplingMixin, DistillationTrainer):
    """`DistillationTrainer` whose completions are sampled from q* ∝ π_θ^(1-α) · π_t^α, token by token.

    A drop-in for `trl.DistillationTrainer`: the loss (generalized JSD between the student's and the
    teacher's next-token distributions at every completion position, `beta`), the teacher's placement
    and everything after generation stay TRL's. Only the sampler changes, at TRL's narrowest seam
    (`_generate_single_turn`): each completion is drawn from q* with α per token by the config's rule
    (`alpha_method`, clamp, `kl_budget`, `teacher_decay_ratio`), so the prefixes the loss is taken at
    lie between the student's own (on-policy distillation) and the teacher's (supervised
    distillation). A per-prefix divergence needs no importance weight for that: the behaviour policy
    only chooses which prefixes are trained on (`theory/derivation.md` §9). The config's default is
    α = 0, TRL's own sampling (`OptimalSamplingDistillationConfig` says why). When α is 0 for every
    token (`alpha_method="fixed", alpha=0`, `alpha_max=0`, or the schedule decayed to 0) the rows are
    sampled from π_θ exactly as `DistillationTrainer` samples them: the same tokens and losses under one
    seed.

    With a teacher prompt (`teacher_prompt_template` / `teacher_prompt_fn`, or `teacher_prompt_fn=`) the
    teacher sees it when q* is sampled and, with `teacher_prompt_in_loss`, in the loss.

    Tools (`tools=`) run through TRL's own tool loop, which samples every turn after a tool result
    through the same seam: each turn of a row is drawn by the same rule (q*, or π_θ throughout when α
    is 0), the teacher reads the conversation from its own prompt on (tool results through its own
    chat template when it differs from the student's), α and the KL metrics cover generated tokens
    only, and TRL's `tool_mask` keeps tool-result tokens out of the loss. With `teacher_prompt_in_loss`
    the teacher scores that same conversation of its own in the loss (`optimal_sampling.trainers.turns`).

    α, KL(q‖π_θ), KL(q‖π_t), the Chernoff information and the teacher's pull are logged under
    `optimal_sampling/` with TRL's metrics.

    Args:
        model, teacher_model, args, train_dataset, eval_dataset, processing_class, **kwargs: as for
            `DistillationTrainer` (`args` must be an `OptimalSamplingDistillationConfig`; the teacher
            may also come from `args.teacher_model_name_or_path`).
        teacher_processing_class: the teacher's tokenizer if it differs (e.g. its own chat template);
            default: loaded next to a teacher path, else the student's. The vocabularies must match.
        teacher_prompt_fn: a callable `row -> prompt` for the teacher (overrides the config's).

    Example:
        >>> from datasets import Dataset
        >>> from optimal_sampling.testing import tiny_causal_lm, tiny_tokenizer
        >>> from optimal_sampling.trainers import OptimalSamplingDistillationConfig, OptimalSamplingDistillationTrainer
        >>> tokenizer = tiny_tokenizer()
        >>> student, teacher = tiny_causal_lm(len(tokenizer), seed=0), tiny_causal_lm(len(tokenizer), seed=1)
        >>> args = OptimalSamplingDistillationConfig(output_dir="/tmp/os-distill-doctest", per_device_train_batch_size=4,
        ...     alpha_method="kl_symmetry", max_completion_length=4, max_steps=1, report_to="none", use_cpu=True,
        ...     bf16=False, logging_steps=1, save_strategy="no", disable_tqdm=True, gradient_checkpointing=False)
        >>> trainer = OptimalSamplingDistillationTrainer(student, teacher_model=teacher, args=args,
        ...     train_dataset=Dataset.from_dict({"prompt": ["the cat"] * 4}), processing_class=tokenizer)
        >>> _ = trainer.train()  # doctest: +ELLIPSIS
        {'loss': ...}
        >>> "optimal_sampling/alpha_mean" in trainer.state.log_history[0]
        True
    """

    def __init__(
        self,
        model,
        teacher_model: PreTrainedModel | str | None = None,
        args: OptimalSamplingDistillationConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        teacher_processing_class=None,
        teacher_prompt_fn: Callable[[dict], Any] | None = None,
        **kwargs,
    ):
        args = checked_args(
            "distillation", OptimalSamplingDistillationConfig, model, args, teacher_model, processing_class
        )
        if teacher_model is model or (teacher_model is None and args.teacher_model_name_or_path is model):
            raise ValueError(
                "The student as its own teacher is not supported by the distillation trainer: TRL places the teacher "
                "as a second, frozen model. Load a second copy (e.g. from the same path) as `teacher_model`."
            )
        uses_tools = bool(kwargs.get("tools"))
        check_tool_backend(args, uses_tools)
        source = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        super().__init__(
            model,
            teacher_model=source,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        refuse_multimodal_processor(self.processing_class, "students")
        if uses_tools:
            self._refuse_sharded_tool_loop()
        # TRL loaded and placed the teacher (it scores every completion in the loss); the sampler shares it.
        self._setup_teacher(source, teacher_processing_class, teacher_prompt_fn, prepared=self.teacher_model)
        self._teacher_loss_inputs: dict[str, torch.Tensor] | None = None

    # -- sampling: TRL's seam ---------------------------------------------------------------

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        if images is not None or multimodal_fields or has_tool_images:
            raise NotImplementedError("Multimodal prompts are not supported by the q* sampler.")
        rollouts = self._sample_turn(prompt_ids)  # a first turn, or a tool-loop continuation
        # Copies: TRL's tool loop replaces entries of the returned list, and the records must stay as sampled.
        return [list(ids) for ids in rollouts.completion_ids]

    def _on_policy_rows(self, num_rows: int) -> torch.Tensor:
        """Distillation samples one completion per prompt: every row from q*, or every row from π_θ
        (exactly TRL's sampling) when α is 0 throughout."""
        return torch.full((num_rows,), self._no_teacher_pull(), dtype=torch.bool)

    def _generate_and_score_completions(self, inputs):
        rows = len(inputs)
        output = self._with_rollout_rows(
            inputs, lambda: super(OptimalSamplingDistillationTrainer, self)._generate_and_score_completions(inputs)
        )
        self._check_rollout_rows(rows)
        if self._teacher_prompt_source is not None and self.args.teacher_prompt_in_loss:
            output.update(self._teacher_loss_batch(output["completion_ids"].shape[1]))  # split and shuffled with rows
        mode = "train" if self.model.training else "eval"
        on_policy = self._pending_on_policy("cpu")
        self._metrics[mode][METRIC_PREFIX + "on_policy_frac"].append(float(on_policy.float().mean()))
        self._metrics[mode][METRIC_PREFIX + "teacher_pull"].append(self._teacher_pull())
        self._log_rollout_metrics()
        return output

    # -- the loss: TRL's, with the teacher under its own prompt -----------------------------

    def _teacher_loss_batch(self, width: int) -> dict[str, torch.Tensor]:
        """The teacher's side of the loss, as `[B, ...]` tensors that TRL splits and shuffles with the rows.

        One turn: the teacher's prompt, which goes before TRL's completion. With tools, the teacher's whole
        conversation (its prompt, then each turn's tool results as it read them and the turn's tokens): its
        tool results may differ from the student's in length, so `teacher_index` `[B, width]` gives, at each
        generated position of TRL's completion, the teacher state that predicts that token (0 at tool-result
        tokens and padding, which `tool_mask` and the completion mask keep out of the loss).
        """
        turns, device, pad = self._sampled_turns(), self.accelerator.device, self._tokenizer.pad_token_id
        if turns.teacher_prompts is None:
            raise RuntimeError("The batch was sampled without the teacher's prompts; they cannot enter the loss.")
        if not self.tools:
            ids, mask = left_pad(turns.teacher_prompts, pad, device)
            return {"teacher_prompt_ids": ids, "teacher_prompt_mask": mask}
        conversations = [turns.teacher_conversation(i) for i in range(turns.num_rows)]
        ids, mask = left_pad([conversation for conversation, _ in conversations], pad, device)
        index = torch.zeros(turns.num_rows, width, dtype=torch.long)
        for i, (conversation, at) in enumerate(conversations):
            positions = range(len(at)) if turns.positions is None else turns.positions[i]
            # left padding shifts the conversation; the state before a token predicts it
            offset = ids.shape[1] - len(conversation) - 1
            index[i, torch.tensor(positions, dtype=torch.long)] = torch.tensor(at, dtype=torch.long) + offset
        return {"teacher_input_ids": ids, "teacher_attention_mask": mask, "teacher_index": index.to(device)}

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        self._teacher_loss_inputs = {key: inputs[key] for key in TEACHER_LOSS_KEYS if key in inputs} or None
        try:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        finally:
            self._teacher_loss_inputs = None

    def _get_last_hidden_state(self, unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs):
        own = self._teacher_loss_inputs
        if own is None or unwrapped_model is not self.accelerator.unwrap_model(self.teacher_model):
            return super()._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)
        if "teacher_index" in own:
            # The teacher's own conversation, scored whole: state j predicts token j + 1. `[B, T - 1, H]`
            ids = own["teacher_input_ids"]
            states = super()._get_last_hidden_state(
                unwrapped_model, ids, own["teacher_attention_mask"], ids.shape[1] - 1, **kwargs
            )
            index = own["teacher_index"].unsqueeze(-1).expand(-1, -1, states.shape[-1])
            return states.gather(1, index)  # `[B, logits_to_keep, H]`, aligned with TRL's completion
        # One turn: TRL scores the teacher on the student's prompt + completion; the last `logits_to_keep`
        # positions are the completion, so the teacher's own prompt replaces what comes before them.
        input_ids = torch.cat([own["teacher_prompt_ids"], input_ids[:, -logits_to_keep:]], dim=1)
        attention_mask = torch.cat([own["teacher_prompt_mask"], attention_mask[:, -logits_to_keep:]], dim=1)
        return super()._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)
