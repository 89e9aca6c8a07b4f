"""The messages between a driven engine's logits processor and the coordinator.

One UNIX stream socket per engine (the coordinator listens, each worker of the engine
connects on its first driven step). Per engine step, the worker sends the raw top-k of
every driven row and blocks; the coordinator answers with one token per row, in the same
order, which the processor then forces:

    hello   (worker → coordinator, once)   magic "OSH1", tensor-parallel rank
    step    (worker → coordinator)         magic "OSS1", rank, n rows, k,
                                           slot [n] int64, position [n] int64,
                                           ids [n, k] int32, logp [n, k] float32
    tokens  (coordinator → worker)         magic "OST1", n, token [n] int64

`slot` names the sequence (it travels in the request's `extra_args`), `position` is how
many tokens the engine has generated for it so far, so the coordinator can match the two
engines' rows even when their batches differ. A closed socket on either side means the
other process is gone. Pure Python and numpy: the worker imports it without the package's
other dependencies being exercised.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

import numpy as np

HELLO, STEP, TOKENS = b"OSH1", b"OSS1", b"OST1"
_HELLO = struct.Struct("<4sI")
_STEP = struct.Struct("<4sIII")
_TOKENS = struct.Struct("<4sI")

# The key of a driven request's `SamplingParams.extra_args`: {"channel": path, "slot": int, "k": int}.
EXTRA_ARGS_KEY = "optimal_sampling_driven"


class ProtocolError(RuntimeError):
    """A message that does not follow this protocol (a bug, or another program on the socket)."""


@dataclass
class StepMessage:
    """One engine step's driven rows: `slot`, `position` `[n]`, `ids` / `logp` `[n, k]`."""

    rank: int
    slot: np.ndarray
    position: np.ndarray
    ids: np.ndarray
    logp: np.ndarray


def pack_hello(rank: int) -> bytes:
    return _HELLO.pack(HELLO, rank)


def unpack_hello(data: bytes) -> int:
    magic, rank = _HELLO.unpack(data)
    if magic != HELLO:
        raise ProtocolError(f"expected a hello message, got {magic!r}")
    return rank


def pack_step(rank: int, slot, position, ids: np.ndarray, logp: np.ndarray) -> bytes:
    n, k = ids.shape
    return b"".join(
        (
            _STEP.pack(STEP, rank, n, k),
            np.ascontiguousarray(slot, dtype=np.int64).tobytes(),
            np.ascontiguousarray(position, dtype=np.int64).tobytes(),
            np.ascontiguousarray(ids, dtype=np.int32).tobytes(),
            np.ascontiguousarray(logp, dtype=np.float32).tobytes(),
        )
    )


def unpack_step_header(header: bytes) -> tuple[int, int, int, int]:
    """`(rank, n, k, body bytes)` of a step message, from its header."""
    magic, rank, n, k = _STEP.unpack(header)
    if magic != STEP:
        raise ProtocolError(f"expected a step message, got {magic!r}")
    return rank, n, k, n * (16 + 8 * k)


def unpack_step(rank: int, n: int, k: int, body: bytes) -> StepMessage:
    slot = np.frombuffer(body, np.int64, n, 0)
    position = np.frombuffer(body, np.int64, n, 8 * n)
    ids = np.frombuffer(body, np.int32, n * k, 16 * n).reshape(n, k)
    logp = np.frombuffer(body, np.float32, n * k, (16 + 4 * k) * n).reshape(n, k)
    return StepMessage(rank, slot, position, ids, logp)


def pack_tokens(tokens) -> bytes:
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    return _TOKENS.pack(TOKENS, len(tokens)) + tokens.tobytes()


# -- the worker's side: blocking sockets ----------------------------------------------------


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        chunk = sock.recv_into(view[got:])
        if chunk == 0:
            raise ConnectionError("the optimal-sampling coordinator closed the connection")
        got += chunk
    return bytes(buffer)


class WorkerLink:
    """A worker's connection to one coordinator: send a step's top-k, wait for its tokens."""

    def __init__(self, path: str, rank: int):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.rank = rank
        self.sock.sendall(pack_hello(rank))

    def exchange(self, slot, position, ids: np.ndarray, logp: np.ndarray) -> np.ndarray:
        """Send one step's rows; block until the coordinator answers with `[n]` token ids."""
        self.sock.sendall(pack_step(self.rank, slot, position, ids, logp))
        magic, n = _TOKENS.unpack(_recv_exactly(self.sock, _TOKENS.size))
        if magic != TOKENS or n != len(ids):
            raise ProtocolError(f"expected {len(ids)} tokens, got {magic!r} with {n}")
        return np.frombuffer(_recv_exactly(self.sock, 8 * n), np.int64)

    def close(self) -> None:
        self.sock.close()


STEP_HEADER_SIZE = _STEP.size
HELLO_SIZE = _HELLO.size
