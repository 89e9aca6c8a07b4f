"""The transformers front's seam check (`optimal_sampling/compat.py`), in both test environments.

The main venv has the transformers the front needs (5.24); the vLLM venv has what vLLM pins
(5.19), where the front must refuse to run and say how to fix it (`tests/test_vllm_venv.py`
runs this file there too).
"""

import pytest
import torch
import transformers
from packaging.version import Version

from optimal_sampling.compat import (
    TRANSFORMERS_FRONT,
    IncompatibleTransformersError,
    check_transformers_front,
    transformers_front_problems,
)
from optimal_sampling.teacher import TeacherCache
from optimal_sampling.testing import tiny_causal_lm


class PastKeyValuesModel(torch.nn.Module):
    """A model in the pre-5.24 style: it takes `past_key_values=`, not `cache=`."""

    def forward(self, input_ids, attention_mask=None, past_key_values=None):
        return input_ids


def test_a_model_without_cache_argument_is_named_with_the_fix():
    assert "PastKeyValuesModel.forward takes no `cache=` argument" in transformers_front_problems(PastKeyValuesModel())
    with pytest.raises(IncompatibleTransformersError, match=r"pip install 'transformers>=5.24,<5.25'"):
        check_transformers_front(PastKeyValuesModel())


def test_the_front_runs_exactly_on_the_transformers_it_supports():
    model = tiny_causal_lm(vocab_size=32)
    supported = Version(transformers.__version__) in TRANSFORMERS_FRONT
    assert (transformers_front_problems(model) == []) == supported
    if supported:
        TeacherCache(model)
    else:  # e.g. beside vLLM 0.32: the teacher cache would silently run without its cache
        with pytest.raises(IncompatibleTransformersError, match="optimal_sampling.engines"):
            TeacherCache(model)


def test_each_private_transformers_name_the_front_uses_is_checked(monkeypatch):
    """`GenerationMixin._sample` (and its parameters) and `GenerationConfig._pad_token_tensor`."""
    from transformers import GenerationConfig, GenerationMixin

    model = tiny_causal_lm(vocab_size=32)
    annotations = {k: v for k, v in GenerationConfig.__annotations__.items() if k != "_pad_token_tensor"}
    monkeypatch.setattr(GenerationConfig, "__annotations__", annotations)
    assert "GenerationConfig no longer declares `_pad_token_tensor`" in transformers_front_problems(model)
    monkeypatch.undo()

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
        pass

    monkeypatch.setattr(GenerationMixin, "_sample", _sample)
    problems = transformers_front_problems(model)
    assert "GenerationMixin._sample lacks ['synced_gpus', 'streamer']" in problems
    assert not any("_pad_token_tensor" in problem for problem in problems)
    monkeypatch.delattr(GenerationMixin, "_sample")
    with pytest.raises(IncompatibleTransformersError, match="GenerationMixin._sample is gone"):
        check_transformers_front(model)
