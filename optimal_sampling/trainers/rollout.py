"""The trainer's rollouts: prompts in, completions with log q per token out.

Why not `model.generate(custom_generate=optimal_generate)`? Under FSDP or DeepSpeed ZeRO-3
every forward of a sharded model is a collective, so all ranks must run the same number of
forwards. `generate(synced_gpus=True)` keeps the *base* in step after a rank finishes, but it
skips the logits processors on finished ranks, and the teacher's forward lives in the
processor: the ranks would deadlock. The package's decode engine (`optimal_sampling.fast.
FastDecoder`) runs both forwards on every rank until every rank is done (`sync_stop`, eager
mode), and otherwise does what transformers' `_sample` does (one exponential race per step,
which is `torch.multinomial` draw for draw, finished rows padded), so with α = 0 it draws the
same tokens as vanilla GRPO's `generate` under the same seed. On one CUDA device the trainer
gives it a decoder whose step is captured in a CUDA graph. Rows flagged `on_policy` are sampled
from π_θ itself in the same batch (α = 0 for that row, log q = log π_θ); the teacher still runs
on them, so each of their tokens also carries its log-probability under q* (which
multiple-importance-sampling weights need).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from optimal_sampling.fast import FastDecoder, FastPathConfig
from optimal_sampling.options import QStarOptions
from optimal_sampling.records import RECORDED_DIAGNOSTICS


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
        logp_theta, logp_t: per row, log π_θ(y_t) and log π_t(y_t) of each sampled token (after
            temperature); empty where a backend does not record them.
    """

    completion_ids: list[list[int]]
    logq: list[list[float]]
    logq_star: list[list[float]]
    on_policy: torch.Tensor
    alpha: torch.Tensor
    token_mask: torch.Tensor
    diagnostics: dict[str, torch.Tensor]
    logp_theta: list[list[float]] = field(default_factory=list)
    logp_t: list[list[float]] = field(default_factory=list)

    @classmethod
    def from_padded(
        cls, tokens, token_mask, logq, logq_star, *, on_policy, alpha, diagnostics, logp_theta=None, logp_t=None
    ) -> "Rollouts":
        """From `[B, T]` step records (`token_mask` True where the row generated the token)."""
        lengths = token_mask.sum(-1).tolist()
        rows = lambda x: [x[i, :n].tolist() for i, n in enumerate(lengths)]  # noqa: E731
        return cls(
            completion_ids=rows(tokens),
            logq=rows(logq),
            logq_star=rows(logq_star),
            on_policy=on_policy,
            alpha=alpha,
            token_mask=token_mask,
            diagnostics=diagnostics,
            logp_theta=[] if logp_theta is None else rows(logp_theta),
            logp_t=[] if logp_t is None else rows(logp_t),
        )


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
    decoder: FastDecoder | None = None,
) -> Rollouts:
    """Sample one completion per prompt from q* ∝ π_θ^(1-α) · π_t^α, token by token.

    The tokens are drawn by the package's decode engine, `optimal_sampling.fast.FastDecoder`:
    in eager mode by default (static caches, one step per token; with `sync_stop`, the mode
    FSDP / ZeRO-3 need), or by the `decoder` given (a trainer keeps one, with its step captured
    in a CUDA graph on a GPU). The random stream is used as transformers' `_sample` uses it.

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
        decoder: the `FastDecoder` of (`base`, `teacher`) to draw with; default: a new eager one.

    Example:
        >>> from optimal_sampling.testing import tiny_causal_lm
        >>> base, teacher = tiny_causal_lm(16, seed=0), tiny_causal_lm(16, seed=1)
        >>> out = sample_rollouts(base, teacher, [[5, 6], [7]], teacher_prompt_ids=None, max_new_tokens=3,
        ...                       pad_token_id=0, stop_token_ids=[2], vocab_size=16, device="cpu")
        >>> [len(ids) == len(lq) <= 3 for ids, lq in zip(out.completion_ids, out.logq)]
        [True, True]
    """
    ids, mask = left_pad(prompt_ids, pad_token_id, device)
    teacher_ids = teacher_mask = None
    if teacher_prompt_ids is not None:
        if len(teacher_prompt_ids) != len(prompt_ids):
            raise ValueError(f"Got {len(prompt_ids)} prompts but {len(teacher_prompt_ids)} teacher prompts.")
        teacher_ids, teacher_mask = left_pad(teacher_prompt_ids, pad_token_id, device)
    batch = ids.shape[0]
    flags = torch.zeros(batch, dtype=torch.bool) if on_policy is None else torch.as_tensor(on_policy, dtype=torch.bool)
    if flags.shape != (batch,):
        raise ValueError(f"`on_policy` must hold one flag per prompt ({batch}), got shape {tuple(flags.shape)}.")
    if decoder is None:
        # Eager: look at the finished mask every step, so that the random stream is used exactly as
        # transformers' `_sample` uses it.
        decoder = FastDecoder(base, teacher, FastPathConfig(mode="eager", diagnostics=True, check_every=1))
    out = decoder.generate(  # in eval mode (no dropout); the models go back to their modes after
        ids,
        mask,
        teacher_input_ids=teacher_ids,
        teacher_attention_mask=teacher_mask,
        max_new_tokens=max_new_tokens,
        q_star=q_star,
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        stop_token_ids=stop_token_ids,
        on_policy=flags,
        sync_stop=sync_stop,
    )
    diagnostics = {name: out.diagnostics[name].float().cpu() for name in (*RECORDED_DIAGNOSTICS, "empty_support")}
    return Rollouts.from_padded(
        out.sequences[:, ids.shape[1] :].cpu(),
        out.token_mask.cpu(),
        out.logq.float().cpu(),
        out.diagnostics["logq_star"].float().cpu(),
        on_policy=flags.clone(),
        alpha=out.alpha.float().cpu(),
        diagnostics=diagnostics,
        logp_theta=out.logp_theta.float().cpu(),
        logp_t=out.logp_t.float().cpu(),
    )
