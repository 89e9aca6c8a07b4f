"""New policy weights for the base server: vLLM's NCCL weight transfer, or a dev-mode reload.

Two ways, chosen by `CoordinatorConfig.weight_sync`:

- **nccl**, what a TRL user's server runs (`trl vllm-serve` starts vLLM's own server with
  `VLLM_SERVER_DEV_MODE=1` and `--weight-transfer-config '{"backend": "nccl"}'`). This process
  joins the server's workers in an NCCL group once (rank 0 of `1 + world size`, over a TCP
  rendezvous at `weight_sync_address:weight_sync_port`: `POST /init_weight_transfer_engine` while
  vLLM's `nccl_common.trainer_init` opens this end), then per update: `POST /start_weight_update`,
  `POST /update_weights` with the tensors' names, dtypes and shapes while vLLM's
  `packed_nccl_broadcast_producer` broadcasts them, `POST /finish_weight_update` with the version,
  and `POST /reset_prefix_cache` (cached blocks hold the old weights' KV). The update runs with the
  server paused (`/pause?mode=wait` ... `/resume`). It needs CUDA and vLLM here; it was built from
  vLLM 0.33 / 0.34's routes and trainer helpers (and TRL 1.16's client) and never ran on a GPU.
- **reload**: `/pause?mode=wait`, `/collective_rpc` `reload_weights` from a checkpoint directory
  the server can read (a temporary one under `shared_dir`, /dev/shm by default), `/reset_prefix_cache`,
  `/resume`: no NCCL, so it works on CPU servers, on one machine (or a shared filesystem).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from typing import Any, Callable
from urllib.parse import urlparse

from ..weights import weights_directory
from .client import ServerClient, ServerRequestError

DEV_MODE_HINT = (
    "restart it with VLLM_SERVER_DEV_MODE=1 in its environment (tests/vllm_servers.py and `trl vllm-serve` do)"
)
NCCL_SERVER_HINT = '--weight-transfer-config \'{"backend": "nccl"}\''


class NcclTransport:
    """This process's end of vLLM's NCCL weight transfer: vLLM's own trainer-side helpers.

    `open_endpoint(init_info) -> group` joins the rendezvous as rank 0 (it blocks until the
    server's workers join); `broadcast(named_tensors, group)` sends the tensors in vLLM's packed
    format. Tests pass stand-ins for both; nothing else here touches NCCL.
    """

    def open_endpoint(self, init_info: dict) -> Any:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(
                "weight_sync='nccl' needs a CUDA device in this process (vLLM's NCCL communicator); on a CPU machine "
                "use weight_sync='reload' with a server started with VLLM_SERVER_DEV_MODE=1."
            )
        try:
            from vllm.distributed.weight_transfer.nccl_common import trainer_init
        except ImportError as error:
            raise ImportError(
                "weight_sync='nccl' needs vLLM (0.32-0.34) in this environment for its NCCL weight-transfer helpers; "
                "install it, or use weight_sync='reload'."
            ) from error
        return trainer_init(init_info)

    def broadcast(self, named_tensors, group) -> None:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        packed_nccl_broadcast_producer(iterator=iter(named_tensors), group=group, src=0, post_iter_func=lambda x: x[1])


def local_address(url: str) -> str:
    """The address a server at `url` reaches this process at: loopback for a server on this
    machine, else this host's address (set `weight_sync_address` where that guess is wrong)."""
    host = urlparse(url).hostname or "127.0.0.1"
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return "127.0.0.1"
    except ValueError:
        pass
    return socket.gethostbyname(socket.gethostname())


def _dtype_name(tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


class BaseWeights:
    """Loads policy weights into one (base) server, by `mode` ("auto", "nccl" or "reload")."""

    def __init__(
        self,
        client: ServerClient,
        mode: str = "auto",
        *,
        address: str | None = None,
        port: int = 51216,
        transport: NcclTransport | None = None,
        has_cuda: Callable[[], bool] | None = None,
    ):
        self.client, self.requested = client, mode
        self.mode: str | None = None if mode == "auto" else mode  # resolved at the first load
        self.address, self.port = address, port
        self.transport = transport or NcclTransport()
        self.has_cuda = has_cuda or _cuda_available
        self.group: Any = None  # the NCCL group, once joined

    async def resolve(self) -> str:
        """The mode "auto" stands for with this server: nccl where the server has an NCCL weight-transfer
        engine and this process has CUDA, else reload."""
        if self.mode is None:
            backend = (await self._transfer_config() or {}).get("backend")
            self.mode = "nccl" if backend == "nccl" and self.has_cuda() else "reload"
        return self.mode

    async def _transfer_config(self) -> dict | None:
        """The server's `weight_transfer_config` (its dev-mode /server_info), None without one."""
        try:
            info = await self.client.request("GET", "/server_info?config_format=json", retries=0)
        except ServerRequestError as error:
            if error.status == 404:
                raise RuntimeError(
                    f"{self.client} has no development endpoints (GET /server_info answered 404), through which the "
                    f"policy's weights are loaded: {DEV_MODE_HINT}."
                ) from None
            raise
        config = (info.get("vllm_config") or {}) if isinstance(info, dict) else {}
        return config.get("weight_transfer_config")

    async def load(self, weights_path=None, named_tensors=None, *, version: int, shared_dir=None) -> None:
        if await self.resolve() == "nccl":
            if named_tensors is None:
                named_tensors = _load_checkpoint(weights_path)
            await self._paused(self._send(list(named_tensors), version))
        else:
            with weights_directory(weights_path, named_tensors, shared_dir) as directory:
                await self._paused(self._reload(directory))

    async def _paused(self, update) -> None:
        """Run `update` with the server paused (requests in flight finish first), then resume it."""
        try:
            await self.client.request("POST", "/pause?mode=wait", retries=0)
        except ServerRequestError as error:
            update.close()
            if error.status == 404:
                raise RuntimeError(
                    f"{self.client} has no weight-update endpoints (POST /pause answered 404): {DEV_MODE_HINT} so "
                    "that the trainer can load the policy's weights into it."
                ) from None
            raise
        try:
            await update
            await self.client.request("POST", "/reset_prefix_cache", retries=0)  # cached blocks hold old-weight KV
        finally:
            await self.client.request("POST", "/resume")

    async def _reload(self, directory: str) -> None:
        await self.client.request(
            "POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": directory}}, retries=0
        )

    async def _join(self) -> None:
        """Join the server's workers in the NCCL group (once per coordinator)."""
        if self.group is not None:
            return
        if not await self._transfer_config():
            raise RuntimeError(
                f"{self.client} has no weight-transfer engine, which weight_sync='nccl' needs: restart it with "
                f"{NCCL_SERVER_HINT} (and VLLM_SERVER_DEV_MODE=1), as `trl vllm-serve` does, or use "
                "weight_sync='reload'."
            )
        world = int((await self.client.request("GET", "/get_world_size", retries=0))["world_size"])
        init_info = {
            "master_address": self.address or local_address(self.client.url),
            "master_port": self.port,
            "rank_offset": 1,  # this process is rank 0, the server's workers follow
            "world_size": world + 1,
            "packed": True,
        }
        # Both ends block in the rendezvous until the other arrives: the request and this end together.
        _, self.group = await asyncio.gather(
            self.client.request("POST", "/init_weight_transfer_engine", {"init_info": init_info}, retries=0),
            asyncio.to_thread(self.transport.open_endpoint, init_info),
        )

    async def _send(self, named_tensors: list, version: int) -> None:
        await self._join()
        update_info = {
            "names": [name for name, _ in named_tensors],
            "dtype_names": [_dtype_name(tensor) for _, tensor in named_tensors],
            "shapes": [list(tensor.shape) for _, tensor in named_tensors],
        }
        await self.client.request("POST", "/start_weight_update", {}, retries=0)
        # The server's workers receive while the request is open: the broadcast runs beside it.
        await asyncio.gather(
            self.client.request("POST", "/update_weights", {"update_info": update_info}, retries=0),
            asyncio.to_thread(self.transport.broadcast, named_tensors, self.group),
        )
        await self.client.request("POST", "/finish_weight_update", {"weight_version": str(version)}, retries=0)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _load_checkpoint(weights_path) -> list:
    """`(name, tensor)` pairs of a checkpoint directory's safetensors files, on the current CUDA device."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(weights_path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{weights_path!r} holds no *.safetensors files to send.")
    return [item for f in files for item in load_file(os.path.join(weights_path, f), device="cuda").items()]
