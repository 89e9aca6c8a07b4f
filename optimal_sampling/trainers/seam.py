"""The TRL internals the optimal-sampling trainers rely on, checked at trainer init and in tests.

TRL's private generation API has changed shape five times between 0.24 and 1.16, so every
private name, signature and source-level assumption we depend on is listed here, in one
place. `check_trl_seam` raises, naming each broken assumption, instead of letting an upgrade
train silently on uncorrected samples.

The table holds for TRL 1.14.2 to 1.16 (checked against each release's wheel; CI trains under
the oldest and the newest). The one difference inside that range is a keyword of
`unwrap_model_for_generation` that 1.16 added (`generation_unwrap_kwargs`). TRL 1.14.0 and
1.14.1 set `eos_token_ids` elsewhere and import `requests` without declaring it; 1.13 and older
call `_generate_single_turn` without `num_generations`.
"""

from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass

import trl
from packaging.version import Version

#: TRL versions the trainers were tested with (also pinned in pyproject's `[trl]` extra).
TESTED_TRL_RANGE = (Version("1.14.2"), Version("1.17.0"))


@dataclass(frozen=True)
class SeamPoint:
    """One assumption about TRL: `owner.name` has `parameters`, and its source contains `snippets`."""

    owner: str
    name: str
    parameters: tuple[str, ...] | None = None
    snippets: tuple[str, ...] = ()
    why: str = ""


GRPO_SEAM = (
    SeamPoint(
        "GRPOTrainer",
        "_generate_single_turn",
        ("self", "prompt_ids", "images", "multimodal_fields", "num_generations", "has_tool_images"),
        ("return completion_ids, logprobs",),
        "overridden: the only place completion tokens are produced; returns log q per token",
    ),
    SeamPoint(
        "GRPOTrainer",
        "_generate",
        ("self", "prompts"),
        ("self._generate_single_turn(", "self._tokenize_prompts(prompts)", "= self._tool_call_loop("),
        "calls our `_generate_single_turn` once per batch, rows in the order of `inputs`",
    ),
    SeamPoint(
        "GRPOTrainer",
        "_tool_call_loop",
        ("self", "prompts", "prompt_ids", "completion_ids", "completions", "logprobs", "images", "multimodal_fields"),
        (
            "self._generate_single_turn(",
            "num_generations=1",
            "prompt_ids[idx_with_tool] + completion_ids[idx_with_tool] + suffix_ids",
            "completions[idx_with_tool].append(tool_message)",
            "del completions[idx_with_tool][completions_len_before[idx] :]",
            "completion_ids[idx_with_tool] = pct[prompt_length:] + post_tool_ids[idx]",
            "tool_mask[idx_with_tool] += [0] * tool_length + [1] * post_tool_length",
            "return tool_mask, completions, completion_ids, logprobs",
        ),
        "wrapped: it continues the rows that called a tool, in batch order, as prompt + completion + tool "
        "result, updating its `completion_ids` and `completions` lists in place; `optimal_sampling.trainers.turns` maps each "
        "continuation back to its row from them and checks the final completions against what was sampled",
    ),
    SeamPoint(
        "GRPOTrainer",
        "_generate_and_score_completions",
        ("self", "inputs"),
        (
            'prompts = [x["prompt"] for x in inputs]',
            "= self._generate(prompts)",
            "self.use_vllm and self.vllm_importance_sampling_correction",
            "torch.exp(logps_diff)",
            "rewards_per_func = self._calculate_rewards(inputs, prompts, completions, completion_ids_list)",
            "rewards.view(-1, num_generations)",
            "self.accelerator.process_index * len(prompts)",
            'output["old_per_token_logps"] = old_per_token_logps',
            'output["sampling_per_token_logps"] = sampling_per_token_logps',
            '"sampling/importance_sampling_ratio/mean"',
        ),
        "wrapped to see the dataset rows (teacher prompts) and log rollout metrics; its IS ratio "
        "exp(old_logp - sampling_logp) is gated on `use_vllm`",
    ),
    SeamPoint(
        "GRPOTrainer",
        "_compute_loss",
        ("self", "model", "inputs"),
        (
            "if self.use_vllm and self.vllm_importance_sampling_correction",
            'per_token_loss * inputs["importance_sampling_ratio"]',
        ),
        "wrapped to set the correction flag per batch; multiplies the per-token loss by the q* weights",
    ),
    SeamPoint(
        "GRPOTrainer",
        "_calculate_rewards",
        ("self", "inputs", "prompts", "completions", "completion_ids_list"),
        ("rewards_per_func = torch.zeros(len(prompts), len(self.reward_funcs)",),
        "wrapped to keep the gathered per-row rewards, which the q* baselines and metrics need",
    ),
    SeamPoint(
        "GRPOTrainer",
        "log",
        ("self", "logs", "start_time"),
        ("self._metrics[mode]",),
        "averages `self._metrics[mode][key]` lists into the logs",
    ),
    SeamPoint(
        "GRPOTrainer",
        "__init__",
        None,
        (
            "self.use_vllm = args.use_vllm",
            "self.eos_token_ids = eos_token_ids",
            "self._is_vlm = ",
            "self._dist = DistributedBackend(self.accelerator)",
            "self.ref_model = prepare_fsdp(self.ref_model, self.accelerator)",
        ),
        "attributes we read or flip after init; the reference-model placement we copy for the teacher",
    ),
)

RLOO_SEAM = (
    SeamPoint(
        "RLOOTrainer",
        "_generate_single_turn",
        ("self", "prompt_ids", "images", "multimodal_fields"),
        ("return completion_ids",),
        "overridden: returns q* completion ids (log q is kept on the trainer)",
    ),
    SeamPoint(
        "RLOOTrainer",
        "_generate_and_score_completions",
        ("self", "inputs"),
        (
            'prompts = [x["prompt"] for x in inputs]',
            "old_logps = (old_per_token_logps * completion_mask).sum(1)",
            "rewards_per_func = self._calculate_rewards(inputs, prompts, completions, completion_ids_list)",
            "baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)",
            "self.accelerator.process_index * len(prompts)",
            '"old_logps": old_logps',
            '"advantages": advantages',
        ),
        "wrapped: the leave-one-out advantages are re-centred on the chosen baseline and multiplied by the "
        "sequence weight of the q* rows",
    ),
    SeamPoint(
        "RLOOTrainer",
        "_calculate_rewards",
        ("self", "inputs", "prompts", "completions", "completion_ids_list"),
        ("rewards_per_func = torch.zeros(len(prompts), len(self.reward_funcs)",),
        "wrapped to keep the gathered per-row rewards (which rows are scorable; metrics)",
    ),
    SeamPoint(
        "RLOOTrainer",
        "_compute_loss",
        ("self", "model", "inputs"),
        ('old_logps = inputs["old_logps"]', "per_sequence_loss1 = coef_1 * advantages"),
        "the sequence-level clipped loss is linear in the advantage",
    ),
)

DISTILLATION_SEAM = (
    SeamPoint(
        "DistillationTrainer",
        "_generate_single_turn",
        ("self", "prompt_ids", "images", "multimodal_fields", "has_tool_images"),
        ("return completion_ids",),
        "overridden: the only place completion tokens are produced",
    ),
    SeamPoint(
        "DistillationTrainer",
        "_generate",
        ("self", "prompts"),
        (
            "self._generate_single_turn(prompt_ids, images, multimodal_fields)",
            "self._tokenize_prompts(prompts)",
            "= self._tool_call_loop(prompts, prompt_ids, completion_ids, completions, images, multimodal_fields)",
        ),
        "calls our `_generate_single_turn` once per batch, rows in the order of `inputs`, then the tool loop",
    ),
    SeamPoint(
        "DistillationTrainer",
        "_tool_call_loop",
        ("self", "prompts", "prompt_ids", "completion_ids", "completions", "images", "multimodal_fields"),
        (
            "self._generate_single_turn(",
            "prompt_ids[idx_with_tool] + completion_ids[idx_with_tool] + suffix_ids",
            "completions[idx_with_tool].append(tool_message)",
            "del completions[idx_with_tool][completions_len_before[idx] :]",
            "completion_ids[idx_with_tool] = pct[prompt_length:] + post_tool_ids[idx]",
            "tool_mask[idx_with_tool] += [0] * tool_length + [1] * post_tool_length",
            "return tool_mask, completions, completion_ids, ",
        ),
        "wrapped as GRPO's (`optimal_sampling.trainers.turns`): it continues the rows that called a tool, in batch order, as "
        "prompt + completion + tool result, through `_generate_single_turn`, updating its lists in place",
    ),
    SeamPoint(
        "DistillationTrainer",
        "_generate_and_score_completions",
        ("self", "inputs"),
        ('prompts = [x["prompt"] for x in inputs]', "= self._generate(prompts)", "return output"),
        "wrapped to see the dataset rows (teacher prompts) and to add the teacher's prompt to the batch",
    ),
    SeamPoint(
        "DistillationTrainer",
        "_compute_loss",
        ("self", "unwrapped_student", "inputs", "num_items_in_batch"),
        (
            'input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)',
            'logits_to_keep = inputs["completion_ids"].size(1)',
            "teacher_hidden_states = self._forward_redirection(",
            "self._get_last_hidden_state,\n                unwrapped_teacher,",
        ),
        "wrapped: the teacher's hidden states come from `_get_last_hidden_state(unwrapped_teacher, prompt + "
        "completion, ...)`, whose last `logits_to_keep` positions are the completion",
    ),
    SeamPoint(
        "DistillationTrainer",
        "_get_last_hidden_state",
        None,
        ("last_hidden_state[:, -logits_to_keep:, :]",),
        "overridden for the teacher: its own prompt (or, with tools, its own conversation) replaces the student's",
    ),
    SeamPoint(
        "DistillationTrainer",
        "__init__",
        None,
        (
            "self.eos_token_ids = eos_token_ids",
            "self._dist = DistributedBackend(self.accelerator)",
            "self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)",
        ),
        "attributes we read; the teacher TRL places is the one the sampler uses",
    ),
)

SEAMS = {"grpo": GRPO_SEAM, "rloo": RLOO_SEAM, "distillation": DISTILLATION_SEAM}

#: Every `self.use_vllm` read in `GRPOTrainer` (TRL 1.14.2-1.16). The trainer flips the flag after
#: init to switch on TRL's IS correction; a new reader could start a vLLM-only code path
#: (weight sync, an engine call), so any change in this count needs a fresh audit.
GRPO_USE_VLLM_READS = 10

#: TRL functions we call: (module, name, their parameters, parameters some tested releases lack).
_FUNCTIONS = (
    (
        "trl.models",
        "unwrap_model_for_generation",
        ("model", "accelerator", "gather_deepspeed3_params", "generation_kwargs"),
        ("gradient_checkpointing_kwargs",),  # TRL 1.16
    ),
    ("trl.models", "prepare_deepspeed", ("model", "accelerator"), ()),
    ("trl.models", "prepare_fsdp", ("model", "accelerator"), ()),
)


def _source(obj) -> str:
    return inspect.getsource(obj)


def seam_problems(trainer: str = "grpo") -> list[str]:
    """Every broken assumption about the installed TRL, as readable lines (empty when all hold)."""
    import importlib

    problems = []
    points = SEAMS[trainer]
    for point in points:
        owner = getattr(trl, point.owner, None)
        member = getattr(owner, point.name, None) if owner is not None else None
        where = f"trl.{point.owner}.{point.name}"
        if member is None:
            problems.append(f"{where} is missing ({point.why}).")
            continue
        if point.parameters is not None:
            got = tuple(inspect.signature(member).parameters)
            if got != point.parameters:
                problems.append(f"{where} has parameters {got}, expected {point.parameters} ({point.why}).")
        source = _source(member)
        for snippet in point.snippets:
            if snippet not in source:
                problems.append(f"{where} no longer contains `{snippet}` ({point.why}).")
    if trainer == "grpo":
        reads = len(re.findall(r"self\.use_vllm\b(?!\s*=[^=])", _source(trl.GRPOTrainer)))
        if reads != GRPO_USE_VLLM_READS:
            problems.append(
                f"trl.GRPOTrainer reads `self.use_vllm` {reads} times, expected {GRPO_USE_VLLM_READS}: audit the new "
                "reads before flipping the flag after init."
            )
    for module_name, name, parameters, later in _FUNCTIONS:
        member = getattr(importlib.import_module(module_name), name, None)
        if member is None:
            problems.append(f"{module_name}.{name} is missing.")
            continue
        got = tuple(inspect.signature(member).parameters)
        if got not in (parameters, parameters + later):
            problems.append(f"{module_name}.{name} has parameters {got}, expected {parameters + later}.")
    return problems


def generation_unwrap_kwargs(args) -> dict:
    """Keywords for `trl.models.unwrap_model_for_generation` beyond the model and the accelerator.

    TRL 1.16 takes `gradient_checkpointing_kwargs` and re-enables gradient checkpointing after
    generation with them; 1.14 and 1.15 re-enable it with the defaults, as their own trainers do.
    """
    from trl.models import unwrap_model_for_generation

    kwargs = {"gather_deepspeed3_params": args.ds3_gather_for_generation}
    if "gradient_checkpointing_kwargs" in inspect.signature(unwrap_model_for_generation).parameters:
        kwargs["gradient_checkpointing_kwargs"] = args.gradient_checkpointing_kwargs
    return kwargs


def check_trl_seam(trainer: str = "grpo") -> None:
    """Raise `RuntimeError` if the installed TRL breaks an assumption; warn outside the tested range."""
    problems = seam_problems(trainer)
    low, high = TESTED_TRL_RANGE
    version = Version(trl.__version__)
    if problems:
        raise RuntimeError(
            f"optimal-sampling's trainers were built against trl>={low},<{high}; the installed trl {version} "
            "changed internals they rely on:\n  - " + "\n  - ".join(problems) + "\nInstall a tested version: "
            f"pip install 'trl>={low},<{high}'."
        )
    if not low <= version < high:
        warnings.warn(
            f"trl {version} is outside the tested range >={low},<{high}; the seam checks pass, but results are "
            "untested.",
            stacklevel=3,
        )
