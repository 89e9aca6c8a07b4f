"""The two-server backend: q* sampled from a base and a teacher vLLM server (top-k approximation).

`DualVLLMCoordinator` (async), `generate_with_optimal_sampling` (one call, sync or
awaitable) and `VLLMSampler` (sync, what the CLI uses) share one step: both servers'
top-k log-probs for the current token ids → `sparse_candidates` → `compute_mixture` →
a token sampled by the coordinator.
"""

from .client import MalformedResponseError, ServerError, ServerRequestError, ServerUnavailableError
from .config import CoordinatorConfig
from .coordinator import DualVLLMCoordinator, StepDistribution
from .one_call import generate_with_optimal_sampling, generate_with_optimal_sampling_async
from .sync import VLLMSampler

__all__ = [
    "CoordinatorConfig",
    "DualVLLMCoordinator",
    "MalformedResponseError",
    "ServerError",
    "ServerRequestError",
    "ServerUnavailableError",
    "StepDistribution",
    "VLLMSampler",
    "generate_with_optimal_sampling",
    "generate_with_optimal_sampling_async",
]
