"""Tool calling in `OptimalSamplingDistillationTrainer`, through TRL's own tool loop
(`DistillationTrainer._tool_call_loop`, which samples every later turn through `_generate_single_turn`).

The student and teacher are the tiny models of `tests/tool_models.py`, trained to call a tool in
Qwen3's chat format and then answer with its result, so TRL really parses a tool call, runs the tool
and samples a second turn.
"""

from __future__ import annotations

import pytest
import torch
from test_distillation import arguments, losses, record
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
from trl import DistillationConfig, DistillationTrainer

from optimal_sampling.trainers import OptimalSamplingDistillationConfig, OptimalSamplingDistillationTrainer
from optimal_sampling.trainers.turns import tool_result_ids

ALPHA = 0.5


def distillation_args(config_cls=OptimalSamplingDistillationConfig, **overrides):
    """`tests/test_distillation.py`'s arguments, with room for two turns and one group of 8 rows."""
    options = dict(
        output_dir="/tmp/optimal-sampling-test-distillation-tools",
        per_device_train_batch_size=8,
        max_completion_length=40,
        max_steps=1,
        learning_rate=1e-3,
        seed=3,
        log_completions=False,
    )
    return arguments(config_cls, **{**options, **overrides})


def q_star_trainer(teacher_processing_class=None, **overrides):
    options = dict(alpha_method="fixed", alpha=ALPHA)
    options.update(overrides)
    return OptimalSamplingDistillationTrainer(
        tool_calling_lm("policy"),
        teacher_model=tool_calling_lm("teacher"),
        args=distillation_args(**options),
        train_dataset=tool_dataset(),
        processing_class=tool_tokenizer(),
        teacher_processing_class=teacher_processing_class,
        tools=[secret_number],
    )


def conversation(prompt: list[int], turns: list[list[int]], tool_result: list[int]) -> tuple[list[int], list[int]]:
    """A row's ids (its prompt, then its turns with the tool result between them), and where each turn's
    tokens sit in them."""
    ids, at = list(prompt), []
    for k, turn in enumerate(turns):
        ids += tool_result if k else []
        at += range(len(ids), len(ids) + len(turn))
        ids += turn
    return ids, at


def reverse_kl(student, teacher, student_side: tuple, teacher_side: tuple) -> torch.Tensor:
    """KL(π_θ ‖ π_t) (TRL's loss at beta=1) at each generated token, each model over its own conversation
    (`conversation`'s ids and token positions), from one unpadded forward per model."""

    def logp(model, side):
        ids, at = side
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        return logits[torch.tensor(at) - 1].log_softmax(-1)  # the position before a token predicts it

    logp_s, logp_t = logp(student, student_side), logp(teacher, teacher_side)
    return (logp_s.exp() * (logp_s - logp_t)).sum(-1)


# -- every turn from q*, the teacher on its own conversation ---------------------------------


def completion_rows(batch) -> list[tuple[list[int], list[int]]]:
    """TRL's completions and tool masks, row by row, without padding, in a fixed order (TRL may shuffle rows)."""
    rows = []
    for ids, mask, tool_mask in zip(batch["completion_ids"], batch["completion_mask"], batch["tool_mask"]):
        keep = mask.bool()
        rows.append((ids[keep].tolist(), tool_mask[keep].tolist()))
    return sorted(rows)


def test_every_turn_is_sampled_from_q_star_and_tool_results_are_masked(monkeypatch):
    calls = spy_sampler(monkeypatch)
    trainer = q_star_trainer(teacher_prompt_fn=privileged_prompt)
    _, batches = record(trainer)
    trainer.train()
    first, second = calls[0], calls[1]  # the first turn, then the rows that called the tool
    assert len(calls) == 2 and len(second["prompt_ids"]) == 8, "every row should have called the tool once"

    # the tool really ran: each continuation is the row's prompt, its tool call, the tool's result
    suffix = tool_suffix(tool_tokenizer(), SECRET)
    for row, ids in enumerate(second["prompt_ids"]):
        assert ids == first["prompt_ids"][row] + first["out"].completion_ids[row] + suffix

    # both turns by the same rule: q* at α = 0.5 on every generated token (distillation has no on-policy rows)
    for call in (first, second):
        out = call["out"]
        assert not out.on_policy.any()
        assert out.alpha[out.token_mask].eq(ALPHA).all() and out.token_mask.any()

    # the teacher sees its own (privileged) prompt, then the whole conversation
    for row, ids in enumerate(second["teacher_prompt_ids"]):
        assert ids == first["teacher_prompt_ids"][row] + first["out"].completion_ids[row] + suffix

    # TRL's batch holds both turns with the tool result between them, masked out of the loss by `tool_mask`
    [batch] = batches
    expected = []
    for row in range(8):
        turn1, turn2 = first["out"].completion_ids[row], second["out"].completion_ids[row]
        expected.append((turn1 + suffix + turn2, [1] * len(turn1) + [0] * len(suffix) + [1] * len(turn2)))
    assert completion_rows(batch) == sorted(expected)


def test_the_metrics_cover_the_generated_tokens_of_every_turn_and_no_tool_result(monkeypatch):
    calls = spy_sampler(monkeypatch)
    trainer = q_star_trainer(alpha_method="kl_symmetry")
    _, batches = record(trainer)
    trainer.train()
    [batch] = batches
    outs = [call["out"] for call in calls]
    alphas = torch.cat([out.alpha[out.token_mask] for out in outs])
    generated = (batch["completion_mask"] * batch["tool_mask"]).sum()
    assert len(calls) == 2 and alphas.numel() == int(generated)  # every generated token once, no tool-result token
    logged = trainer.state.log_history[0]
    assert logged["optimal_sampling/alpha_mean"] == pytest.approx(float(alphas.double().mean()), abs=1e-6)
    first_turn_only = float(outs[0].alpha[outs[0].token_mask].double().mean())
    assert abs(logged["optimal_sampling/alpha_mean"] - first_turn_only) > 1e-4  # the second turn counts


@pytest.mark.parametrize(
    "template, in_loss",
    [("policy", True), ("own", True), ("own", False)],
    ids=["same-template", "own-template", "own-template-student-prompt-in-loss"],
)
def test_the_loss_is_trls_reverse_kl_with_the_teacher_on_the_conversation_it_sampled_with(
    monkeypatch, template, in_loss
):
    """The teacher's side of the loss is the conversation it read while sampling: its privileged prompt,
    the row's turns and the tool result as its own template renders it (`teacher_prompt_in_loss`), or
    the student's whole conversation (False, as TRL's DistillationTrainer). Tool results carry no loss."""
    teacher_tokenizer = own_template_tokenizer() if template == "own" else None
    calls = spy_sampler(monkeypatch)
    trainer = q_star_trainer(teacher_tokenizer, teacher_prompt_fn=privileged_prompt, teacher_prompt_in_loss=in_loss)
    _, batches = record(trainer)
    trainer.train()
    first, second = calls[0], calls[1]
    policy_result = tool_suffix(tool_tokenizer(), SECRET)
    teacher_result = policy_result
    if template == "own":
        teacher_result = tool_result_ids(
            teacher_tokenizer, [{"role": "tool", "name": "secret_number", "content": SECRET}]
        )
        assert teacher_result != policy_result and "result: 7" in teacher_tokenizer.decode(teacher_result)

    student, teacher = tool_calling_lm("policy"), tool_calling_lm("teacher")  # the weights before the step
    per_token, length = [], 0
    for row in range(8):
        turns = [first["out"].completion_ids[row], second["out"].completion_ids[row]]
        student_side = conversation(first["prompt_ids"][row], turns, policy_result)
        teacher_side = conversation(first["teacher_prompt_ids"][row], turns, teacher_result)
        # what the teacher read while sampling the second turn
        assert second["teacher_prompt_ids"][row] == teacher_side[0][: -len(turns[1])]
        per_token.append(reverse_kl(student, teacher, student_side, teacher_side if in_loss else student_side))
        length += len(student_side[0]) - len(first["prompt_ids"][row])
    [batch] = batches
    assert int(batch["completion_mask"].sum()) == length  # TRL truncated nothing
    per_token = torch.cat(per_token)  # at generated tokens only: tool results carry no loss
    assert losses(trainer)[0] == pytest.approx(float(per_token.mean()), rel=1e-4)


# -- with α = 0 it is TRL's DistillationTrainer --------------------------------------------------


def test_with_alpha_zero_the_tool_loop_reproduces_trls_distillation_trainer_exactly():
    vanilla = DistillationTrainer(
        tool_calling_lm("policy"),
        teacher_model=tool_calling_lm("teacher"),
        args=distillation_args(DistillationConfig, max_steps=2),
        train_dataset=tool_dataset(),
        processing_class=tool_tokenizer(),
        tools=[secret_number],
    )
    vanilla_turns, vanilla_batches = record(vanilla)
    vanilla.train()
    trainer = q_star_trainer(alpha=0.0, max_steps=2)
    turns, batches = record(trainer)
    trainer.train()
    assert len(turns) == len(vanilla_turns) == 4  # two steps, two turns each
    assert turns == vanilla_turns
    for ours, theirs in zip(batches, vanilla_batches):
        assert torch.equal(ours["tool_mask"], theirs["tool_mask"])
    assert losses(trainer) == losses(vanilla)
    assert all(h["optimal_sampling/on_policy_frac"] == 1.0 for h in trainer.state.log_history if "loss" in h)


# -- refusals --------------------------------------------------------------------------------------


def test_tools_with_a_vllm_sampler_are_refused_by_name():
    with pytest.raises(NotImplementedError, match="sampler_backend='transformers'"):
        q_star_trainer(sampler_backend="vllm", sampler_theta_url="http://x", sampler_t_url="http://y")
