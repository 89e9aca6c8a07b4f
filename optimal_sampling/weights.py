"""New policy weights for a vLLM engine or server: a temporary checkpoint that vLLM can reload.

Both vLLM backends update the policy's weights the same way, through vLLM's
`reload_weights(weights_path=DIR)` worker method: the in-process engines through
`collective_rpc`, a server through its `/collective_rpc` endpoint (dev mode). Tensors passed to
engine processes as call arguments do not arrive as tensors, so the weights travel as a file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


def write_safetensors(named_tensors, path: str) -> None:
    """`(name, tensor)` pairs as one safetensors file (tied weights written once per name, as copies)."""
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, tensor in named_tensors:
        tensor = tensor.detach().cpu().contiguous()
        if tensor.data_ptr() in seen:  # tied weights share storage, which safetensors refuses
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    save_file(tensors, path)


@contextlib.contextmanager
def checkpoint_of(named_tensors, directory: str | os.PathLike | None = None):
    """A temporary directory holding `named_tensors` (`(name, tensor)` pairs in the model's
    checkpoint naming, e.g. `model.state_dict().items()`) as one safetensors file.

    It is made under `directory` if given (a server on another mount must be able to read it),
    else in /dev/shm where there is one, and removed on exit.
    """
    if directory is None and os.path.isdir("/dev/shm"):
        directory = "/dev/shm"
    path = tempfile.mkdtemp(prefix="optimal-sampling-weights-", dir=directory)
    try:
        write_safetensors(named_tensors, os.path.join(path, "model.safetensors"))
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def weights_directory(weights_path=None, named_tensors=None, shared_dir: str | os.PathLike | None = None):
    """The directory a `load_base_weights` call reloads from: `weights_path` as given, or a
    temporary checkpoint of `named_tensors` under `shared_dir` (`checkpoint_of`). Exactly one of
    the two must be given."""
    if (weights_path is None) == (named_tensors is None):
        raise ValueError("Pass exactly one of `weights_path` and `named_tensors`.")
    if weights_path is not None:
        yield str(weights_path)
    else:
        with checkpoint_of(named_tensors, shared_dir) as directory:
            yield directory
