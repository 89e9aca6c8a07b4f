"""New policy weights for the in-process base engine(s): a reload from a checkpoint, or CUDA IPC.

`DrivenDecodeConfig.weight_sync` chooses:

- **reload** (the default, and the way on CPU): the tensors are written to a temporary checkpoint
  in shared memory and every base engine runs vLLM's `reload_weights(weights_path=DIR)` worker
  method (`collective_rpc`); tensors passed to the engine processes as call arguments do not
  arrive as tensors, so they travel as a file.
- **ipc** (colocated on a GPU): vLLM's weight transfer with its `ipc` backend, the engines started
  with `weight_transfer_config={"backend": "ipc"}`: `init_weight_transfer_engine` once, then per
  update `start_weight_update`, `update_weights` with one CUDA IPC handle per tensor (pickled, as
  vLLM's HTTP client sends them, so they pass the engine's RPC; the engine processes run with
  `VLLM_ALLOW_INSECURE_SERIALIZATION=1` to read them) and `finish_weight_update`: the engine's
  workers load the trainer's GPU tensors without a copy through the host. Built from vLLM 0.32 /
  0.34's `ipc_engine.py`; never run here (no GPU).

Either way the prefix cache is reset afterwards (its blocks hold KV of the old weights).
"""

from __future__ import annotations

import base64
import pickle
from dataclasses import replace

from ..weights import weights_directory

#: `DrivenDecodeConfig.weight_sync`'s values.
ENGINE_WEIGHT_SYNC = ("reload", "ipc")
#: What the base engine needs for `weight_sync="ipc"` (added by `VLLMEngineSpec.engine_kwargs_for`'s caller).
IPC_ENGINE_KWARGS = {"weight_transfer_config": {"backend": "ipc"}}
IPC_ENGINE_ENV = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


def engine_spec_for(spec, role: str, weight_sync: str):
    """The `VLLMEngineSpec` an engine starts with: the base engine's gets what `weight_sync="ipc"` needs."""
    if role != "base" or weight_sync != "ipc":
        return spec
    return replace(spec, engine_kwargs={**spec.engine_kwargs, **IPC_ENGINE_KWARGS}, env={**spec.env, **IPC_ENGINE_ENV})


def ipc_update_info(named_tensors) -> tuple[dict, list]:
    """vLLM's `IPCWeightTransferUpdateInfo` fields for CUDA tensors (unpacked: one handle per tensor,
    keyed by the GPU's UUID), and the contiguous copies whose storage must stay alive until the
    engines finished loading."""
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    names, dtype_names, shapes, handles, keep = [], [], [], [], []
    for name, tensor in named_tensors:
        if tensor.device.type != "cuda":
            raise ValueError(
                f"weight_sync='ipc' sends CUDA tensors; {name!r} is on {tensor.device}. Use weight_sync='reload'."
            )
        weight = tensor.detach().contiguous()
        uuid = str(torch.cuda.get_device_properties(weight.device.index).uuid)
        names.append(name)
        dtype_names.append(str(weight.dtype).removeprefix("torch."))
        shapes.append(list(weight.shape))
        handles.append({uuid: reduce_tensor(weight)[1]})
        keep.append(weight)
    return ipc_payload(names, dtype_names, shapes, handles), keep


def ipc_payload(names: list, dtype_names: list, shapes: list, handles: list) -> dict:
    """The update info as it crosses the engine's RPC: the handles pickled and base64-encoded, as
    vLLM's HTTP client sends them (`ipc_handles_pickled`)."""
    pickled = base64.b64encode(pickle.dumps(handles)).decode("ascii")
    return {"names": names, "dtype_names": dtype_names, "shapes": shapes, "ipc_handles_pickled": pickled}


async def reload_engines(engines, weights_path=None, named_tensors=None) -> None:
    """Every base engine reloads from a checkpoint directory (or one written from `named_tensors`)."""
    with weights_directory(weights_path, named_tensors) as directory:
        for engine in engines:
            await engine.collective_rpc("reload_weights", kwargs={"weights_path": directory})
            await engine.reset_prefix_cache()


async def send_over_ipc(engines, named_tensors, *, joined: set, version: int) -> None:
    """Every base engine loads `named_tensors` (CUDA) through vLLM's IPC weight transfer; `joined`
    holds the engines whose transfer engine is initialised already (ids)."""
    import torch
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest, WeightTransferUpdateRequest

    update_info, keep = ipc_update_info(named_tensors)
    for engine in engines:
        if id(engine) not in joined:
            await engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info={"packed": False}))
            joined.add(id(engine))
        await engine.start_weight_update()
        await engine.update_weights(WeightTransferUpdateRequest(update_info=update_info))
        await engine.finish_weight_update(str(version))
        await engine.reset_prefix_cache()
    del keep  # the engines have loaded (copied) every tensor
    torch.cuda.ipc_collect()
