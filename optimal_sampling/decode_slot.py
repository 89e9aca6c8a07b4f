"""One shape bucket of the fast path: static caches, step buffers, and the step, eager or captured.

`FastDecoder` (fast.py) keeps one `DecodeSlot` per (batch, length) bucket. A slot owns two
`StaticCache`s and the `DecodeBuffers` the step reads and writes, so every address the step
touches is fixed once the slot exists; that is what lets `build` capture the step in a CUDA graph
(optionally compiling it first) and replay it for every token.

A capture freezes the Python the step ran through: which branch each module took, and the
addresses of the parameters it read. The optimizer updates parameters in place, so replays see
new weights; but a PEFT adapter switched, merged, disabled or rescaled, or parameters moved to new
storage, would leave a graph that computes the old model. `captured_state` is what such a graph
depends on; the decoder compares it before each call and rebuilds its graphs when it changed.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from transformers import StaticCache

from .compat import kv_cache_keyword
from .decode_step import DecodeBuffers, DeviceScalarConstants, MixingOptions, decode_tail
from .records import RECORDED_DIAGNOSTICS
from .teacher import position_ids_from_mask

WARMUP_STEPS = 2  # eager steps before a capture (compilation, cuBLAS handles)


def reset_cuda_generator(device: torch.device) -> None:
    """Give the device's default CUDA generator a fresh state with the same seed and offset.

    A capture that raises ends without the generator's capture epilogue, so the generator stays
    marked as capturing and every later random draw outside a graph fails ("Offset increment
    outside graph capture encountered unexpectedly"): the eager fallback could not sample. A new
    generator state, copied from the old one's seed and offset, has no such mark.
    """
    generator = torch.cuda.default_generators[torch.device(device).index or 0]
    fresh = torch.Generator(device=device)
    fresh.set_state(generator.get_state())
    generator.graphsafe_set_state(fresh.graphsafe_get_state())


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module):
    """The models in eval mode inside the block, each back in its own mode after."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, training in zip(models, modes):
            model.train(training)


def forward_last_logits(model, cache_keyword: str, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    """`[B, V]` logits at the last position, the KV cache passed under the model's own name for it."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{cache_keyword: cache},
    )
    return out.logits[:, -1]


def captured_state(*models: torch.nn.Module) -> tuple:
    """What a captured step of these models depends on beyond their parameters' values.

    The storage address of every parameter (a graph reads those addresses), and for a PEFT model
    each adapter layer's Python-level switches (active adapters, merged, disabled, scaling), which
    decide the branch its forward took when the step was captured.
    """
    state: list[Any] = []
    for model in models:
        state.append(tuple(p.data_ptr() for p in model.parameters()))
        if hasattr(model, "peft_config"):
            from peft.tuners.tuners_utils import BaseTunerLayer

            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    scaling = getattr(module, "scaling", {})
                    state.append(
                        (
                            tuple(module.active_adapters),
                            bool(module.merged),
                            bool(module.disable_adapters),
                            tuple(sorted(scaling.items())) if isinstance(scaling, dict) else scaling,
                        )
                    )
    return tuple(state)


class DecodeSlot:
    """Static caches, buffers and (in the graph modes) the captured step of one shape bucket."""

    def __init__(
        self,
        base,
        teacher,
        batch: int,
        base_len: int,
        teacher_len: int,
        width: int,
        steps: int,
        options: MixingOptions,
        pad: int,
        stop_ids: tuple[int, ...],
        device: torch.device,
    ):
        self.base, self.teacher, self.options = base, teacher, options
        # Each model's own name for its KV cache (`cache`, or `past_key_values` before transformers 5.24).
        self.base_keyword, self.teacher_keyword = kv_cache_keyword(base), kv_cache_keyword(teacher)
        self.batch, self.base_len, self.teacher_len = batch, base_len, teacher_len
        self.base_cache = StaticCache(config=base.config, max_cache_len=base_len)
        self.teacher_cache = StaticCache(config=teacher.config, max_cache_len=teacher_len)
        long: dict[str, Any] = dict(dtype=torch.long, device=device)
        self.buffers = DecodeBuffers(
            base_input=torch.zeros(batch, 1, **long),
            teacher_input=torch.zeros(batch, 1, **long),
            base_positions=torch.zeros(batch, 1, **long),
            teacher_positions=torch.zeros(batch, 1, **long),
            base_mask=torch.ones(batch, base_len, **long),
            teacher_mask=torch.ones(batch, teacher_len, **long),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
            on_policy=torch.zeros(batch, dtype=torch.bool, device=device),
            step=torch.zeros((), **long),
            noise=torch.ones(batch, width, dtype=torch.float32, device=device),
            pad=torch.tensor(pad, **long),
            stop_ids=torch.tensor(list(stop_ids) or [-1], **long),
        )
        record_dtypes = {
            "tokens": torch.long,
            "token_mask": torch.bool,
            "alpha": torch.float32,
            "logq": torch.float32,
            "logq_star": torch.float32,
            "logp_theta": torch.float32,
            "logp_t": torch.float32,
            "iterations": torch.int32,
            "empty_support": torch.bool,
            "converged": torch.bool,
        }
        if options.diagnostics:
            record_dtypes.update({name: torch.float64 for name in RECORDED_DIAGNOSTICS})
        self.buffers.records = {
            name: torch.zeros(batch, steps, dtype=dt, device=device) for name, dt in record_dtypes.items()
        }
        self.graph: torch.cuda.CUDAGraph | None = None
        self.built = False
        self.mode = "eager"
        self.step_fn = self._eager_step
        # Allocate the caches now (they initialise lazily on the first update), outside any
        # graph or compiled region, so that their addresses are fixed from here on.
        with torch.no_grad():
            self._forwards()
        self.base_cache.reset()
        self.teacher_cache.reset()

    # -- the step, in its three forms ----------------------------------------------------

    def _forwards(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.buffers
        base_logits = forward_last_logits(
            self.base, self.base_keyword, b.base_input, b.base_mask, b.base_positions, self.base_cache
        )
        teacher_logits = forward_last_logits(
            self.teacher, self.teacher_keyword, b.teacher_input, b.teacher_mask, b.teacher_positions, self.teacher_cache
        )
        return base_logits, teacher_logits

    def _eager_step(self) -> None:
        self.buffers.noise.exponential_()
        base_logits, teacher_logits = self._forwards()
        decode_tail(base_logits, teacher_logits, self.buffers, self.options)

    def _full_step_body(self) -> None:
        base_logits, teacher_logits = self._forwards()
        decode_tail(base_logits, teacher_logits, self.buffers, self.options)

    def build(self, mode: str, warmup_steps: int = WARMUP_STEPS) -> None:
        """Compile and/or capture the step for `mode` (the state is reloaded by the caller afterwards)."""
        if mode == "eager":
            self.mode, self.step_fn, self.graph = "eager", self._eager_step, None
            return
        if mode == "compile":
            compiled = torch.compile(self._full_step_body, dynamic=False)

            def body():
                self.buffers.noise.exponential_()
                compiled()
        elif mode == "compile_mixture":
            compiled_tail = torch.compile(decode_tail, dynamic=False)

            def body():
                self.buffers.noise.exponential_()
                with DeviceScalarConstants():
                    base_logits, teacher_logits = self._forwards()
                compiled_tail(base_logits, teacher_logits, self.buffers, self.options)
        elif mode == "cuda_graph":

            def body():
                with DeviceScalarConstants():
                    self._eager_step()
        else:
            raise ValueError(f"Unknown mode {mode!r}.")
        # Warm up on a side stream (compilation, cuBLAS handles, lazy initialisation), then capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup_steps):
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            body()
        self.graph, self.mode, self.step_fn = graph, mode, graph.replay

    # -- one call --------------------------------------------------------------------------

    @torch.no_grad()
    def load(self, ids, mask, teacher_ids, teacher_mask, dummy_rows: torch.Tensor, on_policy: torch.Tensor) -> None:
        """Reset the caches, prefill both prompts but their last token, and set up step 0."""
        b = self.buffers
        for cache in (self.base_cache, self.teacher_cache):
            cache.reset()
        for model, keyword, cache, prompt, prompt_mask, full_mask, inputs, positions in (
            (self.base, self.base_keyword, self.base_cache, ids, mask, b.base_mask, b.base_input, b.base_positions),
            (
                self.teacher,
                self.teacher_keyword,
                self.teacher_cache,
                teacher_ids,
                teacher_mask,
                b.teacher_mask,
                b.teacher_input,
                b.teacher_positions,
            ),
        ):
            width = prompt.shape[1]
            full_mask.fill_(1)
            full_mask[:, :width].copy_(prompt_mask)
            prompt_positions = position_ids_from_mask(prompt_mask)
            if width > 1:
                forward_last_logits(model, keyword, prompt[:, :-1], full_mask, prompt_positions[:, :-1], cache)
            inputs.copy_(prompt[:, -1:])
            positions.copy_(prompt_positions[:, -1:])
        b.finished.copy_(dummy_rows)
        b.on_policy.copy_(on_policy)
        b.step.zero_()
        b.records["token_mask"].zero_()

    def run(self, max_new_tokens: int, check_every: int, sync_stop: Callable[[bool], bool] | None = None) -> int:
        """Run up to `max_new_tokens` steps; stop early once every row finished (with `sync_stop`:
        once no rank has a running row, asked after every step). Returns the steps run."""
        steps = 0
        with torch.no_grad():
            while steps < max_new_tokens:
                self.step_fn()
                steps += 1
                if steps == max_new_tokens:
                    break
                if sync_stop is not None:
                    if not sync_stop(not bool(self.buffers.finished.all())):
                        break
                elif steps % check_every == 0 and bool(self.buffers.finished.all()):
                    break
        return steps
