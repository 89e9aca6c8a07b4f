"""What the transformers front needs of a model and of transformers (`optimal_sampling/compat.py`).

These run in every test environment (`tests/test_vllm_venv.py` runs this file beside vLLM, under
transformers 5.19, whose models take `past_key_values=`; the main venv has the newest, whose
models take `cache=`): the front must find each model's own name for its KV cache, through any
wrapper, and decode with it.
"""

import inspect

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model

from optimal_sampling.compat import (
    KV_CACHE_KEYWORDS,
    IncompatibleTransformersError,
    check_transformers_front,
    kv_cache_keyword,
    sampling_loop_problems,
    transformers_front_problems,
    unwrapped_model,
)
from optimal_sampling.teacher import TeacherCache
from optimal_sampling.testing import tiny_causal_lm


class PastKeyValuesModel(torch.nn.Module):
    """A model in the pre-5.24 style: it takes `past_key_values=`, and drops `cache=` into `**kwargs`."""

    config = None

    def forward(self, input_ids, attention_mask=None, past_key_values=None, **kwargs):
        return input_ids


class NoCacheModel(torch.nn.Module):
    config = None

    def forward(self, input_ids, **kwargs):
        return input_ids


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_model_is_asked_for_its_own_kv_cache_argument(arch):
    model = tiny_causal_lm(32, arch=arch)
    keyword = kv_cache_keyword(model)
    assert keyword in KV_CACHE_KEYWORDS
    assert keyword in inspect.signature(type(model).forward).parameters  # the name this transformers declares
    assert kv_cache_keyword(PastKeyValuesModel()) == "past_key_values"


def test_the_cache_argument_is_read_through_peft_ddp_style_and_compile_wrappers():
    model = tiny_causal_lm(32)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert "cache" not in inspect.signature(lora.forward).parameters  # PeftModel.forward takes **kwargs

    class DataParallelLike(torch.nn.Module):  # DDP / FSDP / DeepSpeed keep the model as `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    for wrapped in (lora, torch.compile(lora), DataParallelLike(lora)):
        assert unwrapped_model(wrapped) is model
        assert kv_cache_keyword(wrapped) == kv_cache_keyword(model)


def test_a_model_that_takes_no_cache_argument_is_refused_with_the_fix():
    assert kv_cache_keyword(PastKeyValuesModel()) == "past_key_values"
    with pytest.raises(IncompatibleTransformersError, match=r"NoCacheModel.forward takes its KV cache under neither"):
        check_transformers_front(NoCacheModel())
    with pytest.raises(IncompatibleTransformersError, match="AutoModelForCausalLM"):
        TeacherCache(NoCacheModel())


def test_a_prompt_learning_adapter_is_refused_and_lora_is_not():
    base = tiny_causal_lm(32)
    prompt_tuned = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(
        IncompatibleTransformersError, match="prompt-learning adapter.*use a weight adapter such as LoRA"
    ):
        check_transformers_front(prompt_tuned)
    lora = get_peft_model(tiny_causal_lm(32), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    assert transformers_front_problems(lora, sampling_loop=True) == []


def test_the_teacher_cache_decodes_with_the_installed_transformers():
    """Under the name it found, the cache really holds the prefix: incremental logits equal a full pass
    (a cache passed under the wrong name would be dropped, and the one-token pass would differ)."""
    model = tiny_causal_lm(32, seed=3)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    cache = TeacherCache(model)
    cache.last_logits(ids[:, :3], torch.ones(1, 3, dtype=torch.long))
    incremental = cache.extend(ids[:, 3:4])
    with torch.no_grad():
        full = model(input_ids=ids[:, :4]).logits[:, -1].float()
        alone = model(input_ids=ids[:, 3:4]).logits[:, -1].float()
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(incremental, alone, atol=1e-3)


def test_generates_sampling_loop_is_checked_by_what_optimal_generate_passes(monkeypatch):
    from transformers import GenerationMixin

    assert sampling_loop_problems() == []

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
        pass

    monkeypatch.setattr(GenerationMixin, "_sample", _sample)
    assert sampling_loop_problems() == [
        "transformers.GenerationMixin._sample (generate's sampling loop) lacks ['synced_gpus', 'streamer']"
    ]
    model = tiny_causal_lm(32)
    assert transformers_front_problems(model) == []  # the processor, TeacherCache and the fast path need no loop
    monkeypatch.delattr(GenerationMixin, "_sample")
    with pytest.raises(
        IncompatibleTransformersError, match="GenerationMixin._sample .generate's sampling loop. is gone"
    ):
        check_transformers_front(model, sampling_loop=True)
