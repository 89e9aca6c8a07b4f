"""q* generation with transformers: the `optimal_generate` strategy and `OptimalSampler`."""

from __future__ import annotations

import inspect
import math
from typing import Any, Sequence, cast

import torch
from transformers import GenerationMixin, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.stopping_criteria import EosTokenCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .compat import check_transformers_front
from .options import OPTION_NAMES, QStarOptions
from .processor import OptimalSamplingLogitsProcessor
from .records import (
    GenerationOutput,
    OptimalGenerateOutput,
    as_id_list,
    check_same_device,
    check_same_vocabulary,
    first_or_none,
    model_eos_ids,
    output_width,
    prompt_token_ids,
    summarize_tokens,
)

# `generate` keeps these in its GenerationConfig (do_sample=True applies them): they reach q*
# from there, not as options of this strategy.
_GENERATE_SAMPLING = ("temperature", "top_k", "top_p")

# Warpers whose effect on q* we reproduce inside the mixture (temperature before mixing,
# top-k / top-p after); any other warper would change what is sampled without being in logq.
_ABSORBED_WARPERS = {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"}
_REJECTED_WARPERS = {
    "MinPLogitsWarper": "min_p",
    "TopHLogitsWarper": "top_h",
    "TypicalLogitsWarper": "typical_p",
    "EpsilonLogitsWarper": "epsilon_cutoff",
    "EtaLogitsWarper": "eta_cutoff",
    "LogitNormalization": "renormalize_logits",
}


def optimal_generate(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config,
    teacher_model: torch.nn.Module | None = None,
    teacher_input_ids: torch.Tensor | None = None,
    teacher_attention_mask: torch.Tensor | None = None,
    q_star: QStarOptions | None = None,
    vocab_size: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    optimal_streamer=None,
    synced_gpus: bool = False,
    fast=False,
    **model_kwargs,
):
    """A `custom_generate` strategy: sample from q* with `base.generate(...)`.

    Use as `base.generate(**inputs, custom_generate=optimal_generate, teacher_model=teacher, ...)`.
    `generate` prepares inputs, cache, processors and stopping criteria as usual; this
    strategy moves `temperature` (before mixing) and `top_k` / `top_p` (after mixing) into
    the q* processor, adds the teacher's EOS (and `stop_token_ids`) to the stopping
    criteria, and runs transformers' own sampling loop. Note that `generate`'s default
    `top_k=50` applies to q* too: pass `top_k=0` for untruncated q*.

    The q* settings come as `q_star=QStarOptions(...)` or as its field names directly
    (`alpha_method="fixed", alpha=0.5, empty_support="base"`); temperature, top-k and top-p
    are `generate`'s own arguments.

    With `return_dict_in_generate=True` the result is an `OptimalGenerateOutput`: the
    usual fields plus `alpha`, `logq`, `logp_theta`, `logp_t`, `token_mask` and
    `diagnostics` per generated token. A streamer goes in `optimal_streamer=` (generate
    drops `streamer=` before calling custom strategies).

    `fast=True` (or a mode name, or an `optimal_sampling.fast.FastPathConfig`) decodes with
    the fast path instead: static KV caches for both models and the whole step captured in
    a CUDA graph (eager on CPU); same output fields, diagnostics reduced unless asked for.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from optimal_sampling import optimal_generate
        >>> config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> base, teacher = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
        >>> prompt = torch.tensor([[5, 6, 7]])
        >>> out = base.generate(prompt, attention_mask=torch.ones_like(prompt), custom_generate=optimal_generate,
        ...                     teacher_model=teacher, do_sample=True, top_k=0, max_new_tokens=4,
        ...                     return_dict_in_generate=True)
        >>> out.sequences.shape[1] <= 7, out.logq.shape == out.alpha.shape
        (True, True)
    """
    if teacher_model is None:
        raise ValueError("optimal_generate needs `teacher_model=` (the teacher causal LM).")
    check_transformers_front(model, teacher_model, sampling_loop=not fast)
    options = {name: model_kwargs.pop(name) for name in OPTION_NAMES if name in model_kwargs}
    q_star = QStarOptions.build(q_star, **options)
    for name in _GENERATE_SAMPLING:
        if getattr(q_star, name) != getattr(QStarOptions(), name):
            raise ValueError(
                f"Pass `{name}` to generate itself (generate(..., {name}=...)), not in `q_star`: "
                "generate applies its own sampling settings."
            )
    if (generation_config.num_beams or 1) > 1:
        raise ValueError(
            f"optimal_generate samples token by token from q*; beam search (num_beams={generation_config.num_beams}) "
            "is not supported. Use num_beams=1."
        )
    if model_kwargs.get("assistant_model") is not None or getattr(generation_config, "prompt_lookup_num_tokens", None):
        raise ValueError("optimal_generate does not support assisted / speculative decoding; drop `assistant_model`.")

    kept = LogitsProcessorList()
    for processor in logits_processor:
        name = type(processor).__name__
        if name in _REJECTED_WARPERS:
            raise ValueError(
                f"`{_REJECTED_WARPERS[name]}` is not supported with optimal_generate: it would change the sampled "
                "distribution without being recorded in logq. Use top_k / top_p instead."
            )
        if name not in _ABSORBED_WARPERS:
            kept.append(processor)
    do_sample = bool(generation_config.do_sample)
    temperature = generation_config.temperature if do_sample and generation_config.temperature else 1.0
    top_k = (generation_config.top_k or 0) if do_sample else 0
    top_p = (generation_config.top_p if generation_config.top_p is not None else 1.0) if do_sample else 1.0
    q_star = q_star.replace(temperature=temperature, top_k=top_k, top_p=top_p)

    stop_ids = sorted(
        set(as_id_list(generation_config.eos_token_id))
        | set(model_eos_ids(teacher_model))
        | set(as_id_list(stop_token_ids))
    )
    extra_stops = sorted(set(stop_ids) - set(as_id_list(generation_config.eos_token_id)))
    # What generate pads finished rows with: its pad id, else its first EOS id (as generate itself decides).
    pad_token_id = first_or_none(generation_config.pad_token_id)
    if pad_token_id is None:
        pad_token_id = first_or_none(generation_config.eos_token_id)
    if extra_stops:
        if pad_token_id is None:
            raise ValueError(
                f"Rows may stop on {extra_stops} (the teacher's EOS or `stop_token_ids`), but generate has no id to pad "
                "them with afterwards: the base's generation config has neither `pad_token_id` nor `eos_token_id`. "
                "Pass `pad_token_id=` to generate."
            )
        stopping_criteria = StoppingCriteriaList([*stopping_criteria, EosTokenCriteria(eos_token_id=extra_stops)])

    # --- fast path (optimal_sampling/fast.py): static caches, CUDA graphs --------------------
    if fast:
        from .fast import fast_optimal_generate

        if optimal_streamer is not None:
            raise ValueError("The fast path does not stream; drop `optimal_streamer` or use fast=False.")
        return fast_optimal_generate(
            model,
            teacher_model,
            input_ids,
            generation_config,
            kept,
            stopping_criteria,
            fast=fast,
            model_kwargs=model_kwargs,
            stop_ids=stop_ids,
            pad_token_id=pad_token_id,
            q_star=q_star,
            vocab_size=vocab_size,
            teacher_input_ids=teacher_input_ids,
            teacher_attention_mask=teacher_attention_mask,
        )
    # --- end of fast path ----------------------------------------------------------------------

    processor = OptimalSamplingLogitsProcessor(
        teacher_model,
        q_star,
        teacher_input_ids=teacher_input_ids,
        teacher_attention_mask=teacher_attention_mask,
        vocab_size=vocab_size,
        pad_token_id=first_or_none(generation_config.pad_token_id),
        eos_token_id=stop_ids,
    )
    kept.append(processor)
    if optimal_streamer is not None:
        optimal_streamer.put(input_ids.cpu())
    output = GenerationMixin._sample(
        cast(Any, model),  # a causal LM with GenerationMixin: generate() called this strategy on it
        input_ids,
        logits_processor=kept,
        stopping_criteria=stopping_criteria,
        generation_config=generation_config,
        synced_gpus=synced_gpus,
        streamer=optimal_streamer,
        **model_kwargs,
    )
    if not generation_config.return_dict_in_generate or not isinstance(output, GenerateDecoderOnlyOutput):
        return output
    record = processor.records(output.sequences)
    return OptimalGenerateOutput(
        **{k: v for k, v in output.items()},
        alpha=record.alpha,
        logq=record.logq,
        logp_theta=record.logp_theta,
        logp_t=record.logp_t,
        token_mask=record.token_mask,
        diagnostics=record.diagnostics,
    )


def _with_option_parameters(function):
    """Declare every q* option (but generate's own temperature / top-k / top-p) as a keyword of
    `function`'s signature. `generate` routes the keywords a custom strategy declares to it and
    rejects any other unknown keyword as an unused model argument, so an option added to
    `QStarOptions` reaches `generate(..., custom_generate=optimal_generate)` with no list to keep."""
    signature = inspect.signature(function)
    *named, rest = signature.parameters.values()
    options = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
        for name in OPTION_NAMES
        if name not in _GENERATE_SAMPLING
    ]
    function.__signature__ = signature.replace(parameters=[*named, *options, rest])
    return function


optimal_generate = _with_option_parameters(optimal_generate)


# ---------------------------------------------------------------------------------------
# The high-level sampler


class OptimalSampler:
    """Sample completions from q* with a base (π_θ) and a teacher (π_t) transformers model.

    Args:
        base_model, teacher_model: causal LMs sharing one vocabulary (their padded embedding
            sizes may differ). The same object may serve as both (separate caches), e.g. for
            self-distillation with a privileged teacher prompt.
        tokenizer: the base's tokenizer (its chat template formats chat prompts for the base).
        teacher_tokenizer: the teacher's tokenizer, if it has its own chat template; its
            vocabulary must equal the base's.
        q_star: a `QStarOptions`: the α rule and clamp, temperature (before mixing), top-k /
            top-p (after mixing; `logq` is under the truncated distribution), forced teacher
            tokens, the empty-support fallback. Keyword `options` (its field names, e.g.
            `alpha_method="fixed", alpha=0.5`) change single ones.
        stop_token_ids: extra ids that end a completion (the base's and the teacher's EOS
            always do).
        fast: `True`, a mode name or a `FastPathConfig`: decode with the fast path (static
            caches, CUDA graphs) instead of transformers' sampling loop.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from optimal_sampling import OptimalSampler
        >>> from optimal_sampling.testing import tiny_tokenizer
        >>> tokenizer = tiny_tokenizer()
        >>> config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
        ...                      eos_token_id=tokenizer.eos_token_id)
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> sampler = OptimalSampler(LlamaForCausalLM(config), LlamaForCausalLM(config), tokenizer)
        >>> [out] = sampler.generate(["the cat"], teacher_prompts=["the dog"], max_new_tokens=5, seed=0)
        >>> out.error is None, len(out.logq) == len(out.generated_tokens) == len(out.alpha_history)
        (True, True)
    """

    def __init__(
        self,
        base_model: torch.nn.Module,
        teacher_model: torch.nn.Module,
        tokenizer,
        q_star: QStarOptions | None = None,
        *,
        teacher_tokenizer=None,
        stop_token_ids: Sequence[int] | None = None,
        fast=False,
        **options,
    ):
        check_transformers_front(base_model, teacher_model, sampling_loop=not fast)
        self.fast = fast  # the fast path (optimal_sampling/fast.py) when truthy
        self.base = base_model.eval()
        self.teacher = teacher_model.eval()
        self.tokenizer = tokenizer
        self.teacher_tokenizer = teacher_tokenizer or tokenizer
        check_same_vocabulary(self.tokenizer, self.teacher_tokenizer)
        self.vocab_size = len(tokenizer)
        for name, model in (("base", base_model), ("teacher", teacher_model)):
            width = output_width(model)
            if width < self.vocab_size:
                raise ValueError(
                    f"The {name} model's output layer has {width} rows but the tokenizer has {self.vocab_size} tokens; "
                    "this tokenizer does not belong to that model."
                )
        check_same_device(next(base_model.parameters()).device, teacher_model)
        self.device = next(base_model.parameters()).device
        self.q_star = QStarOptions.build(q_star, **options)
        self.pad_token_id = self._pad_id()
        self.stop_token_ids = sorted(
            set(as_id_list(stop_token_ids))
            | set(model_eos_ids(base_model))
            | set(model_eos_ids(teacher_model))
            | set(as_id_list(tokenizer.eos_token_id))
            | set(as_id_list(self.teacher_tokenizer.eos_token_id))
        )
        if not self.stop_token_ids:
            raise ValueError("No stop token: neither model nor tokenizer defines an EOS id; pass `stop_token_ids=`.")

    def _pad_id(self) -> int:
        for candidate in (
            self.tokenizer.pad_token_id,
            getattr(self.base.config, "pad_token_id", None),
            self.tokenizer.eos_token_id,
        ):
            if candidate is not None:
                return int(candidate)
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set `tokenizer.pad_token`.")

    # -- prompts ------------------------------------------------------------------------

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- generation -----------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Any],
        *,
        teacher_prompts: Sequence[Any] | None = None,
        max_new_tokens: int = 128,
        batch_size: int = 8,
        seed: int | None = None,
        return_diagnostics: bool = True,
        show_progress: bool = False,
    ) -> list[GenerationOutput]:
        """Sample one completion per prompt from q*.

        `teacher_prompts` (same length as `prompts`) give the teacher its own view, e.g. a
        system prompt or the reference answer as a hint; by default the teacher sees the
        base's prompt (chat prompts are formatted with each model's own template). A batch
        that fails is retried one sample at a time, so an error marks only the sample that
        caused it (`GenerationOutput.error`).
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
            raise TypeError("`prompts` must be a list of prompts; wrap a single prompt in a list.")
        if teacher_prompts is not None and len(teacher_prompts) != len(prompts):
            raise ValueError(
                f"Got {len(prompts)} prompts but {len(teacher_prompts)} teacher prompts; give one per prompt."
            )
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"Need max_new_tokens >= 1 and batch_size >= 1, got {max_new_tokens} and {batch_size}.")
        teacher_prompts = list(teacher_prompts) if teacher_prompts is not None else list(prompts)
        base_ids = [prompt_token_ids(p, self.tokenizer, f"prompts[{i}]") for i, p in enumerate(prompts)]
        teacher_ids = [
            prompt_token_ids(p, self.teacher_tokenizer, f"teacher_prompts[{i}]") for i, p in enumerate(teacher_prompts)
        ]
        if seed is not None:
            torch.manual_seed(seed)

        outputs: list[GenerationOutput] = []
        starts = range(0, len(prompts), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(prompts), desc="q* sampling", unit="sample")
        for start in starts:
            end = min(start + batch_size, len(prompts))
            batch = list(range(start, end))
            try:
                outputs.extend(
                    self._generate_batch(
                        batch, prompts, teacher_prompts, base_ids, teacher_ids, max_new_tokens, return_diagnostics
                    )
                )
            except Exception as batch_error:  # retry alone, so one bad sample marks only itself
                if len(batch) == 1:
                    outputs.append(
                        GenerationOutput(
                            prompt=prompts[start],
                            teacher_prompt=teacher_prompts[start],
                            error=f"{type(batch_error).__name__}: {batch_error}",
                        )
                    )
                else:
                    for i in batch:
                        try:
                            outputs.extend(
                                self._generate_batch(
                                    [i],
                                    prompts,
                                    teacher_prompts,
                                    base_ids,
                                    teacher_ids,
                                    max_new_tokens,
                                    return_diagnostics,
                                )
                            )
                        except Exception as error:
                            outputs.append(
                                GenerationOutput(
                                    prompt=prompts[i],
                                    teacher_prompt=teacher_prompts[i],
                                    error=f"{type(error).__name__}: {error}",
                                )
                            )
            if show_progress:
                progress.update(end - start)
        if show_progress:
            progress.close()
        return outputs

    def generate_token_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        teacher_prompt_ids: Sequence[Sequence[int]] | None = None,
        max_new_tokens: int = 128,
        return_diagnostics: bool = False,
    ) -> OptimalGenerateOutput:
        """Lower-level: already tokenized prompts in, the `optimal_generate` output out.

        Rows are left-padded here; the result holds `sequences` (prompt + completion),
        `logq`, `alpha`, ... as `[B, T]` tensors. Trainers use this entry point.
        """
        ids, mask = self._left_pad([list(r) for r in prompt_ids])
        teacher_ids = teacher_mask = None
        if teacher_prompt_ids is not None:
            teacher_ids, teacher_mask = self._left_pad([list(r) for r in teacher_prompt_ids])
        return cast(Any, self.base).generate(  # a causal LM's GenerationMixin.generate
            input_ids=ids,
            attention_mask=mask,
            custom_generate=optimal_generate,
            teacher_model=self.teacher,
            teacher_input_ids=teacher_ids,
            teacher_attention_mask=teacher_mask,
            vocab_size=self.vocab_size,
            stop_token_ids=self.stop_token_ids,
            do_sample=True,
            temperature=self.q_star.temperature,
            top_k=self.q_star.top_k,
            top_p=self.q_star.top_p,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.stop_token_ids,
            return_dict_in_generate=True,
            fast=self.fast,
            q_star=self.q_star.replace(temperature=1.0, top_k=0, top_p=1.0),  # generate's own, above
        )

    def _generate_batch(
        self, batch, prompts, teacher_prompts, base_ids, teacher_ids, max_new_tokens, return_diagnostics
    ):
        same_prompts = all(base_ids[i] == teacher_ids[i] for i in batch) and self.teacher_tokenizer is self.tokenizer
        out = self.generate_token_ids(
            [base_ids[i] for i in batch],
            teacher_prompt_ids=None if same_prompts else [teacher_ids[i] for i in batch],
            max_new_tokens=max_new_tokens,
        )
        prompt_width = out.sequences.shape[1] - out.logq.shape[1]
        results = []
        for row, i in enumerate(batch):
            n = int(out.token_mask[row].sum())
            tokens = out.sequences[row, prompt_width : prompt_width + n].tolist()
            alpha = out.alpha[row, :n].tolist()
            diagnostics = None
            if return_diagnostics:
                per_token = {name: values[row, :n].tolist() for name, values in out.diagnostics.items()}
                diagnostics = summarize_tokens(alpha, per_token)
            logq = out.logq[row, :n].tolist()
            if any(math.isnan(v) for v in logq):
                raise FloatingPointError(f"NaN log q in sample {i}.")
            results.append(
                GenerationOutput(
                    prompt=prompts[i],
                    teacher_prompt=teacher_prompts[i],
                    generated_text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                    generated_tokens=tokens,
                    alpha_history=alpha,
                    logq=logq,
                    logp_theta=out.logp_theta[row, :n].tolist(),
                    logp_t=out.logp_t[row, :n].tolist(),
                    diagnostics=diagnostics,
                )
            )
        return results
