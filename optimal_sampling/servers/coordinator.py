"""`DualVLLMCoordinator`: q* sampled token by token from two vLLM servers (top-k approximation).

Per step, every in-flight sequence's current token ids go to both servers in ONE batched
1-token completion request per server (`prompt` = a list of token-id lists, `logprobs=k`).
The coordinator merges the two top-k lists with the core's `sparse_candidates`, solves α and
q* for the whole step with `compute_mixture`, and samples the next token itself. The token
ids travel back in the next request, so nothing is ever re-tokenised. A server's prefix cache
holds whole KV blocks only, so each step prefills again the part of a prefix past its last
full block, and all of a prefix shorter than one block (vLLM's CPU default block size is 128:
start CPU servers with `--block-size 32`). Every request carries neutral sampling parameters
and never a `seed` (see `client.NEUTRAL_SAMPLING`).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Sequence

import torch

from ..records import GenerationOutput, check_same_vocabulary
from ..topk_decoding import (
    StepDistribution,
    TopKSequence,
    TopKStepper,
    check_generate_arguments,
    counter_uniforms,
    declared_eos_ids,
    make_sequences,
    sample_step,
    sequence_output,
)
from .client import (
    CoordinatorLog,
    MalformedResponseError,
    RequestCounters,
    ServerClient,
    ServerError,
    ServerRequestError,
    ServerUnavailableError,
    logger,
)
from .config import CoordinatorConfig, logging_level
from .weights import BaseWeights


class DualVLLMCoordinator:
    """Sample from q* ∝ π_θ^(1-α*) · π_t^α* with a base and a teacher vLLM server.

    Use it as an async context manager: entering checks that both servers answer, that
    their tokenizers share one vocabulary and that they accept `top_k` log-probs.

    Args:
        config: a `CoordinatorConfig` (or pass its fields as keyword arguments).
        theta_tokenizer, t_tokenizer: already loaded tokenizers, instead of loading them
            from `config.theta_tokenizer` / the servers' model directories.

    Example (needs two running servers, see tests/VLLM_SERVERS.md):

        async with DualVLLMCoordinator(CoordinatorConfig(theta_url=..., t_url=..., top_k=20)) as coordinator:
            outputs = await coordinator.generate_batch(["Hello"], max_tokens=16)
            outputs[0].generated_text, outputs[0].alpha_history, outputs[0].logq
            coordinator.get_statistics()["covered_mass_theta_mean"]
    """

    def __init__(self, config: CoordinatorConfig | None = None, *, theta_tokenizer=None, t_tokenizer=None, **fields):
        if config is None:
            config = CoordinatorConfig(**fields)
        elif fields:
            raise TypeError("Pass either a CoordinatorConfig or its fields as keyword arguments, not both.")
        self.config = config
        if config.log_level is not None:
            logger.setLevel(logging_level(config.log_level))
        self.log = CoordinatorLog(config.enable_logging)
        self.theta_tokenizer, self.t_tokenizer = theta_tokenizer, t_tokenizer
        self.counters = RequestCounters()
        self._theta: ServerClient | None = None
        self._t: ServerClient | None = None
        self._started = False
        self._unavailable: ServerUnavailableError | None = None
        self.vocab_size = 0
        self.top_k = config.top_k
        self.stop_token_ids: set[int] = set()
        self.max_model_len: dict[str, int | None] = {}
        self.stepper = TopKStepper(config.q_star, 0)
        # role ("base", "teacher") -> url, served model name, and its directory if on this machine
        self.served: dict[str, dict[str, str | None]] = {}
        self.base_weights: BaseWeights | None = None  # `start` creates it with the base server's client
        self.weight_version = 0
        self._weight_loads = 0
        self._reset_statistics()

    # -- life cycle ---------------------------------------------------------------------

    async def __aenter__(self) -> "DualVLLMCoordinator":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect and check both servers (called by `async with`)."""
        if self._started:
            return
        cfg = self.config
        common: dict[str, Any] = dict(
            timeout=cfg.request_timeout,
            pool_size=cfg.connection_pool_size,
            max_retries=cfg.max_retries,
            retry_delay=cfg.retry_delay,
            counters=self.counters,
            log=self.log,
        )
        self._theta = ServerClient("base", cfg.theta_url, api_key=cfg.theta_api_key, **common)
        self._t = ServerClient("teacher", cfg.t_url, api_key=cfg.t_api_key, **common)
        self.base_weights = BaseWeights(
            self._theta, cfg.weight_sync, address=cfg.weight_sync_address, port=cfg.weight_sync_port
        )
        try:
            roots = await asyncio.gather(
                self._discover(self._theta, cfg.theta_model), self._discover(self._t, cfg.t_model)
            )
            await asyncio.to_thread(self._load_tokenizers, *roots)
            await asyncio.gather(
                self._check_tokenizer(self._theta, self.theta_tokenizer),
                self._check_tokenizer(self._t, self.t_tokenizer),
            )
            self.vocab_size = self.stepper.vocab_size = len(self.theta_tokenizer)
            self.stop_token_ids = set(cfg.stop_token_ids) | declared_eos_ids(roots[0]) | declared_eos_ids(roots[1])
            for tokenizer in (self.theta_tokenizer, self.t_tokenizer):
                if tokenizer.eos_token_id is not None:
                    self.stop_token_ids.add(int(tokenizer.eos_token_id))
            await asyncio.gather(self._probe(self._theta), self._probe(self._t))
        except BaseException:
            await self.close()
            raise
        self._started = True

    async def close(self) -> None:
        for client in (self._theta, self._t):
            if client is not None:
                await client.aclose()
        self._started = False

    async def _discover(self, client: ServerClient, model: str | None) -> str | None:
        """Pick the served model and return its directory (`root`) when it is on this machine."""
        body = await client.request("GET", "/v1/models")
        try:
            entries = {entry["id"]: entry for entry in body["data"]}
        except (KeyError, TypeError) as error:
            raise MalformedResponseError(
                f"{client}: /v1/models is not an OpenAI model list ({error}): {body}"
            ) from None
        if model is None:
            if len(entries) != 1:
                raise ValueError(
                    f"{client} serves {sorted(entries)}; say which one with "
                    f"`{'theta' if client.role == 'base' else 't'}_model=`."
                )
            model = next(iter(entries))
        elif model not in entries:
            raise ValueError(
                f"{client} serves {sorted(entries)}, not {model!r}; fix "
                f"`{'theta' if client.role == 'base' else 't'}_model`."
            )
        client.model = model
        self.max_model_len[client.role] = entries[model].get("max_model_len")
        root = entries[model].get("root")
        local_root = root if root and Path(root).is_dir() else None
        self.served[client.role] = {"url": client.url, "model": model, "root": local_root}
        return local_root

    def _load_tokenizers(self, theta_root: str | None, t_root: str | None) -> None:
        from transformers import AutoTokenizer

        cfg = self.config
        theta, t = self._clients()
        for attr, path, root, option in (
            ("theta_tokenizer", cfg.theta_tokenizer, theta_root, "theta_tokenizer"),
            ("t_tokenizer", cfg.t_tokenizer, t_root, "t_tokenizer"),
        ):
            if getattr(self, attr) is not None:
                continue
            source = path or root
            if source is None:
                client = theta if attr == "theta_tokenizer" else t
                flag = "--base" if attr == "theta_tokenizer" else "--teacher"
                raise ValueError(
                    f"{client} serves {client.model!r} from a directory that is not on this machine, so "
                    f"its tokenizer cannot be found; pass `{option}=` (a local path or hub id), or "
                    f"`{flag}` on the command line."
                )
            setattr(self, attr, AutoTokenizer.from_pretrained(source))
        try:
            check_same_vocabulary(self.theta_tokenizer, self.t_tokenizer)
        except ValueError as error:
            raise ValueError(f"{theta} ({theta.model}) and {t} ({t.model}): {error}") from None

    async def _check_tokenizer(self, client: ServerClient, tokenizer) -> None:
        """The local tokenizer must encode like the served model's (vLLM's /tokenize)."""
        text = "Hello world! 12 + 34 = 46. The teacher and the student."
        try:
            body = await client.request(
                "POST", "/tokenize", {"model": client.model, "prompt": text, "add_special_tokens": False}, retries=0
            )
            served = body["tokens"]
        except (ServerRequestError, MalformedResponseError, KeyError, TypeError):
            self.log.info("%s has no usable /tokenize endpoint; skipping the tokenizer check", client)
            return
        local = tokenizer(text, add_special_tokens=False)["input_ids"]
        if list(served) != list(local):
            raise ValueError(
                f"{client} ({client.model}) tokenizes text differently from the local tokenizer "
                f"({getattr(tokenizer, 'name_or_path', tokenizer)!r}): {served[:12]} vs {local[:12]}. "
                "Pass the served model's tokenizer (`theta_tokenizer=` / `t_tokenizer=`)."
            )

    async def _probe(self, client: ServerClient) -> None:
        tokenizer = self.theta_tokenizer
        token = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), 0)
        try:
            ids, logp = await client.top_logprobs([[int(token)]], self.top_k, self.vocab_size)
        except ServerRequestError as error:
            fix = ""
            if "logprobs" in error.message:
                fix = (
                    f" Lower `top_k` (={self.top_k}) or restart the server with `--max-logprobs {self.top_k}` "
                    "(-1 allows the whole vocabulary)."
                )
            raise ValueError(
                f"{client} rejected a probe request with top_k={self.top_k}: {error.message}.{fix}"
            ) from None
        except MalformedResponseError as error:
            raise ValueError(f"A probe request found the server unusable: {error}") from None
        client.check_log_prob_values(ids, logp)

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError(
                "Use the coordinator inside `async with DualVLLMCoordinator(config) as coordinator:` "
                "(or await coordinator.start() first)."
            )

    def _clients(self) -> tuple[ServerClient, ServerClient]:
        """The base and the teacher server's clients (`start` creates them)."""
        if self._theta is None or self._t is None:
            raise RuntimeError("The coordinator has no server clients yet; await coordinator.start() first.")
        return self._theta, self._t

    # -- weights ------------------------------------------------------------------------

    async def load_base_weights(
        self,
        weights_path: str | os.PathLike | None = None,
        *,
        named_tensors=None,
        version: int | None = None,
        shared_dir: str | os.PathLike | None = None,
    ) -> int:
        """Load new policy weights into the base server and return the new weight version.

        Give either `weights_path` (a checkpoint directory of `*.safetensors` in the model's
        naming) or `named_tensors` (`(name, tensor)` pairs, e.g. `model.state_dict().items()`).
        `config.weight_sync` says how (`servers/weights.py`): through vLLM's NCCL weight transfer
        (a server started like `trl vllm-serve`), or by a dev-mode reload from a directory the
        server can read (`named_tensors` are written under `shared_dir`, by default /dev/shm; the
        server must run with `VLLM_SERVER_DEV_MODE=1`; works on CPU servers). The version counts
        loads unless `version` sets it (a trainer's global step). Call it between `generate_batch` calls.
        """
        self._require_started()
        if (weights_path is None) == (named_tensors is None):
            raise ValueError("Pass exactly one of `weights_path` and `named_tensors`.")
        version = self.weight_version + 1 if version is None else int(version)
        assert self.base_weights is not None  # (created by start)
        await self.base_weights.load(weights_path, named_tensors, version=version, shared_dir=shared_dir)
        self.weight_version = version
        self._weight_loads += 1
        return self.weight_version

    # -- one step -----------------------------------------------------------------------

    def mix(
        self, ids_theta, logp_theta, ids_t, logp_t, *, temperature: float = 1.0, return_diagnostics: bool = True
    ) -> StepDistribution:
        """q* over the candidate columns of two top-k lists (`[B, k]` each): the core's sparse path."""
        return self.stepper.mix(
            ids_theta, logp_theta, ids_t, logp_t, temperature=temperature, return_diagnostics=return_diagnostics
        )

    async def next_token_distribution(
        self,
        base_prefixes: Sequence[Sequence[int]],
        teacher_prefixes: Sequence[Sequence[int]] | None = None,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        return_diagnostics: bool = True,
    ) -> StepDistribution:
        """q* for the next token after each prefix (token ids), without sampling: one step.

        `teacher_prefixes` default to `base_prefixes`; `top_k` overrides the config's.
        """
        self._require_started()
        theta, t = self._clients()
        base_ids = [list(p) for p in base_prefixes]
        teacher_ids = base_ids if teacher_prefixes is None else [list(p) for p in teacher_prefixes]
        k = top_k or self.top_k
        (ids_theta, lp_theta), (ids_t, lp_t) = await asyncio.gather(
            theta.top_logprobs(base_ids, k, self.vocab_size),
            t.top_logprobs(teacher_ids, k, self.vocab_size),
        )
        return self.mix(
            ids_theta, lp_theta, ids_t, lp_t, temperature=temperature, return_diagnostics=return_diagnostics
        )

    async def _fetch(self, rows: list[TopKSequence]) -> tuple[dict[int, tuple], dict[int, str]]:
        """Both servers' top-k for every row: one batched request per server, and per-row
        requests for a side whose batched request failed (so a bad row marks only itself).

        Returns `({row position: (ids_theta, lp_theta, ids_t, lp_t)}, {row position: error})`.
        """
        theta, t = self._clients()
        sides = (
            (theta, [s.base_ids for s in rows]),
            (t, [s.teacher_ids for s in rows]),
        )
        batched = await asyncio.gather(
            *(client.top_logprobs(prefixes, self.top_k, self.vocab_size) for client, prefixes in sides),
            return_exceptions=True,
        )
        per_side: list[list] = []
        for (client, prefixes), result in zip(sides, batched):
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
            if not isinstance(result, Exception):
                ids, logp = result
                per_side.append([(ids[i : i + 1], logp[i : i + 1]) for i in range(len(rows))])
                continue
            self._check_available(result)
            if len(rows) == 1:
                per_side.append([result])
                continue
            self.log.warning("%s: batched step failed (%s); retrying its %d rows one by one", client, result, len(rows))
            singles = await asyncio.gather(
                *(client.top_logprobs([p], self.top_k, self.vocab_size) for p in prefixes), return_exceptions=True
            )
            for single in singles:
                if isinstance(single, BaseException) and not isinstance(single, Exception):
                    raise single
                if isinstance(single, Exception):
                    self._check_available(single)
            per_side.append(singles)
        fetched, errors = {}, {}
        for position in range(len(rows)):
            theta, t = per_side[0][position], per_side[1][position]
            failure = next((r for r in (theta, t) if isinstance(r, Exception)), None)
            if failure is not None:
                errors[position] = f"{type(failure).__name__}: {failure}"
            else:
                fetched[position] = (*theta, *t)
        return fetched, errors

    def _check_available(self, error: Exception) -> None:
        if isinstance(error, ServerUnavailableError):
            self._unavailable = error  # the remaining sequences fail at once instead of retrying one by one
            raise error

    async def _advance(
        self,
        rows: list[TopKSequence],
        *,
        seed: int,
        temperature: float,
        max_tokens: int,
        return_diagnostics: bool,
        stop_token_ids: set[int],
    ) -> None:
        """One step for `rows`: append a token to each, or set its error."""
        started = time.perf_counter()
        try:
            fetched, errors = await self._fetch(rows)
        except ServerUnavailableError as error:
            fetched, errors = {}, {i: f"{type(error).__name__}: {error}" for i in range(len(rows))}
        fetched_at = time.perf_counter()
        self._stats["server_seconds"] += fetched_at - started
        for position, message in errors.items():
            rows[position].fail(message)
        if not fetched:
            return
        positions = sorted(fetched)
        ids_theta, lp_theta, ids_t, lp_t = (torch.cat([fetched[p][j] for p in positions]) for j in range(4))
        ok = [rows[p] for p in positions]
        self.stepper.advance(
            ok,
            ids_theta,
            lp_theta,
            ids_t,
            lp_t,
            seed=seed,
            temperature=temperature,
            max_tokens=max_tokens,
            stop_token_ids=stop_token_ids,
            return_diagnostics=return_diagnostics,
        )
        self._stats["compute_seconds"] += time.perf_counter() - fetched_at

    # -- many sequences -----------------------------------------------------------------

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

        Prompts are strings, chat message lists (each tokenizer's chat template) or token-id
        lists. `teacher_prompts` give the teacher its own view of each prompt. Up to
        `config.max_concurrency` sequences are in flight; a sequence ends at a stop token of
        either model (or of `stop_token_ids`) or after `max_tokens`. `on_policy` (one bool
        per prompt) samples a row from the base alone (α = 0). A sequence whose requests
        fail (after retries) gets `error` set and empty fields; the others are unaffected.
        """
        self._require_started()
        check_generate_arguments(prompts, teacher_prompts, on_policy, max_tokens=max_tokens, temperature=temperature)
        sequences = make_sequences(prompts, teacher_prompts, on_policy, self.theta_tokenizer, self.t_tokenizer)
        seed = self.config.seed if seed is None else seed
        self._unavailable = None
        progress = None
        if show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(sequences), desc="q* sampling (vLLM)", unit="sample")
        queue = deque(sequences)
        groups = min(self.config.pipeline_groups, self.config.max_concurrency)
        capacity = math.ceil(self.config.max_concurrency / groups)
        options = dict(
            seed=seed,
            temperature=temperature,
            max_tokens=max_tokens,
            return_diagnostics=return_diagnostics,
            stop_token_ids=self.stop_token_ids | {int(i) for i in stop_token_ids or ()},
        )
        started = time.perf_counter()
        try:
            await asyncio.gather(*(self._run_group(queue, capacity, progress, options) for _ in range(groups)))
        finally:
            self._stats["seconds"] += time.perf_counter() - started
            if progress is not None:
                progress.close()
        self._stats["samples"] += len(sequences)
        self._stats["failed_samples"] += sum(s.error is not None for s in sequences)
        return [sequence_output(s, self.theta_tokenizer, return_diagnostics) for s in sequences]

    async def _run_group(self, queue: deque, capacity: int, progress, options: dict) -> None:
        active: list[TopKSequence] = []
        while True:
            while queue and len(active) < capacity:
                active.append(queue.popleft())
            if not active:
                return
            if self._unavailable is not None:
                for row in active:
                    row.fail(f"ServerUnavailableError: {self._unavailable}")
            else:
                await self._advance(active, **options)
            finished = [s for s in active if s.done]
            active = [s for s in active if not s.done]
            if progress is not None and finished:
                progress.update(len(finished))

    # -- statistics ---------------------------------------------------------------------

    def _reset_statistics(self) -> None:
        self._stats = dict(samples=0, failed_samples=0, seconds=0.0, server_seconds=0.0, compute_seconds=0.0)

    def get_statistics(self) -> dict[str, float]:
        """Totals since the coordinator was created.

        total_tokens, samples, failed_samples, steps (batched steps), mean_batch_size,
        requests (HTTP requests sent, retries included), retries, failed_requests,
        dropped_entries (top-k ids beyond the tokenizer), covered_mass_theta_mean /
        covered_mass_t_mean (mass of each side's own top-k list, mean over generated
        tokens), elapsed (seconds inside generate_batch), tokens_per_second, and where
        the time went: server_seconds (waiting for both servers' answers, parsing
        included) and compute_seconds (q* and sampling); with several pipeline groups
        these overlap; weight_version and weight_loads (`load_base_weights`).
        """
        s, c = {**self._stats, **self.stepper.stats}, self.counters
        tokens = s["tokens"]
        return {
            "total_tokens": tokens,
            "samples": s["samples"],
            "failed_samples": s["failed_samples"],
            "steps": s["steps"],
            "mean_batch_size": tokens / s["steps"] if s["steps"] else 0.0,
            "requests": c.requests,
            "retries": c.retries,
            "failed_requests": c.failed_requests,
            "dropped_entries": c.dropped_entries,
            "covered_mass_theta_mean": s["covered_theta_sum"] / tokens if tokens else float("nan"),
            "covered_mass_t_mean": s["covered_t_sum"] / tokens if tokens else float("nan"),
            "elapsed": s["seconds"],
            "tokens_per_second": tokens / s["seconds"] if s["seconds"] > 0 else 0.0,
            "server_seconds": s["server_seconds"],
            "compute_seconds": s["compute_seconds"],
            "weight_version": self.weight_version,
            "weight_loads": self._weight_loads,
        }


__all__ = [
    "DualVLLMCoordinator",
    "StepDistribution",
    "counter_uniforms",
    "sample_step",
    "ServerError",
]
