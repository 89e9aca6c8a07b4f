"""Runs the Triton kernel under Triton's CPU interpreter, for `tests/test_kernels.py`.

The interpreter must be switched on before `triton` is first imported, so the tests run
this in a fresh process:  python tests/kernel_child.py JOBS.pt RESULTS.pt
JOBS maps a job name to (logp_theta, logp_t, call, kwargs) with call one of "kernel"
(`kernels.kl_symmetry_kernel`), "solve_alpha" or "compute_mixture"; RESULTS maps the same
names to dicts of output tensors.
"""

from __future__ import annotations

import os
import sys


def main(jobs_path: str, results_path: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    from optimal_sampling import compute_mixture, solve_alpha
    from optimal_sampling.alpha import solver_backend
    from optimal_sampling.kernels import kl_symmetry_kernel

    results = {}
    for name, (lp, lr, call, kwargs) in torch.load(jobs_path).items():
        if solver_backend(lp) == "torch":
            raise SystemExit("the kernel does not apply under TRITON_INTERPRET=1: is triton installed?")
        if call == "kernel":
            alpha, iterations, degenerate, empty, converged = kl_symmetry_kernel(lp, lr, 1e-6, 20, **kwargs)
            results[name] = dict(
                alpha=alpha, iterations=iterations, degenerate=degenerate, empty=empty, converged=converged
            )
        elif call == "solve_alpha":
            results[name] = dict(solve_alpha(lp, lr, return_info=True, **kwargs).__dict__)
        elif call == "compute_mixture":
            step = compute_mixture(lp, lr, **kwargs)
            results[name] = dict(alpha=step.alpha, logq=step.logq, iterations=step.solution.iterations)
        else:
            raise SystemExit(f"unknown call {call!r}")
    torch.save(results, results_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
