"""`CoordinatorConfig`: everything the two-server coordinator needs to know, with help texts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

from ..options import QStarOptions, q_star_field, q_star_from

#: How the base server receives new policy weights (`CoordinatorConfig.weight_sync`, `servers/weights.py`).
WEIGHT_SYNC_MODES = ("auto", "nccl", "reload")


@dataclass
class CoordinatorConfig:
    """Settings of a `DualVLLMCoordinator` (the original tool's names, plus a few).

    Every field carries its help text in `metadata["help"]`. The API keys never appear in
    the config's `repr` (a logged config must not leak them), nor in error messages.

    Example:
        >>> from optimal_sampling.servers import CoordinatorConfig
        >>> config = CoordinatorConfig(theta_url="http://127.0.0.1:8000", t_url="http://127.0.0.1:8001", top_k=20)
        >>> config.top_k, config.max_retries
        (20, 3)
        >>> CoordinatorConfig(top_k=0)
        Traceback (most recent call last):
        ...
        ValueError: `top_k` (=0) must be >= 1: it is how many log-probs each server returns per step (e.g. 20-100).
        >>> "sk-" in repr(CoordinatorConfig(theta_api_key="sk-123", t_api_key="sk-456"))
        False
    """

    theta_url: str = field(default="http://localhost:8000", metadata={"help": "Base model (π_θ) server, without /v1."})
    t_url: str = field(default="http://localhost:8001", metadata={"help": "Teacher (π_t) server, without /v1."})
    top_k: int = field(
        default=100,
        metadata={
            "help": "Log-probs each server returns per step; the candidate set is the union of both "
            "top-k lists. Must not exceed the servers' --max-logprobs (-1 there allows the whole "
            "vocabulary); the start-up check reports the server's refusal."
        },
    )
    alpha_tol: float = q_star_field("tol")
    alpha_max_iter: int = q_star_field("max_iter")
    max_retries: int = field(
        default=3, metadata={"help": "Retries of a request after a connection error, an HTTP 5xx / 429 or a timeout."}
    )
    retry_delay: float = field(
        default=1.0, metadata={"help": "Seconds before the first retry; doubled after each further failure."}
    )
    request_timeout: float = field(default=60.0, metadata={"help": "Seconds before one HTTP request times out."})
    connection_pool_size: int = field(default=100, metadata={"help": "HTTP connections kept per server."})

    theta_api_key: str | None = field(
        default=None, repr=False, metadata={"help": "Bearer token for the base server (its --api-key); never shown."}
    )
    t_api_key: str | None = field(
        default=None, repr=False, metadata={"help": "Bearer token for the teacher server; never shown."}
    )
    theta_model: str | None = field(
        default=None, metadata={"help": "Served model name on the base server; default: the one /v1/models lists."}
    )
    t_model: str | None = field(
        default=None, metadata={"help": "Served model name on the teacher server; default: the one /v1/models lists."}
    )
    theta_tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer (path or hub id) of the base; default: the model directory /v1/models "
            "reports as `root`, when it exists on this machine."
        },
    )
    t_tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer of the teacher; default as for the base."}
    )
    max_concurrency: int = field(
        default=64,
        metadata={
            "help": "Sequences in flight at once. Each step sends one batched request per server "
            "holding every in-flight sequence, so this is also the server-side batch size."
        },
    )
    pipeline_groups: int = field(
        default=1,
        metadata={
            "help": "Split the in-flight sequences into this many groups that step independently, so the "
            "servers work on one group while the coordinator samples another."
        },
    )
    stop_token_ids: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Extra ids that end a sequence; both tokenizers' EOS and both models' "
            "generation_config EOS always do."
        },
    )
    # The q* options (`QStarOptions`) the top-k step honours; the temperature is each call's
    # (`generate_batch(temperature=...)`), and `topk_decoding.UNSUPPORTED_OPTIONS` are refused.
    alpha_method: str = q_star_field("alpha_method")
    alpha: float | None = q_star_field("alpha")
    kl_budget: float | None = q_star_field("kl_budget")
    alpha_min: float = q_star_field("alpha_min")
    alpha_max: float = q_star_field("alpha_max")
    force_teacher_first_tokens: int = q_star_field("force_teacher_first_tokens")
    empty_support: str = q_star_field("empty_support")
    seed: int = field(
        default=0,
        metadata={
            "help": "Sampling seed. Draws depend only on (seed, prompt index, step), not on concurrency "
            "or timing; generate_batch(seed=...) overrides it per call."
        },
    )
    weight_sync: str = field(
        default="auto",
        metadata={
            "help": "How `load_base_weights` puts the policy's weights into the base server: 'nccl' (vLLM's weight "
            "transfer, the server started like `trl vllm-serve`: VLLM_SERVER_DEV_MODE=1 and --weight-transfer-config "
            "'{\"backend\": \"nccl\"}'; needs CUDA and vLLM in the trainer), 'reload' (dev-mode reload from a "
            "checkpoint directory the server can read; works on CPU) or 'auto' (nccl when the server has an NCCL "
            "weight-transfer engine and this process has CUDA, else reload)."
        },
    )
    weight_sync_address: str | None = field(
        default=None,
        metadata={
            "help": "With weight_sync='nccl': this process's address, which the server's workers connect to for "
            "the NCCL rendezvous; default 127.0.0.1 for a server on this machine, else this host's address."
        },
    )
    weight_sync_port: int = field(
        default=51216, metadata={"help": "With weight_sync='nccl': the TCP port of that rendezvous."}
    )

    enable_logging: bool = field(
        default=True,
        metadata={
            "help": "False silences this coordinator's log records (retries, rows retried one by one); "
            "other coordinators and libraries are unaffected."
        },
    )
    log_level: str | int | None = field(
        default=None,
        metadata={
            "help": "If set (e.g. 'INFO', 'DEBUG' or logging.INFO), the level of the "
            "'optimal_sampling.servers' logger. As for any library, the records reach you through "
            "the handlers your application configures (e.g. logging.basicConfig()); "
            "None leaves the logging configuration alone."
        },
    )

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(
                f"`top_k` (={self.top_k}) must be >= 1: it is how many log-probs each server returns per step (e.g. 20-100)."
            )
        for name in ("max_concurrency", "connection_pool_size", "pipeline_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` (={getattr(self, name)}) must be >= 1.")
        if self.max_retries < 0 or self.retry_delay < 0:
            raise ValueError(
                f"Need max_retries >= 0 and retry_delay >= 0, got {self.max_retries} and {self.retry_delay}."
            )
        if self.weight_sync not in WEIGHT_SYNC_MODES:
            raise ValueError(f"`weight_sync` ({self.weight_sync!r}) must be one of {', '.join(WEIGHT_SYNC_MODES)}.")
        if not self.request_timeout > 0:
            raise ValueError(f"Need request_timeout > 0, got {self.request_timeout}.")
        self.q_star  # noqa: B018 (QStarOptions validates the q* fields, as for every front)
        for name in ("theta_url", "t_url"):
            url = getattr(self, name)
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"`{name}` ({url!r}) must be an http(s) URL such as http://127.0.0.1:8000.")
            # The coordinator adds /v1/...; accept the OpenAI-style base URL too.
            url = url.rstrip("/")
            setattr(self, name, url[:-3] if url.endswith("/v1") else url)
        self.stop_token_ids = [int(i) for i in self.stop_token_ids]
        if self.log_level is not None:
            logging_level(self.log_level)  # a bad name fails here, not when the coordinator starts

    @property
    def q_star(self) -> QStarOptions:
        """The q* options these fields describe (the temperature is each call's)."""
        # `top_k` here is the candidate count, not the truncation of q* after mixing
        return q_star_from(self, exclude=("top_k",))

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name → help text."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def logging_level(level: str | int) -> int:
    """The `logging` level of a name ('info', 'WARNING') or number, with a clear error otherwise.

    >>> logging_level("info"), logging_level(30)
    (20, 30)
    """
    if isinstance(level, bool) or not isinstance(level, (str, int)):
        raise ValueError(f"`log_level` ({level!r}) must be a logging level name such as 'INFO' or a number.")
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.strip().upper())
    if not isinstance(number, int):
        raise ValueError(
            f"`log_level` ({level!r}) is not a logging level; use one of DEBUG, INFO, WARNING, ERROR, CRITICAL."
        )
    return number
