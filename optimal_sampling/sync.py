"""`SyncSampler`: a synchronous `generate` over an async q* coordinator (both vLLM backends use it)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, Sequence

from .records import GenerationOutput


class SyncSampler:
    """A synchronous front for an async coordinator, with `OptimalSampler.generate`'s signature.

    It owns a private event loop, so the coordinator is started once (server checks and
    HTTP connections, or engines) and reused by every `generate` call. Do not use it inside
    a running event loop; use the coordinator there. Call `close()` (or use `with`) when done.
    """

    def __init__(self, coordinator, *, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"`temperature` (={temperature}) has to be a strictly positive float.")
        self.temperature = temperature
        self.coordinator = coordinator
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self.coordinator.start())
        except BaseException:
            self._loop.close()
            raise

    def _run(self, coroutine):
        if self._loop.is_closed():
            coroutine.close()
            raise RuntimeError(f"This {type(self).__name__} was closed.")
        config = getattr(self, "_config", None)  # a `with_config` view
        if config is None:
            return self._loop.run_until_complete(coroutine)
        coordinator = self.coordinator
        saved = coordinator.config
        coordinator.config, coordinator.stepper.q_star = config, config.q_star
        try:
            return self._loop.run_until_complete(coroutine)
        finally:
            coordinator.config, coordinator.stepper.q_star = saved, saved.q_star

    def with_config(self, **fields):
        """A sampler on the same coordinator (engines or server connections) whose calls use its
        config with `fields` changed, e.g. `alpha_method="fixed", alpha=1.0` for teacher-only
        samples, or a trainer's scheduled `alpha_max`; closing it leaves the coordinator running."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._config = replace(self.coordinator.config, **fields)
        return view

    def generate(
        self,
        prompts: Sequence[Any],
        *,
        teacher_prompts: Sequence[Any] | None = None,
        max_new_tokens: int = 128,
        batch_size: int | None = None,
        seed: int | None = None,
        return_diagnostics: bool = True,
        show_progress: bool = False,
        temperature: float | None = None,
        **options,
    ) -> list[GenerationOutput]:
        """One q* completion per prompt (see the coordinator's `generate_batch`).

        `batch_size` is accepted for `OptimalSampler` compatibility; the number of
        sequences in flight is the config's `max_concurrency`. `temperature` overrides the
        sampler's for this call; other keyword arguments (`on_policy`, `stop_token_ids`)
        go to `generate_batch`.
        """
        return self._run(
            self.coordinator.generate_batch(
                prompts,
                teacher_prompts=teacher_prompts,
                max_tokens=max_new_tokens,
                temperature=self.temperature if temperature is None else temperature,
                return_diagnostics=return_diagnostics,
                show_progress=show_progress,
                seed=seed,
                **options,
            )
        )

    def next_token_distribution(
        self,
        base_prefixes,
        teacher_prefixes=None,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        return_diagnostics: bool = True,
    ):
        """q* for the next token after each prefix (token ids), without sampling: one step
        (the coordinator's `next_token_distribution`; a `StepDistribution`)."""
        return self._run(
            self.coordinator.next_token_distribution(
                base_prefixes,
                teacher_prefixes,
                temperature=temperature,
                top_k=top_k,
                return_diagnostics=return_diagnostics,
            )
        )

    def load_base_weights(self, weights_path=None, *, named_tensors=None, version: int | None = None, **options) -> int:
        """Load new policy weights into the base engine or server and return the new weight
        version (the coordinator's `load_base_weights`: a checkpoint directory, or
        `named_tensors=model.state_dict().items()`; `version=` a trainer's global step)."""
        return self._run(
            self.coordinator.load_base_weights(weights_path, named_tensors=named_tensors, version=version, **options)
        )

    @property
    def weight_version(self) -> int:
        """Which policy weights the next samples come from (counts `load_base_weights`, or its `version`)."""
        return self.coordinator.weight_version

    def get_statistics(self) -> dict[str, float]:
        return self.coordinator.get_statistics()

    def close(self) -> None:
        if getattr(self, "_config", None) is not None:  # a view shares the coordinator it came from
            return
        if not self._loop.is_closed():
            self._loop.run_until_complete(self.coordinator.close())
            self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
