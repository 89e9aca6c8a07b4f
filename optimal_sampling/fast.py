"""The fast path: q* decoding with static KV caches and a decode step without host syncs.

`optimal_generate` reuses transformers' `_sample` loop: one Python-driven forward per model,
a processor with host synchronisations, a growing `DynamicCache`. On a GPU that is bound
by Python and kernel launches, not by memory bandwidth. Here the whole decoding step

    base forward + teacher forward → log-softmax(z / T) on the shared vocabulary
    → α (`solve_alpha`) → log q* (`optimal_log_probs`, `truncate_log_probs`)
    → sample → record logq / logp_theta / logp_t / α → stop bookkeeping

touches only preallocated tensors (two `StaticCache`s, `[B, ...]` buffers), so it can be
captured once in a CUDA graph (optionally compiled with `torch.compile` first) and replayed
for every token. The host looks at the finished mask only every `check_every` steps.

Shapes are bucketed (batch to a power of two, cache lengths to a multiple of 64) and each
bucket's caches and graph are kept (a `DecodeSlot`, decode_slot.py), so later calls of similar
size reuse them; this module holds the options, the decoder that picks and builds the slots,
and the `optimal_generate(..., fast=...)` branch.

**Same distribution, same tokens.** Sampling is the exponential race
`argmax(softmax(scores) / E)`, `E ~ Exp(1)` drawn with `exponential_` on a `[B, V_base]`
tensor from the default generator: that is exactly what `torch.multinomial(probs, 1)` (and
so transformers' `_sample`) does. In eager mode without batch padding the fast path
therefore gives the same tokens as `optimal_generate` under the same seed (up to float
round-off between the static and the dynamic cache). Batch padding draws noise for the
dummy rows too, so the stream shifts and only the distribution is the same. A CUDA graph
replays the eager kernels, random draws included (benchmarks/fast_path.py checks that
`cuda_graph` mode reproduces eager mode's tokens on the GPU).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence, cast

import torch

from .compat import check_transformers_front
from .decode_slot import WARMUP_STEPS, DecodeSlot, captured_state, eval_mode, reset_cuda_generator
from .decode_step import DeviceScalarConstants, MixingOptions, decode_tail
from .options import QStarOptions
from .records import OptimalGenerateOutput, check_same_device, output_width
from .support import check_sampled_log_probs
from .teacher import repeat_teacher_prompts

__all__ = [
    "FAST_MODES",
    "DeviceScalarConstants",
    "FastDecoder",
    "FastPathConfig",
    "MixingOptions",
    "clear_fast_decoders",
    "decode_tail",
    "fast_decoder_for",
    "fast_optimal_generate",
]

FAST_MODES = ("auto", "eager", "cuda_graph", "compile_mixture", "compile")
_FALLBACK = {"compile": "cuda_graph", "compile_mixture": "cuda_graph", "cuda_graph": "eager"}
GRAPH_MAX_ITER = 8  # Newton iterations of a captured step, unless FastPathConfig.max_iter says otherwise


@dataclass(frozen=True)
class FastPathConfig:
    """How the fast path runs. Pass as `fast=FastPathConfig(...)` (or `fast=True` for these defaults).

    Attributes:
        mode: `"eager"` (plain Python loop over the same step; the CPU choice),
            `"cuda_graph"` (the eager step captured in one CUDA graph: no compile time),
            `"compile_mixture"` (the α solve, mixing and sampling compiled with torch.compile,
            the two forwards eager, all captured in one CUDA graph), `"compile"` (the whole
            step compiled, then captured), or `"auto"` (`"compile_mixture"` on CUDA, `"eager"`
            elsewhere). A mode that fails to compile or capture falls back to the next simpler
            one (`FastDecoder.stats` counts it and keeps the error).
        max_iter: Newton iterations of the α solve; None: the `QStarOptions`' own, capped at
            `GRAPH_MAX_ITER` (8) in the graph modes, where every iteration runs (there is no
            early exit without a host sync) and 8 is plenty for the safeguarded Newton started
            at the secant point. Rows that did not reach `tol` are counted in the `converged`
            diagnostic.
        tol: tolerance on α; None: the `QStarOptions`' own.
        check_every: look at the finished mask on the host every this many steps.
        diagnostics: also record KL / ESS / entropy / Chernoff diagnostics per token
            (several more passes over the vocabulary per step).
        bucket_batch: pad the batch to a power of two with dummy rows (stripped from the
            output). Default: on for the graph modes, off for eager (so that eager sampling
            uses the random stream exactly as `optimal_generate` does).
        length_multiple: round the static cache lengths up to a multiple of this.
        max_cached_shapes: how many (batch, length) buckets keep their caches and graphs.
    """

    mode: str = "auto"
    max_iter: int | None = None
    tol: float | None = None
    check_every: int = 8
    diagnostics: bool = False
    bucket_batch: bool | None = None
    length_multiple: int = 64
    max_cached_shapes: int = 4

    def __post_init__(self):
        if self.mode not in FAST_MODES:
            raise ValueError(f"Unknown fast-path mode {self.mode!r}; choose one of {', '.join(FAST_MODES)}.")
        if (self.max_iter is not None and self.max_iter < 1) or (self.tol is not None and self.tol <= 0):
            raise ValueError(f"Need max_iter >= 1 and tol > 0, got max_iter={self.max_iter}, tol={self.tol}.")
        if self.check_every < 1 or self.length_multiple < 1 or self.max_cached_shapes < 1:
            raise ValueError("`check_every`, `length_multiple` and `max_cached_shapes` must be >= 1.")

    @classmethod
    def from_flag(cls, fast: "bool | str | FastPathConfig") -> "FastPathConfig":
        """`True` → defaults, a mode name → that mode, a `FastPathConfig` → itself."""
        if isinstance(fast, FastPathConfig):
            return fast
        if fast is True:
            return cls()
        if isinstance(fast, str):
            return cls(mode=fast)
        raise TypeError(
            f"`fast` must be True, a mode name ({', '.join(FAST_MODES)}) or a FastPathConfig, got {fast!r}."
        )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _batch_bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ---------------------------------------------------------------------------------------
# The decoder: buckets, fallbacks, outputs


class FastDecoder:
    """q* sampling with static caches for both models and a captured (or compiled) decode step.

    Holds the static caches and graphs of the shape buckets it has seen, so keep one
    decoder per (base, teacher) pair; `optimal_generate(..., fast=True)` and
    `OptimalSampler(..., fast=True)` do that for you (see `fast_decoder_for`).

    Args:
        base_model, teacher_model: causal LMs on one device sharing a vocabulary (the same
            object may serve as both; it gets two caches).
        config: a `FastPathConfig` (mode, solver iterations, stop-check interval, buckets).

    Example:
        >>> import torch
        >>> from optimal_sampling.fast import FastDecoder
        >>> from optimal_sampling.testing import tiny_causal_lm
        >>> base, teacher = tiny_causal_lm(40, seed=1), tiny_causal_lm(40, seed=2)
        >>> decoder = FastDecoder(base, teacher)  # eager on CPU; CUDA graphs on a GPU
        >>> prompt = torch.tensor([[0, 5, 6], [7, 8, 9]])  # left-padded with id 0
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> out = decoder.generate(prompt, prompt != 0, max_new_tokens=4, pad_token_id=0, stop_token_ids=[2])
        >>> out.logq.shape == out.alpha.shape == out.token_mask.shape, out.sequences.shape[0]
        (True, 2)
    """

    def __init__(
        self, base_model: torch.nn.Module, teacher_model: torch.nn.Module, config: FastPathConfig | None = None
    ):
        for name, model in (("base_model", base_model), ("teacher_model", teacher_model)):
            if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
                raise TypeError(f"`{name}` must be a transformers causal LM, got {type(model).__name__}.")
        check_transformers_front(base_model, teacher_model)
        self.device = next(base_model.parameters()).device
        check_same_device(self.device, teacher_model)
        self.base, self.teacher = base_model, teacher_model
        self.config = config or FastPathConfig()
        self._slots: OrderedDict[tuple, DecodeSlot] = OrderedDict()
        self._captured_state: tuple | None = None  # what the slots' captured steps froze (`captured_state`)
        self.stats: dict = {
            "calls": 0,
            "builds": 0,
            "build_seconds": 0.0,
            "fallbacks": 0,
            "errors": [],
            "mode": None,
            "recaptures": 0,
        }

    def _resolve_mode(self) -> str:
        mode = self.config.mode
        if mode == "auto":
            mode = "compile_mixture" if self.device.type == "cuda" else "eager"
        if mode != "eager" and self.device.type != "cuda":
            raise ValueError(
                f"Fast-path mode {mode!r} needs a CUDA device; the models are on {self.device}. Use mode='eager'."
            )
        return mode

    def _slot(self, batch, base_len, teacher_len, width, steps, options, pad, stop_ids) -> DecodeSlot:
        key = (batch, base_len, teacher_len, steps, options, pad, stop_ids)
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        while len(self._slots) >= self.config.max_cached_shapes:
            self._slots.popitem(last=False)
        slot = DecodeSlot(
            self.base, self.teacher, batch, base_len, teacher_len, width, steps, options, pad, stop_ids, self.device
        )
        self._slots[key] = slot
        return slot

    def _drop_stale_steps(self) -> None:
        """Forget the captured steps when the models changed under them (a PEFT adapter switched,
        merged, disabled or rescaled; parameters moved to new storage): they would replay the old
        model. In-place updates (the optimizer's) keep the addresses and are read by the replays."""
        state = captured_state(self.base, self.teacher)
        if self._captured_state is not None and state != self._captured_state and self._slots:
            self._slots.clear()
            self.stats["recaptures"] += 1
        self._captured_state = state

    def _build(self, slot: DecodeSlot, load_args) -> None:
        """Compile/capture the slot's step, falling back to simpler modes on failure."""
        mode = self._resolve_mode()
        start = time.perf_counter()
        # Warm-up steps draw random numbers; restore the generator afterwards so that the first
        # call of a shape samples what later calls with the same seed sample.
        rng_state = torch.cuda.get_rng_state(self.device)
        while True:
            try:
                slot.load(*load_args)  # warm-up runs on real inputs (it is reloaded below)
                slot.build(mode)
                break
            except Exception as error:  # counted and kept: a mode that cannot capture must not stop sampling
                reset_cuda_generator(self.device)
                if mode not in _FALLBACK:
                    raise
                self.stats["fallbacks"] += 1
                self.stats["errors"].append(f"{mode}: {type(error).__name__}: {error}"[:2000])
                mode = _FALLBACK[mode]
        torch.cuda.synchronize(self.device)
        torch.cuda.set_rng_state(rng_state, self.device)
        self.stats["builds"] += 1
        self.stats["build_seconds"] += time.perf_counter() - start

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        teacher_input_ids: torch.Tensor | None = None,
        teacher_attention_mask: torch.Tensor | None = None,
        q_star: QStarOptions | None = None,
        vocab_size: int | None = None,
        pad_token_id: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        on_policy: Sequence[bool] | torch.Tensor | None = None,
        sync_stop: Callable[[bool], bool] | None = None,
        **options,
    ):
        """Sample up to `max_new_tokens` tokens per row from q*; returns an `OptimalGenerateOutput`.

        `input_ids` / `attention_mask` are the base's left-padded prompts (`[B, P]`);
        `teacher_input_ids` / `teacher_attention_mask` the teacher's (default: the same).
        A row ends at its first token in `stop_token_ids` (pass both models' EOS ids) and is
        padded with `pad_token_id` afterwards. `q_star` (a `QStarOptions`, changed by keyword
        `options` such as `alpha_max=0.5`) says how q* is computed; the solver's `tol` and
        `max_iter` are the `FastPathConfig`'s.
        `on_policy` (`[B]` bool) samples those rows from the base alone (α = 0, log q = log π_θ),
        in the same batch, e.g. a mixed GRPO group's on-policy members; with it, the output's
        `diagnostics["logq_star"]` holds each token's log q* on every row.

        `sync_stop` (eager mode) makes ranks that share collectives stop together: it maps
        "this rank still has running rows" to "some rank still has" (e.g. an all-reduce), and the
        decoder keeps stepping (finished rows emit padding) until no rank has a running row. Under
        FSDP / ZeRO-3 every forward is a collective, so every rank must run the same number.
        """
        with eval_mode(self.base, self.teacher):  # no dropout while sampling
            if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
                raise ValueError(
                    f"`input_ids` must be a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}."
                )
            if max_new_tokens < 1:
                raise ValueError(f"`max_new_tokens` (={max_new_tokens}) must be >= 1.")
            stop_ids = tuple(sorted({int(i) for i in (stop_token_ids or [])}))
            if pad_token_id is None:
                if not stop_ids:
                    raise ValueError(
                        "Pass `pad_token_id` (or at least one stop token id, used for padding as generate does)."
                    )
                pad_token_id = stop_ids[0]
            rows = input_ids.shape[0]
            device = self.device
            ids = input_ids.to(device)
            mask = (torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)).long()
            if teacher_input_ids is None:
                teacher_ids, teacher_mask = ids, mask
            else:
                teacher_ids = teacher_input_ids.to(device)
                teacher_mask = (
                    torch.ones_like(teacher_ids)
                    if teacher_attention_mask is None
                    else teacher_attention_mask.to(device).long()
                )
                if teacher_ids.shape[1] == 0:
                    raise ValueError(
                        "`teacher_input_ids` is empty; the teacher needs at least one prompt token per row."
                    )
                teacher_ids, teacher_mask = repeat_teacher_prompts(teacher_ids, teacher_mask, rows)
            if bool((mask[:, -1] == 0).any()) or bool((teacher_mask[:, -1] == 0).any()):
                raise ValueError(
                    "The fast path needs left-padded prompts (every row's last column a real token); pad on the left."
                )

            base_width, teacher_width = output_width(self.base), output_width(self.teacher)
            mode = self._resolve_mode()
            if sync_stop is not None and mode != "eager":
                raise ValueError(
                    f"`sync_stop` (ranks stopping together) needs the eager mode; a {mode!r} step is captured "
                    "and cannot wait for other ranks. Use FastPathConfig(mode='eager')."
                )
            q_star = QStarOptions.build(q_star, **options)
            max_iter = self.config.max_iter or (
                q_star.max_iter if mode == "eager" else min(q_star.max_iter, GRAPH_MAX_ITER)
            )
            q_star = q_star.replace(tol=self.config.tol or q_star.tol, max_iter=max_iter)
            mixing = MixingOptions(
                vocab_size=vocab_size or min(base_width, teacher_width),
                q_star=q_star,
                diagnostics=self.config.diagnostics,
            )

            bucket = self.config.bucket_batch if self.config.bucket_batch is not None else mode != "eager"
            batch = _batch_bucket(rows) if bucket else rows
            multiple = self.config.length_multiple
            # Cache slots used: (prompt - 1) prefilled + one per step (at least the warm-up steps).
            steps_cap = _round_up(max(max_new_tokens, WARMUP_STEPS), multiple)
            base_len = _round_up(ids.shape[1] - 1 + max(max_new_tokens, WARMUP_STEPS), multiple)
            teacher_len = _round_up(teacher_ids.shape[1] - 1 + max(max_new_tokens, WARMUP_STEPS), multiple)
            dummy = torch.zeros(batch, dtype=torch.bool, device=device)
            dummy[rows:] = True  # dummy rows copy row 0 and start finished
            flags = torch.zeros(batch, dtype=torch.bool, device=device)
            if on_policy is not None:
                given = torch.as_tensor(on_policy, dtype=torch.bool).flatten()
                if given.shape[0] != rows:
                    raise ValueError(f"`on_policy` must hold one flag per prompt ({rows}), got {given.shape[0]}.")
                flags[:rows] = given.to(device)
            if batch > rows:
                fill = lambda x: torch.cat([x, x[:1].expand(batch - rows, -1)], 0)  # noqa: E731
                ids, mask, teacher_ids, teacher_mask = fill(ids), fill(mask), fill(teacher_ids), fill(teacher_mask)

            self.stats["calls"] += 1
            if mode != "eager":
                self._drop_stale_steps()
            slot = self._slot(batch, base_len, teacher_len, base_width, steps_cap, mixing, pad_token_id, stop_ids)
            load_args = (ids, mask, teacher_ids, teacher_mask, dummy, flags)
            if not slot.built:
                if mode != "eager":
                    self._build(slot, load_args)
                slot.built = True
                self.stats["mode"] = slot.mode
            slot.load(*load_args)
            steps = slot.run(max_new_tokens, self.config.check_every, sync_stop)

            records = {name: r[:rows, :steps] for name, r in slot.buffers.records.items()}
            token_mask = records.pop("token_mask")
            width = int(token_mask.sum(dim=1).max())  # generate stops after the step where the last row ended
            records = {name: r[:, :width].clone() for name, r in records.items()}
            token_mask = token_mask[:, :width].clone()
            check_sampled_log_probs(records, token_mask)
            tokens = records.pop("tokens")
            logq_star = records.pop("logq_star")
            if on_policy is not None:
                records["logq_star"] = logq_star
            sequences = torch.cat([input_ids.to(device), tokens], dim=1)
            return OptimalGenerateOutput(
                sequences=cast(torch.LongTensor, sequences),  # (transformers types the field as LongTensor)
                alpha=records.pop("alpha"),
                logq=records.pop("logq"),
                logp_theta=records.pop("logp_theta"),
                logp_t=records.pop("logp_t"),
                token_mask=token_mask,
                diagnostics=records,
            )


# Decoders of recent (base, teacher, config) triples, so that repeated
# `optimal_generate(..., fast=...)` calls reuse caches and graphs. A decoder holds its
# models, so a weak registry would never let them go; a short LRU list does.
_DECODERS: "OrderedDict[tuple, FastDecoder]" = OrderedDict()
MAX_CACHED_DECODERS = 2


def fast_decoder_for(
    base_model: torch.nn.Module, teacher_model: torch.nn.Module, config: FastPathConfig
) -> FastDecoder:
    """The cached `FastDecoder` of this model pair and config (created on first use).

    The last `MAX_CACHED_DECODERS` decoders are kept, with their models, static caches and
    graphs; `clear_fast_decoders()` releases them.
    """
    key = (id(base_model), id(teacher_model), config)
    decoder = _DECODERS.get(key)
    if decoder is not None and decoder.base is base_model and decoder.teacher is teacher_model:
        _DECODERS.move_to_end(key)
        return decoder
    decoder = FastDecoder(base_model, teacher_model, config)
    _DECODERS[key] = decoder
    while len(_DECODERS) > MAX_CACHED_DECODERS:
        _DECODERS.popitem(last=False)
    return decoder


def clear_fast_decoders() -> None:
    """Drop the cached decoders (and the models, caches and CUDA graphs they hold)."""
    _DECODERS.clear()


# Processors that generate adds and that the fast path has no equivalent for.
_SUPPORTED_STOPPING = {"MaxLengthCriteria", "EosTokenCriteria"}


def fast_optimal_generate(
    model,
    teacher_model,
    input_ids,
    generation_config,
    logits_processor,
    stopping_criteria,
    *,
    fast,
    model_kwargs,
    stop_ids,
    pad_token_id: int | None,
    q_star: QStarOptions,
    vocab_size: int | None,
    teacher_input_ids=None,
    teacher_attention_mask=None,
):
    """The `optimal_generate(..., fast=...)` branch: same inputs, same output type, fast decoder."""
    unsupported = [type(p).__name__ for p in logits_processor]
    if unsupported:
        raise ValueError(
            f"The fast path does not support these generate options (processors {', '.join(unsupported)}); "
            "drop them or use fast=False."
        )
    other_criteria = [type(c).__name__ for c in stopping_criteria if type(c).__name__ not in _SUPPORTED_STOPPING]
    if other_criteria:
        raise ValueError(
            f"The fast path stops on max_new_tokens and stop ids only, not on {', '.join(other_criteria)}; "
            "use fast=False."
        )
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("The fast path needs `input_ids`, not `inputs_embeds`; use fast=False.")
    max_new_tokens = int(generation_config.max_length) - input_ids.shape[1]
    decoder = fast_decoder_for(model, teacher_model, FastPathConfig.from_flag(fast))
    output = decoder.generate(
        input_ids,
        model_kwargs.get("attention_mask"),
        max_new_tokens=max_new_tokens,
        q_star=q_star,
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        stop_token_ids=stop_ids,
        teacher_input_ids=teacher_input_ids,
        teacher_attention_mask=teacher_attention_mask,
    )
    return output if generation_config.return_dict_in_generate else output.sequences
