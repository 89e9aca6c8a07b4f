"""What the transformers front needs of a model and of transformers, checked as capabilities.

The core (`alpha`, `mixture`, `sparse`, `topk_decoding`) and both vLLM backends (`servers`,
`engines`) use public transformers API only. The transformers front (`OptimalSamplingLogitsProcessor`,
`optimal_generate`, `OptimalSampler`, the fast path, `TeacherCache`, and the trainers built on
them) needs two more things, which no version number states exactly:

1. **How each model takes its KV cache.** transformers 5.24 renamed the forward argument
   `past_key_values=` to `cache=`, model by model. A model that takes one name puts the other
   into its `**kwargs` and silently decodes *without* the cache: the teacher would see one token
   and record wrong log q, with no error. So the front never assumes a name: `kv_cache_keyword`
   reads it from the forward signature of the transformers model under any wrapper (a PEFT
   adapter, DDP / FSDP / DeepSpeed, `torch.compile`), and every forward passes the cache under
   that name.
2. **generate's sampling loop.** `optimal_generate` is a `custom_generate` callable: generate
   prepares inputs, cache, processors and stopping criteria and hands them to it, and the callable
   must run the decoding loop itself. transformers has no public loop that takes prepared inputs,
   so `optimal_generate` runs `GenerationMixin._sample` (private); `sampling_loop_problems` checks
   that it is there and takes what we pass. The processor, `TeacherCache` and the fast path do not
   need it.

Both hold on every transformers from 5.16.1 (the oldest that a supported vLLM pins) to 5.25
(tested in CI under 5.19 and the newest; README, "Beside vLLM").
"""

from __future__ import annotations

import inspect

import torch

#: The forward argument names a KV cache goes by, newest first (`cache` since transformers 5.24).
KV_CACHE_KEYWORDS = ("cache", "past_key_values")

#: What `optimal_generate` passes to `GenerationMixin._sample` by name (model kwargs go in `**`).
SAMPLE_PARAMETERS = (
    "input_ids",
    "logits_processor",
    "stopping_criteria",
    "generation_config",
    "synced_gpus",
    "streamer",
)


class IncompatibleTransformersError(ImportError):
    """A model, or the installed transformers, lacks something the transformers front needs."""


def unwrapped_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under `model`'s wrappers (itself when it has none).

    Looks through a PEFT `PeftModel` (`get_base_model()`), DDP / FSDP / DeepSpeed engines
    (`.module`) and `torch.compile` (`._orig_mod`), in any nesting.

    Example:
        >>> import torch
        >>> from optimal_sampling.testing import tiny_causal_lm
        >>> model = tiny_causal_lm(16)
        >>> unwrapped_model(torch.compile(model)) is model
        True
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        get_base_model = getattr(model, "get_base_model", None)
        if callable(get_base_model) and hasattr(model, "peft_config"):
            model = get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod  # type: ignore[assignment]  # torch.compile's OptimizedModule
        elif isinstance(getattr(model, "module", None), torch.nn.Module) and not hasattr(model, "config"):
            model = model.module  # type: ignore[assignment]  # DDP, FSDP, DeepSpeed
        else:
            break
    return model


def kv_cache_keyword(model: torch.nn.Module) -> str:
    """The name under which `model`'s forward takes its KV cache: `"cache"` or `"past_key_values"`.

    Read from the forward signature of the transformers model under any wrapper (a PEFT model's
    own forward takes `**kwargs` and hands them down), so the cache is never passed under a name
    the model would drop silently.

    Example:
        >>> from optimal_sampling.testing import tiny_causal_lm
        >>> kv_cache_keyword(tiny_causal_lm(16)) in KV_CACHE_KEYWORDS
        True
    """
    inner = unwrapped_model(model)
    parameters: dict = {}
    # The instance's forward first (accelerate wraps it with functools.wraps), then the class's: an
    # instance-level patch that takes `*args, **kwargs` (a hook, a counter) hands them to the latter.
    for forward in (getattr(inner, "forward", None), getattr(type(inner), "forward", None)):
        if callable(forward):
            parameters = dict(inspect.signature(forward).parameters)
            for name in KV_CACHE_KEYWORDS:
                if name in parameters:
                    return name
    raise IncompatibleTransformersError(
        f"{type(inner).__name__}.forward takes its KV cache under neither `cache=` nor `past_key_values=` "
        f"(its parameters: {', '.join(parameters) or 'none'}), so the transformers front of optimal-sampling "
        "cannot keep its cache and would decode every token without it. Pass a transformers causal LM (e.g. "
        "from AutoModelForCausalLM), or one wrapped by PEFT, DDP / FSDP / DeepSpeed or torch.compile."
    )


def adapter_problems(model: torch.nn.Module) -> list[str]:
    """Why a PEFT adapter on `model` cannot decode with the front (empty for LoRA-style adapters).

    Prompt-learning adapters (prompt / prefix / p-tuning, ...) prepend virtual tokens inside the
    forward: the caches, masks and positions the front keeps would no longer match the model's.
    Adapters that change weights (LoRA, DoRA, IA3, ...) decode like any model.
    """
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        kind = getattr(config, "peft_type", type(config).__name__)
        return [
            f"{type(model).__name__} has a prompt-learning adapter ({getattr(kind, 'value', kind)}), which prepends "
            "virtual tokens the decoder's caches do not hold; use a weight adapter such as LoRA"
        ]
    return []


def sampling_loop_problems() -> list[str]:
    """Whether transformers' sampling loop, which `optimal_generate` runs, takes what it passes."""
    from transformers import GenerationMixin

    sample = getattr(GenerationMixin, "_sample", None)
    if sample is None:
        return ["transformers.GenerationMixin._sample (generate's sampling loop) is gone"]
    parameters = inspect.signature(sample).parameters
    missing = [name for name in SAMPLE_PARAMETERS if name not in parameters]
    takes_model_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if missing or not takes_model_kwargs:
        lacks = missing + ([] if takes_model_kwargs else ["**model_kwargs"])
        return [f"transformers.GenerationMixin._sample (generate's sampling loop) lacks {lacks}"]
    return []


def transformers_front_problems(*models: torch.nn.Module, sampling_loop: bool = False) -> list[str]:
    """What keeps the transformers front from running these models (empty when nothing does).

    `sampling_loop=True` also checks generate's sampling loop (`optimal_generate` runs it).
    """
    problems = sampling_loop_problems() if sampling_loop else []
    for model in models:
        try:
            kv_cache_keyword(model)
        except IncompatibleTransformersError as error:
            problems.append(str(error))
        problems.extend(adapter_problems(model))
    return problems


def check_transformers_front(*models: torch.nn.Module, sampling_loop: bool = False) -> None:
    """Raise `IncompatibleTransformersError`, naming what is missing and the fix, unless the front can run.

    Example:
        >>> from optimal_sampling.testing import tiny_causal_lm
        >>> check_transformers_front(tiny_causal_lm(16), sampling_loop=True)  # no error
    """
    problems = transformers_front_problems(*models, sampling_loop=sampling_loop)
    if problems:
        import transformers

        raise IncompatibleTransformersError(
            "The transformers front of optimal-sampling (OptimalSamplingLogitsProcessor, optimal_generate, "
            f"OptimalSampler, the fast path, TeacherCache and the trainers built on them) cannot run here "
            f"(transformers {transformers.__version__}): " + "; ".join(problems) + ". The vLLM backends "
            "(optimal_sampling.engines, optimal_sampling.servers) need none of this."
        )
