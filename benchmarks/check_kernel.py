"""The Triton α kernel on a real GPU: does it agree with the torch path and with float64?

CI runs the kernel only through Triton's CPU interpreter (tests/test_kernels.py); this
script runs the compiled kernel on the device and prints, per case, the largest
|α_kernel − α_float64|, |α_kernel − α_torch| (each within 1e-6 of the root, so within
2e-6 of each other), whether the per-row flags agree, and the
iteration counts. Cases: random pairs from flat to very peaked logits (scales 0.1–30), half
of them with masked tokens on both sides, V ∈ {8, 1000, 151936}; the edge rows of
tests/test_alpha.py; bfloat16 inputs; teacher_top_p with a clamp; and one solve captured
in a CUDA graph and replayed on new inputs. The float64 reference is a bisection on
A'(α) = E_q[Δ] run in float64 throughout (60 iterations), with the boundary rule of the
solver (α = 0 or 1 where A' does not change sign on [0, 1]).

    python benchmarks/check_kernel.py          # exits 1 if a check fails
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimal_sampling import solve_alpha  # noqa: E402
from optimal_sampling.alpha import solver_backend  # noqa: E402
from optimal_sampling.testing import random_log_prob_pairs  # noqa: E402

SCALES = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def float64_alpha(lp: torch.Tensor, lr: torch.Tensor, iterations: int = 60) -> torch.Tensor:
    lp, lr = lp.double(), lr.double()
    support = torch.isfinite(lp) & torch.isfinite(lr)
    lp_s = lp.masked_fill(~support, float("-inf"))
    delta = (lr - lp).masked_fill(~support, 0.0)

    def slope(alpha):
        t = lp_s + alpha.unsqueeze(-1) * delta
        w = torch.exp(t - t.amax(-1, keepdim=True))
        return (w * delta).sum(-1) / w.sum(-1)

    lo, hi = (
        torch.zeros(lp.shape[0], dtype=torch.float64, device=lp.device),
        torch.ones(lp.shape[0], dtype=torch.float64, device=lp.device),
    )
    at_zero, at_one = slope(lo) >= 0, slope(hi) <= 0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        negative = slope(mid) < 0
        lo, hi = torch.where(negative, mid, lo), torch.where(negative, hi, mid)
    return torch.where(at_zero, 0.0, torch.where(at_one, 1.0, 0.5 * (lo + hi)))


def stacked(seed: int, rows: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [
        random_log_prob_pairs(seed + i, rows, vocab, s, m)
        for i, (s, m) in enumerate((s, m) for s in SCALES for m in (0.0, 0.3))
    ]
    return torch.cat([p for p, _ in pairs]).cuda(), torch.cat([r for _, r in pairs]).cuda()


def solve(lp, lr, kernel: bool, **options):
    os.environ["OPTIMAL_SAMPLING_TRITON"] = "1" if kernel else "0"
    try:
        return solve_alpha(lp, lr, return_info=True, **options)
    finally:
        os.environ.pop("OPTIMAL_SAMPLING_TRITON", None)


def main() -> int:
    assert torch.cuda.is_available() and (solver_backend(torch.empty(1, device="cuda")) != "torch"), (
        "needs CUDA and triton"
    )
    import triton

    print(f"# check_kernel: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}\n")
    print(
        "| case | rows | max abs(α_kernel − α_float64) | max abs(α_kernel − α_torch) | flags agree | iterations (median / worst) |"
    )
    print("|---|---:|---:|---:|---|---|")
    failures = []

    def report(name, lp, lr, reference=None, bound=1e-6, **options):
        kernel, torch_path = solve(lp, lr, True, **options), solve(lp, lr, False, **options)
        vs_torch = (kernel.alpha - torch_path.alpha).abs().max().item()
        vs_ref = (
            float("nan")
            if reference is None
            else (kernel.alpha.double() - reference).abs().nan_to_num(0.0).max().item()
        )  # NaN: no reference for that row
        flags = all(
            torch.equal(getattr(kernel, f), getattr(torch_path, f))
            for f in ("degenerate", "empty_support", "converged")
        )
        its = kernel.iterations.float()
        print(
            f"| {name} | {lp.shape[0]} | {vs_ref:.1e} | {vs_torch:.1e} | {'yes' if flags else 'NO'} "
            f"| {its.median().item():.0f} / {its.max().item():.0f} |"
        )
        if not (vs_torch <= 2 * bound and flags and (reference is None or vs_ref <= bound) and its.max() <= 8):
            failures.append(name)

    for vocab, rows in ((8, 150), (1000, 50), (151936, 2)):
        lp, lr = stacked(vocab, rows, vocab)
        report(f"random V={vocab}", lp, lr, float64_alpha(lp, lr))
    lp, lr = stacked(7, 4, 500)
    low_p, low_r = lp.bfloat16(), lr.bfloat16()
    report("bfloat16 inputs (reference: the rounded inputs)", low_p, low_r, float64_alpha(low_p.float(), low_r.float()))
    report("teacher_top_p=0.9, alpha in [0.1, 0.8]", lp, lr, None, teacher_top_p=0.9, alpha_min=0.1, alpha_max=0.8)

    ordinary_p, ordinary_r = random_log_prob_pairs(3, 2, 6, 1.0)

    def row(probs):
        return torch.log(torch.tensor(probs, dtype=torch.float64)).float()

    rows = [
        (ordinary_p[0], ordinary_r[0]),
        (ordinary_p[1], ordinary_p[1]),
        (ordinary_p[0], row([0, 0, 1, 0, 0, 0])),
        (row([0.5, 0.3, 0.2, 0, 0, 0]), row([0, 0, 0.1, 0.6, 0.3, 0])),
        (row([0.5, 0.5, 0, 0, 0, 0]), row([0, 0, 0, 0.2, 0.3, 0.5])),
        # the two rows of tests/test_alpha.py whose deciding terms are e^-120 / e^-139 below the row max
        (
            torch.tensor([0.0, -120.0, -122.0, -150.0, -150.0, -150.0]),
            torch.tensor([0.0, -119.0, -121.5, -150.0, -150.0, -150.0]),
        ),
        (
            torch.tensor([0.0, -300.0, -350.0, -350.0, -350.0, -350.0]),
            torch.tensor([-260.0, 0.0, -350.0, -350.0, -350.0, -350.0]),
        ),
    ]
    edge_p, edge_r = torch.stack([p for p, _ in rows]).cuda(), torch.stack([r for _, r in rows]).cuda()
    report(
        "edge rows (identical, one-hot, one common token, empty, shared top token, disagreeing peaks)",
        edge_p,
        edge_r,
        float64_alpha(edge_p, edge_r).masked_fill(
            torch.tensor([False, True, True, True, True, False, False], device="cuda"), float("nan")
        ),
    )

    # A CUDA graph: the kernel launch is captured and replays on whatever the input buffers hold.
    lp, lr = stacked(11, 5, 32000)
    static_p, static_r = lp.clone(), lr.clone()
    solve(static_p, static_r, True)  # warm-up / compile outside the capture
    graph = torch.cuda.CUDAGraph()
    os.environ["OPTIMAL_SAMPLING_TRITON"] = "1"
    with torch.cuda.graph(graph):
        captured = solve_alpha(static_p, static_r, validate=False)
    os.environ.pop("OPTIMAL_SAMPLING_TRITON", None)
    new_p, new_r = stacked(12, 5, 32000)
    static_p.copy_(new_p)
    static_r.copy_(new_r)
    graph.replay()
    torch.cuda.synchronize()
    gap = (captured.double() - float64_alpha(new_p, new_r)).abs().max().item()
    print(f"| CUDA graph: captured solve replayed on new inputs, V=32000 | {new_p.shape[0]} | {gap:.1e} | | | |")
    if gap > 1e-6:
        failures.append("cuda graph")

    print("\nall checks passed" if not failures else f"\nFAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
