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
from trainer_options import cpu_options
from trl import GRPOConfig, GRPOTrainer, RLOOTrainer  # noqa: E402

import optimal_sampling.trainers as trainers  # noqa: E402
from optimal_sampling.options import QStarOptions  # noqa: E402
from optimal_sampling.testing import tiny_causal_lm, tiny_tokenizer  # noqa: E402
from optimal_sampling.trainers import (  # noqa: E402
    OptimalSamplingGRPOConfig,
    OptimalSamplingGRPOTrainer,
    OptimalSamplingRLOOConfig,
    OptimalSamplingRLOOTrainer,
)
from optimal_sampling.trainers.rollout import sample_rollouts  # noqa: E402
from optimal_sampling.trainers.seam import TESTED_TRL_RANGE, check_trl_seam, seam_problems  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = tiny_tokenizer()
VOCAB = len(TOKENIZER)
PROMPTS = ["the cat", "a dog", "one two", "red blue"]
TEACHER_PROMPTS = ["the cat sat on", "a dog ran to", "one two three", "red blue big"]


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def toy_dataset(rows: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": (PROMPTS * rows)[:rows], "teacher_prompt": (TEACHER_PROMPTS * rows)[:rows]})


def training_args(config_cls=OptimalSamplingGRPOConfig, **overrides):
    return config_cls(**cpu_options("/tmp/optimal-sampling-test-trainers", **overrides))


def make_trainer(
    teacher=None, trainer_cls=OptimalSamplingGRPOTrainer, config_cls=OptimalSamplingGRPOConfig, **overrides
):
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


def test_unwrap_for_generation_takes_the_keywords_each_tested_trl_release_has(monkeypatch):
    """TRL 1.16 added `gradient_checkpointing_kwargs`; 1.14.2 and 1.15 lack it. Either signature
    passes the seam check, and the trainer passes that keyword only where it exists."""
    import trl.models

    from optimal_sampling.trainers.seam import generation_unwrap_kwargs

    args = training_args(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert generation_unwrap_kwargs(args)["gather_deepspeed3_params"] == args.ds3_gather_for_generation

    def trl_1_15(model, accelerator, gather_deepspeed3_params=True, generation_kwargs=None):
        pass

    def renamed(model, accelerator, gather_params=True, generation_kwargs=None):
        pass

    monkeypatch.setattr(trl.models, "unwrap_model_for_generation", trl_1_15)
    assert seam_problems("grpo") == []
    assert "gradient_checkpointing_kwargs" not in generation_unwrap_kwargs(args)
    monkeypatch.setattr(trl.models, "unwrap_model_for_generation", renamed)
    assert any("unwrap_model_for_generation has parameters" in p for p in seam_problems("grpo"))


def test_pinned_trl_range_matches_the_tested_range():
    import trl
    from packaging.version import Version

    low, high = TESTED_TRL_RANGE
    assert low <= Version(trl.__version__) < high
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"trl>={low},<{high.major}.{high.minor}"' in pyproject


def test_config_defaults_mix_on_policy_rows_and_refuse_trls_own_correction_fields():
    args = training_args(max_steps=1)
    # the configuration the pre-registered toy experiments chose (recipes/PREREGISTRATION.md: half the group
    # on-policy, no weights; recipes/PREREGISTRATION_TEACHER_PAYOFF.md: the q* rows sample the KL-symmetric blend)
    assert args.num_on_policy_generations == args.num_generations // 2
    assert (args.alpha_method, args.alpha) == ("kl_symmetry", None)
    assert (args.importance_weighting, args.advantage_baseline) == ("none", "group")
    assert "teacher_prompt_template" in {f for f in inspect.signature(OptimalSamplingGRPOConfig).parameters}
    with pytest.raises(ValueError, match="set `importance_weighting` instead"):
        training_args(vllm_importance_sampling_mode="token_truncate")
    with pytest.raises(ValueError, match="set `importance_weight_cap` instead"):
        training_args(vllm_importance_sampling_clip_max=5.0)


# --- behaviour ---------------------------------------------------------------------------


def run_vanilla(max_steps=3):
    vanilla = GRPOTrainer(
        tiny_causal_lm(VOCAB, seed=0),
        reward_funcs=length_reward,
        args=training_args(GRPOConfig, max_steps=max_steps),
        train_dataset=toy_dataset(),
        processing_class=TOKENIZER,
    )
    completions = []
    record_completions(vanilla, completions)
    vanilla.train()
    return vanilla, completions


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_on_policy_generations=4),
        dict(alpha_method="fixed", alpha=0.0),
        dict(alpha_method="kl_symmetry", alpha_max=0.0),
    ],
    ids=["k=G", "alpha=0", "alpha_max=0"],
)
def test_all_rows_on_policy_reproduce_vanilla_grpo_exactly(overrides):
    vanilla, vanilla_completions = run_vanilla()
    trainer = make_trainer(max_steps=3, **overrides)
    q_completions = []
    record_completions(trainer, q_completions)
    trainer.train()
    # Same tokens under the same seed, and bit-identical losses: every row is π_θ's, so the
    # trainer takes TRL's on-policy path (no recomputed log-probs, no ratio in the loss).
    assert q_completions == vanilla_completions
    assert losses(trainer) == losses(vanilla)
    assert all("sampling/importance_sampling_ratio/mean" not in h for h in trainer.state.log_history)
    assert all(h["optimal_sampling/on_policy_frac"] == 1.0 for h in trainer.state.log_history if "loss" in h)


def test_the_fast_samplers_step_draws_the_eager_loops_rollouts_across_optimizer_steps():
    """sampler_fast='eager' (FastDecoder: static caches, the step the GPU captures) against the
    trainer's own loop ('off'), mixed groups and teacher prompts included: the same tokens, and
    log q, log q*, α and the diagnostics within float tolerance, at every step. The second
    step's rollouts come after an in-place optimizer update, which the decoder must see."""
    runs = {}
    for mode in ("off", "eager"):
        trainer = make_trainer(
            sampler_fast=mode, alpha_method="kl_symmetry", teacher_prompt_template="{teacher_prompt}", max_steps=2
        )
        rollouts = []
        original = trainer._sample_optimal

        def spy(prompt_ids, original=original, rollouts=rollouts):
            rollouts.append(original(prompt_ids))
            return rollouts[-1]

        trainer._sample_optimal = spy
        trainer.train()
        runs[mode] = (rollouts, losses(trainer))
        if mode == "eager":
            assert trainer._fast_decoders["eager"].stats["calls"] == 2
    (loop, loop_losses), (fast, fast_losses) = runs["off"], runs["eager"]
    assert len(loop) == len(fast) == 2
    for a, b in zip(loop, fast):
        assert a.completion_ids == b.completion_ids
        assert torch.equal(a.on_policy, b.on_policy) and bool(a.on_policy.any()) and not bool(a.on_policy.all())
        for name in ("logq", "logq_star"):
            for row_a, row_b in zip(getattr(a, name), getattr(b, name)):
                assert row_b == pytest.approx(row_a, abs=1e-5)
        torch.testing.assert_close(b.alpha, a.alpha, atol=1e-5, rtol=0)
        assert torch.equal(b.token_mask, a.token_mask)
        for name in ("kl_theta", "kl_t", "entropy_q"):
            torch.testing.assert_close(
                b.diagnostics[name][a.token_mask], a.diagnostics[name][a.token_mask].float(), atol=1e-4, rtol=1e-4
            )
    assert fast_losses == pytest.approx(loop_losses, abs=1e-5)


def capture_batches(trainer) -> list[dict]:
    """The trainer's scored batches in sampling order (TRL shuffles rows before the loss)."""
    seen = []
    generate_and_score = trainer._generate_and_score_completions

    def spy(inputs):
        out = generate_and_score(inputs)
        seen.append(out)
        return out

    trainer._generate_and_score_completions = spy
    return seen


def test_mixed_groups_sample_the_first_k_rows_of_each_group_from_the_policy(monkeypatch):
    import optimal_sampling.trainers._common as common

    seen = []

    def spy(*args, **kwargs):
        out = sample_rollouts(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(common, "sample_rollouts", spy)
    trainer = make_trainer(
        max_steps=1,
        num_on_policy_generations=1,
        alpha_method="fixed",
        alpha=0.7,
        importance_weighting="token_truncate",
        advantage_baseline="on_policy",
    )
    inputs = capture_batches(trainer)
    trainer.train()
    rollouts, batch = seen[0], inputs[0]
    assert rollouts.on_policy.tolist() == [True, False, False, False] * 2  # 8 rows, groups of 4
    mask = batch["completion_mask"].bool()
    on = rollouts.on_policy
    # on-policy rows: α = 0, log q = log π_θ (TRL's recomputation agrees to round-off), weight exactly 1
    assert rollouts.alpha[on].eq(0).all() and rollouts.alpha[~on][rollouts.token_mask[~on]].eq(0.7).all()
    sampled = batch["sampling_per_token_logps"][on][mask[on]]
    torch.testing.assert_close(sampled, batch["old_per_token_logps"][on][mask[on]], atol=1e-5, rtol=0)
    weights = batch["importance_sampling_ratio"]
    assert weights[on].eq(1.0).all()
    expected = torch.exp(batch["old_per_token_logps"] - batch["sampling_per_token_logps"]).clamp(max=3.0)
    torch.testing.assert_close(weights[~on][mask[~on]], expected[~on][mask[~on]])
    assert (weights[~on][mask[~on]] - 1).abs().max() > 0.05
    # each q* token also knows its q* log-prob, which on q* rows is the sampled log q
    assert all(a == b for a, b, o in zip(rollouts.logq, rollouts.logq_star, on.tolist()) if not o)


def test_on_policy_baseline_advantages_are_reward_minus_the_on_policy_mean_over_trls_scale():
    trainer = make_trainer(
        max_steps=1, num_on_policy_generations=2, alpha_method="fixed", alpha=0.7, advantage_baseline="on_policy"
    )
    inputs = capture_batches(trainer)
    trainer.train()
    rewards = trainer._rollout_rewards.view(2, 4)  # what TRL's reward functions returned for this batch
    assert float(rewards.mean()) == pytest.approx(trainer.state.log_history[0]["rewards/length_reward/mean"])
    assert float(rewards.std(-1).min()) > 0
    expected = (rewards - rewards[:, :2].mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-4)
    torch.testing.assert_close(inputs[0]["advantages"], expected.flatten(), rtol=1e-5, atol=1e-5)


def test_q_star_weights_reach_the_loss():
    trainer = make_trainer(
        alpha_method="fixed",
        alpha=0.6,
        max_steps=1,
        num_on_policy_generations=0,
        importance_weighting="shaping",
        advantage_baseline="is",
    )
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
    r = torch.exp(inputs["old_per_token_logps"] - inputs["sampling_per_token_logps"])
    torch.testing.assert_close(inputs["importance_sampling_ratio"][mask], (0.1 * r / (r + 0.1) ** 2)[mask])
    assert not torch.isclose(seen["loss"], seen["without_ratio"])


def test_alpha_kl_and_importance_metrics_reach_log_history():
    trainer = make_trainer(
        teacher_prompt_template="{teacher_prompt}",
        importance_weighting="token_truncate",
        advantage_baseline="on_policy",
        alpha_method="kl_symmetry",
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for entry in logged:
        for key in (
            "alpha_mean",
            "alpha_std",
            "alpha_min",
            "alpha_max",
            "kl_theta",
            "kl_t",
            "is_weight_mean",
            "is_weight_min",
            "is_weight_max",
            "is_weight_ess",
            "is_clipped_frac",
            "policy_mass_truncated_token",
            "policy_mass_truncated_seq",
            "on_policy_frac",
            "reward_on_policy",
            "reward_qstar",
            "reward_policy_is",
            "zero_std_frac_on_policy",
            "zero_std_frac_qstar",
        ):
            assert f"optimal_sampling/{key}" in entry, key
        assert "sampling/importance_sampling_ratio/mean" in entry
        assert (
            0.0
            <= entry["optimal_sampling/alpha_min"]
            <= entry["optimal_sampling/alpha_mean"]
            <= entry["optimal_sampling/alpha_max"]
            <= 1.0
        )
        # KL symmetry, the default α rule, holds per token, so it holds on average.
        assert entry["optimal_sampling/kl_theta"] == pytest.approx(entry["optimal_sampling/kl_t"], abs=1e-4)


def test_teacher_prompt_template_gives_the_teacher_its_own_prompt(monkeypatch):
    import optimal_sampling.trainers._common as common

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


def test_teacher_decay_shrinks_alpha_and_then_samples_every_row_on_policy():
    trainer = make_trainer(alpha_method="fixed", alpha=1.0, max_steps=4, teacher_decay_ratio=0.5)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    pulls = [h["optimal_sampling/teacher_pull"] for h in logged]
    assert pulls == pytest.approx([1.0, 0.5, 0.0, 0.0])  # generated at steps 0, 1, 2, 3 of 4; zero from step 2
    assert [h["optimal_sampling/alpha_max"] for h in logged[:2]] == pytest.approx([1.0, 0.5])
    assert [h["optimal_sampling/on_policy_frac"] for h in logged] == [0.5, 0.5, 1.0, 1.0]


def test_kl_budget_keeps_every_q_star_token_within_the_budget():
    trainer = make_trainer(alpha_method="kl_budget", kl_budget=0.05, max_steps=1)
    trainer.train()
    entry = trainer.state.log_history[0]
    assert 0.0 < entry["optimal_sampling/alpha_mean"] < 1.0
    assert entry["optimal_sampling/kl_theta"] <= 0.05 + 1e-4


def test_rloo_advantages_are_recentred_and_carry_truncated_sequence_weights(monkeypatch):
    captured = {}
    original = RLOOTrainer._generate_and_score_completions

    def spy(self, inputs):
        out = original(self, inputs)
        captured["raw_advantages"] = out["advantages"].clone()
        return out

    trainer = make_trainer(
        trainer_cls=OptimalSamplingRLOOTrainer,
        config_cls=OptimalSamplingRLOOConfig,
        beta=0.0,
        max_steps=1,
        alpha_method="fixed",
        alpha=0.6,
        importance_weighting="sequence_truncate",
        advantage_baseline="on_policy",
    )
    monkeypatch.setattr(RLOOTrainer, "_generate_and_score_completions", spy)  # after the init-time seam check
    import optimal_sampling.trainers._common as common

    rollouts = []
    monkeypatch.setattr(
        common, "sample_rollouts", lambda *a, **k: rollouts.append(sample_rollouts(*a, **k)) or rollouts[-1]
    )
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer._pending_rollouts = []
    out = trainer._generate_and_score_completions(batch)
    loo = captured["raw_advantages"].view(2, 4)
    recentred = 0.75 * (loo - loo[:, :2].mean(-1, keepdim=True))  # (n−1)/n (A − mean of the on-policy rows' A)
    on_policy = torch.tensor([True, True, False, False] * 2)
    logq = torch.tensor([sum(row) for row in rollouts[0].logq])
    weights = torch.where(on_policy, 1.0, torch.exp(out["old_logps"] - logq).clamp(max=3.0))
    torch.testing.assert_close(out["advantages"], recentred.flatten() * weights, rtol=1e-5, atol=1e-6)
    assert "optimal_sampling/is_weight_mean" in trainer._metrics["train"]


def test_rloo_refuses_token_level_weights_and_the_biased_combination():
    with pytest.raises(ValueError, match="RLOO's loss is sequence level"):
        training_args(OptimalSamplingRLOOConfig, importance_weighting="token_truncate")
    with pytest.raises(ValueError, match="biased"):
        training_args(OptimalSamplingRLOOConfig, importance_weighting="sequence_truncate")


def test_generation_kwargs_the_sampler_honours_reach_it_and_others_are_refused_by_name():
    trainer = make_trainer(
        max_steps=1,
        max_completion_length=6,
        generation_kwargs={"max_new_tokens": 3, "do_sample": True, "top_k": 0, "use_cache": True},
    )
    batches = capture_batches(trainer)
    trainer.train()
    assert batches[0]["completion_mask"].sum(-1).max() <= 3
    for kwargs, message in (
        ({"num_beams": 4}, r"generation_kwargs\['num_beams'\]=4 would change the sampled distribution"),
        ({"min_new_tokens": 2}, r"generation_kwargs\['min_new_tokens'\] is not supported"),
        ({"temperature": 0.5}, "differs from the trainer's temperature"),
    ):
        with pytest.raises(ValueError, match=message):
            make_trainer(generation_kwargs=kwargs)


def test_mask_truncated_completions_masks_rows_that_hit_the_length_cap():
    from optimal_sampling.testing import bias_output_layer

    eos = TOKENIZER.eos_token_id
    teacher = bias_output_layer(tiny_causal_lm(VOCAB, seed=1), eos, bias=4.0)  # q* rows often stop early
    trainer = make_trainer(
        teacher=teacher, max_steps=1, alpha_method="fixed", alpha=1.0, mask_truncated_completions=True
    )
    batches = capture_batches(trainer)
    trainer.train()
    ids, mask = batches[0]["completion_ids"], batches[0]["completion_mask"]
    ended = torch.tensor([bool((row == eos).any()) for row in ids])
    assert ended.any() and (~ended).any()
    assert mask[~ended].eq(0).all()  # truncated rows carry no loss
    assert mask[ended].sum(-1).gt(0).all()


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
        teacher_prompt_ids=None,
        max_new_tokens=20,
        pad_token_id=TOKENIZER.pad_token_id,
        stop_token_ids=list(range(2, 40)),
        vocab_size=VOCAB,
        device="cpu",
        q_star=QStarOptions(alpha_method="kl_symmetry"),
    )
    prompts = [TOKENIZER(p)["input_ids"] for p in PROMPTS]
    torch.manual_seed(0)
    alone = sample_rollouts(base, teacher, prompts, **options)
    alone_forwards, local_steps = calls["base"], alone.alpha.shape[1]
    calls["base"] = 0
    torch.manual_seed(0)
    synced = sample_rollouts(base, teacher, prompts, sync_stop=lambda local_running: True, **options)
    assert local_steps < 20  # every row stopped early...
    # ...but a slower peer keeps this rank's forwards going: one per step up to max_new_tokens (the
    # decoder's cache allocation and prefill forwards are the same in both runs)
    assert calls["base"] - alone_forwards == 20 - local_steps
    assert synced.completion_ids == alone.completion_ids
    assert synced.logq == alone.logq


# --- errors ----------------------------------------------------------------------------------


def test_missing_teacher_is_a_clear_error():
    with pytest.raises(ValueError, match="No teacher"):
        OptimalSamplingGRPOTrainer(
            tiny_causal_lm(VOCAB),
            reward_funcs=length_reward,
            args=training_args(),
            train_dataset=toy_dataset(),
            processing_class=TOKENIZER,
        )


def test_teacher_with_another_vocabulary_is_a_clear_error():
    other = tiny_tokenizer(extra_words=("zebra",))
    with pytest.raises(ValueError, match="Incompatible teacher.*different vocabularies"):
        OptimalSamplingGRPOTrainer(
            tiny_causal_lm(VOCAB),
            reward_funcs=length_reward,
            args=training_args(),
            train_dataset=toy_dataset(),
            processing_class=TOKENIZER,
            teacher_model=tiny_causal_lm(len(other)),
            teacher_processing_class=other,
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
        (
            dict(
                sampler_backend="vllm",
                sampler_theta_url="http://a",
                sampler_t_url="http://b",
                importance_weighting="mis",
            ),
            ValueError,
            "needs log q.* of the on-policy rows",
        ),
        (
            dict(sampler_backend="vllm", sampler_theta_url="http://a", sampler_t_url="http://b", teacher_top_p=0.9),
            ValueError,
            "teacher_top_p",
        ),
        (dict(alpha_method="fixed", alpha=None), ValueError, "needs `alpha=`"),
        (dict(alpha_method="kl_budget"), ValueError, "needs `kl_budget=`"),
        (dict(importance_weighting="token_truncate"), ValueError, "biased"),
        (
            dict(num_on_policy_generations=0, advantage_baseline="on_policy"),
            ValueError,
            "num_on_policy_generations` is 0",
        ),
        (dict(teacher_decay_ratio=1.5), ValueError, "teacher_decay_ratio"),
    ],
)
def test_unsupported_options_are_clear_errors(overrides, error, message):
    with pytest.raises(error, match=message):
        make_trainer(**overrides)


# --- docs and distributed runs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    ["optimal_sampling.trainers.grpo", "optimal_sampling.trainers.config", "optimal_sampling.trainers.rollout"],
)
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
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "recipes/accelerate/multi_cpu.yaml"),
        str(REPO / "recipes/grpo.py"),
        "--model_name_or_path",
        str(tmp_path / "base"),
        "--teacher_model_name_or_path",
        str(tmp_path / "teacher"),
        "--teacher_prompt_template",
        "{teacher_prompt}",
        "--dataset_name",
        str(tmp_path / "data.jsonl"),
        "--reward_funcs",
        "optimal_sampling.toy.task:exact_match_reward",
        "--output_dir",
        str(tmp_path / "out"),
        "--per_device_train_batch_size",
        "2",
        "--num_generations",
        "4",
        "--max_completion_length",
        "8",
        "--max_steps",
        "2",
        "--logging_steps",
        "1",
        "--use_cpu",
        "--bf16",
        "false",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((tmp_path / "out/run_info.json").read_text())["num_processes"] == 2
    history = json.loads((tmp_path / "out/log_history.json").read_text())
    logged = [h for h in history if "loss" in h]
    assert len(logged) == 2
    assert all("optimal_sampling/alpha_mean" in h and "optimal_sampling/is_weight_mean" in h for h in logged)
    # One group of 4 spans both ranks (2 rows each): rank 1's rows are the group's q* rows only if
    # each rank counts positions from its global offset, so exactly half the rows are on-policy.
    assert all(h["optimal_sampling/on_policy_frac"] == 0.5 for h in logged)


@pytest.mark.parametrize("kind", ["grpo", "rloo", "distillation"])
def test_a_multimodal_processing_class_is_refused_by_name(kind):
    """A processor (here a real `Wav2Vec2Processor` around the tokenizer: no image library needed) is what
    TRL takes for a vision-language model; the q* sampler reads text through a tokenizer, so each trainer
    refuses it with the processor's name and the fix."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    from optimal_sampling.trainers import OptimalSamplingDistillationConfig, OptimalSamplingDistillationTrainer

    processor = Wav2Vec2Processor(feature_extractor=Wav2Vec2FeatureExtractor(), tokenizer=TOKENIZER)
    student = tiny_causal_lm(VOCAB, seed=0)
    common = dict(train_dataset=toy_dataset(), processing_class=processor, teacher_model=tiny_causal_lm(VOCAB, seed=1))
    with pytest.raises(NotImplementedError, match=r"Wav2Vec2Processor\. For a text model, pass its tokenizer"):
        if kind == "distillation":
            options = cpu_options("/tmp/optimal-sampling-test-trainers", groups=False)
            OptimalSamplingDistillationTrainer(student, args=OptimalSamplingDistillationConfig(**options), **common)
        else:
            trainer_cls, config_cls = {
                "grpo": (OptimalSamplingGRPOTrainer, OptimalSamplingGRPOConfig),
                "rloo": (OptimalSamplingRLOOTrainer, OptimalSamplingRLOOConfig),
            }[kind]
            trainer_cls(student, reward_funcs=length_reward, args=training_args(config_cls), **common)
