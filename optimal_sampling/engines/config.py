"""Settings of the in-process backend: one `VLLMEngineSpec` per model, one `DrivenDecodeConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..options import QStarOptions, q_star_field, q_star_from

# Engine arguments driven decode sets itself, and why (`VLLMEngineSpec.engine_args`).
FORCED_ENGINE_ARGS = {
    # A partially prefilled prompt is sampled and the sample discarded; its processor could
    # not tell that step from a real one. Without chunking, a prompt is prefilled in one step.
    "enable_chunked_prefill": False,
    # One step in flight per engine: each step's rows are exactly the unfinished requests.
    "async_scheduling": False,
    # Prompts go in as token ids and tokens come back as ids: the engine needs no tokenizer.
    "skip_tokenizer_init": True,
    # The model's generation_config.json must not supply sampling defaults.
    "generation_config": "vllm",
}


@dataclass
class VLLMEngineSpec:
    """How to start one of the two vLLM engines (base or teacher).

    Every field carries its help text in `metadata["help"]`; fields left at None take vLLM's
    default. `engine_kwargs` passes any other `vllm.AsyncEngineArgs` field.

    Example:
        >>> from optimal_sampling.engines import VLLMEngineSpec
        >>> spec = VLLMEngineSpec("path/to/model", dtype="float32", max_model_len=512, env={"VLLM_CPU_OMP_THREADS_BIND": "0"})
        >>> spec.engine_kwargs_for(max_num_seqs=64)["max_num_batched_tokens"]
        8192
        >>> VLLMEngineSpec("m", engine_kwargs={"enable_chunked_prefill": True})
        Traceback (most recent call last):
        ...
        ValueError: engine_kwargs sets enable_chunked_prefill, which driven decode sets itself (False): a partially prefilled prompt is sampled and the sample discarded, and the logits processor cannot tell that step from a real one. Drop it.
    """

    model: str = field(metadata={"help": "Model directory or hub id."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer path or hub id; default: `model`."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights / activations dtype (`auto`, `float32`, `bfloat16`, ...). "
            "On CPU `auto` casts float32 checkpoints to bfloat16."
        },
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs (or CPU workers) the model is split over."})
    gpu_memory_utilization: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of each GPU's memory this engine may use; two engines on one "
            "GPU need fractions that sum to less than 1 (e.g. 0.45 each)."
        },
    )
    max_model_len: int | None = field(default=None, metadata={"help": "Longest prompt + completion, in tokens."})
    kv_cache_memory_bytes: int | None = field(
        default=None,
        metadata={
            "help": "KV cache size in bytes (instead of gpu_memory_utilization); CPU engines "
            "need it (e.g. 64 MiB for the shipped toy pair)."
        },
    )
    max_num_seqs: int | None = field(
        default=None,
        metadata={"help": "Most sequences per engine step; default: the coordinator's share of max_concurrency."},
    )
    max_num_batched_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Token budget of one engine step. All prompts of a wave should fit in one "
            "step (both engines then admit the same rows); default max(8192, max_model_len)."
        },
    )
    enforce_eager: bool = field(default=False, metadata={"help": "Skip CUDA-graph capture / compilation."})
    seed: int = field(
        default=0, metadata={"help": "vLLM's own seed (unused by driven rows, which force their tokens)."}
    )
    env: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "Environment variables for this engine's processes, set while it starts, e.g. "
            "{'VLLM_CPU_OMP_THREADS_BIND': '0'} or {'CUDA_VISIBLE_DEVICES': '1'}."
        },
    )
    engine_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Other vllm.AsyncEngineArgs fields."})

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ValueError(f"`tensor_parallel_size` (={self.tensor_parallel_size}) must be >= 1.")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"`gpu_memory_utilization` (={self.gpu_memory_utilization}) must be in (0, 1].")
        for name, value in FORCED_ENGINE_ARGS.items():
            if name in self.engine_kwargs and self.engine_kwargs[name] != value:
                why = {
                    "enable_chunked_prefill": "a partially prefilled prompt is sampled and the sample discarded, and the "
                    "logits processor cannot tell that step from a real one",
                    "async_scheduling": "each engine step must hold exactly the unfinished requests",
                }.get(name, "driven decode needs it")
                raise ValueError(
                    f"engine_kwargs sets {name}, which driven decode sets itself ({value}): {why}. Drop it."
                )
        if "logits_processors" in self.engine_kwargs:
            raise ValueError(
                "engine_kwargs sets logits_processors; driven decode installs its own and cannot combine them."
            )

    def engine_kwargs_for(self, *, max_num_seqs: int) -> dict[str, Any]:
        """The `AsyncEngineArgs` keyword arguments of this engine (without the logits processor)."""
        kwargs: dict[str, Any] = dict(
            model=self.model,
            dtype=self.dtype,
            tensor_parallel_size=self.tensor_parallel_size,
            enforce_eager=self.enforce_eager,
            seed=self.seed,
            disable_log_stats=True,
            max_num_seqs=self.max_num_seqs or max_num_seqs,
        )
        for name in ("tokenizer", "gpu_memory_utilization", "max_model_len", "kv_cache_memory_bytes"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        kwargs["max_num_batched_tokens"] = self.max_num_batched_tokens or max(8192, self.max_model_len or 0)
        kwargs.update(self.engine_kwargs)
        kwargs.update(FORCED_ENGINE_ARGS)
        return kwargs

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


@dataclass
class DrivenDecodeConfig:
    """Settings of an `InProcessVLLMCoordinator` (the sampling side; engines have `VLLMEngineSpec`).

    The α options and `top_k`, `max_concurrency`, `pipeline_groups`, `stop_token_ids` and
    `seed` mean what they mean in `CoordinatorConfig`, so both vLLM backends draw the same
    tokens from the same settings.

    Example:
        >>> from optimal_sampling.engines import DrivenDecodeConfig
        >>> DrivenDecodeConfig(top_k=20, max_concurrency=64, pipeline_groups=2).group_capacity
        32
    """

    top_k: int = field(
        default=20,
        metadata={
            "help": "Log-probs each engine hands over per row and step; the candidate "
            "set is the union of both top-k lists (k = vocabulary size is exact)."
        },
    )
    # The q* options the top-k step honours, as in `CoordinatorConfig`.
    alpha_method: str = q_star_field("alpha_method")
    alpha: float | None = q_star_field("alpha")
    kl_budget: float | None = q_star_field("kl_budget")
    alpha_min: float = q_star_field("alpha_min")
    alpha_max: float = q_star_field("alpha_max")
    force_teacher_first_tokens: int = q_star_field("force_teacher_first_tokens")
    empty_support: str = q_star_field("empty_support")
    alpha_tol: float = q_star_field("tol")
    alpha_max_iter: int = q_star_field("max_iter")
    max_concurrency: int = field(
        default=128, metadata={"help": "Sequences in flight at once, over all pipeline groups."}
    )
    pipeline_groups: int = field(
        default=1,
        metadata={
            "help": "Engine pairs, each stepping its own group of sequences, so that q* for one group is "
            "computed while the other pair's engines run. Each pair is a full base + teacher."
        },
    )
    stop_token_ids: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Extra ids that end a sequence; both tokenizers' EOS and both models' declared EOS always do."
        },
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed; draws depend only on (seed, prompt index, step)."})
    weight_sync: str = field(
        default="reload",
        metadata={
            "help": "How `load_base_weights` loads new policy weights into the base engine(s): 'reload' (from a "
            "temporary checkpoint in shared memory; CPU and GPU) or 'ipc' (vLLM's CUDA IPC weight transfer of the "
            "trainer's GPU tensors, for engines colocated with the trainer on its GPU; unverified, see README)."
        },
    )
    step_timeout: float = field(
        default=600.0,
        metadata={
            "help": "Seconds to wait for an engine's next step before the waiting sequences fail "
            "(an engine that admitted fewer rows than the other and cannot catch up)."
        },
    )

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(
                f"`top_k` (={self.top_k}) must be >= 1: it is how many log-probs each engine hands over per step."
            )
        for name in ("max_concurrency", "pipeline_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` (={getattr(self, name)}) must be >= 1.")
        if self.pipeline_groups > self.max_concurrency:
            raise ValueError(
                f"`pipeline_groups` (={self.pipeline_groups}) cannot exceed `max_concurrency` "
                f"(={self.max_concurrency}): each group needs at least one sequence."
            )
        if self.weight_sync not in ("reload", "ipc"):
            raise ValueError(f"`weight_sync` ({self.weight_sync!r}) must be 'reload' or 'ipc'.")
        if not self.step_timeout > 0:
            raise ValueError(f"`step_timeout` (={self.step_timeout}) must be > 0 seconds.")
        self.q_star  # noqa: B018 (QStarOptions validates the q* fields, as for every front)
        self.stop_token_ids = [int(i) for i in self.stop_token_ids]

    @property
    def q_star(self) -> QStarOptions:
        """The q* options these fields describe (the temperature is each call's)."""
        # `top_k` here is the candidate count, not the truncation of q* after mixing
        return q_star_from(self, exclude=("top_k",))

    @property
    def group_capacity(self) -> int:
        """Sequences in flight per engine pair."""
        return math.ceil(self.max_concurrency / self.pipeline_groups)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}
