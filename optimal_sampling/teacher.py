"""The teacher's KV cache, kept in step with the tokens the base model has produced."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from transformers import DynamicCache

from .compat import check_transformers_front, kv_cache_keyword

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


def left_padding_mask(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """`[B, L]` attention mask for a left-padded batch: 0 on the leading pad tokens only.

    Pad tokens *after* the first real token (e.g. rows that finished and were padded by
    `generate`) stay attended, as `generate` keeps them in its own attention mask.
    """
    if pad_token_id is None:
        return torch.ones_like(input_ids)
    return ((input_ids != pad_token_id).cumsum(dim=-1) > 0).to(input_ids.dtype)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: `cumsum(mask) - 1`, clamped at 0.

    Needed for any model fed incrementally under left padding, and essential for models
    with absolute position embeddings (GPT-2), which are badly wrong without them.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp_min(0)


def repeat_teacher_prompts(
    teacher_ids: torch.Tensor, teacher_mask: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One teacher prompt per base prompt, repeated to `rows` (e.g. for num_return_sequences)."""
    if teacher_ids.shape[0] == rows:
        return teacher_ids, teacher_mask
    if rows % teacher_ids.shape[0]:
        raise ValueError(
            f"`teacher_input_ids` has {teacher_ids.shape[0]} rows but there are {rows} sequences; give one "
            "teacher prompt per base prompt (they are repeated for num_return_sequences)."
        )
    repeats = rows // teacher_ids.shape[0]
    return teacher_ids.repeat_interleave(repeats, dim=0), teacher_mask.repeat_interleave(repeats, dim=0)


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest prefix shared by every row of `a` and `b` (`[B, La]`, `[B, Lb]`)."""
    n = min(a.shape[1], b.shape[1])
    if n == 0 or a.shape[0] != b.shape[0]:
        return 0
    same = (a[:, :n] == b[:, :n]).all(dim=0)
    mismatch = (~same).nonzero()
    return int(mismatch[0, 0]) if mismatch.numel() else n


class TeacherCache:
    """Incremental teacher forward passes over a growing (left-padded) token sequence.

    Each call gives the whole current teacher sequence; the cache keeps what it already
    holds, crops back to the longest prefix the new sequence shares with the old one (a
    new generate call, a rewritten turn), and feeds only the rest. The result always equals
    a full forward pass over the sequence (tested), at the cost of one forward per new token.

    Args:
        model: the teacher `PreTrainedModel` (kept in eval mode; never gets gradients).
    """

    def __init__(self, model: torch.nn.Module):
        check_transformers_front(model)
        self.model = model
        self.cache_keyword = kv_cache_keyword(model)  # `cache` or `past_key_values`: a wrong name drops the cache
        self.reset()

    def reset(self) -> None:
        self.cache: DynamicCache | None = None
        self.token_ids: torch.Tensor | None = None  # [B, L] what the cache holds
        self.attention_mask: torch.Tensor | None = None
        self.last_position: torch.Tensor | None = None  # [B, 1] position id of the last token

    @torch.no_grad()
    def last_logits(self, token_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`[B, V_teacher]` float32 logits at the last position of `token_ids` (`[B, L]`)."""
        if token_ids.shape[1] == 0:
            raise ValueError("The teacher sequence is empty; every row needs at least one prompt token.")
        keep = 0
        if (
            self.cache is not None
            and self.token_ids is not None
            and self.attention_mask is not None
            and self.token_ids.shape[0] == token_ids.shape[0]
        ):
            keep = min(
                common_prefix_length(self.token_ids, token_ids),
                common_prefix_length(self.attention_mask, attention_mask),
            )
        keep = min(keep, token_ids.shape[1] - 1)  # feed at least one token to get its logits
        if keep == 0 or self.cache is None:  # keep > 0 only with a cache
            # a transformers model's config (a Module's attributes are typed Tensor | Module)
            self.cache = DynamicCache(config=cast("PreTrainedConfig", self.model.config))
        elif keep < self.cache.get_seq_length():
            self.cache.crop(keep - self.cache.get_seq_length())
        positions = position_ids_from_mask(attention_mask)
        return self._forward(token_ids, attention_mask, positions, keep)

    @torch.no_grad()
    def extend(self, new_ids: torch.Tensor) -> torch.Tensor:
        """`last_logits` of the cached sequence followed by `new_ids` (`[B, n]`, attended).

        The per-step call of a running generation: the caller knows the cache holds the
        sequence so far, so there is no prefix search, and the new positions continue from
        the last one (as `last_logits` would compute them).
        """
        if (
            self.cache is None
            or self.token_ids is None
            or self.attention_mask is None
            or self.last_position is None
            or new_ids.shape[0] != self.token_ids.shape[0]
            or new_ids.shape[1] == 0
        ):
            raise RuntimeError(
                "TeacherCache.extend needs new tokens for a cached sequence of the same batch size; "
                "call last_logits first."
            )
        mask = torch.cat([self.attention_mask, torch.ones_like(new_ids, dtype=self.attention_mask.dtype)], dim=-1)
        steps = torch.arange(1, new_ids.shape[1] + 1, device=new_ids.device)
        positions = self.last_position + steps  # [B, n]
        return self._forward(torch.cat([self.token_ids, new_ids], dim=-1), mask, positions, self.token_ids.shape[1])

    def _forward(self, token_ids, attention_mask, positions, keep: int) -> torch.Tensor:
        """Feed `token_ids[:, keep:]` on top of the `keep` cached tokens; `positions` covers
        either the whole sequence or just the fed part."""
        fed = token_ids.shape[1] - keep
        out = self.model(
            input_ids=token_ids[:, keep:],
            attention_mask=attention_mask,
            position_ids=positions[:, -fed:],
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_keyword: self.cache},
        )
        self.token_ids, self.attention_mask, self.last_position = token_ids, attention_mask, positions[:, -1:]
        return out.logits[:, -1].float()
