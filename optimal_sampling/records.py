"""The records every front produces and the checks every front makes: a neutral room below the fronts.

The transformers front (processor, `optimal_generate`, the fast path), the vLLM coordinators
(`servers/`, `engines/`) and the trainers all return these records and run these checks, so
they live here rather than in one of the fronts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence, cast

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

# The per-token diagnostics every decode loop records (`MixtureDiagnostics` field names).
RECORDED_DIAGNOSTICS = ("kl_theta", "kl_t", "kl_diff", "ess_ratio", "entropy_q", "chernoff")


@dataclass
class OptimalSamplingRecord:
    """Per-token records of a q* generation, `[B, T]` tensors over the T generated positions.

    Attributes:
        alpha: α used at each position.
        logq: log q(y_t) of the sampled token under the distribution actually sampled.
        logp_theta: log π_θ(y_t) (after temperature, full vocabulary).
        logp_t: log π_t(y_t).
        token_mask: True for the tokens a row really generated (up to and including its
            first stop token); False for the padding `generate` adds after a row stopped.
        diagnostics: name → `[B, T]` (kl_theta, kl_t, kl_diff, ess_ratio, entropy_q,
            chernoff, iterations, empty_support, converged).
    """

    alpha: torch.Tensor
    logq: torch.Tensor
    logp_theta: torch.Tensor
    logp_t: torch.Tensor
    token_mask: torch.Tensor
    diagnostics: dict[str, torch.Tensor]


@dataclass
class OptimalGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate`'s usual output plus the per-token q* records (`[B, T]` tensors).

    `alpha`, `logq`, `logp_theta`, `logp_t` and `token_mask` are as in
    `OptimalSamplingRecord`; `diagnostics` maps names to `[B, T]` tensors.
    """

    alpha: torch.Tensor | None = None
    logq: torch.Tensor | None = None
    logp_theta: torch.Tensor | None = None
    logp_t: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    diagnostics: dict[str, torch.Tensor] | None = None


@dataclass
class GenerationOutput:
    """One sample of q* with everything training code needs.

    Attributes:
        prompt: the base prompt (a string, or the chat messages as given).
        teacher_prompt: the prompt the teacher saw.
        generated_text: the decoded completion (special tokens skipped).
        generated_tokens: the completion's token ids, including the stop token if one was sampled.
        alpha_history: α at each generated token.
        logq: log q(y_t) under the distribution actually sampled, per token.
        logp_theta: log π_θ(y_t) (after temperature), per token.
        logp_t: log π_t(y_t) (after temperature), per token.
        diagnostics: means over the generated tokens (alpha_mean/std/min/max, kl_theta_mean,
            kl_t_mean, kl_diff_mean, ess_ratio_mean (ESS_θ(q)/ESS_t(q), 1 when balanced),
            ess_ratio_log_mean (the mean of its log, robust to its heavy tail), entropy_q_mean,
            chernoff_mean, iterations_mean, empty_support_tokens, num_tokens), or None.
        error: None, or what went wrong for this sample (its other fields are then empty).
    """

    prompt: Any
    generated_text: str = ""
    generated_tokens: list[int] = field(default_factory=list)
    alpha_history: list[float] = field(default_factory=list)
    logq: list[float] = field(default_factory=list)
    logp_theta: list[float] = field(default_factory=list)
    logp_t: list[float] = field(default_factory=list)
    diagnostics: dict[str, float] | None = None
    error: str | None = None
    teacher_prompt: Any = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_tokens(alpha: Sequence[float], per_token: dict[str, Sequence[float]]) -> dict[str, float]:
    """Per-sample diagnostics from per-token values (only tokens actually generated)."""
    alpha_t = torch.tensor(list(alpha), dtype=torch.float64)
    n = alpha_t.numel()
    summary = {"num_tokens": float(n)}
    if n == 0:
        return summary
    summary.update(
        alpha_mean=float(alpha_t.mean()),
        alpha_std=float(alpha_t.std(unbiased=False)),
        alpha_min=float(alpha_t.min()),
        alpha_max=float(alpha_t.max()),
    )
    for name, values in per_token.items():
        values_t = torch.tensor(list(values), dtype=torch.float64)
        if name == "empty_support":
            summary["empty_support_tokens"] = float(values_t.sum())
        else:
            summary[f"{name}_mean"] = float(values_t.mean())
        if name == "ess_ratio":  # heavy-tailed (single tokens reach 100s): its log averages well
            summary["ess_ratio_log_mean"] = float(values_t.log().mean())
    return summary


def generated_token_mask(generated: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """`[B, T]` True up to and including each row's first stop token."""
    if not stop_ids:
        return torch.ones_like(generated, dtype=torch.bool)
    is_stop = torch.isin(generated, torch.tensor(stop_ids, device=generated.device))
    stops_before = is_stop.long().cumsum(dim=-1) - is_stop.long()
    return stops_before == 0


def as_id_list(ids: int | Sequence[int] | torch.Tensor | None) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        return [int(i) for i in ids.flatten().tolist()]
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def first_or_none(ids) -> int | None:
    ids = as_id_list(ids)
    return ids[0] if ids else None


def model_eos_ids(model: torch.nn.Module) -> list[int]:
    """The EOS ids a model's generation config (or config) declares, as a list."""
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def check_same_device(base_device: torch.device, teacher: torch.nn.Module) -> None:
    teacher_device = next(teacher.parameters()).device
    if torch.device(base_device) != teacher_device:
        raise ValueError(
            f"The base model's inputs are on {base_device} but the teacher is on {teacher_device}. "
            f"Put both models on one device, e.g. `teacher.to({str(base_device)!r})`."
        )


def check_same_vocabulary(tokenizer, teacher_tokenizer) -> None:
    """Raise unless the two tokenizers map every token to the same id."""
    if teacher_tokenizer is tokenizer:
        return
    vocab, teacher_vocab = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if vocab != teacher_vocab:
        only_base = len(set(vocab.items()) - set(teacher_vocab.items()))
        only_teacher = len(set(teacher_vocab.items()) - set(vocab.items()))
        raise ValueError(
            f"The base and teacher tokenizers have different vocabularies ({len(vocab)} vs {len(teacher_vocab)} "
            f"tokens; {only_base} (token, id) pairs only in the base's, {only_teacher} only in the teacher's). "
            "q* mixes the two models token by token, so they must share one tokenizer: pick a teacher from "
            "the same model family."
        )


def prompt_token_ids(prompt, tokenizer, where: str = "prompt") -> list[int]:
    """Token ids of a prompt: a string is tokenized as is, a chat message list through the
    tokenizer's chat template (with the generation prompt), and a list of ints is taken as
    token ids already. `where` names the prompt in errors."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"{where} is an empty string; every prompt needs at least one token.")
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    elif isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        if not prompt:
            raise ValueError(f"{where} is an empty message list.")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"{where} is a chat message list but the tokenizer has no chat template.")
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        raise TypeError(
            f"{where} must be a string, a list of chat messages ({{'role': ..., 'content': ...}}) or a list of token ids."
        )
    if len(ids) == 0:
        raise ValueError(f"{where} tokenizes to no tokens.")
    return list(ids)


def output_width(model: torch.nn.Module) -> int:
    """Rows of a causal LM's output layer (its logits' width; may exceed the tokenizer's size)."""
    head = cast(Any, model).get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(cast(Any, model).config.vocab_size)
