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

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch

ALPHA_METHODS = ("kl_symmetry", "fixed", "entropy", "ess_balance", "kl_budget")
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
    if logp_theta.numel() == 0:
        return
    # One pass each and one read-back for both: a max is NaN or +inf if any value is.
    if bool(torch.maximum(logp_theta.amax().float(), logp_t.amax().float()) < float("inf")):
        return
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


_SUM_CHUNK = 1024


def _on_host(x: torch.Tensor) -> bool:
    """Whether `x` lives on the CPU outside torch.compile: there reading a value back costs
    no device sync, so the q* step may branch on the data (skip the masking passes of a
    full-support batch) and keep the solver's per-row state (`[B, 1]` columns) in numpy. An
    iteration needs ~50 ops on those columns; a torch op on a tiny tensor costs 3–8 µs of
    dispatch on CPU and a numpy op about 1 µs, so in torch the bookkeeping cost more than
    the pass over the `[B, V]` data. On a GPU everything stays on the device, branch-free."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def has_mass(logp: torch.Tensor) -> torch.Tensor:
    """`logp > -inf`: where a log-prob tensor puts mass. Log-probs are never NaN or +inf
    here (`check_log_prob_pair`), so this is `isfinite` in one pass instead of three."""
    return logp > float("-inf")


def row_sum64(x: torch.Tensor) -> torch.Tensor:
    """Σ over the last dim of a `[B, V]` tensor as float64 `[B]`, without a float64 copy.

    Chunks of 1024 are summed in the input precision (pairwise, so their error is tiny)
    and the chunk sums in float64. Converting the whole tensor to float64 first costs a
    copy that dominated the solve (on CPU float64 arithmetic is also far slower).
    """
    if x.dtype == torch.float64:
        return x.sum(dim=-1)
    batch, width = x.shape
    whole = width // _SUM_CHUNK * _SUM_CHUNK
    total = torch.zeros(batch, dtype=torch.float64, device=x.device)
    if whole:
        total = x[:, :whole].reshape(batch, -1, _SUM_CHUNK).sum(dim=-1).to(torch.float64).sum(dim=-1)
    if whole < width:
        total = total + x[:, whole:].sum(dim=-1).to(torch.float64)
    return total


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
    check_solve_options(method, alpha=alpha, kl_budget=kl_budget, tol=tol, max_iter=max_iter, alpha_min=alpha_min,
                        alpha_max=alpha_max, empty_support=empty_support)
    if validate:
        check_log_prob_pair(logp_theta, logp_t)
    if method == "kl_symmetry" and _kernel_applies(logp_theta):  # one kernel call, no support tensors
        lp, lr = restrict_to_nucleus(logp_theta, logp_t, teacher_top_p)
        solution = _kernel_solution(lp, lr, tol, max_iter, empty_support, alpha_min, alpha_max)
    else:
        pair = common_support(logp_theta, logp_t, teacher_top_p=teacher_top_p)
        solution = solve_on_support(
            pair, method, alpha=alpha, kl_budget=kl_budget, tol=tol, max_iter=max_iter, alpha_min=alpha_min,
            alpha_max=alpha_max, empty_support=empty_support, log_multiplicity=log_multiplicity,
        )
    return solution if return_info else solution.alpha


def _c_kernel_device(x: torch.Tensor) -> bool:
    """Whether `x`'s rows belong to the C kernels (`optimal_sampling.cpu_kernel`): CPU tensors,
    except under `TRITON_INTERPRET=1`, where the tests run the Triton kernel on them."""
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"


def _kernel_applies(x: torch.Tensor) -> bool:
    """Whether a fused kernel solves `kl_symmetry` for these rows: the C solve on float32 CPU
    tensors (`optimal_sampling.cpu_kernel`), the Triton kernel on CUDA (`optimal_sampling.kernels`;
    also CPU tensors under `TRITON_INTERPRET=1`). Cheap on CPU: Triton is not even imported."""
    if _c_kernel_device(x):
        from .cpu_kernel import cpu_kernel_applies

        return cpu_kernel_applies(x)
    if x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        from .kernels import kernel_applies

        return kernel_applies(x)
    return False


def kl_symmetry_kernel(logp_theta: torch.Tensor, logp_t: torch.Tensor, tol: float, max_iter: int, **launch):
    """The kernel `_kernel_applies` chose, imported on first use (the Triton one imports Triton)."""
    if _c_kernel_device(logp_theta):
        from .cpu_kernel import kl_symmetry_cpu as kernel
    else:
        from .kernels import kl_symmetry_kernel as kernel

    return kernel(logp_theta, logp_t, tol, max_iter, **launch)


def check_empty_support(empty_support: str) -> None:
    """Raise a clear error unless `empty_support` names a fallback model."""
    if empty_support not in EMPTY_SUPPORT_FALLBACKS:
        raise ValueError(f"`empty_support` must be 'teacher' or 'base', got {empty_support!r}.")


def check_solve_options(method, *, alpha, tol, max_iter, alpha_min, alpha_max, empty_support, kl_budget=None) -> None:
    """Raise a clear error for an unknown method or inconsistent solver options."""
    if method not in ALPHA_METHODS:
        raise ValueError(f"Unknown alpha method {method!r}; choose one of {', '.join(ALPHA_METHODS)}.")
    if not (0.0 <= alpha_min <= alpha_max <= 1.0):
        raise ValueError(
            f"Need 0 <= alpha_min <= alpha_max <= 1, got alpha_min={alpha_min}, alpha_max={alpha_max}; "
            "swap them or use the defaults 0.0 and 1.0."
        )
    check_empty_support(empty_support)
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"Need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}.")
    if method == "fixed" and alpha is None:
        raise ValueError("method='fixed' needs `alpha=` (a float in [0, 1] or a [B] tensor).")
    if method == "kl_budget":
        if kl_budget is None:
            raise ValueError(
                "method='kl_budget' needs `kl_budget=`: the largest KL(q‖π_θ) per token, in nats, that the sampled q "
                "may have (e.g. 0.1)."
            )
        if not isinstance(kl_budget, torch.Tensor) and not (0.0 <= float(kl_budget) < float("inf")):
            raise ValueError(f"`kl_budget` must be a finite number >= 0 (nats per token), got {kl_budget}.")


@dataclass
class CommonSupport:
    """A base/teacher pair of `[B, V]` log-probs split into what every q* computation reuses.

    Attributes:
        logp_theta, logp_t: the inputs in the compute dtype, restricted to the teacher's
            top-p nucleus when one was asked for (`-inf` outside it).
        logp_theta_s: log π_θ on the common support S, `-inf` off it.
        delta: Δ = log π_t − log π_θ on S, 0 off it (so log q ∝ logp_theta_s + αΔ everywhere).
        off: `[B, V]` bool, the token is outside S; None when every token is in S (known
            only on CPU, where `common_support` checks it: the masking passes are then skipped).
        empty: `[B]` bool, the row has no common token.
    """

    logp_theta: torch.Tensor
    logp_t: torch.Tensor
    logp_theta_s: torch.Tensor
    delta: torch.Tensor
    off: torch.Tensor | None
    empty: torch.Tensor


def restrict_to_nucleus(
    logp_theta: torch.Tensor, logp_t: torch.Tensor, teacher_top_p: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both log-probs in the compute dtype, `-inf` outside the teacher's top-p nucleus if set."""
    dtype = compute_dtype(logp_theta)
    lp, lr = logp_theta.to(dtype), logp_t.to(dtype)
    if teacher_top_p is not None and teacher_top_p < 1.0:
        outside = ~teacher_nucleus_mask(lr, teacher_top_p)
        lp, lr = lp.masked_fill(outside, float("-inf")), lr.masked_fill(outside, float("-inf"))
    return lp, lr


def common_support(logp_theta: torch.Tensor, logp_t: torch.Tensor, *, teacher_top_p: float | None = None) -> CommonSupport:
    """Prepare a validated pair for `solve_on_support` and the mixture (a few passes over `[B, V]`)."""
    lp, lr = restrict_to_nucleus(logp_theta, logp_t, teacher_top_p)
    # Log-probs are never +inf, so the sum is -inf exactly off S (one pass instead of two
    # comparisons). A NaN input stays NaN in Δ and log q, where callers that skip
    # `check_log_prob_pair` (the fast path) detect it.
    both = lp + lr
    if _on_host(both) and bool(both.amin() > float("-inf")):  # full support (and no NaN): no masking needed
        return CommonSupport(lp, lr, lp, lr - lp, None, torch.zeros(both.shape[0], dtype=torch.bool))
    off = torch.isneginf(both)
    delta = torch.where(off, 0.0, lr - lp)
    lp_s = torch.where(off, float("-inf"), lp)
    return CommonSupport(lp, lr, lp_s, delta, off, off.all(dim=-1))


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
) -> AlphaSolution:
    """`solve_alpha` on a prepared pair (options already checked by `check_solve_options`)."""
    batch, device = pair.delta.shape[0], pair.delta.device
    iterations = torch.zeros(batch, dtype=torch.int32, device=device)
    degenerate = torch.zeros(batch, dtype=torch.bool, device=device)
    converged = torch.ones(batch, dtype=torch.bool, device=device)
    if method == "fixed":
        result = torch.as_tensor(alpha, dtype=torch.float64, device=device).expand(batch).clone()
        if bool(((result < 0) | (result > 1)).any()):
            raise ValueError(f"`alpha` for method='fixed' must lie in [0, 1], got {alpha}.")
    elif method == "entropy":
        result = _entropy_alpha(pair.logp_theta, pair.logp_t, log_multiplicity)
    elif method == "ess_balance":
        result, iterations, converged = _ess_balance_alpha(pair.logp_theta_s, pair.delta, tol, max_iter)
    elif method == "kl_budget":
        result, iterations, converged = _kl_budget_alpha(pair, kl_budget, tol, max_iter)
    elif _kernel_applies(pair.logp_theta):
        return _kernel_solution(pair.logp_theta, pair.logp_t, tol, max_iter, empty_support, alpha_min, alpha_max)
    else:
        result, iterations, degenerate, converged = _kl_symmetry_alpha(pair, tol, max_iter)
    return _finish(result, iterations, degenerate, pair.empty, converged, empty_support, alpha_min, alpha_max)


def _kernel_solution(lp, lr, tol, max_iter, empty_support, alpha_min, alpha_max) -> AlphaSolution:
    """The kernel applies the fallback and the clamp itself: one launch for the whole solve."""
    fallback = 1.0 if empty_support == "teacher" else 0.0
    return AlphaSolution(*kl_symmetry_kernel(lp, lr, tol, max_iter, fallback=fallback, alpha_min=alpha_min, alpha_max=alpha_max))


def _finish(alpha, iterations, degenerate, empty, converged, empty_support, alpha_min, alpha_max) -> AlphaSolution:
    """The fallback on rows without a common token, then the clamp, as float32."""
    alpha = torch.where(empty, 1.0 if empty_support == "teacher" else 0.0, alpha)
    alpha = alpha.clamp(alpha_min, alpha_max).to(torch.float32)
    return AlphaSolution(alpha, iterations, degenerate & ~empty, empty, converged | empty)


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
    `_on_host`), torch tensors on the data's device otherwise.
    """

    def __init__(self, pair: CommonSupport) -> None:
        delta = pair.delta
        self.xp = np if _on_host(delta) else torch
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
            extremes = torch.stack([torch.where(pair.off, float("-inf"), delta).amax(dim=-1),
                                    torch.where(pair.off, float("inf"), delta).amin(dim=-1)], dim=-1)
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
        sums = self._columns((t.exp2_().unsqueeze(2) * self.features).sum(dim=-1))  # [B, K, 6]: Σ w Δ±, Σ w Δ±², Σ w Δ±³
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
_QUADRATIC_STEP = 1e-4


def _newton_step_lands(newton_step, slope, curvature, tol):
    """Whether α − newton_step is within tol of the root: the step is below tol, or it is
    short and Taylor's remainder |h''| s² / (2 h') — the error left after a Newton step of
    length s — is below tol / 8. Typically the second Newton step qualifies (~1e-6 long), which
    saves the pass that would only have confirmed it. False for NaN / inf."""
    length = abs(newton_step)
    remainder = abs(curvature) * newton_step * newton_step <= 0.25 * tol * slope
    return (length <= tol) | ((length <= _QUADRATIC_STEP) & remainder)


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
        threshold = _DEGENERATE_RTOL * xp.maximum(abs(delta_max), abs(delta_min))
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
    pair = CommonSupport(*(x.double() if torch.is_tensor(x) and x.is_floating_point() else x for x in
                           (pair.logp_theta, pair.logp_t, pair.logp_theta_s, pair.delta, pair.off, pair.empty)))
    batch, device = pair.delta.shape[0], pair.delta.device
    budget = torch.as_tensor(kl_budget, dtype=torch.float64, device=device).expand(batch)
    if bool((budget < 0).any()) or not bool(torch.isfinite(budget).all()):
        raise ValueError("`kl_budget` must be finite and >= 0 (nats per token) in every row.")
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
        alpha = torch.where(done, finished, torch.where(active & inside, newton, torch.where(active, 0.5 * (lo + hi), alpha)))
        active = active & ~done
    return alpha, iterations, ~active
