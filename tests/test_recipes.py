"""The experiment driver `recipes/grpo_toy.py`: its statistics, and one real two-step grid run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import grpo_toy  # noqa: E402


def test_holm_adjusts_step_down_and_keeps_the_order_monotone():
    adjusted = grpo_toy.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    # sorted 0.01, 0.03, 0.04 → ×3, ×2, ×1 = 0.03, 0.06, 0.04 → monotone: 0.03, 0.06, 0.06
    assert adjusted == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert grpo_toy.holm({"a": 0.6, "b": 0.7}) == pytest.approx({"a": 1.0, "b": 1.0})


def test_area_under_curve_is_the_mean_accuracy_over_training():
    assert grpo_toy.area_under_curve([0, 10, 20], [0.0, 0.5, 0.5]) == pytest.approx((2.5 + 5.0) / 20)
    assert grpo_toy.steps_to_reach([0, 10, 20], [0.1, 0.3, 0.4], 0.3) == 10
    assert grpo_toy.steps_to_reach([0, 10], [0.1, 0.2], 0.3) == float("inf")


def test_paired_tests_report_the_mean_difference_and_its_interval():
    result = grpo_toy.paired_tests([0.01, 0.02, 0.03, 0.02])
    assert result["mean"] == pytest.approx(0.02)
    assert result["low"] < 0.02 < result["high"]
    assert result["t_p"] < 0.05


def test_seed_ranges_parse():
    assert grpo_toy.parse_seeds("0-2,5") == [0, 1, 2, 5]


def test_the_grid_runs_resumes_and_analyses(tmp_path):
    """One arm pair, one seed, two steps: the grid writes a complete result per run, skips it on a
    rerun, and the analysis reads it."""
    command = [
        sys.executable,
        str(REPO / "recipes/grpo_toy.py"),
        "grid",
        "--regime",
        "hard",
        "--arms",
        "vanilla",
        "mixed_qstar",
        "--seeds",
        "0",
        "--steps",
        "2",
        "--eval_every",
        "1",
        "--workers",
        "2",
        "--output_dir",
        str(tmp_path),
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = json.loads((tmp_path / "hard/mixed_qstar-seed0.json").read_text())
    assert [point["step"] for point in result["eval"]] == [0, 1, 2]
    assert result["hard_eval_problems"] == 193 and result["hard_train_problems"] == 812
    assert 0.0 < result["eval"][0]["hard"] < 0.05  # the base's exact success on hard problems
    assert any("optimal_sampling/on_policy_frac" in h for h in result["log_history"])
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert "2 of 2 runs already done; running 0" in again.stdout
    report = subprocess.run(
        [sys.executable, str(REPO / "recipes/grpo_toy.py"), "analyze", "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "| 4 on-policy + 4 q*, no weights | 1 |" in report.stdout  # (paired tests need two seeds)
