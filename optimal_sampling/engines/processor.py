"""The vLLM logits processor that hands each driven row's next token to the coordinator.

vLLM loads it in every worker of an engine started by `InProcessVLLMCoordinator`
(`logits_processors=[PROCESSOR_FQCN]`). It touches only requests whose
`SamplingParams.extra_args` carry `EXTRA_ARGS_KEY`; every other request samples as usual.
For the driven rows of a step it

1. takes the log-softmax of the unprocessed float32 logits (what vLLM's `raw_logprobs`
   returns) and its top-k,
2. sends them to the coordinator and blocks until it answers with one token per row,
3. forces that token: the row's logits become -inf except at the token, so the request's
   greedy sampler picks it and the engine appends it as if it had sampled it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .protocol import EXTRA_ARGS_KEY, WorkerLink


@dataclass
class _DrivenRow:
    channel: str
    slot: int
    k: int
    output_token_ids: list[int]  # vLLM's live list of the request's generated tokens


def driven_spec(params) -> dict | None:
    """The driven-decode arguments of a request's `SamplingParams`, or None for other requests."""
    return (getattr(params, "extra_args", None) or {}).get(EXTRA_ARGS_KEY)


def _tensor_parallel_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except (ImportError, AssertionError, RuntimeError):
        return 0


class DrivenDecodeLogitsProcessor(LogitsProcessor):
    """Per step: send each driven row's raw top-k to the coordinator, force the token it returns."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        spec = driven_spec(sampling_params)
        if spec is None:
            return
        if not (
            isinstance(spec, dict)
            and isinstance(spec.get("channel"), str)
            and isinstance(spec.get("slot"), int)
            and isinstance(spec.get("k"), int)
            and spec["k"] >= 1
        ):
            raise ValueError(
                f"extra_args[{EXTRA_ARGS_KEY!r}] must be {{'channel': str, 'slot': int, 'k': int >= 1}}, "
                f"got {spec!r}; it is set by optimal_sampling.engines, not by hand."
            )

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, _DrivenRow] = {}  # persistent-batch index → row
        self.links: dict[str, WorkerLink] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it forces the token, so it must run for greedy requests too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output_token_ids in batch_update.added:
            spec = driven_spec(params)
            if spec is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = _DrivenRow(spec["channel"], spec["slot"], spec["k"], output_token_ids)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if direction == MoveDirectionality.SWAP and row_b is not None:
                self.rows[a] = row_b

    def _link(self, channel: str) -> WorkerLink:
        link = self.links.get(channel)
        if link is None:
            link = self.links[channel] = WorkerLink(channel, _tensor_parallel_rank())
        return link

    def apply(self, logits: torch.Tensor) -> torch.Tensor:  # [R, V] float32
        if not self.rows:
            return logits
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        for index in sorted(self.rows):
            row = self.rows[index]
            groups[row.channel, row.k].append(index)
        for (channel, k), indices in groups.items():
            rows = [self.rows[i] for i in indices]
            batch_index = torch.tensor(indices, device=logits.device)  # [n] the group's rows of the batch
            logp = torch.log_softmax(logits.index_select(0, batch_index).float(), dim=-1)  # [n, V]
            values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)  # [n, k] each, descending
            try:
                tokens = self._link(channel).exchange(
                    np.array([r.slot for r in rows]),
                    np.array([len(r.output_token_ids) for r in rows]),
                    ids.cpu().numpy(),
                    values.cpu().numpy(),
                )
            except OSError:
                self.links.pop(channel, None)
                raise
            forced = torch.full(
                (len(indices), logits.shape[-1]), float("-inf"), dtype=logits.dtype, device=logits.device
            )
            forced.scatter_(1, torch.from_numpy(tokens.copy()).to(logits.device)[:, None], 0.0)
            logits.index_copy_(0, batch_index, forced)
        return logits


PROCESSOR_FQCN = f"{__name__}:{DrivenDecodeLogitsProcessor.__name__}"
