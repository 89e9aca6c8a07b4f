"""Time of one batched α* solve: `solve_alpha` (safeguarded Newton) against plain bisection.

For each shape `[B, V]` the script draws related base / teacher log-prob pairs (teacher
logits = base logits + noise, float32), then times

  newton, Triton kernel  `solve_alpha(lp, lr, validate=False)` on CUDA with Triton installed:
             the whole solve in one launch (`optimal_sampling/kernels.py`), tol 1e-6
  newton, C solve        the same call on CPU: the same algorithm in C, one row at a time
             (`optimal_sampling/cpu_kernel.py`)
  newton, torch ops      the same call with `OPTIMAL_SAMPLING_TRITON=0` on CUDA or
             `OPTIMAL_SAMPLING_CPU_KERNEL=0` on CPU: two endpoint evaluations, then batched
             Newton iterations until every row converged (one host read-back per iteration)
  bisection  a batched torch bisection on A'(α) = E_q[Δ] over [0, 1] to the same tolerance:
             20 fixed iterations (2^-20 < 1e-6), float32 weights, float64 sums, no read-back
  kl_budget  `solve_alpha(lp, lr, "kl_budget", kl_budget=0.1)`: the largest α with KL(q‖π_θ) ≤ 0.1
             (Newton on √KL in float64), against a float64 bisection of KL(q_α‖π_θ) = 0.1

and reports the median time per solve over `--repeats` (after `--warmup` untimed solves;
`torch.cuda.synchronize()` around every timed solve on CUDA), Newton's iterations per row
(median and worst row) and each method's largest |α − α_float64|, against a bisection run
in float64 throughout (50 iterations). On CUDA it also says whether the target, ≤ 0.25 ms
per [64, 151936] float32 solve, is met.

The table is printed and appended to benchmarks/RESULTS.md (and copied to $OUT when set).

    python benchmarks/alpha_solver.py --device cpu --repeats 3
    python benchmarks/alpha_solver.py --device cuda --repeats 50
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from optimal_sampling import solve_alpha
from optimal_sampling.alpha import kl_symmetry_kernel, solver_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_speed import append_results  # noqa: E402

TARGET_SHAPE, TARGET_MS = (64, 151936), 0.25


def make_pair(batch: int, vocab: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, V]` float32 log-probs of two related models: peaked logits, teacher = base + noise."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scale = torch.empty(batch, 1).uniform_(1.0, 4.0, generator=gen)  # flat-ish to peaked rows
    base = scale * torch.randn(batch, vocab, generator=gen)
    teacher = base + scale * torch.randn(batch, vocab, generator=gen)
    return torch.log_softmax(base, -1).to(device), torch.log_softmax(teacher, -1).to(device)


def _mean_delta(lp: torch.Tensor, delta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """A'(α) = E_{q_α}[Δ], `[B]` float64: weights in float32, sums in float64."""
    t = lp + alpha.to(lp.dtype).unsqueeze(-1) * delta  # [B, V]
    w = torch.exp(t - t.amax(dim=-1, keepdim=True))
    return (w * delta).sum(dim=-1, dtype=torch.float64) / w.sum(dim=-1, dtype=torch.float64)


def bisection_alpha(lp: torch.Tensor, lr: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Plain batched bisection on A'(α) over [0, 1] (full support: A'(0) ≤ 0 ≤ A'(1))."""
    delta = lr - lp
    lo = torch.zeros(lp.shape[0], dtype=torch.float64, device=lp.device)
    hi = torch.ones_like(lo)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        negative = _mean_delta(lp, delta, mid) < 0
        lo, hi = torch.where(negative, mid, lo), torch.where(negative, hi, mid)
    return 0.5 * (lo + hi)  # float64


KL_BUDGET = 0.1


def kl_budget_bisection(lp: torch.Tensor, lr: torch.Tensor, budget: float, iterations: int = 50) -> torch.Tensor:
    """The largest α with KL(q_α‖p) ≤ budget, by bisection on KL = αA' − A in float64 (full support)."""
    lp, delta = lp.double(), (lr - lp).double()

    def kl(alpha):
        t = lp + alpha.unsqueeze(-1) * delta
        log_partition = torch.logsumexp(t, -1)
        q = torch.exp(t - log_partition.unsqueeze(-1))
        return alpha * (q * delta).sum(-1) - log_partition

    lo = torch.zeros(lp.shape[0], dtype=torch.float64, device=lp.device)
    hi = torch.ones_like(lo)
    within = kl(hi) <= budget
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        below = kl(mid) <= budget
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return torch.where(within, 1.0, lo)


def time_ms(fn, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def sweep(pair, device: str, warmup: int, repeats: int) -> list[str]:
    lp, lr = pair
    rows = []
    for block in (1024, 2048, 4096):
        cells = []
        for warps in (4, 8, 16):
            try:
                ms = time_ms(
                    lambda: kl_symmetry_kernel("triton", lp, lr, 1e-6, 20, block=block, num_warps=warps),
                    device,
                    warmup,
                    repeats,
                )
                cells.append(f"{ms:.3f}")
            except Exception as error:  # e.g. out of registers / shared memory for this combination
                cells.append(type(error).__name__)
        rows.append(f"| {block} | " + " | ".join(cells) + " |")
    return rows


def machine(device: str) -> str:
    cpu = f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    cpu += f" (torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f} at the end)"
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); host {cpu}"
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", default="64x151936,256x32000", help="comma-separated BxV")
    parser.add_argument("--repeats", type=int, default=None, help="timed solves per row (default 3 on CPU, 50 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed solves first (default 1 on CPU, 10 on CUDA)")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--sweep", action="store_true", help="also time the Triton kernel's block / num_warps options")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch.cuda.is_available() is False")
    cuda = args.device == "cuda"
    repeats = args.repeats or (50 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)

    header = (
        "| shape [B, V] | method | median ms / solve | iterations (median row) | iterations (worst row) "
        "| max abs(α − α_float64) |\n|---|---|---|---|---|---|"
    )
    lines, target_note = [header], ""
    kernel_available = solver_backend(torch.empty(1, device=args.device)) != "torch"
    for spec in args.shapes.split(","):
        batch, vocab = (int(x) for x in spec.lower().split("x"))
        lp, lr = make_pair(batch, vocab, args.device)
        reference = bisection_alpha(lp.double(), lr.double(), iterations=50)  # float64 throughout: |error| < 1e-15
        shape = f"[{batch}, {vocab}]"
        # (label, environment switch of the fused solve: OPTIMAL_SAMPLING_TRITON on CUDA,
        # OPTIMAL_SAMPLING_CPU_KERNEL — the C solve — on CPU)
        switch = "OPTIMAL_SAMPLING_TRITON" if cuda else "OPTIMAL_SAMPLING_CPU_KERNEL"
        fused = "Triton kernel" if cuda else "C solve"
        paths = [(f"newton, {fused} (solve_alpha default)", "1")] if kernel_available else []
        paths.append(("newton, torch ops" + ("" if kernel_available else " (solve_alpha default)"), "0"))
        for label, flag in paths:
            os.environ[switch] = flag
            info = solve_alpha(lp, lr, return_info=True, validate=False)
            gap = (info.alpha.double() - reference).abs().max().item()
            newton_ms = time_ms(lambda: solve_alpha(lp, lr, validate=False), args.device, warmup, repeats)
            its = info.iterations.float()
            lines.append(
                f"| {shape} | {label} | {newton_ms:.3f} | {its.median().item():.0f} + endpoints "
                f"| {its.max().item():.0f} + endpoints | {gap:.1e} |"
            )
            if cuda and (batch, vocab) == TARGET_SHAPE and flag == "1":
                met = "met" if newton_ms <= TARGET_MS else "NOT met"
                target_note = (
                    f"\nTarget ≤ {TARGET_MS} ms per {list(TARGET_SHAPE)} float32 solve on H100: **{met}** "
                    f"(Triton kernel {newton_ms:.3f} ms on {torch.cuda.get_device_name()})."
                )
        os.environ.pop(switch, None)
        bisect_ms = time_ms(lambda: bisection_alpha(lp, lr), args.device, warmup, repeats)
        gap = (bisection_alpha(lp, lr).double() - reference).abs().max().item()
        lines.append(f"| {shape} | bisection, torch ops (20 its) | {bisect_ms:.3f} | 20 | 20 | {gap:.1e} |")
        info = solve_alpha(lp, lr, "kl_budget", kl_budget=KL_BUDGET, return_info=True, validate=False)
        gap = (info.alpha.double() - kl_budget_bisection(lp, lr, KL_BUDGET)).abs().max().item()
        budget_ms = time_ms(
            lambda: solve_alpha(lp, lr, "kl_budget", kl_budget=KL_BUDGET, validate=False), args.device, warmup, repeats
        )
        its = info.iterations.float()
        lines.append(
            f"| {shape} | kl_budget ε = {KL_BUDGET} (Newton on √KL, float64) | {budget_ms:.3f} | "
            f"{its.median().item():.0f} + endpoints | {its.max().item():.0f} + endpoints | {gap:.1e} |"
        )

    if args.sweep and cuda and kernel_available:
        for shape in (TARGET_SHAPE, (256, 32000)):
            lines.append(f"\nTriton kernel launch options, {list(shape)} (ms / solve):\n")
            lines.append("| block | num_warps=4 | num_warps=8 | num_warps=16 |\n|---|---|---|---|")
            lines.extend(sweep(make_pair(*shape, args.device), args.device, warmup, repeats))

    command = "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    section = "\n".join(
        [
            f"### alpha_solver: Newton (solve_alpha) vs bisection, and the kl_budget rule — "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}",
            "",
            f"- machine: {machine(args.device)}",
            f"- torch {torch.__version__}, device `{args.device}`, float32 inputs, tol 1e-6; "
            f"median of {repeats} timed solves after {warmup} warm-up",
            f"- command: `{command}`",
            "- the kl_budget row's error is against its own float64 reference (a bisection of KL(q_α‖π_θ) = ε)",
            "",
            *lines,
            target_note,
        ]
    )
    print(section)
    if not args.no_append:
        append_results(section)


if __name__ == "__main__":
    main()
