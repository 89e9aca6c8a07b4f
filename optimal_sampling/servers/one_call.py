"""One call from prompts to q* samples on two servers: open a coordinator, sample, close."""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from ..records import GenerationOutput
from .config import CoordinatorConfig
from .coordinator import DualVLLMCoordinator


async def generate_with_optimal_sampling_async(
    prompts: Sequence[Any],
    theta_url: str = "http://localhost:8000",
    t_url: str = "http://localhost:8001",
    *,
    teacher_prompts: Sequence[Any] | None = None,
    max_tokens: int = 100,
    temperature: float = 1.0,
    return_diagnostics: bool = True,
    show_progress: bool = False,
    seed: int | None = None,
    **config_fields,
) -> list[GenerationOutput]:
    """Open a coordinator on the two servers, sample, close: `await` this from async code."""
    config = CoordinatorConfig(theta_url=theta_url, t_url=t_url, **config_fields)
    async with DualVLLMCoordinator(config) as coordinator:
        return await coordinator.generate_batch(
            prompts,
            teacher_prompts=teacher_prompts,
            max_tokens=max_tokens,
            temperature=temperature,
            return_diagnostics=return_diagnostics,
            show_progress=show_progress,
            seed=seed,
        )


def generate_with_optimal_sampling(prompts, theta_url="http://localhost:8000", t_url="http://localhost:8001", **kwargs):
    """Sample q* completions from two vLLM servers in one call.

    From synchronous code it runs the sampling and returns the list of `GenerationOutput`.
    Inside a running event loop (async code, Jupyter) it returns an awaitable instead, as
    the original tool did: `results = await generate_with_optimal_sampling(...)`.
    Keyword arguments are `generate_batch`'s (`teacher_prompts`, `max_tokens`,
    `temperature`, `return_diagnostics`, `show_progress`, `seed`) and
    `CoordinatorConfig`'s fields (`top_k`, `max_retries`, ...).

        results = generate_with_optimal_sampling(["Hello"], "http://127.0.0.1:8000", "http://127.0.0.1:8001",
                                                 max_tokens=32, top_k=20)
    """
    coroutine = generate_with_optimal_sampling_async(prompts, theta_url, t_url, **kwargs)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    return coroutine
