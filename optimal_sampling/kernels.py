"""The KL-symmetric α solve as one Triton kernel: one program per row, one launch per batch.

`alpha.LogRatioMoments` + `alpha._kl_symmetry_alpha` express the solve as batched torch
ops; on a GPU that is ~40 small kernel launches per Newton iteration and a host read-back
to decide when to stop, so a [64, 151936] solve is launch-bound at milliseconds. Here each
row's program runs the same algorithm on its own — the row statistics and both bracket
ends in a first pass over the row, then one pass per Newton iteration — and stops when its
row has converged. Nothing is read back, so it also runs inside a CUDA-graph capture.

It is the same iteration as the torch path (theory/derivation.md §4.6), written for one
row: h(α) = log S₊ − log S₋ with S± = Σ_{±Δ>0} p e^{αΔ} |Δ|, the bracket kept as (α, h, h')
at both ends, the next iterate the larger / smaller tangent root inside the bracket (or the
midpoint), and a row frozen once Newton's step is sure to land within `tol` of the root (it is
shorter than `tol`, or short and its Taylor remainder, from the third moments, is small) or
the bracket is below `tol`. Within a pass
each of the BLOCK lanes keeps its own float32 sums, added across lanes in float64 once at the
end of the pass: no reduction across the block inside the loop, whose loads are pipelined.
The exponents are shifted by a bound of their row max known before the pass (0 at the
bracket ends, where they are log-probs; the chord through the maxima at the ends for a
Newton pass), so one exp per token suffices; a pass whose bound turns out more than 60
above the true max (terms may have underflowed) is redone at the max. `tests/test_kernels.py` runs the kernel through Triton's CPU
interpreter against the same float64 references as the torch path.

Used automatically by `solve_alpha` / `compute_mixture` for `kl_symmetry` on CUDA tensors
when Triton is importable; `OPTIMAL_SAMPLING_TRITON=0` turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .options import DEGENERATE_RTOL, QUADRATIC_STEP  # the same tests as the torch path

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path solves
    triton = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether `kl_symmetry_kernel` should solve this tensor's rows.

    CUDA tensors with Triton installed (CPU tensors too under `TRITON_INTERPRET=1`, which is
    how the tests run it), not while torch.compile traces (the compiled torch path fuses
    well there), and not when `OPTIMAL_SAMPLING_TRITON=0`.
    """
    if triton is None or os.environ.get("OPTIMAL_SAMPLING_TRITON", "1") == "0":
        return False
    if not (x.is_cuda or (_interpreting() and x.device.type == "cpu")):
        return False
    if torch.compiler.is_compiling():
        return False
    return x.dtype in (torch.float32, torch.float16, torch.bfloat16)


if triton is not None:

    @triton.jit
    def load_block(lp_row, lr_row, start, width, BLOCK: tl.constexpr):
        """One block of a row: log p, Δ (0 off the common support), whether each token is on
        the common support and whether it counts in h (on it, with Δ ≠ 0)."""
        offsets = start + tl.arange(0, BLOCK)
        inside = offsets < width
        lp = tl.load(lp_row + offsets, mask=inside, other=-float("inf")).to(tl.float32)
        lr = tl.load(lr_row + offsets, mask=inside, other=-float("inf")).to(tl.float32)
        common = (lp > -float("inf")) & (lr > -float("inf"))
        delta = tl.where(common, lr - lp, 0.0)
        return lp, delta, common, common & (delta != 0.0)

    @triton.jit
    def add_terms(sums, w, delta):
        """Add a block's terms w · Δ±ᵏ (k = 1, 2, 3) to the per-lane float32 sums."""
        s_pos, s_neg, q_pos, q_neg, c_pos, c_neg = sums
        w_pos = w * tl.maximum(delta, 0.0)
        w_neg = w * tl.maximum(-delta, 0.0)
        squared = delta * delta
        return (
            s_pos + w_pos,
            s_neg + w_neg,
            q_pos + w_pos * delta,
            q_neg - w_neg * delta,
            c_pos + w_pos * squared,
            c_neg + w_neg * squared,
        )

    @triton.jit
    def row_sums(sums):
        """The six row sums, adding the lanes in float64."""
        s_pos, s_neg, q_pos, q_neg, c_pos, c_neg = sums
        return (
            tl.sum(s_pos.to(tl.float64), axis=0),
            tl.sum(s_neg.to(tl.float64), axis=0),
            tl.sum(q_pos.to(tl.float64), axis=0),
            tl.sum(q_neg.to(tl.float64), axis=0),
            tl.sum(c_pos.to(tl.float64), axis=0),
            tl.sum(c_neg.to(tl.float64), axis=0),
        )

    @triton.jit
    def row_pass(lp_row, lr_row, width, top, alpha, shift, BLOCK: tl.constexpr):
        """One pass over a row at `alpha`: the four sums of e^(t − shift) · features with
        t = (log p − top) + αΔ, and the row max of t.

        The shift is an upper bound of the max known before the pass, so the lanes need no
        running max and no rescaling: one exp per token. They sum in float32 (V / BLOCK terms
        each; their rounding errors are independent across lanes) and are added across lanes
        in float64."""
        lane_max = tl.full((BLOCK,), -float("inf"), tl.float32)
        sums = (tl.zeros((BLOCK,), dtype=tl.float32),) * 6
        for start in tl.range(0, width, BLOCK, num_stages=3):
            lp, delta, common, counts = load_block(lp_row, lr_row, start, width, BLOCK)
            t = tl.where(counts, (lp - top) + alpha * delta, -float("inf"))
            lane_max = tl.maximum(lane_max, t)
            sums = add_terms(sums, tl.exp(t - shift), delta)
        return (tl.max(lane_max, axis=0),) + row_sums(sums)

    @triton.jit
    def log_ratio(sums):
        """h = log S₊ − log S₋ (±inf with an empty side), h' = E₊[Δ] − E₋[Δ] and
        h'' = Var₊[Δ] − Var₋[Δ] under the weights w Δ± / S± (an empty side counts 0)."""
        s_pos, s_neg, q_pos, q_neg, c_pos, c_neg = sums
        h = tl.log(s_pos) - tl.log(s_neg)
        mean_pos = tl.where(s_pos > 0, q_pos / s_pos, 0.0)
        mean_neg = tl.where(s_neg > 0, q_neg / s_neg, 0.0)
        var_pos = tl.where(s_pos > 0, c_pos / s_pos, 0.0) - mean_pos * mean_pos
        var_neg = tl.where(s_neg > 0, c_neg / s_neg, 0.0) - mean_neg * mean_neg
        return h, mean_pos + mean_neg, var_pos - var_neg

    @triton.jit
    def newton_step_lands(newton_step, slope, curvature, tol, quadratic_step):
        """`alpha._newton_step_lands` for one row."""
        small = tl.abs(newton_step) <= tol
        remainder = tl.abs(curvature) * newton_step * newton_step <= 0.25 * tol * slope
        return small | ((tl.abs(newton_step) <= quadratic_step) & remainder)

    @triton.jit
    def tangent_step(lo, hi, h_lo, h_hi, slope_lo, slope_hi):
        """The larger (slope falling) or smaller tangent root inside (lo, hi), else the midpoint."""
        root_lo = lo - h_lo / slope_lo
        root_hi = hi - h_hi / slope_hi
        in_lo = (root_lo > lo) & (root_lo < hi)
        in_hi = (root_hi > lo) & (root_hi < hi)
        preferred = tl.where(slope_lo >= slope_hi, tl.maximum(root_lo, root_hi), tl.minimum(root_lo, root_hi))
        one = tl.where(in_lo, root_lo, tl.where(in_hi, root_hi, 0.5 * (lo + hi)))
        return tl.where(in_lo & in_hi, preferred, one)

    @triton.jit
    def _kl_symmetry_kernel(
        lp_ptr,
        lr_ptr,
        stride_lp,
        stride_lr,
        width,
        tol,
        quadratic_step,
        max_iter,
        degenerate_rtol,
        fallback,
        alpha_min,
        alpha_max,
        alpha_ptr,
        iterations_ptr,
        flags_ptr,
        batch,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        lp_row = lp_ptr + row.to(tl.int64) * stride_lp
        lr_row = lr_ptr + row.to(tl.int64) * stride_lr

        # Pass 1: row statistics (top log p, Δ range, any common token) and the sums at both
        # bracket ends, α = 0 (exponent log p) and α = 1 (log r), whose signs decide boundary rows.
        top = tl.full((BLOCK,), -float("inf"), tl.float32)  # per lane, reduced after the loop
        d_max = tl.full((BLOCK,), -float("inf"), tl.float32)
        d_min = tl.full((BLOCK,), float("inf"), tl.float32)
        max_zero = tl.full((BLOCK,), -float("inf"), tl.float32)
        max_one = tl.full((BLOCK,), -float("inf"), tl.float32)
        sums_zero = (tl.zeros((BLOCK,), dtype=tl.float32),) * 6
        sums_one = (tl.zeros((BLOCK,), dtype=tl.float32),) * 6
        for start in tl.range(0, width, BLOCK, num_stages=3):
            lp, delta, common, counts = load_block(lp_row, lr_row, start, width, BLOCK)
            top = tl.maximum(top, tl.where(common, lp, -float("inf")))
            d_max = tl.maximum(d_max, tl.where(common, delta, -float("inf")))
            d_min = tl.minimum(d_min, tl.where(common, delta, float("inf")))
            # Log-probs are ≤ 0, so 0 bounds the exponent at both ends from above.
            t_zero = tl.where(counts, lp, -float("inf"))
            t_one = tl.where(counts, lp + delta, -float("inf"))
            max_zero = tl.maximum(max_zero, t_zero)
            max_one = tl.maximum(max_one, t_one)
            sums_zero = add_terms(sums_zero, tl.exp(t_zero), delta)
            sums_one = add_terms(sums_one, tl.exp(t_one), delta)
        top = tl.max(top, axis=0)
        d_max = tl.max(d_max, axis=0)
        d_min = tl.min(d_min, axis=0)
        # t(α) = (1 − α)·(log p − top) + α·(log r − top) per token, so the chord through its row
        # maxima at α = 0 and 1 bounds its row max at any α in [0, 1] from above.
        max_zero = tl.max(max_zero, axis=0) - top
        max_one = tl.max(max_one, axis=0) - top
        sums = row_sums(sums_zero)
        if max_zero < -60.0:  # nearly all mass on tokens with Δ = 0: the terms may have underflowed
            sums = row_pass(lp_row, lr_row, width, top, 0.0, max_zero, BLOCK)[1:]
        h_lo, slope_lo, _ = log_ratio(sums)
        sums = row_sums(sums_one)
        if max_one < -60.0:
            sums = row_pass(lp_row, lr_row, width, top, 1.0, max_one, BLOCK)[1:]
        h_hi, slope_hi, _ = log_ratio(sums)
        nonempty = top > -float("inf")
        d_scale = tl.maximum(tl.abs(d_max), tl.abs(d_min))
        degenerate = nonempty & (d_max - d_min <= degenerate_rtol * d_scale)
        live = nonempty & ~degenerate
        at_lower = live & (h_lo >= 0)
        at_upper = live & ~at_lower & (h_hi <= 0)
        lo = tl.zeros((), dtype=tl.float64)
        hi = lo + 1.0
        alpha = tangent_step(lo, hi, h_lo, h_hi, slope_lo, slope_hi)
        alpha = tl.where(degenerate, 0.5, alpha)
        alpha = tl.where(at_lower, 0.0, alpha)
        alpha = tl.where(at_upper, 1.0, alpha)
        active = live & ~at_lower & ~at_upper

        iterations = tl.zeros((), dtype=tl.int32)
        while active & (iterations < max_iter):
            a = alpha.to(tl.float32)
            shift = (1.0 - a) * max_zero + a * max_one
            evaluated = row_pass(lp_row, lr_row, width, top, a, shift, BLOCK)
            if evaluated[0] < shift - 60.0:  # the bound was loose enough for terms to underflow: redo at the max
                evaluated = row_pass(lp_row, lr_row, width, top, a, evaluated[0], BLOCK)
            h, slope, curvature = log_ratio(evaluated[1:])
            iterations += 1
            below = h < 0
            above = h > 0
            lo = tl.where(below, alpha, lo)
            h_lo = tl.where(below, h, h_lo)
            slope_lo = tl.where(below, slope, slope_lo)
            hi = tl.where(above, alpha, hi)
            h_hi = tl.where(above, h, h_hi)
            slope_hi = tl.where(above, slope, slope_hi)
            newton_step = h / slope
            close = newton_step_lands(newton_step, slope, curvature, tol, quadratic_step)
            polished = tl.minimum(tl.maximum(alpha - newton_step, lo), hi)
            step = tl.where(close, polished, tangent_step(lo, hi, h_lo, h_hi, slope_lo, slope_hi))
            alpha = tl.where(h != 0, step, alpha)
            active = ~((h == 0) | close | (hi - lo <= tol))

        # What `alpha._finish` does on the torch path: the fallback on rows without a common
        # token, then the clamp; the flags as three bool rows.
        alpha = tl.where(nonempty, alpha, fallback)
        alpha = tl.minimum(tl.maximum(alpha, alpha_min), alpha_max)
        tl.store(alpha_ptr + row, alpha.to(tl.float32))
        tl.store(iterations_ptr + row, iterations)
        tl.store(flags_ptr + row, degenerate.to(tl.int8))
        tl.store(flags_ptr + batch + row, (~nonempty).to(tl.int8))
        tl.store(flags_ptr + 2 * batch + row, (~active).to(tl.int8))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def kl_symmetry_kernel(
    logp_theta: torch.Tensor,
    logp_t: torch.Tensor,
    tol: float,
    max_iter: int,
    *,
    fallback: float = 1.0,
    alpha_min: float = 0.0,
    alpha_max: float = 1.0,
    block: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve every row of a `[B, V]` pair: the fields of `alpha.AlphaSolution` — α (float32,
    `fallback` on rows without a common token, clamped to [alpha_min, alpha_max]),
    iterations (int32), degenerate, empty support, converged (bool) — as `[B]` tensors.

    `block` (a power of two) is how many tokens a program loads at a time: 2048 on a GPU
    by default; the tests vary it to cover rows of one and of many blocks. `num_warps` is
    Triton's launch option: by default 16 while there are no more rows than multiprocessors
    (each row's program has one to itself), else 8 — the faster on an H100 for [64, 151936]
    and [256, 32000] (`benchmarks/alpha_solver.py --sweep` times the options)."""
    if logp_theta.stride(-1) != 1:
        logp_theta = logp_theta.contiguous()
    if logp_t.stride(-1) != 1:
        logp_t = logp_t.contiguous()
    batch, width = logp_theta.shape
    device = logp_theta.device
    alpha = torch.empty(batch, dtype=torch.float32, device=device)
    iterations = torch.empty(batch, dtype=torch.int32, device=device)
    flags = torch.empty(3, batch, dtype=torch.int8, device=device)  # degenerate, empty, converged
    if batch:
        block = block or (1024 if _interpreting() else 2048)
        if num_warps is None:
            num_warps = 16 if not logp_theta.is_cuda or batch <= _multiprocessors(device) else 8
        launch_on = torch.cuda.device(device) if logp_theta.is_cuda else contextlib.nullcontext()
        with launch_on:  # Triton launches on the current device: make it the tensors' one
            _kl_symmetry_kernel[(batch,)](
                logp_theta,
                logp_t,
                logp_theta.stride(0),
                logp_t.stride(0),
                width,
                float(tol),
                QUADRATIC_STEP,
                int(max_iter),
                DEGENERATE_RTOL,
                float(fallback),
                float(alpha_min),
                float(alpha_max),
                alpha,
                iterations,
                flags,
                batch,
                BLOCK=block,
                num_warps=num_warps,
            )
    degenerate, empty, converged = flags.view(torch.bool).unbind(0)
    return alpha, iterations, degenerate, empty, converged
