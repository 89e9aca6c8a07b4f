"""The tests that must hold beside vLLM, run in the vLLM environment.

A TRL user's environment has vLLM, which pins its transformers (vLLM 0.32: >=5.16.1,<5.20), and
every front must work there. So the in-process engine tests (`tests/test_engines*.py`) run in the
vLLM venv (`.ci/install_vllm.sh`, with optimal-sampling, TRL and PEFT installed beside vLLM by
`pip install -e .[trl] peft`), and so do the core's, the server coordinator's, the transformers
front's and the trainers' tests, which the main venv's suite also runs under the newest
transformers. `tests/vllm_servers.py start` records the venv in the servers' env file as
OPTIMAL_SAMPLING_VLLM_VENV (or set that variable). This test runs them there and fails with
their failures; under CI a skipped test fails it too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_servers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VLLM_VENV_TESTS = [
    "tests/test_engines.py",
    "tests/test_engines_cli.py",
    "tests/test_engines_pipeline.py",  # only there
    "tests/test_engines_trainer.py",
    "tests/test_vllm_v2_processor.py",  # here against the installed vLLM's V2 interface classes
    "tests/test_vllm_weight_transfer.py",  # only there
    "tests/test_servers_weights.py",
    "tests/test_servers.py",
    "tests/test_topk_decoding.py",
    "tests/test_compat.py",
    # the transformers front and the trainers (their default, transformers backend), LoRA included
    "tests/test_generation.py",
    "tests/test_fast.py",
    "tests/test_options.py",
    "tests/test_peft.py",
    "tests/test_trainers.py",
    "tests/test_trainers_tools.py",
    "tests/test_distillation.py",
    "tests/test_distillation_tools.py",
    "tests/test_rollout_func.py",
    "tests/test_sparse.py",
    "tests/test_mixture.py",
    "tests/test_alpha.py",
    "optimal_sampling/alpha.py",
    "optimal_sampling/mixture.py",
    "optimal_sampling/sparse.py",
    "optimal_sampling/topk_decoding.py",
    "optimal_sampling/compat.py",
    "optimal_sampling/teacher.py",
    "optimal_sampling/processor.py",
    "optimal_sampling/generation.py",
    "optimal_sampling/fast.py",
    "optimal_sampling/decode_slot.py",
    "optimal_sampling/trainers",
    "optimal_sampling/servers",
    "optimal_sampling/engines",
]
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")


def vllm_venv() -> Path | None:
    venv = os.environ.get("OPTIMAL_SAMPLING_VLLM_VENV") or (vllm_servers.servers_from_env() or {}).get(
        "OPTIMAL_SAMPLING_VLLM_VENV"
    )
    return Path(venv) if venv else None


def test_core_server_and_engine_tests_pass_beside_vllm(tmp_path):
    venv = vllm_venv()
    if venv is None:
        hint = (
            "no vLLM venv for the tests that run beside vLLM: start the servers with tests/vllm_servers.py "
            "(it records the venv) or set OPTIMAL_SAMPLING_VLLM_VENV, after `VENV/bin/pip install -e .`"
        )
        if IN_CI:
            pytest.fail(f"CI must run the tests beside vLLM, but {hint}")
        pytest.skip(hint)
    python = venv / "bin" / "python"
    probe = subprocess.run(
        [str(python), "-c", "import vllm, optimal_sampling; print(optimal_sampling.__file__)"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if probe.returncode != 0 or not probe.stdout.strip().startswith(str(ROOT)):
        pytest.fail(
            f"{python} cannot import vllm and this checkout's optimal_sampling ({probe.stdout.strip()} "
            f"{probe.stderr.strip()[-400:]}); run `{venv}/bin/pip install -e {ROOT}`."
        )
    report = tmp_path / "vllm-venv.xml"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    run = subprocess.run(
        [
            str(python),
            "-m",
            "pytest",
            *VLLM_VENV_TESTS,
            "-p",
            "no:cacheprovider",
            "-q",
            "-rfEs",
            f"--junitxml={report}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    print(run.stdout[-6000:])  # shown with -rA / on failure
    suite = ElementTree.parse(report).getroot() if report.exists() else None
    if suite is None:
        pytest.fail(
            f"the tests beside vLLM did not run (exit code {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        )
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = suite.findall("testcase")
    failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    # CI has no GPU: the CUDA-only tests (captured steps) skip there by design, beside vLLM as in the main venv;
    # any other skip means CI did not provide something a test needs.
    skipped = [
        c.get("name")
        for c in cases
        if c.find("skipped") is not None and "GPU" not in (c.find("skipped").get("message") or "")
    ]
    assert cases and not failed and run.returncode == 0, f"tests beside vLLM failed: {failed}\n{run.stdout[-4000:]}"
    for module in ("test_engines", "test_generation", "test_trainers", "test_peft"):
        assert any(c.get("classname", "").endswith(module) for c in cases), f"{module} was not collected"
    if IN_CI:
        assert not skipped, f"tests beside vLLM skipped under CI: {skipped}"
