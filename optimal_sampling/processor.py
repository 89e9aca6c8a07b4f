"""`OptimalSamplingLogitsProcessor`: q* sampling inside an ordinary `model.generate` call."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .compat import check_transformers_front
from .mixture import Mixture, compute_mixture, log_probs_from_logits, token_records
from .options import QStarOptions
from .records import OptimalSamplingRecord, check_same_device, generated_token_mask, model_eos_ids
from .teacher import TeacherCache, left_padding_mask, repeat_teacher_prompts


class OptimalSamplingLogitsProcessor(LogitsProcessor):
    r"""Replace the base model's scores with log q*, q* ∝ π_θ^(1-α*) · π_t^α*, at every step.

    The teacher runs alongside `generate` with its own KV cache, fed the same new tokens as
    the base (with its own prompt if `teacher_input_ids` is given). Temperature is applied
    to both models *before* mixing, top-k / top-p *after*, so pass them here and leave
    `generate`'s own `temperature=1.0` and `top_k=0` (its default `top_k=50` would truncate
    q* behind this processor's back). For stopping on either model's EOS, pass both ids as
    `eos_token_id=[...]` to `generate`, or use `optimal_generate`, which does all of this.

    Beam search is rejected: beams are reordered every step, which would tie the teacher
    cache and the records to the wrong rows.

    Args:
        teacher_model: the teacher `PreTrainedModel`; must share the base's tokenizer and be
            on the same device. May be the base model object itself (separate cache).
        q_star: a `QStarOptions` (α rule, clamp, temperature before mixing, top-k / top-p
            after mixing, empty-support fallback, ...); keyword `options` with its field
            names (`alpha_method="fixed", alpha=0.5`) change single ones.
        teacher_input_ids, teacher_attention_mask: the teacher's own (left-padded) prompt,
            one row per base prompt (rows are repeated for `num_return_sequences`). Default:
            the teacher sees the base's prompt.
        vocab_size: the shared vocabulary size (`len(tokenizer)`); ids at or above it get
            probability 0. Default: the smaller of the two models' logit widths.
        pad_token_id: the id used for left padding (default: the base's pad id), to rebuild
            the attention mask that the processor is not given.
        eos_token_id: id(s) that end a row, for `token_mask` (default: both models' EOS).
        record: keep per-token records for `records(sequences)`.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from optimal_sampling import OptimalSamplingLogitsProcessor
        >>> config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> base, teacher = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
        >>> proc = OptimalSamplingLogitsProcessor(teacher)
        >>> prompt = torch.tensor([[5, 6, 7]])
        >>> out = base.generate(prompt, attention_mask=torch.ones_like(prompt), logits_processor=[proc],
        ...                     do_sample=True, top_k=0, max_new_tokens=4, min_new_tokens=4)
        >>> rec = proc.records(out)
        >>> rec.alpha.shape, bool((rec.alpha >= 0).all() and (rec.alpha <= 1).all())
        (torch.Size([1, 4]), True)
    """

    def __init__(
        self,
        teacher_model: torch.nn.Module,
        q_star: QStarOptions | None = None,
        *,
        teacher_input_ids: torch.Tensor | None = None,
        teacher_attention_mask: torch.Tensor | None = None,
        vocab_size: int | None = None,
        pad_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        record: bool = True,
        **options,
    ):
        if not isinstance(teacher_model, torch.nn.Module) or not hasattr(teacher_model, "config"):
            raise TypeError(
                f"`teacher_model` must be a transformers causal LM (e.g. AutoModelForCausalLM.from_pretrained(...)), "
                f"got {type(teacher_model).__name__}."
            )
        check_transformers_front(teacher_model)
        self.q_star = QStarOptions.build(q_star, **options)
        if teacher_attention_mask is not None and teacher_input_ids is None:
            raise ValueError("`teacher_attention_mask` was given without `teacher_input_ids`.")
        if teacher_input_ids is not None:
            if teacher_attention_mask is None:
                teacher_attention_mask = torch.ones_like(teacher_input_ids)
            if teacher_input_ids.shape != teacher_attention_mask.shape:
                raise ValueError(
                    f"`teacher_input_ids` {tuple(teacher_input_ids.shape)} and `teacher_attention_mask` "
                    f"{tuple(teacher_attention_mask.shape)} must have the same shape."
                )
            if teacher_input_ids.shape[1] == 0:
                raise ValueError("`teacher_input_ids` is empty; the teacher needs at least one prompt token per row.")
        self.teacher = teacher_model
        self.teacher_cache = TeacherCache(teacher_model)
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.teacher_prompt = (teacher_input_ids, teacher_attention_mask)
        self.record = record
        self._reset_call(None)

    # -- state of one generate call ---------------------------------------------------

    def _reset_call(self, input_ids: torch.Tensor | None) -> None:
        self._last_ids = input_ids
        self._prompt_length = 0 if input_ids is None else input_ids.shape[1]
        self._steps: list[dict[str, torch.Tensor]] = []  # per step: alpha, diagnostics, and the step's log-probs
        self._pending: tuple[Mixture, torch.Tensor, torch.Tensor] | None = None  # last step, before its token is known

    def _continues_last_call(self, input_ids: torch.Tensor) -> bool:
        last = self._last_ids
        if last is None or last.shape[0] != input_ids.shape[0] or input_ids.shape[1] != last.shape[1] + 1:
            return False
        if bool((input_ids[:, :-1] == last).all()):
            return True
        # The same rows in another order is beam search (or another reordering strategy).
        matches = (input_ids[:, None, :-1] == last[None, :, :]).all(dim=-1)  # [B, B]
        if bool(matches.any(dim=-1).all()):
            raise ValueError(
                "OptimalSamplingLogitsProcessor does not support beam search (the rows were reordered "
                "between steps). Use `do_sample=True, num_beams=1`."
            )
        return False

    def _teacher_sequence(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        teacher_ids, teacher_mask = self.teacher_prompt
        if teacher_ids is None or teacher_mask is None:  # (a mask always comes with teacher ids)
            return input_ids, left_padding_mask(input_ids, self.pad_token_id)
        teacher_ids, teacher_mask = repeat_teacher_prompts(teacher_ids, teacher_mask, input_ids.shape[0])
        self.teacher_prompt = (teacher_ids, teacher_mask)
        teacher_ids = teacher_ids.to(input_ids.device)
        teacher_mask = teacher_mask.to(input_ids.device)
        generated = input_ids[:, self._prompt_length :]
        return (
            torch.cat([teacher_ids, generated], dim=-1),
            torch.cat([teacher_mask, torch.ones_like(generated)], dim=-1),
        )

    # -- the processor ----------------------------------------------------------------

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # Nothing here needs autograd, and inference mode skips its per-op bookkeeping (~5% of
        # a small teacher's forward on CPU). The scores leave it as a normal tensor, so that
        # processors after this one may still modify them in place.
        with torch.inference_mode():
            logq = self._process(input_ids, scores)
        return logq.clone()  # type: ignore[return-value]  # transformers annotates scores as FloatTensor

    def _process(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._continues_last_call(input_ids):
            self._record_sampled(input_ids[:, -1])
            # The cache holds the teacher's sequence up to the previous step: feed the new token.
            teacher_logits = self.teacher_cache.extend(input_ids[:, -1:])
        else:
            check_same_device(input_ids.device, self.teacher)
            if self.pad_token_id is None and self.teacher_prompt[0] is None:
                self.pad_token_id = getattr(self.teacher.config, "pad_token_id", None)
            self._reset_call(input_ids)
            teacher_logits = self.teacher_cache.last_logits(*self._teacher_sequence(input_ids))
        self._last_ids = input_ids

        vocab = self.vocab_size or min(scores.shape[-1], teacher_logits.shape[-1])
        logp_theta = log_probs_from_logits(scores, self.q_star.temperature, vocab)
        logp_t = log_probs_from_logits(teacher_logits, self.q_star.temperature, vocab)
        forced = None
        if input_ids.shape[1] - self._prompt_length < self.q_star.force_teacher_first_tokens:
            forced = torch.ones(input_ids.shape[0], dtype=torch.bool, device=scores.device)
        step = compute_mixture(logp_theta, logp_t, self.q_star, forced=forced, return_diagnostics=self.record)

        if self.record:
            self._pending = (step, logp_theta, logp_t)
            self._steps.append({})  # the step's record, once its sampled token is known
        if vocab == scores.shape[-1] and step.logq.dtype == scores.dtype:
            return step.logq
        out = torch.full_like(scores, float("-inf"))
        out[:, :vocab] = step.logq.to(scores.dtype)
        return out

    def _record_sampled(self, tokens: torch.Tensor) -> None:
        if not self.record or self._pending is None:
            return
        step, logp_theta, logp_t = self._pending
        record = token_records(step, tokens.clamp(max=step.logq.shape[-1] - 1), logp_theta, logp_t)
        del record["logq_star"]  # = logq: the processor samples q* itself
        self._steps[-1] = record
        self._pending = None

    def records(self, sequences: torch.Tensor) -> OptimalSamplingRecord:
        """Per-token records for the final `sequences` that `generate` returned (`[B, P + T]`)."""
        if not self.record:
            raise RuntimeError("This processor was built with `record=False`.")
        if self._last_ids is None:
            raise RuntimeError("No generate call has run through this processor yet.")
        generated = sequences[:, self._prompt_length :]
        steps = generated.shape[1]
        if len(self._steps) < steps or steps == 0:
            raise ValueError(
                f"`sequences` has {steps} generated tokens but the processor saw {len(self._steps)} steps; "
                "pass the sequences of the last generate call made with this processor."
            )
        if self._pending is not None and len(self._steps) == steps:
            self._record_sampled(generated[:, len(self._steps) - 1].to(self._pending[1].device))
        steps_used = self._steps[:steps]
        stacked = {name: torch.stack([s[name] for s in steps_used], dim=1) for name in steps_used[0]}
        return OptimalSamplingRecord(
            alpha=stacked.pop("alpha"),
            logq=stacked.pop("logq"),
            logp_theta=stacked.pop("logp_theta"),
            logp_t=stacked.pop("logp_t"),
            token_mask=generated_token_mask(generated, self._stop_ids()),
            diagnostics=stacked,
        )

    def _stop_ids(self) -> list[int]:
        if self.eos_token_id is not None:
            eos = self.eos_token_id
            return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        return model_eos_ids(self.teacher)
