"""The small model pair that ships with optimal-sampling (works offline).

Two Llama models (about 0.5 M parameters, 2 MB each in fp32) trained from scratch on
two-digit addition (see :mod:`optimal_sampling.toy.task`) with one shared byte-level
BPE tokenizer:

- ``base``: weak (about 30% exact match on held-out problems at temperature 1); it
  answers the plain prompt ``"12+34="``.
- ``teacher``: strong (about 100%); its own prompt is the chat format
  ``"<|user|>\\n12+34=\\n<|assistant|>\\n"`` (it also answers the plain prompt).

Both continue with the digits of the sum and then EOS, so they score the same
continuation tokens. ``recipes/train_toy_pair.py`` rebuilds the assets;
``assets/TRAINING.md`` records how they were built and their measured accuracies.

Two more teachers, of the same architecture and tokenizer, make the regimes of the
teacher-payoff experiment (``load_toy_pair(teacher=...)``, :data:`TEACHER_DIRS`):

- ``"arithmetic"``: addition and subtraction (``57-23=`` -> ``34``); the base never saw ``-``;
- ``"scratchpad"``: addition answered with a worked solution
  (:func:`~optimal_sampling.toy.task.worked_solution`), graded by
  :func:`~optimal_sampling.toy.task.final_answer_reward`.
"""

from __future__ import annotations

from pathlib import Path

from .task import (
    EOS_TEXT,
    OPERAND_MAX,
    OPERAND_MIN,
    OPERATORS,
    TEACHER_PROMPT_TEMPLATE,
    all_pairs,
    exact_match_reward,
    extract_answer,
    final_answer,
    final_answer_reward,
    format_prompt,
    format_teacher_prompt,
    make_problems,
    solve,
    split_of,
    worked_solution,
)

__all__ = [
    "BASE_DIR",
    "EOS_TEXT",
    "OPERAND_MAX",
    "OPERAND_MIN",
    "OPERATORS",
    "TEACHER_DIR",
    "TEACHER_DIRS",
    "TEACHER_PROMPT_TEMPLATE",
    "TOKENIZER_DIR",
    "TOY_PAIR_DIR",
    "all_pairs",
    "exact_match_reward",
    "extract_answer",
    "final_answer",
    "final_answer_reward",
    "format_prompt",
    "format_teacher_prompt",
    "load_toy_pair",
    "make_problems",
    "solve",
    "split_of",
    "worked_solution",
]

#: Folder of the shipped assets: ``base/``, ``teacher/`` (each a full model folder with
#: the tokenizer files beside the weights, as vLLM needs) and ``tokenizer/``.
TOY_PAIR_DIR = Path(__file__).resolve().parent / "assets"
BASE_DIR = TOY_PAIR_DIR / "base"
TEACHER_DIR = TOY_PAIR_DIR / "teacher"
TOKENIZER_DIR = TOY_PAIR_DIR / "tokenizer"
#: Every shipped teacher by its task: the pair's own (``"addition"``) and the two of the
#: teacher-payoff regimes.
TEACHER_DIRS = {
    "addition": TEACHER_DIR,
    "arithmetic": TOY_PAIR_DIR / "teacher_arithmetic",
    "scratchpad": TOY_PAIR_DIR / "teacher_scratchpad",
}


def _check_assets(teacher_dir: Path = TEACHER_DIR) -> None:
    missing = [
        str(d / f)
        for d in (BASE_DIR, teacher_dir, TOKENIZER_DIR)
        for f in (("config.json", "model.safetensors") if d != TOKENIZER_DIR else ())
        + ("tokenizer.json", "tokenizer_config.json")
        if not (d / f).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            "the toy model pair's files are missing from the installed package: "
            + ", ".join(missing)
            + ". Reinstall optimal-sampling (the wheel must include package data "
            "'optimal_sampling/toy/assets/**'), or rebuild them with "
            "`python recipes/train_toy_pair.py`."
        )


def load_toy_pair(device="cpu", teacher: str = "addition"):
    """Load ``(base_model, teacher_model, tokenizer)`` from the package data.

    ``teacher`` picks one of :data:`TEACHER_DIRS` (default: the pair's own addition teacher).
    Both models are fp32 ``LlamaForCausalLM`` in eval mode on ``device``; the
    tokenizer pads on the left and adds no special tokens when encoding. Nothing is
    downloaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if teacher not in TEACHER_DIRS:
        raise ValueError(f"unknown toy teacher {teacher!r}: choose one of {sorted(TEACHER_DIRS)}")
    _check_assets(TEACHER_DIRS[teacher])
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
    tokenizer.padding_side = "left"
    models = []
    for directory in (BASE_DIR, TEACHER_DIRS[teacher]):
        model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype="float32")
        models.append(model.to(device).eval())
    base, teacher_model = models
    return base, teacher_model, tokenizer
