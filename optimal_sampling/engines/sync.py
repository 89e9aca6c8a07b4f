"""`InProcessVLLMSampler`: the in-process coordinator behind a synchronous `generate`."""

from __future__ import annotations

import os

from ..sync import SyncSampler
from .config import DrivenDecodeConfig, VLLMEngineSpec
from .coordinator import InProcessVLLMCoordinator


class InProcessVLLMSampler(SyncSampler):
    """Two in-process vLLM engines driven token by token, called synchronously.

    What the CLI's `--backend vllm-inprocess` and a trainer use. Per batch, a trainer calls

        outputs = sampler.generate(prompt_ids, teacher_prompts=teacher_prompt_ids, max_new_tokens=256,
                                   temperature=1.0, stop_token_ids=[...], on_policy=[...], seed=step)
        # outputs[i].generated_tokens, .logq, .logp_theta, .logp_t, .alpha_history, .error

    and after each optimizer step

        sampler.load_base_weights(named_tensors=model.state_dict().items(), version=step)

    so that `sampler.weight_version` says which weights the next rollouts come from.

    Args:
        base, teacher: `VLLMEngineSpec`s (or model paths).
        config: a `DrivenDecodeConfig` (or its fields as keyword arguments).
        temperature: the default sampling temperature (both models, before mixing).
    """

    def __init__(
        self,
        base: VLLMEngineSpec | str,
        teacher: VLLMEngineSpec | str,
        config: DrivenDecodeConfig | None = None,
        *,
        temperature: float = 1.0,
        **fields,
    ):
        super().__init__(InProcessVLLMCoordinator(base, teacher, config, **fields), temperature=temperature)


def engine_arguments(items: list[str], role: str, *, default_cpu: bool = False, rank: int = 0) -> dict:
    """`VLLMEngineSpec` fields from `KEY=VALUE` / `ROLE.KEY=VALUE` strings, for one role.

    Unknown keys go to `engine_kwargs` (any `vllm.AsyncEngineArgs` field). With
    `default_cpu`, a machine without CUDA gets settings that run the shipped toy pair, each
    engine bound to its own core where there are enough: the `rank`-th engine pair of this
    machine (one per training process) takes cores 2·rank and 2·rank + 1, modulo the cores.

    Example:
        >>> engine_arguments(["dtype=float32", "teacher.max_model_len=256", "enforce_eager=true"], "teacher")
        {'dtype': 'float32', 'max_model_len': 256, 'enforce_eager': True}
    """
    import json
    from dataclasses import fields

    known = {f.name for f in fields(VLLMEngineSpec)} - {"model", "engine_kwargs", "env"}
    spec: dict = {}
    if default_cpu:
        import torch

        if not torch.cuda.is_available():
            cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
            spec.update(
                dtype="float32",
                kv_cache_memory_bytes=64 << 20,
                max_model_len=512,
                enforce_eager=True,
                env={"VLLM_CPU_OMP_THREADS_BIND": str(cpus[(2 * rank + (role == "teacher")) % len(cpus)])},
            )
    extra: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(
                f"--vllm-engine-arg {item!r} is not KEY=VALUE (e.g. dtype=float32 or base.max_model_len=1024)."
            )
        target, _, name = key.rpartition(".")
        if target not in ("", "base", "teacher"):
            raise ValueError(f"--vllm-engine-arg {item!r}: the prefix must be `base.` or `teacher.`, not {target!r}.")
        if target and target != role:
            continue
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        (spec if name in known else extra)[name] = parsed
    if extra:
        spec["engine_kwargs"] = extra
    return spec
