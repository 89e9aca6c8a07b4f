"""The TRL trainers: q* rollouts, importance weights, metrics, distributed runs, errors."""

from __future__ import annotations

import doctest
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# trl comes with the README's test install (`.[test,trl]`): a missing trl must fail, not skip.
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOTrainer  # noqa: E402

import trainers  # noqa: E402
from optimal_sampling.testing import tiny_causal_lm, tiny_tokenizer  # noqa: E402
from trainers import (  # noqa: E402
    OptimalSamplingGRPOConfig,
    OptimalSamplingGRPOTrainer,
    OptimalSamplingRLOOConfig,
    OptimalSamplingRLOOTrainer,
)
from trainers.rollout import sample_rollouts  # noqa: E402
from trainers.seam import TESTED_TRL_RANGE, check_trl_seam, seam_problems  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = tiny_tokenizer()
VOCAB = len(TOKENIZER)
PROMPTS = ["the cat", "a dog", "one two", "red blue"]
TEACHER_PROMPTS = ["the cat sat on", "a dog ran to", "one two three", "red blue big"]


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def toy_dataset(rows: int = 8) -> Dataset:
    return Dataset.from_dict(
        {"prompt": (PROMPTS * rows)[:rows], "teacher_prompt": (TEACHER_PROMPTS * rows)[:rows]}
    )


def training_args(config_cls=OptimalSamplingGRPOConfig, **overrides):
    options = dict(
        output_dir="/tmp/optimal-sampling-test-trainers",
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        learning_rate=1e-2,
        seed=7,
        report_to="none",
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        log_completions=False,
    )
    options.update(overrides)
    return config_cls(**options)


def make_trainer(teacher=None, trainer_cls=OptimalSamplingGRPOTrainer, config_cls=OptimalSamplingGRPOConfig, **overrides):
    teacher = tiny_causal_lm(VOCAB, seed=1, logit_scale=4.0) if teacher is None else teacher
    return trainer_cls(
        tiny_causal_lm(VOCAB, seed=0),
        reward_funcs=length_reward,
        args=training_args(config_cls, **overrides),
        train_dataset=toy_dataset(),
        processing_class=TOKENIZER,
        teacher_model=teacher,
    )


def record_completions(trainer, store: list) -> None:
    original = trainer._generate_single_turn

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        store.append(out[0] if isinstance(out, tuple) else out)
        return out

    trainer._generate_single_turn = spy


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# --- the public contract and the TRL seam ---------------------------------------------


def test_public_names_subclass_trl():
    assert issubclass(trainers.OptimalSamplingGRPOTrainer, GRPOTrainer)
    assert issubclass(trainers.OptimalSamplingGRPOConfig, GRPOConfig)
    assert issubclass(trainers.OptimalSamplingRLOOTrainer, RLOOTrainer)


def test_trl_seam_holds_for_the_installed_trl():
    assert seam_problems("grpo") == []
    assert seam_problems("rloo") == []


def test_changed_seam_signature_fails_loudly(monkeypatch):
    def renamed(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False, extra=None):
        return [], None

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", renamed)
    with pytest.raises(RuntimeError, match="_generate_single_turn has parameters"):
        check_trl_seam("grpo")


def test_pinned_trl_range_matches_the_tested_range():
    import trl
    from packaging.version import Version

    low, high = TESTED_TRL_RANGE
    assert low <= Version(trl.__version__) < high
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"trl>={low.major}.{low.minor},<{high.major}.{high.minor}"' in pyproject


def test_config_defaults_to_token_truncation_with_a_cap():
    args = training_args(max_steps=1)
    assert args.vllm_importance_sampling_correction is True
    assert args.vllm_importance_sampling_mode == "token_truncate"
    assert args.vllm_importance_sampling_clip_max == 3.0
    assert "teacher_prompt_template" in {f for f in inspect.signature(OptimalSamplingGRPOConfig).parameters}


# --- behaviour ---------------------------------------------------------------------------


def test_alpha_zero_reproduces_vanilla_grpo():
    vanilla_args = training_args(GRPOConfig, max_steps=3)
    vanilla = GRPOTrainer(
        tiny_causal_lm(VOCAB, seed=0),
        reward_funcs=length_reward,
        args=vanilla_args,
        train_dataset=toy_dataset(),
        processing_class=TOKENIZER,
    )
    vanilla_completions, q_completions = [], []
    record_completions(vanilla, vanilla_completions)
    vanilla.train()

    trainer = make_trainer(alpha_method="fixed", alpha=0.0, max_steps=3)
    record_completions(trainer, q_completions)
    trainer.train()

    # Same tokens under the same seed, and the same losses: the only difference is the IS
    # ratio exp(log π_θ − log q), which is 1 up to float32 round-off of two forward paths.
    assert q_completions == vanilla_completions
    assert losses(trainer) == pytest.approx(losses(vanilla), rel=1e-5, abs=1e-6)
    ratio_max = [h["sampling/importance_sampling_ratio/max"] for h in trainer.state.log_history if "loss" in h]
    assert all(abs(r - 1.0) < 1e-5 for r in ratio_max)


def test_positive_alpha_importance_ratios_differ_from_one_and_reach_the_loss():
    trainer = make_trainer(alpha_method="fixed", alpha=0.6, max_steps=1)
    seen = {}
    compute_loss = trainer._compute_loss

    def spy(model, inputs):
        loss = compute_loss(model, inputs)
        with torch.no_grad():
            ratio = inputs["importance_sampling_ratio"]
            seen["without_ratio"] = compute_loss(model, {**inputs, "importance_sampling_ratio": torch.ones_like(ratio)})
        seen.update(loss=loss.detach(), inputs=inputs)
        return loss

    trainer._compute_loss = spy
    trainer.train()
    inputs = seen["inputs"]
    mask = inputs["completion_mask"].bool()
    ratio = inputs["importance_sampling_ratio"]
    expected = torch.exp(inputs["old_per_token_logps"] - inputs["sampling_per_token_logps"]).clamp(max=3.0)
    assert torch.allclose(ratio[mask], expected[mask])
    assert (ratio[mask] - 1).abs().max() > 0.05
    assert not torch.isclose(seen["loss"], seen["without_ratio"])


def test_alpha_kl_and_importance_metrics_reach_log_history():
    trainer = make_trainer(teacher_prompt_template="{teacher_prompt}")
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for entry in logged:
        for key in (
            "alpha_mean", "alpha_std", "alpha_min", "alpha_max", "kl_theta", "kl_t",
            "is_weight_mean", "is_weight_min", "is_weight_max", "is_weight_ess", "is_clipped_frac",
        ):
            assert f"optimal_sampling/{key}" in entry, key
        assert "sampling/importance_sampling_ratio/mean" in entry
        assert 0.0 <= entry["optimal_sampling/alpha_min"] <= entry["optimal_sampling/alpha_mean"] <= entry["optimal_sampling/alpha_max"] <= 1.0
        # KL symmetry, the default α rule, holds per token, so it holds on average.
        assert entry["optimal_sampling/kl_theta"] == pytest.approx(entry["optimal_sampling/kl_t"], abs=1e-4)


def test_teacher_prompt_template_gives_the_teacher_its_own_prompt(monkeypatch):
    import trainers._common as common

    seen = []

    def spy(*args, **kwargs):
        seen.append((args[2], kwargs["teacher_prompt_ids"]))
        return sample_rollouts(*args, **kwargs)

    monkeypatch.setattr(common, "sample_rollouts", spy)
    make_trainer(teacher_prompt_template="{teacher_prompt}", max_steps=1).train()
    prompt_ids, teacher_ids = seen[0]
    expected = dict(zip(PROMPTS, TEACHER_PROMPTS))
    pairs = [(TOKENIZER.decode(p), TOKENIZER.decode(t)) for p, t in zip(prompt_ids, teacher_ids)]
    assert len(pairs) == 8
    assert all(expected[prompt] == teacher_prompt for prompt, teacher_prompt in pairs)


def test_teacher_stays_frozen_in_eval_mode():
    teacher = tiny_causal_lm(VOCAB, seed=1, logit_scale=4.0)
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    trainer = make_trainer(teacher=teacher, max_steps=1)
    trainer.train()
    assert not trainer.teacher_model.training
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in trainer.teacher_model.named_parameters())


def test_teacher_samples_without_correction_skip_the_ratio():
    trainer = make_trainer(alpha_method="fixed", alpha=1.0, vllm_importance_sampling_correction=False, max_steps=1)
    trainer.train()
    entry = trainer.state.log_history[0]
    assert entry["optimal_sampling/alpha_mean"] == 1.0
    assert "sampling/importance_sampling_ratio/mean" not in entry


def test_rloo_advantages_carry_truncated_sequence_weights(monkeypatch):
    captured = {}
    original = RLOOTrainer._generate_and_score_completions

    def spy(self, inputs):
        out = original(self, inputs)
        captured["raw_advantages"] = out["advantages"].clone()
        return out

    trainer = make_trainer(
        trainer_cls=OptimalSamplingRLOOTrainer, config_cls=OptimalSamplingRLOOConfig, beta=0.0, max_steps=1,
        alpha_method="fixed", alpha=0.6,
    )
    monkeypatch.setattr(RLOOTrainer, "_generate_and_score_completions", spy)  # after the init-time seam check
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer._pending_rollouts = []
    out = trainer._generate_and_score_completions(batch)
    raw = captured["raw_advantages"]
    weights = out["advantages"] / raw
    assert torch.all(weights <= 3.0 + 1e-5) and torch.all(weights > 0)
    assert (weights - 1).abs().max() > 0.05
    assert "optimal_sampling/is_weight_mean" in trainer._metrics["train"]


# --- the decode loop ----------------------------------------------------------------------


def test_synced_stop_keeps_forwarding_without_changing_the_samples():
    base, teacher = tiny_causal_lm(VOCAB, seed=0, logit_scale=4.0), tiny_causal_lm(VOCAB, seed=1)
    calls = {"base": 0}
    forward = base.forward

    def counting_forward(*args, **kwargs):
        calls["base"] += 1
        return forward(*args, **kwargs)

    base.forward = counting_forward
    options = dict(
        teacher_prompt_ids=None, max_new_tokens=20, pad_token_id=TOKENIZER.pad_token_id, stop_token_ids=list(range(2, 40)),
        vocab_size=VOCAB, device="cpu", mixing=dict(alpha_method="kl_symmetry"),
    )
    prompts = [TOKENIZER(p)["input_ids"] for p in PROMPTS]
    torch.manual_seed(0)
    alone = sample_rollouts(base, teacher, prompts, **options)
    local_steps = calls["base"]
    calls["base"] = 0
    torch.manual_seed(0)
    synced = sample_rollouts(base, teacher, prompts, sync_stop=lambda local_running: True, **options)
    assert local_steps < 20  # every row stopped early...
    assert calls["base"] == 20  # ...but a slower peer keeps this rank's forwards going
    assert synced.completion_ids == alone.completion_ids
    assert synced.logq == alone.logq


# --- errors ----------------------------------------------------------------------------------


def test_missing_teacher_is_a_clear_error():
    with pytest.raises(ValueError, match="No teacher"):
        OptimalSamplingGRPOTrainer(
            tiny_causal_lm(VOCAB), reward_funcs=length_reward, args=training_args(), train_dataset=toy_dataset(),
            processing_class=TOKENIZER,
        )


def test_teacher_with_another_vocabulary_is_a_clear_error():
    other = tiny_tokenizer(extra_words=("zebra",))
    with pytest.raises(ValueError, match="Incompatible teacher.*different vocabularies"):
        OptimalSamplingGRPOTrainer(
            tiny_causal_lm(VOCAB), reward_funcs=length_reward, args=training_args(), train_dataset=toy_dataset(),
            processing_class=TOKENIZER, teacher_model=tiny_causal_lm(len(other)), teacher_processing_class=other,
        )


def test_teacher_with_a_smaller_output_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="Incompatible teacher.*output layer has 16 rows"):
        make_trainer(teacher=tiny_causal_lm(16))


def test_teacher_path_that_does_not_load_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Could not load the teacher"):
        make_trainer(teacher=str(tmp_path / "no-such-model"))


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(top_k=50), ValueError, "top_k=50"),
        (dict(repetition_penalty=1.2), ValueError, "repetition_penalty"),
        (dict(sampler_backend="vllm", sampler_theta_url="http://a", sampler_t_url="http://b"), NotImplementedError, "sampler_backend='vllm'"),
        (dict(alpha_method="fixed"), ValueError, "needs `alpha`"),
    ],
)
def test_unsupported_options_are_clear_errors(overrides, error, message):
    with pytest.raises(error, match=message):
        make_trainer(**overrides)


# --- docs and distributed runs ----------------------------------------------------------------


@pytest.mark.parametrize("module", ["trainers.grpo", "trainers.config", "trainers.rollout"])
def test_docstring_examples_run(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_two_process_accelerate_run_completes(tmp_path):
    for name, seed in (("base", 0), ("teacher", 1)):
        tiny_causal_lm(VOCAB, seed=seed, logit_scale=4.0).save_pretrained(tmp_path / name)
        TOKENIZER.save_pretrained(tmp_path / name)
    toy_dataset().add_column("answer", ["two"] * 8).to_json(tmp_path / "data.jsonl")
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "recipes/accelerate/multi_cpu.yaml"),
        str(REPO / "recipes/grpo.py"),
        "--model_name_or_path", str(tmp_path / "base"),
        "--teacher_model_name_or_path", str(tmp_path / "teacher"),
        "--teacher_prompt_template", "{teacher_prompt}",
        "--dataset_name", str(tmp_path / "data.jsonl"),
        "--reward_funcs", "optimal_sampling.toy.task:exact_match_reward",
        "--output_dir", str(tmp_path / "out"),
        "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "8",
        "--max_steps", "2", "--logging_steps", "1", "--use_cpu", "--bf16", "false",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((tmp_path / "out/run_info.json").read_text())["num_processes"] == 2
    history = json.loads((tmp_path / "out/log_history.json").read_text())
    logged = [h for h in history if "loss" in h]
    assert len(logged) == 2
    assert all("optimal_sampling/alpha_mean" in h and "optimal_sampling/is_weight_mean" in h for h in logged)
