"""The toy task of the shipped model pair: two-digit addition (and its variants).

Problems are ``a + b`` with ``a`` and ``b`` both in ``10..99`` (8100 ordered pairs), so
answers lie in ``20..198`` and have two or three digits.

Two variants make the regimes of the teacher-payoff experiment (``recipes/teacher_payoff.py``):

- *subtraction* (``op="-"``): ``a - b`` with ``10 <= b <= a <= 99`` (4095 pairs, answers
  ``0..89``). The base never saw the ``-`` operator; the ``arithmetic`` teacher did.
- *worked solutions* (:func:`worked_solution`): the ``scratchpad`` teacher answers an
  addition problem with a fixed-width worked solution before the sum, e.g. ``12+34=`` ->
  ``"2+4=06 1+3+0=04 => 46"``, 21-22 tokens; :func:`final_answer_reward` rewards the last
  number of a completion, so the base's bare ``"46"`` and the worked solution both score.

Prompt formats (both models answer with the same continuation: the decimal digits of
the sum, then the tokenizer's EOS token, e.g. ``"46"`` + ``<|eos|>``):

- ``prompt`` (the base's plain completion prompt): ``"12+34="``.
- ``teacher_prompt`` (the teacher's own format, a chat turn): the tokenizer's chat
  template applied to ``[{"role": "user", "content": prompt}]`` with
  ``add_generation_prompt=True``, i.e. ``"<|user|>\\n12+34=\\n<|assistant|>\\n"``.
  ``TEACHER_PROMPT_TEMPLATE.format(prompt=row["prompt"])`` gives the same string.

No BOS token is prepended to either prompt: the shipped tokenizer adds no special
tokens when encoding, and the models were trained without one.

Splits are fixed by a hash of ``(a, b)``: about 20% of the pairs (``split="test"``,
alias ``"heldout"``) never appear in training; the rest are ``split="train"``.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

__all__ = [
    "EOS_TEXT",
    "OPERATORS",
    "OPERAND_MIN",
    "OPERAND_MAX",
    "TEACHER_PROMPT_TEMPLATE",
    "all_pairs",
    "extract_answer",
    "exact_match_reward",
    "final_answer",
    "final_answer_reward",
    "format_prompt",
    "format_teacher_prompt",
    "make_problems",
    "solve",
    "split_of",
    "worked_solution",
]

OPERAND_MIN = 10
OPERAND_MAX = 99
#: The operators of the toy problems: addition (the shipped pair's task) and subtraction.
OPERATORS = ("+", "-")

#: str.format template with one field, ``{prompt}`` (the base's plain prompt), that
#: gives the teacher's prompt. It equals the shipped tokenizer's chat template applied
#: to one user message with ``add_generation_prompt=True``.
TEACHER_PROMPT_TEMPLATE = "<|user|>\n{prompt}\n<|assistant|>\n"

_HELDOUT_BUCKETS = 2  # out of 10 -> ~20% held out
_SPLIT_ALIASES = {
    "train": "train",
    "test": "test",
    "heldout": "test",
    "held_out": "test",
    "held-out": "test",
    "validation": "test",
}


def format_prompt(a: int, b: int, op: str = "+") -> str:
    """The base's plain prompt for ``a + b`` (or ``a - b``), e.g. ``"12+34="``."""
    _check_operator(op)
    return f"{a}{op}{b}="


def solve(a: int, b: int, op: str = "+") -> int:
    """The answer to ``a op b``."""
    _check_operator(op)
    return a + b if op == "+" else a - b


def worked_solution(a: int, b: int) -> str:
    """The scratchpad teacher's answer to ``a + b``: units, then tens with the carry, then the sum.

    Every partial sum is written with two digits, so the text has a fixed shape::

        >>> worked_solution(12, 34)
        '2+4=06 1+3+0=04 => 46'
        >>> worked_solution(49, 77)
        '9+7=16 4+7+1=12 => 126'
    """
    units = a % 10 + b % 10
    carry = units // 10
    tens = a // 10 + b // 10 + carry
    return f"{a % 10}+{b % 10}={units:02d} {a // 10}+{b // 10}+{carry}={tens:02d} => {a + b}"


def _check_operator(op: str) -> None:
    if op not in OPERATORS:
        raise ValueError(f"unknown operator {op!r}: the toy problems use {OPERATORS}")


def format_teacher_prompt(prompt: str) -> str:
    """The teacher's prompt for a base prompt (see :data:`TEACHER_PROMPT_TEMPLATE`)."""
    return TEACHER_PROMPT_TEMPLATE.format(prompt=prompt)


def split_of(a: int, b: int, op: str = "+") -> str:
    """``"train"`` or ``"test"`` for the problem ``a op b``, fixed by a SHA-256 hash."""
    _check_operator(op)
    digest = hashlib.sha256(f"{a}{op}{b}".encode()).digest()
    return "test" if digest[0] % 10 < _HELDOUT_BUCKETS else "train"


def all_pairs(split: str = "train", op: str = "+") -> list[tuple[int, int]]:
    """Every ``(a, b)`` pair of one split, in a fixed order (for ``"-"``: ``b <= a``)."""
    key = _normalise_split(split)
    return [
        (a, b)
        for a in range(OPERAND_MIN, OPERAND_MAX + 1)
        for b in range(OPERAND_MIN, OPERAND_MAX + 1)
        if (op == "+" or b <= a) and split_of(a, b, op) == key
    ]


def _normalise_split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown split {split!r}: use 'train' or 'test' (alias 'heldout')") from None


def make_problems(n: int, seed: int, split: str = "train", op: str = "+") -> list[dict]:
    """``n`` addition (or subtraction, ``op="-"``) problems of one split, drawn deterministically from ``seed``.

    Each row has ``prompt`` (base format), ``teacher_prompt`` (teacher format),
    ``answer`` (the result as a string) and the operands ``a`` and ``b``. Problems are
    distinct while ``n`` is at most the split's size (addition: 6000+ train, ~1600 test;
    subtraction: ~3300 train, ~800 test); beyond that the split is cycled through again in
    a new shuffled order.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pairs = all_pairs(split, op)
    salt = "" if op == "+" else f"-{op}"  # addition keeps the draws it always had
    rng = random.Random(f"{seed}-{_normalise_split(split)}{salt}")
    chosen: list[tuple[int, int]] = []
    while len(chosen) < n:
        order = pairs[:]
        rng.shuffle(order)
        chosen.extend(order[: n - len(chosen)])
    rows = []
    for a, b in chosen:
        prompt = format_prompt(a, b, op)
        rows.append(
            {
                "prompt": prompt,
                "teacher_prompt": format_teacher_prompt(prompt),
                "answer": str(solve(a, b, op)),
                "a": a,
                "b": b,
            }
        )
    return rows


#: The EOS token's text in the shipped tokenizer.
EOS_TEXT = "<|eos|>"
_ANSWER_RE = re.compile(r"^\s*(\d+)\s*$")
_SPECIAL_RE = re.compile(r"<\|[a-z_]+\|>")


def _completion_text(completion: Any) -> str | None:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content")
        return content if isinstance(content, str) else None
    if isinstance(completion, (list, tuple)):
        # Chat form: the last assistant message (or the last message) holds the answer.
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        chosen = assistant or messages
        if not chosen:
            return None
        content = chosen[-1].get("content")
        if isinstance(content, list):  # multimodal-style [{"type": "text", "text": ...}]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content if isinstance(content, str) else None
    return None


def extract_answer(text: Any) -> str | None:
    """The integer answer in a completion, or ``None`` when it is malformed.

    A well-formed completion is the digits of the answer, optionally surrounded by
    whitespace and optionally followed by the EOS text ``<|eos|>`` (the text after the
    first ``<|eos|>`` is ignored; any other special token such as ``<|user|>`` before it
    makes the completion malformed).
    Leading zeros are removed (``"046"`` -> ``"46"``). Anything else - extra words,
    a second number, an empty string - is malformed. Chat-message lists are accepted.
    """
    text = _completion_text(text)
    if text is None:
        return None
    text = text.split(EOS_TEXT, 1)[0]  # anything after the first EOS is ignored
    if _SPECIAL_RE.search(text):  # another special token inside the answer
        return None
    match = _ANSWER_RE.match(text)
    if match is None:
        return None
    return str(int(match.group(1)))


def exact_match_reward(completions: list, answer: list, **kwargs: Any) -> list[float]:
    """TRL-style reward: 1.0 where the completion's answer equals ``answer``, else 0.0.

    ``completions`` are strings or chat message lists
    (``[{"role": "assistant", "content": "46"}]``); ``answer`` is the dataset column
    (a list of strings or ints, one per completion). Extra keyword arguments (``prompts``,
    other columns, ``trainer_state``...) are ignored.
    """
    if isinstance(answer, (str, int)):
        answer = [answer] * len(completions)
    if len(answer) != len(completions):
        raise ValueError(f"exact_match_reward got {len(completions)} completions but {len(answer)} answers")
    rewards = []
    for completion, expected in zip(completions, answer):
        got = extract_answer(completion)
        want = extract_answer(str(expected))
        rewards.append(1.0 if got is not None and got == want else 0.0)
    return rewards


_LAST_NUMBER_RE = re.compile(r"(\d+)\D*$")


def final_answer(text: Any) -> str | None:
    """The last number of a completion (before its first ``<|eos|>``), or ``None``.

    A completion with another special token before EOS, or with no digit, has no answer.
    This is how worked solutions are graded: ``"2+4=06 1+3+0=04 => 46"`` answers ``"46"``,
    and so does the bare ``"46"``.
    """
    text = _completion_text(text)
    if text is None:
        return None
    text = text.split(EOS_TEXT, 1)[0]
    if _SPECIAL_RE.search(text):
        return None
    match = _LAST_NUMBER_RE.search(text)
    return None if match is None else str(int(match.group(1)))


def final_answer_reward(completions: list, answer: list, **kwargs: Any) -> list[float]:
    """TRL-style reward: 1.0 where the completion's last number equals ``answer``, else 0.0.

    The reward of the worked-solution regime: the format is free, only the final number
    counts (:func:`final_answer`). Arguments as for :func:`exact_match_reward`.
    """
    if isinstance(answer, (str, int)):
        answer = [answer] * len(completions)
    if len(answer) != len(completions):
        raise ValueError(f"final_answer_reward got {len(completions)} completions but {len(answer)} answers")
    return [
        1.0 if (got := final_answer(c)) is not None and got == extract_answer(str(want)) else 0.0
        for c, want in zip(completions, answer)
    ]
