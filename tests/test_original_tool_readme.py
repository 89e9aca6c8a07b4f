"""The original tool's README (tests/original_tool/README.md, a verbatim copy) against this package.

Its users should be able to run its client code with only the import line changed
(`from dual_vllm import` -> `from optimal_sampling import`). Every ```python snippet is checked,
in order, in one namespace, against the two real vLLM servers:

- client snippets run as written, with top-level `await` / `async with` allowed (as in a
  notebook or `python -m asyncio`), the servers' URLs in place of localhost:8000 / 8001, and the
  names the README leaves to the reader predefined: `np` (numpy, used unimported) and
  `training_prompts`. A snippet that uses `coordinator` without opening one continues the API
  reference's `async with DualVLLMCoordinator(config) as coordinator:` and runs inside one;
- the two `@dataclass` snippets document interfaces: every `CoordinatorConfig` field they list
  is accepted with its default, and every `GenerationOutput` field exists;
- its ```bash snippets install the original tool's own dependencies and start its Llama-2 servers
  (neither is about this package); the health check runs against the servers.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import inspect
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from readme_blocks import fenced_blocks

from optimal_sampling import CoordinatorConfig, GenerationOutput

README = Path(__file__).resolve().parent / "original_tool" / "README.md"
BLOCKS = fenced_blocks(README.read_text())
PYTHON = [b for b in BLOCKS if b.language == "python"]
CLIENT = [b for b in PYTHON if "@dataclass" not in b.code]
NOT_ABOUT_THIS_PACKAGE = ("pip install aiohttp", "vllm.entrypoints.api_server", "python example.py")


def dataclass_fields(code: str) -> dict[str, object]:
    """Field name -> default (a literal) of the one dataclass a snippet defines."""
    [cls] = [node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.ClassDef)]
    return {
        node.target.id: ast.literal_eval(node.value) if node.value is not None else dataclasses.MISSING
        for node in cls.body
        if isinstance(node, ast.AnnAssign)
    }


def test_every_coordinator_config_field_it_documents_is_accepted_with_its_default():
    [block] = [b for b in PYTHON if "class CoordinatorConfig" in b.code]
    documented = dataclass_fields(block.code)
    assert {"enable_logging", "log_level", "top_k", "connection_pool_size"} <= set(documented)
    config = CoordinatorConfig(**documented)
    assert {name: getattr(config, name) for name in documented} == documented


def test_every_generation_output_field_it_documents_exists():
    [block] = [b for b in PYTHON if "class GenerationOutput" in b.code]
    ours = {f.name for f in dataclasses.fields(GenerationOutput)}
    assert set(dataclass_fields(block.code)) <= ours


def test_its_shell_snippets_are_the_health_check_and_the_original_tools_own_setup():
    for block in (b for b in BLOCKS if b.language == "bash"):
        assert "curl" in block.code or any(marker in block.code for marker in NOT_ABOUT_THIS_PACKAGE), block.code


def test_its_health_check_answers(servers):
    [block] = [b for b in BLOCKS if b.language == "bash" and "curl" in b.code]
    result = subprocess.run(
        ["bash", "-e", "-c", point_at(block.code, servers) + "\n"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def point_at(code: str, servers) -> str:
    return code.replace("http://localhost:8000", servers["OPTIMAL_SAMPLING_THETA_URL"]).replace(
        "http://localhost:8001", servers["OPTIMAL_SAMPLING_T_URL"]
    )


def client_code(block, servers) -> str:
    code = point_at(block.code.replace("from dual_vllm import", "from optimal_sampling import"), servers)
    if "coordinator." in code and "as coordinator" not in code:
        code = "async with DualVLLMCoordinator(config) as coordinator:\n" + textwrap.indent(code, "    ")
    return code


@pytest.fixture(scope="module")
def notebook():
    """The namespace the snippets share, with what the README leaves to its reader."""
    from optimal_sampling import DualVLLMCoordinator
    from optimal_sampling.toy import make_problems

    return {
        "__name__": "__original_readme__",
        "np": np,
        "DualVLLMCoordinator": DualVLLMCoordinator,
        "training_prompts": [row["prompt"] for row in make_problems(4, seed=0)],
    }


@pytest.mark.parametrize("block", CLIENT, ids=lambda b: b.name)
def test_its_client_snippet_runs_with_only_the_import_changed(block, notebook, servers):
    for earlier in CLIENT[: CLIENT.index(block)]:  # in order, once, as a reader would
        if earlier.name not in notebook.setdefault("__ran__", set()):
            run_snippet(earlier, notebook, servers)
    run_snippet(block, notebook, servers)


def run_snippet(block, notebook, servers) -> None:
    code = compile(
        client_code(block, servers), f"original README.md:{block.line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    )
    result = eval(code, notebook)  # top-level await makes it a coroutine
    if inspect.iscoroutine(result):
        asyncio.run(result)
    notebook.setdefault("__ran__", set()).add(block.name)
    for result in notebook.get("results") or []:  # every snippet that samples leaves `results`
        assert result.error is None, result.error
        assert set(result.diagnostics) >= {
            "alpha_mean",
            "alpha_std",
            "alpha_min",
            "alpha_max",
            "kl_theta_mean",
            "kl_t_mean",
            "kl_diff_mean",
            "ess_ratio_mean",
            "entropy_q_mean",
        }
