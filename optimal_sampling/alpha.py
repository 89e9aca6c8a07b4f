"""Per-token choice of α for the geometric mixture q_α ∝ p^(1-α) · r^α.

Every function here is pure and batched: log-probabilities in (`[B, V]`, `-inf` for
masked tokens), one α per row out (`[B]`). The maths is in `theory/derivation.md`;
the short version: with Δ = log r − log p on the common support S and
A(α) = log Σ_S p^(1-α) r^α,

    KL(q_α‖p) − KL(q_α‖r) = A'(α) = E_q[Δ],      A''(α) = Var_q[Δ] ≥ 0,

so the KL-symmetric α* is the minimiser of the convex A on [0, 1] (the Chernoff point),
found by a safeguarded Newton iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALPHA_METHODS = ("kl_symmetry", "fixed", "entropy", "ess_balance")
EMPTY_SUPPORT_FALLBACKS = ("teacher", "base")

# Δ-spreads below this (relative to |Δ|) are float round-off of a constant Δ: such a row
# gives the same q for every α, and gets the conventional α = 0.5.
_DEGENERATE_RTOL = 1e-5


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


def check_log_prob_pair(logp_theta: torch.Tensor, logp_t: torch.Tensor) -> None:
    """Raise a clear error unless the two inputs are a valid `[B, V]` pair of log-probs.

    This synchronises with the device (it reads back whether any value is NaN); hot loops
    that already validated their logits can skip it with `validate=False`.
    """
    if not isinstance(logp_theta, torch.Tensor) or not isinstance(logp_t, torch.Tensor):
        raise TypeError(
            "`logp_theta` and `logp_t` must be torch tensors of log-probabilities, got "
            f"{type(logp_theta).__name__} and {type(logp_t).__name__}."
        )
    if logp_theta.dim() != 2 or logp_t.shape != logp_theta.shape:
        raise ValueError(
            f"`logp_theta` {tuple(logp_theta.shape)} and `logp_t` {tuple(logp_t.shape)} must both "
            "be [batch, vocab] with the same shape; slice both models' logits to the shared "
            "vocabulary first (e.g. `logits[..., :len(tokenizer)]`)."
        )
    if logp_theta.device != logp_t.device:
        raise ValueError(
            f"`logp_theta` is on {logp_theta.device} and `logp_t` on {logp_t.device}; move both "
            "to one device first (e.g. `logp_t.to(logp_theta.device)`)."
        )
    if not (logp_theta.is_floating_point() and logp_t.is_floating_point()):
        raise TypeError("`logp_theta` and `logp_t` must be floating-point tensors.")
    for name, x in (("logp_theta", logp_theta), ("logp_t", logp_t)):
        if bool(torch.isnan(x).any()):
            raise ValueError(
                f"`{name}` contains NaN. The model produced NaN logits (check the dtype: fp16 "
                "overflow is the usual cause; try bfloat16 or float32), or a mask was applied "
                "with NaN instead of -inf."
            )
        if bool(torch.isposinf(x).any()):
            raise ValueError(f"`{name}` contains +inf; pass log-probabilities (log_softmax), not raw scores.")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 at least, whatever the models' dtype (fp16/bf16 inputs are upcast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def teacher_nucleus_mask(logp_t: torch.Tensor, top_p: float) -> torch.Tensor:
    """`[B, V]` bool: the smallest set of teacher tokens whose mass reaches `top_p`.

    Applied to both models before the solve, so that the KL symmetry holds on the tokens
    that can actually be sampled. The teacher's most likely token is always kept.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"`teacher_top_p` (={top_p}) must be in (0, 1]; use 1.0 (or None) to keep the whole support.")
    sorted_logp, order = torch.sort(logp_t.to(compute_dtype(logp_t)), dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_logp.exp(), dim=-1) - sorted_logp.exp()
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def solve_alpha(
    logp_theta: torch.Tensor,
    logp_t: torch.Tensor,
    method: str = "kl_symmetry",
    *,
    alpha: float | torch.Tensor | None = None,
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
            `"fixed"` (the constant `alpha`), `"entropy"` (α = H(π_θ) / (H(π_θ) + H(π_t))) or
            `"ess_balance"` (equal importance-sampling effective sample sizes, bisection).
        alpha: the constant for `method="fixed"` (a float or a `[B]` tensor).
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
    if method not in ALPHA_METHODS:
        raise ValueError(f"Unknown alpha method {method!r}; choose one of {', '.join(ALPHA_METHODS)}.")
    if not (0.0 <= alpha_min <= alpha_max <= 1.0):
        raise ValueError(
            f"Need 0 <= alpha_min <= alpha_max <= 1, got alpha_min={alpha_min}, alpha_max={alpha_max}; "
            "swap them or use the defaults 0.0 and 1.0."
        )
    if empty_support not in EMPTY_SUPPORT_FALLBACKS:
        raise ValueError(f"`empty_support` must be 'teacher' or 'base', got {empty_support!r}.")
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"Need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}.")
    if method == "fixed" and alpha is None:
        raise ValueError("method='fixed' needs `alpha=` (a float in [0, 1] or a [B] tensor).")
    if validate:
        check_log_prob_pair(logp_theta, logp_t)

    dtype = compute_dtype(logp_theta)
    lp, lr = logp_theta.to(dtype), logp_t.to(dtype)
    if teacher_top_p is not None and teacher_top_p < 1.0:
        keep = teacher_nucleus_mask(lr, teacher_top_p)
        lp = lp.masked_fill(~keep, float("-inf"))
        lr = lr.masked_fill(~keep, float("-inf"))
    support = torch.isfinite(lp) & torch.isfinite(lr)
    empty = ~support.any(dim=-1)
    lp_s = lp.masked_fill(~support, float("-inf"))
    delta = (lr - lp).masked_fill(~support, 0.0)

    batch = lp.shape[0]
    iterations = torch.zeros(batch, dtype=torch.int32, device=lp.device)
    degenerate = torch.zeros(batch, dtype=torch.bool, device=lp.device)
    converged = torch.ones(batch, dtype=torch.bool, device=lp.device)

    if method == "fixed":
        result = torch.as_tensor(alpha, dtype=torch.float64, device=lp.device).expand(batch).clone()
        if bool(((result < 0) | (result > 1)).any()):
            raise ValueError(f"`alpha` for method='fixed' must lie in [0, 1], got {alpha}.")
    elif method == "entropy":
        result = _entropy_alpha(lp, lr, log_multiplicity)
    elif method == "ess_balance":
        result, iterations, converged = _ess_balance_alpha(lp_s, delta, lr, tol, max_iter)
    else:
        result, iterations, degenerate, converged = _kl_symmetry_alpha(lp_s, delta, tol, max_iter)

    fallback = 1.0 if empty_support == "teacher" else 0.0
    result = torch.where(empty, torch.full_like(result, fallback), result)
    degenerate = degenerate & ~empty
    result = result.clamp(alpha_min, alpha_max).to(torch.float32)
    if not return_info:
        return result
    return AlphaSolution(result, iterations, degenerate, empty, converged | empty)


# ---------------------------------------------------------------------------------------
# KL symmetry: safeguarded Newton on A'(α) = 0


def _mixture_moments(
    lp_s: torch.Tensor, delta: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """E_q[Δ] and Var_q[Δ] at α, `[B]` each, with q_α ∝ exp(log p + α Δ) on S.

    The weights are formed in the input precision; the three sums accumulate in float64,
    which keeps A' accurate enough for a 1e-6 root even when Var_q[Δ] is small.
    """
    t = lp_s + alpha.to(lp_s.dtype).unsqueeze(-1) * delta  # [B, V]
    top = t.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(t - top)  # [B, V], 0 outside S
    z = w.sum(dim=-1, dtype=torch.float64)
    wd = w * delta
    s1 = wd.sum(dim=-1, dtype=torch.float64)
    s2 = (wd * delta).sum(dim=-1, dtype=torch.float64)
    mean = s1 / z
    var = (s2 / z - mean * mean).clamp_min(0.0)
    return mean, var


def _iteration_done(active: torch.Tensor) -> bool:
    """Whether every row has converged. Reading this back is the solve's only host sync;
    inside a CUDA-graph capture or torch.compile the loop runs its full length instead."""
    if torch.compiler.is_compiling():
        return False
    if active.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return not bool(active.any())


def _kl_symmetry_alpha(lp_s, delta, tol, max_iter):
    batch = lp_s.shape[0]
    device = lp_s.device
    zeros = torch.zeros(batch, dtype=torch.float64, device=device)
    slope_at_0, _ = _mixture_moments(lp_s, delta, zeros)  # A'(0) = -KL(p‖r) on full support
    slope_at_1, _ = _mixture_moments(lp_s, delta, zeros + 1.0)  # A'(1) = KL(r‖p)

    spread = slope_at_1 - slope_at_0  # = ∫ Var_q[Δ] dα ≥ 0; zero iff Δ is constant on S
    scale = slope_at_0.abs() + slope_at_1.abs()
    degenerate = spread <= _DEGENERATE_RTOL * scale + 1e-12
    at_lower = ~degenerate & (slope_at_0 >= 0)  # A increasing on [0, 1]: minimum at 0
    at_upper = ~degenerate & (slope_at_1 <= 0)  # A decreasing on [0, 1]: minimum at 1

    # Secant start: the root of the chord through (0, A'(0)) and (1, A'(1)), which is
    # KL(p‖r) / (KL(p‖r) + KL(r‖p)) on full support.
    secant = (-slope_at_0 / spread.clamp_min(1e-300)).clamp(0.0, 1.0)
    alpha = torch.where(degenerate, zeros + 0.5, secant)
    alpha = torch.where(at_lower, zeros, alpha)
    alpha = torch.where(at_upper, zeros + 1.0, alpha)

    lo, hi = zeros.clone(), zeros + 1.0  # bracket: A'(lo) < 0 < A'(hi)
    active = ~(degenerate | at_lower | at_upper)
    active = active & torch.isfinite(slope_at_0) & torch.isfinite(slope_at_1)  # empty rows
    iterations = torch.zeros(batch, dtype=torch.int32, device=device)
    for _ in range(max_iter):
        if _iteration_done(active):
            break
        slope, curvature = _mixture_moments(lp_s, delta, alpha)
        iterations += active.to(torch.int32)
        lo = torch.where(active & (slope < 0), alpha, lo)
        hi = torch.where(active & (slope > 0), alpha, hi)
        newton = alpha - slope / curvature.clamp_min(1e-300)
        inside = (curvature > 0) & (newton > lo) & (newton < hi)
        step = torch.where(inside, newton, 0.5 * (lo + hi))
        # Freeze a row once the step (≈ the distance to the root) or the bracket is below
        # tol: further steps would only chase round-off and could flip the bracket.
        done = (slope == 0) | ((step - alpha).abs() <= tol) | (hi - lo <= tol)
        alpha = torch.where(active & (slope != 0), step, alpha)
        active = active & ~done
    converged = ~active
    return alpha, iterations, degenerate, converged


# ---------------------------------------------------------------------------------------
# The other rules


def _entropy(logp: torch.Tensor, log_multiplicity: torch.Tensor | None) -> torch.Tensor:
    """H = −Σ p log p per row, counting a bucket of n equal tokens as n tokens."""
    per_token = logp if log_multiplicity is None else logp - log_multiplicity
    terms = torch.where(torch.isfinite(logp), logp.exp() * per_token, torch.zeros_like(logp))
    return -terms.sum(dim=-1, dtype=torch.float64)


def _entropy_alpha(lp, lr, log_multiplicity):
    h_theta, h_t = _entropy(lp, log_multiplicity), _entropy(lr, log_multiplicity)
    total = h_theta + h_t
    return torch.where(total > 0, h_theta / total.clamp_min(1e-300), torch.full_like(total, 0.5))


def ess_log_gap(lp_s: torch.Tensor, delta: torch.Tensor, lr_s: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """log Σ_S p²/q_α − log Σ_S r²/q_α = log ESS_t(q_α) − log ESS_θ(q_α), `[B]`.

    With ESS_π(q) = 1 / Σ π²/q, the partition A(α) cancels: p²/q_α ∝ exp(log p − αΔ) and
    r²/q_α ∝ exp(log r + (1 − α)Δ). (Bucket multiplicities cancel between the two terms.)
    """
    a = alpha.to(lp_s.dtype).unsqueeze(-1)
    return (
        torch.logsumexp(lp_s - a * delta, dim=-1) - torch.logsumexp(lr_s + (1 - a) * delta, dim=-1)
    ).to(torch.float64)


def _ess_balance_alpha(lp_s, delta, lr, tol, max_iter):
    lr_s = lr.masked_fill(~torch.isfinite(lp_s), float("-inf"))
    batch, device = lp_s.shape[0], lp_s.device
    lo = torch.zeros(batch, dtype=torch.float64, device=device)
    hi = lo + 1.0
    gap_lo, gap_hi = ess_log_gap(lp_s, delta, lr_s, lo), ess_log_gap(lp_s, delta, lr_s, hi)
    bracketed = (gap_lo <= 0) & (gap_hi >= 0)
    # Without a sign change the balance is not reachable on [0, 1]: take the endpoint
    # closer to balance.
    best_end = torch.where(gap_lo.abs() <= gap_hi.abs(), lo, hi)
    iterations = torch.zeros(batch, dtype=torch.int32, device=device)
    active = bracketed & torch.isfinite(gap_lo) & torch.isfinite(gap_hi)
    for _ in range(max(max_iter, 1)):
        if _iteration_done(active):
            break
        mid = 0.5 * (lo + hi)
        gap = ess_log_gap(lp_s, delta, lr_s, mid)
        iterations += active.to(torch.int32)
        lo = torch.where(active & (gap <= 0), mid, lo)
        hi = torch.where(active & (gap > 0), mid, hi)
        active = active & (hi - lo > tol)
    alpha = torch.where(bracketed, 0.5 * (lo + hi), best_end)
    return alpha, iterations, ~active
