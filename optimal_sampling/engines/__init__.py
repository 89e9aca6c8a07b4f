"""The in-process backend: q* decoded by driving two vLLM engines in this process (no HTTP).

`InProcessVLLMCoordinator` (async) and `InProcessVLLMSampler` (sync, what the CLI and a
trainer call) start a base and a teacher `vllm` engine, each described by a
`VLLMEngineSpec`, and decode with the step the two-server backend uses
(`optimal_sampling.topk_decoding`), so both backends draw the same tokens under the same
seed. Importing this package does not import vLLM; starting a coordinator does.
"""

from .config import DrivenDecodeConfig, VLLMEngineSpec
from .coordinator import EngineFailedError, InProcessVLLMCoordinator
from .sync import InProcessVLLMSampler

__all__ = [
    "DrivenDecodeConfig",
    "EngineFailedError",
    "InProcessVLLMCoordinator",
    "InProcessVLLMSampler",
    "VLLMEngineSpec",
]
