"""Which transformers the package needs where: the front built on generate internals checks its seam.

The core (`alpha`, `mixture`, `sparse`, `topk_decoding`) and both vLLM backends (`servers`,
`engines`) need only public transformers API (tokenizers, `AutoModelForCausalLM` in tests),
so they work with the transformers that vLLM pins (vLLM 0.32: `>=5.16.1,<5.20`). The
transformers front (`OptimalSamplingLogitsProcessor`, `optimal_generate`, `OptimalSampler`,
the fast path, `TeacherCache`, and the TRL trainers built on them) runs transformers' private
`GenerationMixin._sample` loop (and sets `GenerationConfig._pad_token_tensor`), and passes KV
caches to the models as `cache=`, which
transformers 5.24 introduced: older models take `past_key_values=` and silently ignore
`cache=`, so the teacher would be decoded without its cache and record wrong log q. That
front calls `check_transformers_front` before it does anything.
"""

from __future__ import annotations

import inspect

from packaging.specifiers import SpecifierSet
from packaging.version import Version

TRANSFORMERS_FRONT = SpecifierSet(">=5.24,<5.25")
_SAMPLE_PARAMETERS = (
    "input_ids",
    "logits_processor",
    "stopping_criteria",
    "generation_config",
    "synced_gpus",
    "streamer",
)


class IncompatibleTransformersError(ImportError):
    """The installed transformers is not one the transformers front was built and tested against."""


def transformers_front_problems(*models) -> list[str]:
    """What in this environment breaks the transformers front's seam (empty when nothing does)."""
    import transformers
    from transformers import GenerationConfig, GenerationMixin

    problems = []
    version = Version(transformers.__version__)
    if version not in TRANSFORMERS_FRONT:
        problems.append(f"transformers {version} is installed, not {TRANSFORMERS_FRONT}")
    if "_pad_token_tensor" not in getattr(GenerationConfig, "__annotations__", {}):
        # generate() stores the pad id there; optimal_generate sets it when it adds stop ids
        problems.append("GenerationConfig no longer declares `_pad_token_tensor`")
    sample = getattr(GenerationMixin, "_sample", None)
    missing = [] if sample is None else [p for p in _SAMPLE_PARAMETERS if p not in inspect.signature(sample).parameters]
    if sample is None or missing:
        problems.append(f"GenerationMixin._sample {'is gone' if sample is None else f'lacks {missing}'}")
    for model in models:
        forward = getattr(type(model), "forward", None)
        if forward is not None and "cache" not in inspect.signature(forward).parameters:
            problems.append(f"{type(model).__name__}.forward takes no `cache=` argument")
    return problems


def check_transformers_front(*models) -> None:
    """Raise `IncompatibleTransformersError` naming the fix unless the front's seam holds.

    Example:
        >>> from optimal_sampling.compat import TRANSFORMERS_FRONT
        >>> "5.24.0" in TRANSFORMERS_FRONT, "5.19.0" in TRANSFORMERS_FRONT
        (True, False)
    """
    problems = transformers_front_problems(*models)
    if problems:
        raise IncompatibleTransformersError(
            "The transformers front of optimal-sampling (OptimalSamplingLogitsProcessor, optimal_generate, "
            f"OptimalSampler, the fast path, TeacherCache and the trainers built on them) needs transformers{TRANSFORMERS_FRONT}: "
            f"{'; '.join(problems)}. It runs the private GenerationMixin._sample and passes KV caches as `cache=`, "
            "which older releases silently ignore. Install it with `pip install 'transformers>=5.24,<5.25'` in an "
            "environment without vLLM 0.32 (which pins transformers<5.20); beside vLLM, use the vLLM backends "
            "(optimal_sampling.engines, optimal_sampling.servers), which need transformers>=5.16.1 only."
        )
