"""Per-token choice of α for the geometric mixture q_α ∝ p^(1-α) · r^α.

Every function here is pure and batched: log-probabilities in (`[B, V]`, `-inf` for
masked tokens), one α per row out (`[B]`). The maths is in `theory/derivation.md`;
the short version: with Δ = log r − log p on the common support S and
A(α) = log Σ_S p^(1-α) r^α,

    KL(q_α‖p) − KL(q_α‖r) = A'(α) = E_q[Δ],      A''(α) = Var_q[Δ] ≥ 0,

so the KL-symmetric α* is the minimiser of the convex A on [0, 1] (the Chernoff point),
found by a safeguarded Newton iteration. The `kl_budget` rule instead takes the largest α
whose KL(q_α‖π_θ) = αA'(α) − A(α) stays within a budget ε: that KL has slope αA''(α) ≥ 0, so
it is monotone in α and one bracketed root-find per row gives α.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .options import ALPHA_METHODS, EMPTY_SUPPORT_FALLBACKS, QStarOptions
from .solvers import _entropy_alpha, _ess_balance_alpha, _kl_budget_alpha, _kl_symmetry_alpha
from .support import CommonSupport, check_log_prob_pair, common_support, restrict_to_nucleus

__all__ = [
    "ALPHA_METHODS",
    "EMPTY_SUPPORT_FALLBACKS",
    "AlphaSolution",
    "check_solve_options",
    "solve_alpha",
    "solve_on_support",
    "solver_backend",
]


@dataclass
class AlphaSolution:
    """What `solve_alpha(..., return_info=True)` returns besides α.

    Attributes:
        alpha: `[B]` the chosen α per row (float32), after clamping.
        iterations: `[B]` Newton / bisection iterations the row used (int32; 0 for rows
            decided without iterating: boundary, degenerate, empty support, non-iterative
            methods).
        degenerate: `[B]` bool, Δ is constant on the common support (q does not depend on α;
            α = 0.5 by convention).
        empty_support: `[B]` bool, the two distributions share no token; the row's q is the
            fallback distribution (`empty_support=` argument) and α is 1 (teacher) or 0 (base).
        converged: `[B]` bool, the row met the tolerance (always true for rows that did not
            need to iterate).
    """

    alpha: torch.Tensor
    iterations: torch.Tensor
    degenerate: torch.Tensor
    empty_support: torch.Tensor
    converged: torch.Tensor


def solve_alpha(
    logp_theta: torch.Tensor,
    logp_t: torch.Tensor,
    method: str = "kl_symmetry",
    *,
    alpha: float | torch.Tensor | None = None,
    kl_budget: float | torch.Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 20,
    alpha_min: float = 0.0,
    alpha_max: float = 1.0,
    teacher_top_p: float | None = None,
    empty_support: str = "teacher",
    log_multiplicity: torch.Tensor | None = None,
    return_info: bool = False,
    validate: bool = True,
) -> torch.Tensor | AlphaSolution:
    """Choose α per row for q_α ∝ π_θ^(1-α) · π_t^α.

    Args:
        logp_theta: `[B, V]` log-probabilities of the base model π_θ (after temperature);
            `-inf` marks masked tokens. Any float dtype; the maths runs in float32 at least.
        logp_t: `[B, V]` log-probabilities of the teacher π_t over the same vocabulary.
        method: `"kl_symmetry"` (KL(q‖π_θ) = KL(q‖π_t), safeguarded Newton; the default),
            `"fixed"` (the constant `alpha`), `"entropy"` (α = H(π_θ) / (H(π_θ) + H(π_t))),
            `"ess_balance"` (equal importance-sampling effective sample sizes, bisection) or
            `"kl_budget"` (the largest α with KL(q_α‖π_θ) ≤ `kl_budget`, safeguarded Newton).
        alpha: the constant for `method="fixed"` (a float or a `[B]` tensor).
        kl_budget: the budget ε ≥ 0 (nats per token, a float or a `[B]` tensor) for
            `method="kl_budget"`: how far from π_θ the sampled q may move.
        tol: tolerance on α for the iterative methods.
        max_iter: iteration cap for the iterative methods.
        alpha_min, alpha_max: α is clamped to this interval (for `kl_symmetry` the clamped
            value is still the minimiser of the convex A on the interval).
        teacher_top_p: if set, restrict both distributions to the teacher's top-p nucleus
            before solving, so the symmetry holds on the tokens that can be sampled.
        empty_support: what a row whose two distributions share no token falls back to:
            `"teacher"` (α = 1, q = π_t) or `"base"` (α = 0, q = π_θ). Such rows are flagged
            in the returned info so callers can count them.
        log_multiplicity: optional `[B, V]` log of how many vocabulary tokens each column
            stands for (0 for ordinary tokens). The sparse top-k path uses it for its "rest"
            bucket; it changes entropies and ESS, not the KL-symmetric α.
        return_info: also return iterations and per-row flags (see `AlphaSolution`).
        validate: check shapes and NaN first (one host synchronisation).

    Returns:
        `[B]` float32 α, or an `AlphaSolution` when `return_info=True`.

    Example:
        >>> import torch
        >>> from optimal_sampling import solve_alpha
        >>> logp_theta = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0]]), dim=-1)
        >>> logp_t = torch.log_softmax(torch.tensor([[-1.0, 0.0, 2.0]]), dim=-1)
        >>> solve_alpha(logp_theta, logp_t)  # mirror images meet in the middle
        tensor([0.5000])
        >>> solve_alpha(logp_theta, logp_theta)  # identical rows: α = 0.5 by convention
        tensor([0.5000])
    """
    check_solve_options(
        method,
        alpha=alpha,
        kl_budget=kl_budget,
        tol=tol,
        max_iter=max_iter,
        alpha_min=alpha_min,
        alpha_max=alpha_max,
        empty_support=empty_support,
    )
    if validate:
        check_log_prob_pair(logp_theta, logp_t)
    backend = solver_backend(logp_theta) if method == "kl_symmetry" else "torch"
    if backend != "torch":  # one kernel call, no support tensors
        lp, lr = restrict_to_nucleus(logp_theta, logp_t, teacher_top_p)
        solution = _kernel_solution(backend, lp, lr, tol, max_iter, empty_support, alpha_min, alpha_max)
    else:
        pair = common_support(logp_theta, logp_t, teacher_top_p=teacher_top_p)
        solution = solve_on_support(
            pair,
            method,
            alpha=alpha,
            kl_budget=kl_budget,
            tol=tol,
            max_iter=max_iter,
            alpha_min=alpha_min,
            alpha_max=alpha_max,
            empty_support=empty_support,
            log_multiplicity=log_multiplicity,
            backend=backend,
        )
    return solution if return_info else solution.alpha


SOLVER_BACKENDS = ("c", "triton", "torch")


def solver_backend(x: torch.Tensor) -> str:
    """Which implementation solves `kl_symmetry` (and, for "c", forms q*) for these rows; chosen
    once per step, by this function only.

    - `"c"`: float32 / half CPU tensors, the C step (`optimal_sampling.cpu_kernel`);
    - `"triton"`: CUDA tensors with Triton installed (`optimal_sampling.kernels`; also CPU tensors
      under `TRITON_INTERPRET=1`, where the tests run the Triton kernel);
    - `"torch"`: everything else (float64 rows, a kernel switched off or not built).

    Cheap on CPU: Triton is not even imported.
    """
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if x.device.type == "cpu" and not interpreted:
        from .cpu_kernel import cpu_kernel_applies

        return "c" if cpu_kernel_applies(x) else "torch"
    if x.is_cuda or interpreted:
        from .kernels import kernel_applies

        return "triton" if kernel_applies(x) else "torch"
    return "torch"


def kl_symmetry_kernel(
    backend: str, logp_theta: torch.Tensor, logp_t: torch.Tensor, tol: float, max_iter: int, **launch
):
    """The `kl_symmetry` kernel of `backend` ("c" or "triton"), imported on first use."""
    if backend == "c":
        from .cpu_kernel import kl_symmetry_cpu

        return kl_symmetry_cpu(logp_theta, logp_t, tol, max_iter, **launch)
    if backend == "triton":
        from .kernels import kl_symmetry_kernel as kl_symmetry_triton

        return kl_symmetry_triton(logp_theta, logp_t, tol, max_iter, **launch)
    raise ValueError(f"No kl_symmetry kernel for backend {backend!r}; the kernels are 'c' and 'triton'.")


def check_solve_options(method, *, alpha, tol, max_iter, alpha_min, alpha_max, empty_support, kl_budget=None) -> None:
    """Raise a clear error for an unknown method or inconsistent solver options (`QStarOptions`
    validates them; a per-row `[B]` tensor `alpha` / `kl_budget` is range-checked where it is used)."""
    QStarOptions(
        alpha_method=method,
        alpha=0.5 if isinstance(alpha, torch.Tensor) else alpha,
        kl_budget=0.0 if isinstance(kl_budget, torch.Tensor) else kl_budget,
        tol=tol,
        max_iter=max_iter,
        alpha_min=alpha_min,
        alpha_max=alpha_max,
        empty_support=empty_support,
    )


def solve_on_support(
    pair: CommonSupport,
    method: str = "kl_symmetry",
    *,
    alpha: float | torch.Tensor | None = None,
    kl_budget: float | torch.Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 20,
    alpha_min: float = 0.0,
    alpha_max: float = 1.0,
    empty_support: str = "teacher",
    log_multiplicity: torch.Tensor | None = None,
    backend: str | None = None,
) -> AlphaSolution:
    """`solve_alpha` on a prepared pair (options already checked by `check_solve_options`).

    `backend` is the caller's `solver_backend` choice for this step (None: choose here).
    """
    batch, device = pair.delta.shape[0], pair.delta.device
    iterations = torch.zeros(batch, dtype=torch.int32, device=device)
    degenerate = torch.zeros(batch, dtype=torch.bool, device=device)
    converged = torch.ones(batch, dtype=torch.bool, device=device)
    if method == "fixed":
        if isinstance(alpha, torch.Tensor):  # a per-row α (a float was checked with the options: no host sync)
            result = alpha.to(device=device, dtype=torch.float64).expand(batch).clone()
            if bool(((result < 0) | (result > 1)).any()):
                raise ValueError(f"`alpha` for method='fixed' must lie in [0, 1], got {alpha}.")
        elif alpha is not None:  # (None was refused with the options)
            result = torch.full((batch,), float(alpha), dtype=torch.float64, device=device)
        else:
            raise ValueError("method='fixed' needs `alpha=` (a number in [0, 1]).")
    elif method == "entropy":
        result = _entropy_alpha(pair.logp_theta, pair.logp_t, log_multiplicity)
    elif method == "ess_balance":
        result, iterations, converged = _ess_balance_alpha(pair.logp_theta_s, pair.delta, tol, max_iter)
    elif method == "kl_budget":
        result, iterations, converged = _kl_budget_alpha(pair, kl_budget, tol, max_iter)
    elif (backend := backend or solver_backend(pair.logp_theta)) != "torch":
        return _kernel_solution(
            backend, pair.logp_theta, pair.logp_t, tol, max_iter, empty_support, alpha_min, alpha_max
        )
    else:
        result, iterations, degenerate, converged = _kl_symmetry_alpha(pair, tol, max_iter)
    return _finish(result, iterations, degenerate, pair.empty, converged, empty_support, alpha_min, alpha_max)


def _kernel_solution(backend, lp, lr, tol, max_iter, empty_support, alpha_min, alpha_max) -> AlphaSolution:
    """The kernel applies the fallback and the clamp itself: one launch for the whole solve."""
    fallback = 1.0 if empty_support == "teacher" else 0.0
    return AlphaSolution(
        *kl_symmetry_kernel(backend, lp, lr, tol, max_iter, fallback=fallback, alpha_min=alpha_min, alpha_max=alpha_max)
    )


def _finish(alpha, iterations, degenerate, empty, converged, empty_support, alpha_min, alpha_max) -> AlphaSolution:
    """The fallback on rows without a common token, then the clamp, as float32."""
    alpha = torch.where(empty, 1.0 if empty_support == "teacher" else 0.0, alpha)
    alpha = alpha.clamp(alpha_min, alpha_max).to(torch.float32)
    return AlphaSolution(alpha, iterations, degenerate & ~empty, empty, converged | empty)
