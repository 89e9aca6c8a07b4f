"""`q_star_rollout_func`: q* rollouts for TRL's plain `GRPOTrainer`, through its public `rollout_func`."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trainer_options import cpu_options
from trl import GRPOConfig, GRPOTrainer

import optimal_sampling.trainers.rollout_func as rollout_func_module
from optimal_sampling.testing import tiny_causal_lm, tiny_tokenizer
from optimal_sampling.trainers import q_star_rollout_func
from optimal_sampling.trainers.rollout import sample_rollouts

TOKENIZER = tiny_tokenizer()
VOCAB = len(TOKENIZER)


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def grpo_trainer(rollout_func=None, reward=length_reward, **overrides):
    options = cpu_options("/tmp/optimal-sampling-test-rollout-func", **overrides)
    return GRPOTrainer(
        tiny_causal_lm(VOCAB, seed=0),
        reward_funcs=reward,
        args=GRPOConfig(**options),
        train_dataset=Dataset.from_dict({"prompt": ["the cat", "a dog", "one two", "red blue"] * 2}),
        processing_class=TOKENIZER,
        rollout_func=rollout_func,
    )


def teacher():
    return tiny_causal_lm(VOCAB, seed=1, logit_scale=4.0)


def capture_batches(trainer) -> list[dict]:
    seen = []
    original = trainer._generate_and_score_completions

    def spy(inputs):
        out = original(inputs)
        seen.append(out)
        return out

    trainer._generate_and_score_completions = spy
    return seen


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_with_every_row_on_policy_it_reproduces_grpo_trainers_rollouts_and_losses():
    vanilla = grpo_trainer()
    vanilla_batches = capture_batches(vanilla)
    vanilla.train()
    trainer = grpo_trainer(q_star_rollout_func(teacher(), num_on_policy_generations=4))
    batches = capture_batches(trainer)
    trainer.train()
    assert len(batches) == len(vanilla_batches) == 2
    for ours, theirs in zip(batches, vanilla_batches):
        assert torch.equal(ours["completion_ids"], theirs["completion_ids"])
        assert torch.equal(ours["completion_mask"], theirs["completion_mask"])
    assert losses(trainer) == losses(vanilla)


def test_q_star_rows_come_from_the_mixture_and_reach_the_reward_functions_marked(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        out = sample_rollouts(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(rollout_func_module, "sample_rollouts", spy)
    seen_on_policy = []

    def reward(completions, on_policy, **kwargs):
        seen_on_policy.append(list(on_policy))
        return length_reward(completions)

    trainer = grpo_trainer(
        q_star_rollout_func(teacher(), num_on_policy_generations=1, alpha_method="fixed", alpha=0.7),
        reward=reward,
        max_steps=1,
    )
    batches = capture_batches(trainer)
    trainer.train()
    [rollouts], [batch] = calls, batches
    on = rollouts.on_policy
    assert on.tolist() == [True, False, False, False] * 2
    assert rollouts.alpha[on].eq(0).all() and rollouts.alpha[~on][rollouts.token_mask[~on]].eq(0.7).all()
    assert seen_on_policy == [on.tolist()]
    # TRL keeps the returned log q as its sampling log-probs (and, with use_vllm=False, applies no ratio)
    mask = batch["completion_mask"].bool()
    width = mask.shape[1]
    recorded = torch.zeros(8, width)
    for i, row in enumerate(rollouts.logq):
        recorded[i, : len(row)] = torch.tensor(row)
    torch.testing.assert_close(batch["sampling_per_token_logps"][mask], recorded[mask], atol=1e-6, rtol=0)
    assert "importance_sampling_ratio" not in batch


def test_tools_are_refused_with_the_reason():
    from tool_models import USER_TURNS, secret_number, tool_calling_lm, tool_tokenizer

    tokenizer = tool_tokenizer()
    trainer = GRPOTrainer(
        tool_calling_lm("policy"),
        reward_funcs=length_reward,
        args=GRPOConfig(
            output_dir="/tmp/optimal-sampling-test-rollout-func",
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=8,
            max_steps=1,
            report_to="none",
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            disable_tqdm=True,
        ),
        train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": USER_TURNS[0]}]] * 4}),
        processing_class=tokenizer,
        tools=[secret_number],
        rollout_func=q_star_rollout_func(tool_calling_lm("teacher")),
    )
    with pytest.raises(ValueError, match="tool loop samples every later turn with its own generator"):
        trainer.train()


def test_a_teacher_with_another_vocabulary_is_refused():
    other = tiny_tokenizer(extra_words=("zebra",))
    trainer = grpo_trainer(q_star_rollout_func(teacher(), teacher_processing_class=other), max_steps=1)
    with pytest.raises(ValueError, match="Incompatible teacher"):
        trainer.train()


def test_the_docstring_example_runs():
    import doctest

    result = doctest.testmod(rollout_func_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
