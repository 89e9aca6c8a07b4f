"""Model runner V2's logits processor for driven decode (vLLM 0.34, and GPU engines of 0.32 / 0.33).

vLLM's V2 interface (`vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`) keys a
request by its persistent slot: `add_request(slot, params)` when it enters the batch (a slot is
recycled, so its old state is overwritten there), and `apply(logits, ctx)` once per step for the
whole batch, rows mapped to slots by `ctx.expanded_idx_mapping`. A row's input position
`ctx.pos` is the position of the token fed to the model, so the request has generated
`pos + 1 - prompt_len` tokens when its next one is sampled (also after a preemption, when the
prompt and the partial output are fed again). `forcing.DrivenRows` does the exchange.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

from .forcing import DrivenRow, DrivenRows, driven_spec, validate_driven_spec


def _host_values(values) -> np.ndarray:
    """A per-slot buffer of vLLM's request state as a host array (a `UvaBackedTensor`'s `np`
    mirror, which the runner writes before the request's first step, or a tensor)."""
    if hasattr(values, "np"):
        return values.np
    if isinstance(values, torch.Tensor):
        return values.cpu().numpy()
    return np.asarray(values)


class DrivenDecodeLogitsProcessorV2(LogitsProcessor):
    """Per step: send each driven row's raw top-k to the coordinator, force the token it returns."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_driven_spec(sampling_params)

    def __init__(self, vllm_config, req_states) -> None:
        self.req_states = req_states  # read-only: prompt_len per slot
        self.specs: dict[int, dict] = {}  # slot → driven-decode arguments
        self.driven = DrivenRows()

    def add_request(self, req_idx: int, sampling_params) -> bool:
        spec = driven_spec(sampling_params)
        if spec is None:
            self.specs.pop(req_idx, None)  # the slot's previous occupant may have been driven
            return False
        self.specs[req_idx] = spec
        return True  # it masks the row's logits: vLLM must run it (greedy requests included)

    def apply(self, logits, ctx):  # logits [R, V] float32
        if not self.specs:
            return logits
        if logits.shape[0] == len(ctx.idx_mapping_np):  # one row per request: no copy to the host
            slots = ctx.idx_mapping_np
        else:
            slots = ctx.expanded_idx_mapping.cpu().numpy()
        rows = [row for row, slot in enumerate(slots.tolist()) if slot in self.specs]
        if not rows:
            return logits
        driven_slots = slots[rows]
        if len(set(driven_slots.tolist())) != len(rows):
            raise RuntimeError(
                "A driven request has several logits rows in one step (speculative decoding): driven decode "
                "forces one token per request and step. Start the engines without a speculative config."
            )
        positions = ctx.pos[torch.tensor(rows, device=ctx.pos.device)].cpu().numpy()  # [n] input positions
        generated = positions + 1 - _host_values(self.req_states.prompt_len)[driven_slots]
        self.driven.force(
            logits, [DrivenRow(row, self.specs[slot], int(n)) for row, slot, n in zip(rows, driven_slots, generated)]
        )
        return logits


PROCESSOR_V2_FQCN = f"{__name__}:{DrivenDecodeLogitsProcessorV2.__name__}"
