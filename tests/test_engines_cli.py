"""`optimal-sampling generate --backend vllm-inprocess` against real engines on the toy pair.

Runs where `vllm` imports (see `tests/test_engines.py`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from optimal_sampling.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


def test_cli_backend_vllm_inprocess_writes_the_dataset_the_server_backend_writes(servers, tmp_path):
    common = [
        "generate",
        "--limit",
        "12",
        "--batch-size",
        "8",
        "--max-new-tokens",
        "4",
        "--top-k-candidates",
        "16",
        "--seed",
        "3",
        "--no-progress",
    ]
    inprocess, http = tmp_path / "inprocess.jsonl", tmp_path / "http.jsonl"
    assert (
        main(
            [
                *common,
                "--backend",
                "vllm-inprocess",
                "--vllm-engine-arg",
                "teacher.max_num_seqs=16",
                "--output",
                str(inprocess),
            ]
        )
        == 0
    )
    toy = Path(__file__).resolve().parent.parent / "optimal_sampling" / "toy" / "assets"
    assert (
        main(
            [
                *common,
                "--backend",
                "vllm",
                "--theta-url",
                servers["OPTIMAL_SAMPLING_THETA_URL"],
                "--t-url",
                servers["OPTIMAL_SAMPLING_T_URL"],
                "--base",
                str(toy / "base"),
                "--teacher",
                str(toy / "teacher"),
                "--output",
                str(http),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in inprocess.read_text().splitlines()]
    reference = [json.loads(line) for line in http.read_text().splitlines()]
    assert len(rows) == len(reference) == 12
    for row, ref in zip(rows, reference):
        assert row["error"] is None and row["teacher_prompt"] != row["prompt"]  # the toy task's teacher prompts
        assert row["generated_tokens"] == ref["generated_tokens"] and row["generated_text"] == ref["generated_text"]
        assert 1 <= len(row["generated_tokens"]) <= 4 and len(row["logq"]) == len(row["alpha_history"])
        assert all(math.isfinite(v) and v <= 0 for v in row["logq"])
