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
"""

from __future__ import annotations

from pathlib import Path

from .task import (
    EOS_TEXT,
    OPERAND_MAX,
    OPERAND_MIN,
    TEACHER_PROMPT_TEMPLATE,
    all_pairs,
    exact_match_reward,
    extract_answer,
    format_prompt,
    format_teacher_prompt,
    make_problems,
    split_of,
)

__all__ = [
    "BASE_DIR",
    "EOS_TEXT",
    "OPERAND_MAX",
    "OPERAND_MIN",
    "TEACHER_DIR",
    "TEACHER_PROMPT_TEMPLATE",
    "TOKENIZER_DIR",
    "TOY_PAIR_DIR",
    "all_pairs",
    "exact_match_reward",
    "extract_answer",
    "format_prompt",
    "format_teacher_prompt",
    "load_toy_pair",
    "make_problems",
    "split_of",
]

#: Folder of the shipped assets: ``base/``, ``teacher/`` (each a full model folder with
#: the tokenizer files beside the weights, as vLLM needs) and ``tokenizer/``.
TOY_PAIR_DIR = Path(__file__).resolve().parent / "assets"
BASE_DIR = TOY_PAIR_DIR / "base"
TEACHER_DIR = TOY_PAIR_DIR / "teacher"
TOKENIZER_DIR = TOY_PAIR_DIR / "tokenizer"


def _check_assets() -> None:
    missing = [
        str(d / f)
        for d in (BASE_DIR, TEACHER_DIR, TOKENIZER_DIR)
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


def load_toy_pair(device="cpu"):
    """Load ``(base_model, teacher_model, tokenizer)`` from the package data.

    Both models are fp32 ``LlamaForCausalLM`` in eval mode on ``device``; the
    tokenizer pads on the left and adds no special tokens when encoding. Nothing is
    downloaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_assets()
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
    tokenizer.padding_side = "left"
    models = []
    for directory in (BASE_DIR, TEACHER_DIR):
        model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype="float32")
        models.append(model.to(device).eval())
    base, teacher = models
    return base, teacher, tokenizer
