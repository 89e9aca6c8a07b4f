"""The trainer's own q* decode loop: prompts in, completions with log q per token out.

Why not `model.generate(custom_generate=optimal_generate)`? Under FSDP or DeepSpeed ZeRO-3
every forward of a sharded model is a collective, so all ranks must run the same number of
forwards. `generate(synced_gpus=True)` keeps the *base* in step after a rank finishes, but it
skips the logits processors on finished ranks, and the teacher's forward lives in the
processor: the ranks would deadlock. This loop runs both forwards on every rank until every
rank is done (`sync_stop`), and otherwise does what transformers' `_sample` does (one
`torch.multinomial` per step over the softmax of the sampled log-probs, finished rows padded),
so with α = 0 it draws the same tokens as vanilla GRPO's `generate` under the same seed.
Rows flagged `on_policy` are sampled from π_θ itself in the same batch (α = 0 for that row,
log q = log π_θ); the teacher still runs on them, so each of their tokens also carries its
log-probability under q* (which multiple-importance-sampling weights need).

The per-token maths is the package core: `log_probs_from_logits` and `compute_mixture`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from optimal_sampling.mixture import compute_mixture, log_probs_from_logits, token_records
from optimal_sampling.options import QStarOptions
from optimal_sampling.records import RECORDED_DIAGNOSTICS
from optimal_sampling.teacher import TeacherCache


@dataclass
class Rollouts:
    """One batch of q* samples.

    Attributes:
        completion_ids: per row, the sampled ids up to and including the first stop token.
        logq: per row, log q(y_t) of each sampled token under the distribution sampled
            (log π_θ(y_t) on on-policy rows).
        logq_star: per row, log q*(y_t) of each sampled token under the q* mixture, also on
            on-policy rows (equal to `logq` on q* rows).
        on_policy: `[B]` bool, the row was sampled from π_θ (α = 0).
        alpha: `[B, T]` α at each step (T = steps this rank sampled); 0 on on-policy rows.
        token_mask: `[B, T]` True where the row really generated the token.
        diagnostics: name → `[B, T]` (kl_theta, kl_t, kl_diff, ess_ratio, entropy_q, chernoff,
            empty_support).
    """

    completion_ids: list[list[int]]
    logq: list[list[float]]
    logq_star: list[list[float]]
    on_policy: torch.Tensor
    alpha: torch.Tensor
    token_mask: torch.Tensor
    diagnostics: dict[str, torch.Tensor]

    @classmethod
    def from_padded(cls, tokens, token_mask, logq, logq_star, *, on_policy, alpha, diagnostics) -> "Rollouts":
        """From `[B, T]` step records (`token_mask` True where the row generated the token)."""
        lengths = token_mask.sum(-1).tolist()
        rows = lambda x: [x[i, :n].tolist() for i, n in enumerate(lengths)]  # noqa: E731
        return cls(completion_ids=rows(tokens), logq=rows(logq), logq_star=rows(logq_star), on_policy=on_policy,
                   alpha=alpha, token_mask=token_mask, diagnostics=diagnostics)


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, L]` left-padded ids and attention mask from ragged id lists."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row) == 0:
            raise ValueError(f"Prompt {i} has no tokens; every prompt needs at least one.")
        ids[i, width - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample_rollouts(
    base: torch.nn.Module,
    teacher: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    teacher_prompt_ids: Sequence[Sequence[int]] | None,
    max_new_tokens: int,
    pad_token_id: int,
    stop_token_ids: Sequence[int],
    vocab_size: int,
    device: torch.device | str,
    q_star: QStarOptions | None = None,
    on_policy: Sequence[bool] | torch.Tensor | None = None,
    sync_stop: Callable[[bool], bool] | None = None,
) -> Rollouts:
    """Sample one completion per prompt from q* ∝ π_θ^(1-α) · π_t^α, token by token.

    Args:
        base, teacher: causal LMs (already unwrapped / gathered as the caller needs).
        prompt_ids: the base's prompts, one id list per row.
        teacher_prompt_ids: the teacher's own prompts (same rows), or None for the base's.
        max_new_tokens: length cap of a completion.
        pad_token_id: left padding, and the filler after a row stopped.
        stop_token_ids: ids that end a row (both models' EOS).
        vocab_size: the shared vocabulary (`len(tokenizer)`); logit columns beyond it are dropped.
        q_star: the `QStarOptions` (its temperature must equal the trainer's); default: the
            defaults. `force_teacher_first_tokens` applies to the q* rows.
        on_policy: `[B]` bool, rows to sample from π_θ itself (α = 0, log q = log π_θ); None:
            every row samples q*.
        sync_stop: maps "this rank still has running rows" to "some rank still has", e.g. an
            all-reduce; None for a single process. Ranks keep running forwards (with pad
            tokens) until every rank is done.

    Example:
        >>> from optimal_sampling.testing import tiny_causal_lm
        >>> base, teacher = tiny_causal_lm(16, seed=0), tiny_causal_lm(16, seed=1)
        >>> out = sample_rollouts(base, teacher, [[5, 6], [7]], teacher_prompt_ids=None, max_new_tokens=3,
        ...                       pad_token_id=0, stop_token_ids=[2], vocab_size=16, device="cpu")
        >>> [len(ids) == len(lq) <= 3 for ids, lq in zip(out.completion_ids, out.logq)]
        [True, True]
    """
    q_star = q_star or QStarOptions()
    ids, mask = left_pad(prompt_ids, pad_token_id, device)
    if teacher_prompt_ids is None:
        teacher_ids, teacher_mask = ids, mask
    else:
        if len(teacher_prompt_ids) != len(prompt_ids):
            raise ValueError(f"Got {len(prompt_ids)} prompts but {len(teacher_prompt_ids)} teacher prompts.")
        teacher_ids, teacher_mask = left_pad(teacher_prompt_ids, pad_token_id, device)
    base_cache, teacher_cache = TeacherCache(base), TeacherCache(teacher)
    stops = torch.tensor(sorted(set(int(s) for s in stop_token_ids)), device=ids.device)
    batch = ids.shape[0]
    if on_policy is None:
        on_policy = torch.zeros(batch, dtype=torch.bool)
    on_policy = torch.as_tensor(on_policy, dtype=torch.bool).to(ids.device)
    if on_policy.shape != (batch,):
        raise ValueError(f"`on_policy` must hold one flag per prompt ({batch}), got shape {tuple(on_policy.shape)}.")
    generated = ids.new_empty((batch, 0))
    running = torch.ones(batch, dtype=torch.bool, device=ids.device)
    steps: list[dict[str, torch.Tensor]] = []

    for step in range(max_new_tokens):
        local_running = bool(running.any())
        if not (sync_stop(local_running) if sync_stop is not None else local_running):
            break
        ones = torch.ones_like(generated)
        base_logits = base_cache.last_logits(torch.cat([ids, generated], 1), torch.cat([mask, ones], 1))
        teacher_logits = teacher_cache.last_logits(
            torch.cat([teacher_ids, generated], 1), torch.cat([teacher_mask, ones], 1)
        )
        if not local_running:  # only keeping the other ranks' collectives company
            generated = torch.cat([generated, generated.new_full((batch, 1), pad_token_id)], 1)
            continue
        logp_theta = log_probs_from_logits(base_logits, q_star.temperature, vocab_size)  # [B, V]
        logp_t = log_probs_from_logits(teacher_logits, q_star.temperature, vocab_size)  # [B, V]
        forced = torch.full((batch,), step < q_star.force_teacher_first_tokens, device=logp_theta.device)
        mix = compute_mixture(logp_theta, logp_t, q_star, forced=forced if q_star.force_teacher_first_tokens else None)
        logq = torch.where(on_policy.unsqueeze(-1), logp_theta, mix.logq)  # [B, V]: what each row samples
        # As transformers' `_sample`: one multinomial draw over softmax(scores) per step.
        next_tokens = torch.multinomial(torch.softmax(logq, dim=-1), num_samples=1).squeeze(1)
        next_tokens = torch.where(running, next_tokens, torch.full_like(next_tokens, pad_token_id))
        record = token_records(mix, next_tokens.clamp(max=vocab_size - 1), logp_theta, logp_t, sampled_logq=logq)
        entry = {name: record[name].float() for name in ("logq", "logq_star", "empty_support", *RECORDED_DIAGNOSTICS)}
        entry.update(mask=running.clone(), alpha=torch.where(on_policy, 0.0, mix.alpha.float()))
        steps.append(entry)
        generated = torch.cat([generated, next_tokens[:, None]], 1)
        running = running & ~torch.isin(next_tokens, stops)

    if not steps:
        raise RuntimeError("max_new_tokens must be >= 1 to sample a completion.")
    stacked = {name: torch.stack([s[name] for s in steps], dim=1) for name in steps[0]}  # [B, T] each
    token_mask = stacked.pop("mask")
    return Rollouts.from_padded(
        generated[:, : token_mask.shape[1]], token_mask, stacked.pop("logq"), stacked.pop("logq_star"),
        on_policy=on_policy, alpha=stacked.pop("alpha"), diagnostics=stacked,
    )
