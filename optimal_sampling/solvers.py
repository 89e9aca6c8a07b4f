"""The torch solvers of the α rules, on a pair prepared by `support.common_support`.

`alpha.solve_on_support` picks one per method: KL symmetry (safeguarded Newton on a
well-conditioned form of A'(α) = 0), `ess_balance` (bisection), `kl_budget` (bracketed Newton)
and `entropy` (closed form). The C and Triton kernels implement the KL-symmetry solve with the
same constants (`options.DEGENERATE_RTOL`, `options.QUADRATIC_STEP`).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from . import support
from .options import DEGENERATE_RTOL, QUADRATIC_STEP
from .support import CommonSupport, has_mass, row_sum64

# ---------------------------------------------------------------------------------------
# KL symmetry: safeguarded Newton on A'(α) = 0, in a better-conditioned form
#
# A'(α) = E_q[Δ] = (S₊(α) − S₋(α)) / Z(α) with S± = Σ_{±Δ>0} p e^{αΔ} |Δ|. Newton runs on
#
#     h(α) = log S₊(α) − log S₋(α),      h'(α) = E_{q₊}[Δ] − E_{q₋}[Δ] > 0,
#
# which has the same root and sign as A' but stays well-conditioned on peaked rows: where
# A' is a near-step (q jumping from one dominant token to another), h is nearly linear
# (exactly linear when two tokens dominate), and tokens with Δ = 0 — typically the token
# both models agree on — drop out of h instead of flattening A' towards 0.


_LOG2E = 1.4426950408889634


def _quiet(xp):
    """numpy warns on log(0), x/0 and inf − inf, which the iteration produces on purpose
    (an empty side of h, a vanishing slope) and handles by comparison; torch does not."""
    return np.errstate(all="ignore") if xp is np else contextlib.nullcontext()


class LogRatioMoments:
    """Evaluates h(α), h'(α) and h''(α) of one batch at any number of α per row.

    Built once per solve; each call is one pass over the `[B, V]` data: the weights
    w = p e^{αΔ} shifted by their row max, then the six sums Σ w Δ±ᵏ (k = 1, 2, 3; S± are
    the k = 1 ones) in one fused multiply-and-sum against a stacked `[B, 6, V]` feature
    tensor. Tokens with Δ = 0 add nothing to any of them; leaving them out of the weights
    keeps the row max among the tokens that count, so S± cannot underflow behind a shared
    top token. The weights are float32 (`exp2` of pre-scaled exponents: the same values at a
    third of `exp`'s cost on CPU), the sums float32 (tree / cascade summation), converted to
    float64 for the logs and ratios. Few, large ops: on small batches the solve is bound by
    the number of ops, not by the arithmetic.

    The per-row results are columns of `self.xp`: numpy arrays for CPU tensors (see
    `support.on_host`), torch tensors on the data's device otherwise.
    """

    def __init__(self, pair: CommonSupport) -> None:
        delta = pair.delta
        self.xp = np if support.on_host(delta) else torch
        # Centring log p per row keeps the float32 round-off of log p + αΔ small on flat rows,
        # where the root is most sensitive to it.
        top = pair.logp_theta_s.amax(dim=-1, keepdim=True).clamp_min_(torch.finfo(delta.dtype).min)
        log2_weight = torch.where(delta == 0, float("-inf"), (pair.logp_theta_s - top).mul_(_LOG2E))
        self.log2_weight = log2_weight.unsqueeze(1)  # [B, 1, V]
        self.log2_delta = (delta * _LOG2E).unsqueeze(1)  # [B, 1, V]
        # Written in place, feature-major (each [B, V] slice contiguous, as `out=` wants).
        features = delta.new_empty(6, *delta.shape)  # Δ₊, Δ₋, Δ₊², Δ₋², Δ₊³, Δ₋³
        torch.clamp_min(delta, 0.0, out=features[0])
        torch.clamp_max(delta, 0.0, out=features[1]).neg_()
        torch.mul(features[0:2], features[0:2], out=features[2:4])
        torch.mul(features[2:4], features[0:2], out=features[4:6])
        self.features = features.transpose(0, 1).unsqueeze(1)  # [B, 1, 6, V] (a view)
        # Δ's range on the common support, for the degenerate-row test: [B, 2] = (max, min)
        if pair.off is None:
            extremes = torch.stack([delta.amax(dim=-1), delta.amin(dim=-1)], dim=-1)  # (aminmax is slower on CPU)
        else:
            extremes = torch.stack(
                [
                    torch.where(pair.off, float("-inf"), delta).amax(dim=-1),
                    torch.where(pair.off, float("inf"), delta).amin(dim=-1),
                ],
                dim=-1,
            )
        self.delta_range = self._columns(extremes)
        self._ends = torch.arange(2, dtype=torch.float64, device=delta.device).unsqueeze(0)  # α = 0, 1; no host copy

    def _columns(self, x: torch.Tensor):
        x = x.double()
        return x.numpy() if self.xp is np else x

    def at_ends(self):
        """h, h', h'' at α = 0 and α = 1 (`[B, 2]` columns each), in one pass."""
        return self._moments(self._ends)

    def __call__(self, alpha):
        """`alpha`: a `[B, K]` float64 column → h, h', h'' as `[B, K]` float64 columns.

        h = log S₊ − log S₋ is ±inf when one side is empty or underflows (its sign is still
        right). With E± the means under the weights w Δ± / S±, h' = E₊[Δ] − E₋[Δ] and
        h'' = Var₊[Δ] − Var₋[Δ]; an empty side counts 0 in both.
        """
        return self._moments(torch.from_numpy(alpha) if self.xp is np else alpha)

    def _moments(self, alpha: torch.Tensor):
        t = torch.addcmul(self.log2_weight, alpha.to(self.log2_delta.dtype).unsqueeze(-1), self.log2_delta)  # [B, K, V]
        t -= t.amax(dim=-1, keepdim=True).clamp_min_(torch.finfo(t.dtype).min)  # an all -inf row stays -inf, no NaN
        sums = self._columns(
            (t.exp2_().unsqueeze(2) * self.features).sum(dim=-1)
        )  # [B, K, 6]: Σ w Δ±, Σ w Δ±², Σ w Δ±³
        xp = self.xp
        first = sums[..., 0:2]
        counted = first > 0  # an empty side has 0/0 moments; it counts 0
        mean = xp.where(counted, sums[..., 2:4] / first, 0.0)  # E±|Δ|
        variance = xp.where(counted, sums[..., 4:6] / first, 0.0) - mean * mean
        h = xp.log(first[..., 0]) - xp.log(first[..., 1])
        return h, mean[..., 0] + mean[..., 1], variance[..., 0] - variance[..., 1]


def _tangent_step(xp, lo, hi, h_lo, h_hi, slope_lo, slope_hi):
    """Next iterate inside (lo, hi) from the tangents at both bracket ends (`[B, 1]` columns).

    Where h is concave on the bracket both tangent roots undershoot the root and the larger
    is the tighter; where convex both overshoot and the smaller is. So take the larger (if
    the slope falls from lo to hi) or the smaller of the roots that lie inside, else bisect.
    One end is the latest iterate, so near the root this is Newton's step; far from it, the
    older end's tangent often cuts across a kink that plain Newton would creep along. For h
    made of two linear pieces it lands on the root exactly.
    """
    root_lo, root_hi = lo - h_lo / slope_lo, hi - h_hi / slope_hi  # NaN / ±inf: never inside
    inside_lo = (root_lo > lo) & (root_lo < hi)
    inside_hi = (root_hi > lo) & (root_hi < hi)
    prefer_lo = xp.where(slope_lo >= slope_hi, root_lo >= root_hi, root_lo <= root_hi)
    best = xp.where(inside_lo & (prefer_lo | ~inside_hi), root_lo, root_hi)
    return xp.where(inside_lo | inside_hi, best, 0.5 * (lo + hi))


# Newton's step is accepted without a pass to confirm it only while it is this short: the
# error estimate below uses h'' at the current iterate, and a kink of h within the step
# would make it wrong.


def _newton_step_lands(newton_step, slope, curvature, tol):
    """Whether α − newton_step is within tol of the root: the step is below tol, or it is
    short and Taylor's remainder |h''| s² / (2 h') — the error left after a Newton step of
    length s — is below tol / 8. Typically the second Newton step qualifies (~1e-6 long), which
    saves the pass that would only have confirmed it. False for NaN / inf."""
    length = abs(newton_step)
    remainder = abs(curvature) * newton_step * newton_step <= 0.25 * tol * slope
    return (length <= tol) | ((length <= QUADRATIC_STEP) & remainder)


def _iteration_done(active) -> bool:
    """Whether every row has converged. Reading this back is the solve's only host sync;
    inside a CUDA-graph capture or torch.compile the loop runs its full length instead."""
    if isinstance(active, np.ndarray):
        return not active.any()
    if torch.compiler.is_compiling():
        return False
    if active.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return not bool(active.any())


def _kl_symmetry_alpha(pair: CommonSupport, tol: float, max_iter: int):
    """Batched safeguarded Newton on h; every per-row quantity is a `[B, 1]` column (numpy on
    CPU, torch elsewhere: `LogRatioMoments.xp`), so that the ~50 small ops an iteration needs
    broadcast without reshaping. Returns α, iterations, degenerate, converged as `[B]` tensors."""
    moments = LogRatioMoments(pair)
    xp = moments.xp
    with _quiet(xp):
        delta_max, delta_min = moments.delta_range[:, 0:1], moments.delta_range[:, 1:2]
        spread = delta_max - delta_min  # NaN on empty rows: neither degenerate nor live
        threshold = DEGENERATE_RTOL * xp.maximum(abs(delta_max), abs(delta_min))
        degenerate, live = spread <= threshold, spread > threshold

        h_ends, slope_ends, _ = moments.at_ends()  # signs of A'(0) = -KL(p‖r), A'(1) = KL(r‖p)
        h_lo, h_hi = h_ends[:, 0:1], h_ends[:, 1:2]
        slope_lo, slope_hi = slope_ends[:, 0:1], slope_ends[:, 1:2]
        lo = xp.zeros_like(h_lo)
        hi = lo + 1.0
        at_lower = live & (h_lo >= 0)  # A increasing on [0, 1]: minimum at 0
        at_upper = live & (h_hi <= 0) & ~at_lower  # A decreasing on [0, 1]: minimum at 1
        active = live & ~(at_lower | at_upper)  # h(lo) < 0 < h(hi)

        alpha = _tangent_step(xp, lo, hi, h_lo, h_hi, slope_lo, slope_hi)
        alpha = xp.where(at_upper, hi, xp.where(at_lower, lo, alpha))
        alpha = xp.where(degenerate, 0.5, alpha)
        iterations = xp.zeros_like(lo)
        for _ in range(max_iter):
            if _iteration_done(active):
                break
            h, slope, curvature = moments(alpha)
            iterations = iterations + active
            # The new point replaces the bracket end on its side of the root (active rows only).
            below, above = active & (h < 0), active & (h > 0)
            lo, h_lo, slope_lo = xp.where(below, alpha, lo), xp.where(below, h, h_lo), xp.where(below, slope, slope_lo)
            hi, h_hi, slope_hi = xp.where(above, alpha, hi), xp.where(above, h, h_hi), xp.where(above, slope, slope_hi)
            # Freeze a row once Newton's step lands within tol of the root, or the bracket is
            # below tol. The step is tested before the bracket safeguard, which would reject a
            # step below round-off of α as "outside".
            newton_step = h / slope
            close = _newton_step_lands(newton_step, slope, curvature, tol)
            landing = xp.minimum(xp.maximum(alpha - newton_step, lo), hi)
            step = xp.where(close, landing, _tangent_step(xp, lo, hi, h_lo, h_hi, slope_lo, slope_hi))
            alpha = xp.where(below | above, step, alpha)
            active = active & ~(close | (h == 0) | (hi - lo <= tol))  # a NaN h keeps its row unconverged
    alpha, iterations, degenerate, converged = (  # numpy columns exist only for CPU data
        (torch.from_numpy(column) if xp is np else column).squeeze(-1)
        for column in (alpha, iterations, degenerate, ~active)
    )
    return alpha, iterations.to(torch.int32), degenerate, converged


# ---------------------------------------------------------------------------------------
# The other rules


def _entropy(logp: torch.Tensor, log_multiplicity: torch.Tensor | None) -> torch.Tensor:
    """H = −Σ p log p per row, counting a bucket of n equal tokens as n tokens."""
    per_token = logp if log_multiplicity is None else logp - log_multiplicity
    terms = torch.where(has_mass(logp), logp.exp() * per_token, torch.zeros_like(logp))
    return -row_sum64(terms)


def _entropy_alpha(lp, lr, log_multiplicity):
    h_theta, h_t = _entropy(lp, log_multiplicity), _entropy(lr, log_multiplicity)
    total = h_theta + h_t
    return torch.where(total > 0, h_theta / total.clamp_min(1e-300), torch.full_like(total, 0.5))


def ess_log_gap(lp_s: torch.Tensor, delta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """log Σ_S p²/q_α − log Σ_S r²/q_α = log ESS_t(q_α) − log ESS_θ(q_α), `[B]` float64.

    With ESS_π(q) = 1 / Σ π²/q, the partition A(α) cancels: p²/q_α ∝ exp(log p − αΔ) and
    r²/q_α ∝ exp(log p + (2 − α)Δ), so the gap is A(−α) − A(2 − α), one two-point
    log-partition (NaN on a row without a common token). Bucket multiplicities cancel
    between the two terms.
    """
    far = torch.stack([-alpha, 2 - alpha], dim=-1).to(lp_s.dtype).unsqueeze(-1)  # [B, 2, 1]
    log_partition = torch.logsumexp(torch.addcmul(lp_s.unsqueeze(1), far, delta.unsqueeze(1)), dim=-1).double()
    return log_partition[:, 0] - log_partition[:, 1]


def _ess_balance_alpha(lp_s, delta, tol, max_iter):
    batch, device = lp_s.shape[0], lp_s.device
    lo = torch.zeros(batch, dtype=torch.float64, device=device)
    hi = lo + 1.0
    gap_lo, gap_hi = ess_log_gap(lp_s, delta, lo), ess_log_gap(lp_s, delta, hi)
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
        gap = ess_log_gap(lp_s, delta, mid)
        iterations += active.to(torch.int32)
        lo = torch.where(active & (gap <= 0), mid, lo)
        hi = torch.where(active & (gap > 0), mid, hi)
        active = active & (hi - lo > tol)
    alpha = torch.where(bracketed, 0.5 * (lo + hi), best_end)
    return alpha, iterations, ~active


# ---------------------------------------------------------------------------------------
# KL budget: the largest α with KL(q_α‖π_θ) ≤ ε
#
# KL(q_α‖π_θ) = αA'(α) − A(α) (theory/derivation.md §5.4) has slope αA''(α) = α Var_q[Δ] ≥ 0,
# so it is non-decreasing in α, and the answer is where it crosses ε, if it does in [0, 1].
# At α = 0 the KL is −log π_θ(S) (0 on full support) and at α = 1 it is KL(r‖p) on S: a row
# within budget at α = 1 takes α = 1, one already over budget at α = 0 takes 0. Near α = 0 the
# KL grows like α² Var/2, so Newton on the KL itself creeps; on h(α) = √KL − √ε, which is
# nearly linear there, the secant start is already close and Newton takes 2-4 steps.


def kl_to_base(pair: CommonSupport, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(q_α‖π_θ) and its slope α·Var_{q_α}[Δ] at a `[B]` α, `[B]` float64 each (NaN on empty rows)."""
    mixed = torch.addcmul(pair.logp_theta_s, alpha.to(pair.delta.dtype).unsqueeze(-1), pair.delta)  # [B, V]
    log_partition = torch.logsumexp(mixed, dim=-1, keepdim=True)
    q = (mixed - log_partition).exp()
    mean = row_sum64(q * pair.delta)  # A'(α) = E_q[Δ]
    centred = pair.delta - mean.to(pair.delta.dtype).unsqueeze(-1)
    variance = row_sum64(q * centred * centred)  # A''(α)
    a = alpha.double()
    return (a * mean - log_partition.squeeze(-1).double()).clamp_min(0.0), a * variance


def _kl_budget_alpha(pair: CommonSupport, kl_budget, tol: float, max_iter: int):
    """Batched safeguarded Newton on h(α) = √KL(q_α‖π_θ) − √ε over the bracket [0, 1].

    Runs in float64: a budget of 1e-4 nats is a difference of two O(1) terms (αA' and A), which
    float32 sums resolve only to about 1e-6, i.e. a percent of the budget.
    """
    pair = CommonSupport(
        pair.logp_theta.double(),
        pair.logp_t.double(),
        pair.logp_theta_s.double(),
        pair.delta.double(),
        pair.off,
        pair.empty,
    )
    batch, device = pair.delta.shape[0], pair.delta.device
    if isinstance(kl_budget, torch.Tensor):  # per-row budgets (a float was checked with the options: no host sync)
        budget = kl_budget.to(dtype=torch.float64, device=device).expand(batch)
        if bool((budget < 0).any()) or not bool(torch.isfinite(budget).all()):
            raise ValueError("`kl_budget` must be finite and >= 0 (nats per token) in every row.")
    else:
        budget = torch.full((batch,), float(kl_budget), dtype=torch.float64, device=device)
    root_budget = budget.sqrt()
    lo = torch.zeros(batch, dtype=torch.float64, device=device)
    hi = lo + 1.0
    h_lo = kl_to_base(pair, lo)[0].sqrt() - root_budget
    h_hi = kl_to_base(pair, hi)[0].sqrt() - root_budget
    at_upper = h_hi <= 0  # the teacher itself is within budget
    at_lower = (h_lo >= 0) & ~at_upper  # already over budget at α = 0 (a restricted support), or ε = 0
    active = ~(at_upper | at_lower | pair.empty)
    alpha = torch.where(at_upper, hi, lo)
    alpha = torch.where(active, (-h_lo / (h_hi - h_lo)).clamp(0.0, 1.0), alpha)  # secant start
    iterations = torch.zeros(batch, dtype=torch.int32, device=device)
    for _ in range(max_iter):
        if _iteration_done(active):
            break
        kl, slope = kl_to_base(pair, alpha)
        root_kl = kl.sqrt()
        h = root_kl - root_budget
        iterations += active.to(torch.int32)
        lo = torch.where(active & (h < 0), alpha, lo)
        hi = torch.where(active & (h > 0), alpha, hi)
        # h' = slope / (2√KL). Where round-off made the KL 0 (or the slope vanishes) there is no
        # Newton step: NaN, never inside the bracket, never "close".
        has_step = (root_kl > 0) & (slope > 0)
        newton = torch.where(has_step, alpha - h * 2 * root_kl / slope, float("nan"))
        inside = (newton > lo) & (newton < hi)
        done = active & ((h == 0) | ((alpha - newton).abs() <= tol) | (hi - lo <= tol))
        # A finished row takes Newton's landing point when it is inside the bracket, else the
        # end that is within budget.
        finished = torch.where(inside, newton, torch.where(h <= 0, alpha, lo))
        alpha = torch.where(
            done, finished, torch.where(active & inside, newton, torch.where(active, 0.5 * (lo + hi), alpha))
        )
        active = active & ~done
    return alpha, iterations, ~active
