"""`VLLMSampler`: the coordinator behind a synchronous `generate` (what the CLI calls)."""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from ..generation import GenerationOutput
from .config import CoordinatorConfig
from .coordinator import DualVLLMCoordinator


class VLLMSampler:
    """A synchronous front for `DualVLLMCoordinator`, with `OptimalSampler.generate`'s signature.

    It owns a private event loop, so the server checks and the HTTP connections are done
    once and reused by every `generate` call. Do not use it inside a running event loop;
    use the coordinator there. Call `close()` (or use `with`) when done.

    Example (needs two running servers):

        with VLLMSampler(CoordinatorConfig(theta_url=..., t_url=..., top_k=20)) as sampler:
            outputs = sampler.generate(["12+34="], max_new_tokens=4, seed=0)
    """

    def __init__(self, config: CoordinatorConfig, *, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"`temperature` (={temperature}) has to be a strictly positive float.")
        self.temperature = temperature
        self.coordinator = DualVLLMCoordinator(config)
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self.coordinator.start())
        except BaseException:
            self._loop.close()
            raise

    @classmethod
    def from_cli_args(cls, args, **overrides) -> "VLLMSampler":
        """Build from `optimal-sampling generate --backend vllm ...` arguments (`overrides`:
        config fields to change, e.g. `alpha_method="fixed", alpha=0.0`).

        `--base` / `--teacher`, when given, are the tokenizers to use; otherwise the
        servers' model directories are.
        """
        from ..io import UsageError

        try:
            fields = dict(
                theta_url=args.theta_url,
                t_url=args.t_url,
                top_k=args.top_k_candidates,
                theta_tokenizer=args.base,
                t_tokenizer=args.teacher,
                alpha_method=args.alpha_method,
                alpha=args.alpha,
                max_concurrency=max(args.batch_size, 1),
                seed=args.seed,
            )
            config = CoordinatorConfig(**{**fields, **overrides})
            return cls(config, temperature=args.temperature)
        except (ValueError, RuntimeError, OSError) as error:  # server down, tokenizer mismatch, k too large
            raise UsageError(str(error)) from None

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
    ) -> list[GenerationOutput]:
        """One q* completion per prompt (see `DualVLLMCoordinator.generate_batch`).

        `batch_size` is accepted for `OptimalSampler` compatibility; the number of
        sequences in flight is the config's `max_concurrency`.
        """
        if self._loop.is_closed():
            raise RuntimeError("This VLLMSampler was closed.")
        return self._loop.run_until_complete(
            self.coordinator.generate_batch(
                prompts,
                teacher_prompts=teacher_prompts,
                max_tokens=max_new_tokens,
                temperature=self.temperature,
                return_diagnostics=return_diagnostics,
                show_progress=show_progress,
                seed=seed,
            )
        )

    def get_statistics(self) -> dict[str, float]:
        return self.coordinator.get_statistics()

    def served_models(self) -> dict[str, dict[str, str | None]]:
        """Per role ("base", "teacher"): the server's url, the served model's name, and its
        directory when that is on this machine (else None)."""
        return self.coordinator.served

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self.coordinator.close())
            self._loop.close()

    def __enter__(self) -> "VLLMSampler":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
