"""`VLLMSampler`: the two-server coordinator behind a synchronous `generate`."""

from __future__ import annotations

from ..sync import SyncSampler
from .config import CoordinatorConfig
from .coordinator import DualVLLMCoordinator

__all__ = ["SyncSampler", "VLLMSampler"]


class VLLMSampler(SyncSampler):
    """The two-server coordinator behind a synchronous `generate` (what the CLI calls).

    Example (needs two running servers):

        with VLLMSampler(CoordinatorConfig(theta_url=..., t_url=..., top_k=20)) as sampler:
            outputs = sampler.generate(["12+34="], max_new_tokens=4, seed=0)
    """

    def __init__(self, config: CoordinatorConfig, *, temperature: float = 1.0):
        super().__init__(DualVLLMCoordinator(config), temperature=temperature)

    def served_models(self) -> dict[str, dict[str, str | None]]:
        """Per role ("base", "teacher"): the server's url, the served model's name, and its
        directory when that is on this machine (else None)."""
        return self.coordinator.served
