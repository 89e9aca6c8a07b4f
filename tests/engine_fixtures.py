"""Helpers of the in-process engine tests: the toy pair's engine specs, prompts, the HTTP reference."""

from __future__ import annotations

import asyncio
import os

from optimal_sampling.engines import VLLMEngineSpec
from optimal_sampling.servers import CoordinatorConfig, DualVLLMCoordinator
from optimal_sampling.toy import TOY_PAIR_DIR, make_problems

TOY = TOY_PAIR_DIR


def engine_spec(role: str) -> VLLMEngineSpec:
    """A CPU engine for one model of the toy pair: float32, small KV cache, one core each."""
    cpus = sorted(os.sched_getaffinity(0))
    return VLLMEngineSpec(
        str(TOY / role),
        dtype="float32",
        max_model_len=512,
        kv_cache_memory_bytes=64 << 20,
        enforce_eager=True,
        env={
            "VLLM_CPU_OMP_THREADS_BIND": str(cpus[(role == "teacher") % len(cpus)]),
            "VLLM_HOST_IP": "127.0.0.1",
            "TORCHDYNAMO_DISABLE": "1",
        },
    )


def toy_prompts(n: int, seed: int = 1) -> tuple[list[str], list[str]]:
    """`n` held-out addition problems: the base's plain prompts and the teacher's chat prompts."""
    rows = make_problems(n, seed=seed, split="test")
    return [r["prompt"] for r in rows], [r["teacher_prompt"] for r in rows]


def http_reference(servers: dict, prompts, teacher_prompts, *, max_tokens: int, seed: int, top_k: int, **fields):
    """The two-server coordinator's samples for the same prompts and settings."""
    config = CoordinatorConfig(
        theta_url=servers["OPTIMAL_SAMPLING_THETA_URL"],
        t_url=servers["OPTIMAL_SAMPLING_T_URL"],
        top_k=top_k,
        max_concurrency=len(prompts),
        theta_tokenizer=str(TOY / "base"),
        t_tokenizer=str(TOY / "teacher"),
        **fields,
    )

    async def run():
        async with DualVLLMCoordinator(config) as coordinator:
            return await coordinator.generate_batch(
                prompts, teacher_prompts=teacher_prompts, max_tokens=max_tokens, seed=seed
            )

    return asyncio.run(run())
