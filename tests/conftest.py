"""Test-wide settings: no network, quiet telemetry, deterministic single-thread torch; and the
two vLLM servers that the server tests need (`servers`)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_servers  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def servers() -> dict:
    """The running servers' settings (URLs, model names and directories; `vllm_servers.py`)."""
    cfg = vllm_servers.servers_from_env()
    if cfg is None:  # only under CI: elsewhere these tests are left out at collection
        pytest.fail(f"CI must run the vLLM server tests, but found {vllm_servers.SKIP_HINT}")
    return cfg


def pytest_collection_modifyitems(config, items):
    """Without servers (and outside CI), leave out the tests that need them and say so once at
    the end, rather than one skip line per test."""
    needs = [item for item in items if "servers" in getattr(item, "fixturenames", ())]
    if not needs or vllm_servers.in_ci() or vllm_servers.servers_from_env() is not None:
        return
    config.hook.pytest_deselected(items=needs)
    items[:] = [item for item in items if item not in needs]
    config.stash[_LEFT_OUT] = len(needs)


_LEFT_OUT = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, config):
    left_out = config.stash.get(_LEFT_OUT, 0)
    if left_out:
        tests = "1 test" if left_out == 1 else f"{left_out} tests"
        terminalreporter.write_line(f"{tests} not run: {vllm_servers.SKIP_HINT}", yellow=True)
