"""The Triton α kernel (`optimal_sampling/kernels.py`), run by Triton's CPU interpreter.

CI has no GPU, so the kernel's own code — the row passes with their online max, the
bracketed Newton iteration, the flags — runs here through `TRITON_INTERPRET=1` in one child
process (`tests/kernel_child.py`, all jobs at once: starting it costs ~10 s), and is checked
against the same independent float64 references as the torch path. The H100 benchmark
(`benchmarks/alpha_solver.py`) runs the compiled kernel and checks it against bisection.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from optimal_sampling import solve_alpha

sys.path.insert(0, str(Path(__file__).parent))
from test_alpha import edge_batch, ref_kl_symmetric_alpha, stacked_pairs  # noqa: E402,F401

try:
    import triton  # noqa: F401
except ImportError:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        raise  # CI installs the [test] extra, which has triton: fail rather than skip
    pytest.skip("triton is not installed (`pip install -e '.[test]'`)", allow_module_level=True)

CHILD = Path(__file__).with_name("kernel_child.py")

# (vocabulary, rows per (scale, mask) setting, tokens per block): rows of one block and of
# several, up to the full Qwen vocabulary.
RANDOM_CASES = {
    "V8-one-block": (8, 6, 1024),
    "V1000-four-blocks": (1000, 2, 256),
    "V5000-five-blocks": (5000, 1, 1024),
    "V151936": (151936, 1, 8192),
}
OPTIONS = dict(alpha_min=0.1, alpha_max=0.8, teacher_top_p=0.9)


def random_case(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    vocab, rows, _ = RANDOM_CASES[name]
    return stacked_pairs(seed=vocab + 1, rows_per_setting=rows, vocab=vocab)


def options_case() -> tuple[torch.Tensor, torch.Tensor]:
    return stacked_pairs(seed=21, rows_per_setting=2, vocab=300)  # half the rows masked: some at the boundary


def half_case() -> tuple[torch.Tensor, torch.Tensor]:
    lp, lr = stacked_pairs(seed=5, rows_per_setting=2, vocab=500)
    return lp.to(torch.bfloat16), lr.to(torch.bfloat16)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory, edge_batch) -> dict:
    _, edge_lp, edge_lr = edge_batch
    jobs = {name: (*random_case(name), "kernel", {"block": block}) for name, (_, _, block) in RANDOM_CASES.items()}
    jobs["edge"] = (edge_lp, edge_lr, "solve_alpha", {})
    jobs["edge-base-fallback"] = (edge_lp, edge_lr, "solve_alpha", {"empty_support": "base"})
    jobs["options-solve"] = (*options_case(), "solve_alpha", OPTIONS)
    jobs["options-mixture"] = (*options_case(), "compute_mixture", OPTIONS)
    jobs["bfloat16"] = (*half_case(), "solve_alpha", {})
    folder = tmp_path_factory.mktemp("kernel")
    jobs_path, results_path = folder / "jobs.pt", folder / "results.pt"
    torch.save(jobs, jobs_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(CHILD), str(jobs_path), str(results_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(results_path)


@pytest.mark.parametrize("case", list(RANDOM_CASES))
def test_kernel_alpha_matches_float64_root(interpreted, case):
    lp, lr = random_case(case)
    out = interpreted[case]
    reference = ref_kl_symmetric_alpha(lp.double().numpy(), lr.double().numpy())
    error = np.abs(out["alpha"].clamp(0, 1).numpy() - reference)
    assert error.max() <= 1e-6, f"worst row {error.argmax()}: |α - α_ref| = {error.max():.2e}"
    assert out["converged"].all() and int(out["iterations"].max()) <= 8
    assert not out["degenerate"].any() and not out["empty"].any()


def test_kernel_flags_edge_rows_like_the_torch_path(interpreted, edge_batch):
    names, lp, lr = edge_batch
    torch_path = solve_alpha(lp, lr, return_info=True)
    kernel = interpreted["edge"]
    assert kernel["degenerate"].tolist() == torch_path.degenerate.tolist()
    assert kernel["empty_support"].tolist() == torch_path.empty_support.tolist()
    assert kernel["converged"].all()
    torch.testing.assert_close(kernel["alpha"], torch_path.alpha, rtol=0, atol=1e-6)
    assert dict(zip(names, kernel["alpha"].tolist()))["empty_support"] == 1.0
    i = names.index("shared_top_token")
    assert kernel["alpha"][i].item() == 0.0 and kernel["iterations"][i].item() == 0
    assert (
        abs(dict(zip(names, kernel["alpha"].tolist()))["disagreeing_peaks"] - (300 - math.log(300 / 260)) / 560) <= 1e-6
    )
    assert dict(zip(names, interpreted["edge-base-fallback"]["alpha"].tolist()))["empty_support"] == 0.0


def test_kernel_respects_clamp_teacher_top_p_and_boundary_rows(interpreted):
    lp, lr = options_case()
    torch_path = solve_alpha(lp, lr, return_info=True, **OPTIONS)
    unclamped = solve_alpha(lp, lr)
    assert (unclamped == 0).any() or (unclamped == 1).any()  # boundary rows present
    torch.testing.assert_close(interpreted["options-solve"]["alpha"], torch_path.alpha, rtol=0, atol=1e-6)
    mixed = interpreted["options-mixture"]["alpha"]
    torch.testing.assert_close(mixed, torch_path.alpha, rtol=0, atol=1e-6)
    assert (mixed >= 0.1).all() and (mixed <= 0.8).all()


def test_kernel_takes_half_precision_inputs_like_the_torch_path(interpreted):
    lp, lr = half_case()
    reference = ref_kl_symmetric_alpha(lp.double().numpy(), lr.double().numpy())  # the root of the rounded inputs
    assert np.abs(interpreted["bfloat16"]["alpha"].double().numpy() - reference).max() <= 1e-6
