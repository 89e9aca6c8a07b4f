"""How a user gets (or learns to get) the two vLLM servers the server tests need."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
SOME_SERVER_TEST = "tests/test_servers.py"
A_QUICK_TEST = "tests/test_coordinator_config.py::test_api_keys_are_not_in_the_repr"


def pytest_without_servers(tmp_path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPTIMAL_SAMPLING_") and k != "CI"}
    clean["OPTIMAL_SAMPLING_VLLM_ENV_FILE"] = str(tmp_path / "no-servers.env")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", SOME_SERVER_TEST, A_QUICK_TEST],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_without_servers_their_tests_are_left_out_with_one_line_saying_how_to_start_them(tmp_path):
    result = pytest_without_servers(tmp_path)
    assert result.returncode == 0, result.stdout[-2000:]
    assert result.stdout.count("no vLLM servers") == 1
    assert "python tests/vllm_servers.py up" in result.stdout
    assert "deselected" in result.stdout and "skipped" not in result.stdout


def test_under_ci_the_server_tests_fail_without_servers(tmp_path):
    result = pytest_without_servers(tmp_path, CI="true")
    assert result.returncode != 0 and "CI must run the vLLM server tests" in result.stdout


def test_the_servers_report_absolute_model_directories(servers):
    """So the coordinator finds the tokenizers from any working directory (vLLM reports the path
    it was given as the model's `root`)."""
    for role in ("THETA", "T"):
        body = httpx.get(servers[f"OPTIMAL_SAMPLING_{role}_URL"] + "/v1/models", timeout=30).json()
        root = body["data"][0]["root"]
        assert Path(root).is_absolute() and (Path(root) / "config.json").is_file(), root
