"""The in-process backend against real vLLM engines on the shipped toy pair.

Runs where `vllm` imports (the vLLM venv; from the main test venv, `tests/test_vllm_venv.py`
runs this file there). The reference samples come from the two-server coordinator on the
servers `tests/vllm_servers.py` starts (CI starts them in `.ci/run`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_fixtures import TOY, engine_spec, http_reference, toy_prompts  # noqa: E402
from test_servers import exact_log_probs, id_prompts  # noqa: E402

from optimal_sampling.engines import InProcessVLLMSampler  # noqa: E402
from optimal_sampling.mixture import compute_mixture  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def engines():
    sampler = InProcessVLLMSampler(
        engine_spec("base"), engine_spec("teacher"), top_k=16, max_concurrency=128, step_timeout=120
    )
    yield sampler
    sampler.close()


@pytest.fixture(scope="module")
def exact():
    """The toy pair in transformers (float32): the exact reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = lambda role: AutoModelForCausalLM.from_pretrained(TOY / role, dtype=torch.float32).eval()  # noqa: E731
    tokenizer = AutoTokenizer.from_pretrained(TOY / "base")
    return {"base": load("base"), "teacher": load("teacher"), "tokenizer": tokenizer, "V": len(tokenizer)}


def test_driven_decode_draws_the_http_coordinators_tokens(servers, engines):
    """128 sequences, teacher prompts unlike the base's, stops at different steps: token for token."""
    prompts, teacher_prompts = toy_prompts(128)
    reference = http_reference(servers, prompts, teacher_prompts, max_tokens=4, seed=5, top_k=16)
    assert all(r.error is None for r in reference)
    assert len({len(r.generated_tokens) for r in reference}) > 1, "the sequences should stop at different steps"
    for concurrency in (128, 40):  # one wave, then refills as sequences finish
        engines.coordinator.config.max_concurrency = concurrency
        skewed = engines.get_statistics()["skewed_answers"]
        try:
            outputs = engines.generate(prompts, teacher_prompts=teacher_prompts, max_new_tokens=4, seed=5)
        finally:
            engines.coordinator.config.max_concurrency = 128
        if concurrency == 128:  # one wave: both engines held the same rows at every step
            assert engines.get_statistics()["skewed_answers"] == skewed
        assert [o.error for o in outputs] == [None] * 128
        assert [o.generated_tokens for o in outputs] == [r.generated_tokens for r in reference]
        for out, ref in zip(outputs, reference):
            for name in ("alpha_history", "logq", "logp_theta", "logp_t"):
                assert getattr(out, name) == pytest.approx(getattr(ref, name), abs=1e-6)
            assert out.teacher_prompt == ref.teacher_prompt and out.generated_text == ref.generated_text


def test_full_vocabulary_matches_the_exact_transformers_path(engines, exact):
    V, temperature = exact["V"], 0.8
    prompts, teacher_prompts = id_prompts(exact, 3), id_prompts(exact, 3, teacher=True)
    engines.coordinator.config.top_k = V
    try:
        outputs = engines.generate(
            prompts, teacher_prompts=teacher_prompts, max_new_tokens=6, temperature=temperature, seed=0
        )
        stats = engines.get_statistics()
    finally:
        engines.coordinator.config.top_k = 16
    assert stats["covered_mass_theta_mean"] == pytest.approx(1.0, abs=1e-4)
    for out, prompt, teacher_prompt in zip(outputs, prompts, teacher_prompts):
        assert out.error is None
        tokens, n = out.generated_tokens, len(out.generated_tokens)
        assert n >= 1 and len(out.alpha_history) == len(out.logq) == len(out.logp_theta) == len(out.logp_t) == n
        lp = exact_log_probs(exact["base"], prompt + tokens[:-1], n, temperature, V)
        lr = exact_log_probs(exact["teacher"], teacher_prompt + tokens[:-1], n, temperature, V)
        step = compute_mixture(lp, lr)
        index = torch.tensor(tokens)[:, None]
        expected = {
            "alpha_history": step.alpha.double(),
            "logq": step.logq.gather(-1, index)[:, 0],
            "logp_theta": lp.gather(-1, index)[:, 0],
            "logp_t": lr.gather(-1, index)[:, 0],
        }
        for name, values in expected.items():
            torch.testing.assert_close(torch.tensor(getattr(out, name), dtype=torch.float64), values, atol=1e-4, rtol=0)
        assert out.diagnostics["kl_diff_mean"] == pytest.approx(0.0, abs=1e-4)


def test_on_policy_rows_are_sampled_from_the_base_alone(engines):
    prompts, teacher_prompts = toy_prompts(16)
    flags = [i % 2 == 0 for i in range(16)]
    mixed = engines.generate(prompts, teacher_prompts=teacher_prompts, max_new_tokens=4, seed=2, on_policy=flags)
    plain = engines.generate(prompts, teacher_prompts=teacher_prompts, max_new_tokens=4, seed=2)
    for out, ref, on_policy in zip(mixed, plain, flags):
        assert out.error is None
        if on_policy:
            assert out.alpha_history == [0.0] * len(out.generated_tokens)
            assert out.logq == pytest.approx(out.logp_theta, abs=1e-9)  # q = π_θ: importance weight 1
            assert out.diagnostics["kl_theta_mean"] == pytest.approx(0.0, abs=1e-9)
        else:  # the other rows do not notice their neighbours' flags
            assert out.generated_tokens == ref.generated_tokens and out.logq == ref.logq
    assert any(a > 0 for out, flag in zip(mixed, flags) if not flag for a in out.alpha_history)


def test_a_prompt_an_engine_rejects_marks_only_its_sample(engines):
    prompts, teacher_prompts = toy_prompts(3)
    too_long = engines.coordinator.tokenizers["base"](prompts[1])["input_ids"] * 200  # beyond max_model_len 512
    outputs = engines.generate(
        [prompts[0], too_long, prompts[2]],
        teacher_prompts=[teacher_prompts[0], too_long, teacher_prompts[2]],
        max_new_tokens=4,
        seed=0,
    )
    assert outputs[0].error is None and outputs[2].error is None and len(outputs[2].generated_tokens) >= 1
    assert "max_model_len" in outputs[1].error or "maximum" in outputs[1].error, outputs[1].error
    assert outputs[1].generated_tokens == []


def test_loading_weights_into_the_base_engine_changes_its_log_probs_and_back(engines, exact):
    """The teacher's weights make the base engine's top-k the teacher's; the original ones restore it."""
    from safetensors.torch import load_file

    prefixes = id_prompts(exact, 4)
    V = exact["V"]

    def lists():
        step = engines.next_token_distribution(prefixes, top_k=V)
        c = step.candidates  # [B, 2V] candidate columns (the rest bucket, empty at k = V, dropped)
        return c.token_ids, c.logp_theta[:, :-1], c.logp_t[:, :-1]

    ids0, base0, teacher0 = lists()
    listed = ids0 >= 0
    assert (base0 - teacher0)[listed].abs().max() > 0.1  # two different models to begin with
    assert engines.load_base_weights(TOY / "teacher") == 1 == engines.weight_version
    ids1, base1, teacher1 = lists()
    torch.testing.assert_close(base1, teacher1, atol=1e-5, rtol=0)
    torch.testing.assert_close(teacher1, teacher0, atol=1e-6, rtol=0)
    original = load_file(os.path.join(TOY, "base", "model.safetensors"))
    assert engines.load_base_weights(named_tensors=original.items(), version=7) == 7 == engines.weight_version
    ids2, base2, _ = lists()
    assert torch.equal(ids2, ids0)
    torch.testing.assert_close(base2, base0, atol=1e-6, rtol=0)
    assert engines.get_statistics()["weight_loads"] == 2
