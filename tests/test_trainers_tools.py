"""Tool calling with q* rollouts, through TRL's own tool loop (`GRPOTrainer._tool_call_loop`).

The policy and teacher are tiny models trained here to call a tool in Qwen3's chat format and then
answer with its result (`tests/tool_models.py`), so TRL really parses a tool call, runs the tool and
samples a second turn.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tool_models import (
    SECRET,
    own_template_tokenizer,
    privileged_prompt,
    secret_number,
    spy_sampler,
    tool_calling_lm,
    tool_dataset,
    tool_suffix,
    tool_tokenizer,
)
from trainer_options import cpu_options
from trl import GRPOConfig, GRPOTrainer

from optimal_sampling.trainers import OptimalSamplingGRPOConfig, OptimalSamplingGRPOTrainer
from optimal_sampling.trainers.turns import tool_result_ids

ALPHA = 0.5


def answer_length_reward(completions, **kwargs):
    """The length of the last assistant message: the policy's three phrasings differ, so groups vary."""
    return [
        float(len(next(m for m in reversed(c) if m["role"] == "assistant").get("content") or "")) for c in completions
    ]


class SecretEnvironment:
    """An `environment_factory` environment: its public method is the tool."""

    def reset(self, **kwargs):
        self.calls = 0

    def secret_number(self) -> str:
        """Look up the secret number."""
        self.calls += 1
        return SECRET


def grpo_args(config_cls=OptimalSamplingGRPOConfig, **overrides):
    options = dict(max_completion_length=40, max_steps=1, learning_rate=1e-3, seed=3)
    options.update(overrides)
    return config_cls(**cpu_options("/tmp/optimal-sampling-test-tools", **options))


def q_star_trainer(*, tools=True, **overrides):
    options = dict(num_on_policy_generations=2, alpha_method="fixed", alpha=ALPHA)
    options.update(overrides)
    return OptimalSamplingGRPOTrainer(
        tool_calling_lm("policy"),
        reward_funcs=answer_length_reward,
        args=grpo_args(**options),
        train_dataset=tool_dataset(),
        processing_class=tool_tokenizer(),
        teacher_model=tool_calling_lm("teacher"),
        **({"tools": [secret_number]} if tools else {"environment_factory": SecretEnvironment}),
    )


def vanilla_trainer(**overrides):
    return GRPOTrainer(
        tool_calling_lm("policy"),
        reward_funcs=answer_length_reward,
        args=grpo_args(GRPOConfig, **overrides),
        train_dataset=tool_dataset(),
        processing_class=tool_tokenizer(),
        tools=[secret_number],
    )


def spy_turns(trainer) -> list[list]:
    """What `_generate_single_turn` returned, call by call (first turns and continuations)."""
    seen = []
    original = trainer._generate_single_turn

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out[0])
        return out

    trainer._generate_single_turn = spy
    return seen


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


# -- every turn of a row, by the row's rule ------------------------------------------------


@pytest.mark.parametrize("source", ["tools", "environment_factory"])
def test_the_second_turn_is_sampled_by_each_rows_rule_and_tool_results_carry_no_weight(monkeypatch, source):
    calls = spy_sampler(monkeypatch)
    trainer = q_star_trainer(
        tools=source == "tools",
        teacher_prompt_fn=privileged_prompt,
        importance_weighting="token_truncate",
        advantage_baseline="on_policy",
    )
    batches = capture_batches(trainer)
    trainer.train()
    first, second = calls[0], calls[1]  # the first turn, then the rows that called the tool
    assert len(calls) == 2 and len(second["prompt_ids"]) == 8, "every row should have called the tool once"
    if source == "environment_factory":
        assert [env.calls for env in trainer.environments] == [1] * 8

    # the tool really ran: each continuation is the row's prompt, its tool call, the tool's result
    suffix = tool_suffix(tool_tokenizer(), SECRET)
    for row, ids in enumerate(second["prompt_ids"]):
        assert ids == first["prompt_ids"][row] + first["out"].completion_ids[row] + suffix

    # each row keeps its rule: on-policy rows sample π_θ again (α = 0), q* rows q* (α = 0.5)
    on_policy = first["on_policy"]
    assert on_policy.tolist() == [True, True, False, False] * 2
    assert torch.equal(second["on_policy"], on_policy)
    for call in (first, second):
        out = call["out"]
        assert out.alpha[out.on_policy][out.token_mask[out.on_policy]].eq(0).all()
        assert out.alpha[~out.on_policy][out.token_mask[~out.on_policy]].eq(ALPHA).all()

    # the teacher sees its own (privileged) prompt, then the whole conversation
    assert first["teacher_prompt_ids"] is not None
    for row, ids in enumerate(second["teacher_prompt_ids"]):
        assert ids == first["teacher_prompt_ids"][row] + first["out"].completion_ids[row] + suffix

    # TRL's batch: tool-result tokens are masked, get no weight, and the per-token log q is the sampled one
    [batch] = batches
    tool_mask = batch["tool_mask"].bool()
    for row in range(8):
        turn1, turn2 = first["out"].completion_ids[row], second["out"].completion_ids[row]
        expected_mask = [True] * len(turn1) + [False] * len(suffix) + [True] * len(turn2)
        assert tool_mask[row, : len(expected_mask)].tolist() == expected_mask
        generated = torch.tensor(expected_mask)
        weights = batch["importance_sampling_ratio"][row, : len(expected_mask)]
        assert weights[~generated].eq(0).all()
        if on_policy[row]:
            assert weights[generated].eq(1).all()
        logq = batch["sampling_per_token_logps"][row, : len(expected_mask)][generated]
        recorded = first["out"].logq[row] + second["out"].logq[row]
        torch.testing.assert_close(logq, torch.tensor(recorded), rtol=0, atol=1e-6)
    # log q, log π_θ, log π_t and log q* are kept for every generated token of both turns, for no tool token
    turns = trainer._turns
    for row in range(8):
        generated_positions = [p for p, m in enumerate(tool_mask[row, : len(turns.positions[row]) + len(suffix)]) if m]
        assert turns.positions[row] == generated_positions
        for name in ("logq", "logp_theta", "logp_t", "logq_star"):
            assert len(turns.values(name, row)) == len(generated_positions), name


def test_log_q_of_both_turns_is_the_mixture_of_the_two_models_over_their_own_conversations(monkeypatch):
    """Recompute π_θ over the policy's conversation and π_t over the teacher's (its privileged prompt,
    then the same tokens): every generated token's log q is log softmax((1 − α) log π_θ + α log π_t)
    on q* rows and log π_θ on on-policy rows, in the second turn as in the first."""
    calls = spy_sampler(monkeypatch)
    trainer = q_star_trainer(teacher_prompt_fn=privileged_prompt)
    trainer.train()
    policy, teacher = tool_calling_lm("policy"), tool_calling_lm("teacher")  # the weights that sampled
    first, second = calls[0], calls[1]
    for call in (first, second):
        out = call["out"]
        for row in range(len(call["prompt_ids"])):
            tokens = out.completion_ids[row]
            base = torch.tensor([call["prompt_ids"][row] + tokens])
            teach = torch.tensor([call["teacher_prompt_ids"][row] + tokens])
            with torch.no_grad():
                logp = policy(base).logits[0, -len(tokens) - 1 : -1].log_softmax(-1)
                logr = teacher(teach).logits[0, -len(tokens) - 1 : -1].log_softmax(-1)
            if out.on_policy[row]:
                expected = logp
            else:
                expected = ((1 - ALPHA) * logp + ALPHA * logr).log_softmax(-1)
            picked = expected.gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(torch.tensor(out.logq[row]), picked, rtol=0, atol=2e-4)
            torch.testing.assert_close(
                torch.tensor(out.logp_t[row]),
                logr.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1),
                atol=2e-4,
                rtol=0,
            )


def test_a_teacher_with_its_own_template_reads_the_tool_results_in_its_own_format(monkeypatch):
    """Same vocabulary, another chat template: the tool result reaches the teacher as its template renders
    it (here with a `result: ` label), the policy's tokens everywhere else."""
    tokenizer, teacher_tokenizer = tool_tokenizer(), own_template_tokenizer()
    calls = spy_sampler(monkeypatch)
    trainer = OptimalSamplingGRPOTrainer(
        tool_calling_lm("policy"),
        reward_funcs=answer_length_reward,
        args=grpo_args(num_on_policy_generations=2, alpha_method="fixed", alpha=ALPHA),
        train_dataset=tool_dataset(),
        processing_class=tokenizer,
        teacher_model=tool_calling_lm("teacher"),
        teacher_processing_class=teacher_tokenizer,
        teacher_prompt_fn=privileged_prompt,
        tools=[secret_number],
    )
    trainer.train()
    first, second = calls[0], calls[1]
    theirs = tool_result_ids(teacher_tokenizer, [{"role": "tool", "name": "secret_number", "content": SECRET}])
    assert theirs != tool_suffix(tokenizer, SECRET) and "result: 7" in teacher_tokenizer.decode(theirs)
    for row, ids in enumerate(second["teacher_prompt_ids"]):
        assert ids == first["teacher_prompt_ids"][row] + first["out"].completion_ids[row] + theirs
    for row, ids in enumerate(second["prompt_ids"]):  # the policy's conversation is TRL's, unchanged
        assert ids == first["prompt_ids"][row] + first["out"].completion_ids[row] + tool_suffix(tokenizer, SECRET)


# -- on-policy rows are GRPOTrainer's ---------------------------------------------------------


def test_with_every_row_on_policy_the_tool_loop_reproduces_grpo_trainer_exactly():
    vanilla = vanilla_trainer(max_steps=2)
    vanilla_turns = spy_turns(vanilla)
    vanilla.train()
    trainer = q_star_trainer(num_on_policy_generations=4, max_steps=2)
    turns = spy_turns(trainer)
    trainer.train()
    assert len(turns) == len(vanilla_turns) == 4  # two steps, two turns each
    assert turns == vanilla_turns
    assert losses(trainer) == losses(vanilla)


def test_on_policy_rows_of_a_mixed_group_reproduce_grpo_trainers_tokens_in_every_turn():
    vanilla = vanilla_trainer()
    vanilla_batches = capture_batches(vanilla)
    vanilla.train()
    trainer = q_star_trainer(importance_weighting="token_truncate", advantage_baseline="on_policy")
    batches = capture_batches(trainer)
    trainer.train()
    [ours], [theirs] = batches, vanilla_batches
    on = trainer._turns.on_policy
    assert on.tolist() == [True, True, False, False] * 2
    width = min(ours["completion_ids"].shape[1], theirs["completion_ids"].shape[1])
    mask = ours["completion_mask"][on].bool()
    assert torch.equal(ours["completion_ids"][on][:, :width], theirs["completion_ids"][on][:, :width])
    assert torch.equal(ours["tool_mask"][on][:, :width], theirs["tool_mask"][on][:, :width])
    assert torch.equal(mask.sum(-1), theirs["completion_mask"][on].sum(-1))
    assert not torch.equal(ours["completion_ids"][~on][:, :width], theirs["completion_ids"][~on][:, :width])
    generated = mask & ours["tool_mask"][on].bool()
    # their log q is π_θ's own log-probability (TRL's recomputation agrees), so their weight is exactly 1
    torch.testing.assert_close(
        ours["sampling_per_token_logps"][on][generated], ours["old_per_token_logps"][on][generated], atol=1e-5, rtol=0
    )
    assert ours["importance_sampling_ratio"][on][generated].eq(1).all()


# -- the pieces --------------------------------------------------------------------------------


def test_the_teachers_tool_result_tokens_are_trls_for_the_same_template():
    tokenizer = tool_tokenizer()
    from trl.chat_template_utils import get_training_chat_template

    template = get_training_chat_template(tokenizer)
    trl_side = SimpleNamespace(
        processing_class=tokenizer, chat_template=template, chat_template_kwargs={}, _is_vlm=False, _tokenizer=tokenizer
    )
    messages = [{"role": "tool", "name": "secret_number", "content": "7"}]
    assert tool_result_ids(tokenizer, messages, chat_template=template) == GRPOTrainer._get_tool_suffix_ids(
        trl_side, messages
    )


def test_tools_with_a_vllm_sampler_are_refused_by_name():
    with pytest.raises(NotImplementedError, match="sampler_backend='transformers'"):
        OptimalSamplingGRPOTrainer(
            tool_calling_lm("policy"),
            reward_funcs=answer_length_reward,
            args=grpo_args(sampler_backend="vllm", sampler_theta_url="http://x", sampler_t_url="http://y"),
            train_dataset=tool_dataset(),
            processing_class=tool_tokenizer(),
            teacher_model=tool_calling_lm("teacher"),
            tools=[secret_number],
        )
