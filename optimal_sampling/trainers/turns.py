"""Tool-calling rollouts: every assistant turn of a row sampled by that row's own rule.

TRL's tool loop (`GRPOTrainer._tool_call_loop`, TRL 1.16) samples a batch's first turn, runs the
tools the completions call, appends each tool result's tokens to the row, and calls
`_generate_single_turn(..., num_generations=1)` again on the rows that called a tool, until none
does. Each such call gets only token ids, so `RolloutTurns` keeps what a batch's rows sampled,
turn by turn, and maps every continuation back to its row:

- a continuing row keeps its rule: an on-policy row is sampled from π_θ again (α = 0), a q* row
  from q*;
- the teacher sees the row's conversation from its own prompt on: its first-turn prompt (the
  teacher prompt mapping), every token the row generated, and each tool result rendered by the
  teacher's chat template (the policy's tokens when both templates are the same);
- every generated token carries its log q, log π_θ, log π_t, log q* and α; tool-result tokens
  carry none (they are not sampled: TRL masks them with `tool_mask`, and the q* weights, the
  baselines' sequence ratios and the α / KL metrics cover generated tokens only);
- KV caches are not kept across turns: each turn re-prefills both models on the whole
  conversation so far (as TRL's own transformers path re-runs `generate` on it). The prefill is
  one batched forward per model and turn; the decode steps dominate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ._host import TrainerHost
from .rollout import Rollouts

#: The per-token fields of `Rollouts` that `RolloutTurns.padded` lays out over a completion.
PER_TOKEN_FIELDS = ("logq", "logq_star", "logp_theta", "logp_t")


@dataclass
class _Turn:
    rollouts: Rollouts  # the sampling call
    row: int  # this row's index in that call
    kept: int = -1  # tokens TRL kept of it (it cuts a last turn at max_completion_length); -1: all
    teacher_prefix: list[int] = field(default_factory=list)  # the tool results before it, as the teacher reads them

    def tokens(self) -> list[int]:
        """The turn's generated tokens TRL kept."""
        ids = self.rollouts.completion_ids[self.row]
        return list(ids if self.kept < 0 else ids[: self.kept])


@dataclass
class RolloutTurns:
    """What one batch's rows sampled, turn by turn (one `_Turn` per row and sampling call).

    Attributes:
        on_policy: `[B]` bool, the row is sampled from π_θ in every turn.
        teacher_prompts: per row, the teacher's own first-turn prompt, or None when the teacher
            sees the policy's ids (`teacher_conversation` adds the turns).
        turns: per row, its turns in order.
        positions: per row, where its generated tokens sit in TRL's completion (tool-result
            tokens between turns excluded); None until `finish` (single turn: 0, 1, 2, ...).
    """

    on_policy: torch.Tensor
    teacher_prompts: list[list[int]] | None
    turns: list[list[_Turn]]
    positions: list[list[int]] | None = None
    _loop: tuple | None = field(default=None, repr=False)  # TRL's (prompt_ids, completion_ids, completions)
    _seen: list[int] = field(default_factory=list, repr=False)  # len(completions[i]) at row i's last turn

    @classmethod
    def first(cls, teacher_prompt_ids: Sequence[Sequence[int]] | None, rollouts: Rollouts) -> "RolloutTurns":
        rows = len(rollouts.completion_ids)
        prompts = None if teacher_prompt_ids is None else [list(t) for t in teacher_prompt_ids]
        return cls(rollouts.on_policy.clone(), prompts, [[_Turn(rollouts, i)] for i in range(rows)])

    @property
    def num_rows(self) -> int:
        return len(self.turns)

    @property
    def in_tool_loop(self) -> bool:
        return self._loop is not None

    # -- inside TRL's tool loop ------------------------------------------------------------

    def enter_tool_loop(self, prompt_ids: list, completion_ids: list, completions: list) -> None:
        """Keep TRL's own lists (it updates them in place while the loop runs)."""
        if len(prompt_ids) != self.num_rows:
            raise RuntimeError(f"TRL's tool loop got {len(prompt_ids)} rows for a batch of {self.num_rows}.")
        self._loop = (prompt_ids, completion_ids, completions)
        self._seen = [0] * self.num_rows

    def continuing_rows(self, inputs: Sequence[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
        """The batch row of each continuation input, and the tool-result ids appended to it.

        TRL continues the rows that called a tool, in batch order, each as its prompt + its
        completion so far + the tool result's tokens. A row qualifies if its messages gained a tool
        result since its last turn and its ids so far are a prefix of the input.
        """
        prompt_ids, completion_ids, completions = self._loop  # type: ignore[misc]
        rows, suffixes, start = [], [], 0
        for j, ids in enumerate(inputs):
            ids = list(ids)
            for i in range(start, self.num_rows):
                messages = completions[i]
                if len(messages) <= self._seen[i] or messages[-1].get("role") != "tool":
                    continue
                history = list(prompt_ids[i]) + list(completion_ids[i])
                if len(ids) > len(history) and ids[: len(history)] == history:
                    rows.append(i)
                    suffixes.append(ids[len(history) :])
                    start = i + 1
                    break
            else:
                raise RuntimeError(
                    f"A tool-loop continuation (input {j}) matches no row of the batch that called a tool: TRL "
                    "changed how `_tool_call_loop` builds its inputs. Please report it with your TRL version."
                )
        return rows, suffixes

    def tool_messages(self, row: int) -> list[dict[str, Any]]:
        """The tool-result messages TRL appended to `row` since its last turn."""
        messages = self._loop[2][row]  # type: ignore[index]
        tail: list[dict[str, Any]] = []
        for message in reversed(messages[self._seen[row] :]):
            if message.get("role") != "tool":
                break
            tail.insert(0, message)
        return tail

    def add_turn(self, rows: list[int], teacher_suffixes: list[list[int]] | None, rollouts: Rollouts) -> None:
        completions = self._loop[2]  # type: ignore[index]
        for j, i in enumerate(rows):
            prefix = [] if teacher_suffixes is None else list(teacher_suffixes[j])
            self.turns[i].append(_Turn(rollouts, j, teacher_prefix=prefix))
            self._seen[i] = len(completions[i])

    def teacher_inputs(self, rows: list[int], teacher_suffixes: list[list[int]]) -> list[list[int]] | None:
        if self.teacher_prompts is None:
            return None
        return [self.teacher_conversation(i)[0] + list(s) for i, s in zip(rows, teacher_suffixes)]

    def teacher_conversation(self, row: int) -> tuple[list[int], list[int]]:
        """`row` as the teacher reads it, and where each generated token sits in it.

        The teacher's prompt, then each turn's tool results in the teacher's format and the turn's
        generated tokens (those TRL kept, once `finish` ran); the positions index those generated
        tokens, all turns in order (as `values` lists their records).
        """
        if self.teacher_prompts is None:
            raise RuntimeError("The teacher reads the policy's ids: it has no conversation of its own.")
        ids, at = list(self.teacher_prompts[row]), list[int]()
        for turn in self.turns[row]:
            tokens = turn.tokens()
            ids += turn.teacher_prefix
            at += range(len(ids), len(ids) + len(tokens))
            ids += tokens
        return ids, at

    def finish(self, completion_ids: list[list[int]], tool_mask: list[list[int]]) -> None:
        """Match TRL's final completions (tool results included) against the sampled turns.

        Each row's generated tokens (`tool_mask` 1) must be its turns' tokens in order, the last
        turn possibly cut (TRL truncates at `max_completion_length`); a cut turn's dropped tokens
        leave the records (`kept`, and their `token_mask` in the metrics).
        """
        self._loop = None
        self.positions = []
        for i, (ids, mask) in enumerate(zip(completion_ids, tool_mask)):
            positions = [p for p, m in enumerate(mask) if m]
            generated = [ids[p] for p in positions]
            sampled = [t for turn in self.turns[i] for t in turn.tokens()]
            if generated != sampled[: len(generated)]:
                raise RuntimeError(
                    f"Row {i}: TRL's completion holds other tokens than the q* sampler drew for it; the per-token "
                    "log-probabilities would be misplaced. Please report it with your TRL version."
                )
            left = len(generated)
            for turn in self.turns[i]:
                length = len(turn.rollouts.completion_ids[turn.row])
                turn.kept = min(length, left)
                left -= turn.kept
                if turn.kept < length:
                    drop = turn.rollouts.token_mask[turn.row].nonzero().flatten()[turn.kept :]
                    turn.rollouts.token_mask[turn.row, drop] = False
            self.positions.append(positions)

    # -- what the trainer reads ----------------------------------------------------------------

    def values(self, name: str, row: int) -> list[float]:
        """A per-token field over `row`'s generated tokens, all turns in order."""
        out: list[float] = []
        for turn in self.turns[row]:
            values = getattr(turn.rollouts, name)[turn.row]
            out += list(values if turn.kept < 0 else values[: turn.kept])
        return out

    def padded(self, name: str, width: int, device=None) -> torch.Tensor:
        """`[B, width]` float32: a per-token field at each generated token's completion position, 0 at
        tool-result tokens and padding."""
        out = torch.zeros(self.num_rows, width, dtype=torch.float32)
        for i in range(self.num_rows):
            values = torch.tensor(self.values(name, i), dtype=torch.float32)
            positions = torch.arange(len(values)) if self.positions is None else torch.tensor(self.positions[i])
            keep = positions < width
            out[i, positions[keep]] = values[: len(positions)][keep]
        return out.to(device) if device is not None else out


def tool_result_ids(tokenizer, tool_messages: list[dict[str, Any]], **template_kwargs) -> list[int]:
    """The ids a chat template puts after an assistant turn that called tools and before the next
    assistant turn: the tool results, rendered by `tokenizer`'s template, and the next turn's header.

    They are the difference between two renderings of a stand-in conversation, with and without the
    results; the assistant turn ends at its last end-of-turn (EOS) token, and what the template writes
    after it (e.g. a newline) belongs to the results.
    """
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": tool_messages[0].get("name", "tool"), "arguments": {}}}
        ],
    }
    head = [{"role": "user", "content": "?"}, call]
    before = list(tokenizer.apply_chat_template(head, tokenize=True, return_dict=False, **template_kwargs))
    after = list(
        tokenizer.apply_chat_template(
            head + list(tool_messages), tokenize=True, return_dict=False, add_generation_prompt=True, **template_kwargs
        )
    )
    ends = [p for p, t in enumerate(before) if t == tokenizer.eos_token_id]
    if ends:
        before = before[: ends[-1] + 1]
    if after[: len(before)] != before:
        raise ValueError(
            "The teacher's chat template renders an assistant turn differently once tool results follow it, so the "
            "tool results' tokens cannot be cut out for the teacher. Give the teacher a template that renders earlier "
            "turns the same whatever follows (e.g. TRL's `get_training_chat_template`), or leave "
            "`teacher_processing_class` unset to let the teacher read the policy's tokens."
        )
    return after[len(before) :]


class ToolLoopMixin(TrainerHost):
    """Samples TRL's tool-loop continuations by each row's rule (see the module docstring).

    For a TRL trainer whose `_tool_call_loop(prompts, prompt_ids, completion_ids, completions, ...)`
    calls `_generate_single_turn` for the rows that called a tool; mixed in before
    `OptimalSamplingMixin`. The subclass's `_generate_single_turn` calls `_sample_turn`.
    """

    def _tool_call_loop(self, prompts, prompt_ids, completion_ids, completions, *args, **kwargs):
        turns = self._turns
        turns.enter_tool_loop(prompt_ids, completion_ids, completions)
        try:
            result = super()._tool_call_loop(prompts, prompt_ids, completion_ids, completions, *args, **kwargs)
        finally:
            turns._loop = None
        tool_mask, _, final_ids = result[0], result[1], result[2]
        turns.finish(final_ids, tool_mask)
        return result

    def _refuse_sharded_tool_loop(self) -> None:
        """After TRL's init: a sharded forward needs every rank, and each rank's tool loop runs its own turns."""
        if (self.is_fsdp_enabled or self.is_deepspeed_enabled) and self.accelerator.num_processes > 1:
            raise NotImplementedError(
                "Tool calling with a sharded policy (FSDP / DeepSpeed) is not supported: each rank's tool loop runs "
                "its own number of turns, and a sharded forward needs every rank. Use DDP (or one process)."
            )

    def _sample_turn(self, prompt_ids) -> Rollouts:
        """A batch's first turn, or a continuation of the rows that called a tool."""
        turns = self._turns
        if turns is None or not turns.in_tool_loop:
            return self._sample_optimal(prompt_ids)
        rows, suffixes = turns.continuing_rows(prompt_ids)
        teacher_suffixes = suffixes
        if turns.teacher_prompts is not None and not self._teacher_reads_policy_template():
            tokenizer, template = self.teacher_processing_class, self._teacher_tool_template()
            teacher_suffixes = [
                tool_result_ids(tokenizer, turns.tool_messages(i), chat_template=template) for i in rows
            ]
        rollouts = self._draw(prompt_ids, turns.teacher_inputs(rows, teacher_suffixes), turns.on_policy[rows])
        turns.add_turn(rows, teacher_suffixes, rollouts)
        return rollouts

    def _teacher_tool_template(self) -> str | None:
        """The teacher's template for tool results: its own, or TRL's prefix-preserving training version of
        it when its own re-renders earlier turns (as TRL does for the policy)."""
        from trl.chat_template_utils import get_training_chat_template, is_chat_template_prefix_preserving

        tokenizer = self.teacher_processing_class
        if is_chat_template_prefix_preserving(tokenizer):
            return None
        try:
            return get_training_chat_template(tokenizer)
        except ValueError:
            return None  # an unknown template: `tool_result_ids` says what to do if it cannot cut the results

    def _teacher_reads_policy_template(self) -> bool:
        """The teacher's tokenizer renders tool results as the policy's does (then it reads the policy's ids)."""
        teacher = self.teacher_processing_class
        return (
            teacher is self._tokenizer
            or teacher is self.processing_class
            or (getattr(teacher, "chat_template", None) == getattr(self.processing_class, "chat_template", None))
        )
