"""The q* mixture and its diagnostics, from two `[B, V]` log-prob tensors.

`compute_mixture` is the whole per-token q* computation in one pure function; every
front (logits processor, generate strategy, sampler, server coordinator, trainer) calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .alpha import AlphaSolution, _kernel_solution, solve_on_support, solver_backend
from .cpu_kernel import mixture_cpu
from .options import QStarOptions
from .solvers import ess_log_gap
from .support import CommonSupport, check_log_prob_pair, common_support, compute_dtype, has_mass, restrict_to_nucleus

NEG_INF = float("-inf")


def log_probs_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, vocab_size: int | None = None
) -> torch.Tensor:
    """`[B, V']` logits → `[B, V]` float32 log-softmax(logits / T) over the first `vocab_size` ids.

    Models that share a tokenizer often pad their embedding matrices to different sizes;
    slicing both to the tokenizer's length drops the padded ids (random models put real
    mass there).
    """
    if temperature <= 0:
        raise ValueError(
            f"`temperature` (={temperature}) has to be a strictly positive float; for greedy "
            "decoding take the argmax of log q instead."
        )
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    logits = logits.to(compute_dtype(logits))
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def _as_alpha(alpha: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(alpha, dtype=like.dtype, device=like.device).expand(like.shape[0])


def mixture_on_support(
    pair: CommonSupport, alpha: torch.Tensor, empty_support: str = "teacher"
) -> tuple[torch.Tensor, torch.Tensor]:
    """log q_α `[B, V]` and the log-partition A(α) `[B]` of a prepared pair.

    (1-α) log π_θ + α log π_t = log π_θ + αΔ, which is −inf exactly off the common support
    (Δ is 0 there), so no masking is needed. A row without a common token gets the fallback
    model's log-probs and A = −inf.
    """
    mixed = torch.addcmul(pair.logp_theta_s, alpha.to(pair.delta.dtype).unsqueeze(-1), pair.delta)  # [B, V]
    log_partition = torch.logsumexp(mixed, dim=-1, keepdim=True)  # −inf on empty rows
    logq = mixed - log_partition
    if pair.off is not None:  # (None: full support, no row is empty)
        fallback = pair.logp_t if empty_support == "teacher" else pair.logp_theta
        logq = torch.where(pair.empty.unsqueeze(-1), fallback, logq)
    return logq, log_partition.squeeze(-1)


def optimal_log_probs(
    logp_theta: torch.Tensor,
    logp_t: torch.Tensor,
    alpha: torch.Tensor | float,
    *,
    empty_support: str = "teacher",
) -> torch.Tensor:
    """Normalised log q_α = (1-α) log π_θ + α log π_t − A(α) on the common support.

    Args:
        logp_theta, logp_t: `[B, V]` log-probabilities (`-inf` = masked).
        alpha: `[B]` (or a float) mixing weight per row.
        empty_support: a row with no common token gets the teacher's (`"teacher"`) or the
            base's (`"base"`) distribution instead.

    Returns:
        `[B, V]` float32 (float64 for float64 input) log q, `-inf` outside the common support.

    Example:
        >>> import torch
        >>> from optimal_sampling import optimal_log_probs
        >>> lp = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
        >>> lr = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
        >>> optimal_log_probs(lp, lr, torch.tensor([1.0])).exp()  # α = 1: the teacher on the common support
        tensor([[0.4000, 0.6000, 0.0000]])
    """
    QStarOptions(empty_support=empty_support)  # validates it
    pair = common_support(logp_theta, logp_t)
    return mixture_on_support(pair, _as_alpha(alpha, pair.delta), empty_support)[0]


@dataclass
class MixtureDiagnostics:
    """Per-row diagnostics of q_α against the two models, `[B]` float64 tensors each.

    Attributes:
        kl_theta: KL(q‖π_θ).
        kl_t: KL(q‖π_t).
        kl_diff: KL(q‖π_θ) − KL(q‖π_t), = A'(α); ≈ 0 at the KL-symmetric α.
        ess_ratio: ESS_θ(q) / ESS_t(q) with ESS_π(q) = 1 / Σ π²/q; 1 when balanced.
        entropy_q: H(q).
        chernoff: −A(α) = −log Σ_S π_θ^(1-α) π_t^α; at α* this is the Chernoff information
            and equals both KLs (on full support).
    """

    kl_theta: torch.Tensor
    kl_t: torch.Tensor
    kl_diff: torch.Tensor
    ess_ratio: torch.Tensor
    entropy_q: torch.Tensor
    chernoff: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def mixture_diagnostics(
    logp_theta: torch.Tensor,
    logp_t: torch.Tensor,
    alpha: torch.Tensor | float,
    *,
    log_multiplicity: torch.Tensor | None = None,
    empty_support: str = "teacher",
) -> MixtureDiagnostics:
    """KLs, ESS ratio, entropy and Chernoff value of q_α, per row.

    `log_multiplicity` (`[B, V]`, log of the number of tokens a column stands for) is used by
    the sparse path's rest bucket: KLs are exact per bucket, entropy and ESS need the count.
    A row without a common token is described through its fallback q (`empty_support`).
    """
    QStarOptions(empty_support=empty_support)  # validates it
    pair = common_support(logp_theta, logp_t)
    alpha = _as_alpha(alpha, pair.delta)
    logq, log_partition = mixture_on_support(pair, alpha, empty_support)
    return diagnostics_on_support(pair, alpha, logq, log_partition, log_multiplicity, empty_support)


def diagnostics_on_support(
    pair: CommonSupport,
    alpha: torch.Tensor,
    logq: torch.Tensor,
    log_partition: torch.Tensor,
    log_multiplicity: torch.Tensor | None = None,
    empty_support: str = "teacher",
) -> MixtureDiagnostics:
    """`mixture_diagnostics` from the pieces `mixture_on_support` already computed.

    With log q = log π_θ + αΔ − A on the common support, every KL is a function of E_q[Δ]:

        KL(q‖π_θ) = α E_q[Δ] − A,   KL(q‖π_t) = (α − 1) E_q[Δ] − A,   Chernoff = −A,

    and ESS_θ / ESS_t = exp(A(2 − α) − A(−α)) (`ess_log_gap`). So one weighted sum, the
    entropy and one two-point log-partition cover all six.
    """
    q = logq.exp()
    mean_delta = (q * pair.delta).sum(dim=-1).double()  # E_q[Δ]; 0 on empty rows (Δ = 0 there)
    # −Σ q log q; clamping −inf to the lowest float makes 0 · log 0 = 0 (torch.special.entr does
    # the same but is several times slower on CPU)
    entropy_terms = q * logq.clamp_min(torch.finfo(logq.dtype).min)
    if log_multiplicity is not None:
        entropy_terms = entropy_terms - torch.where(q > 0, q * log_multiplicity, 0.0)
    entropy_q = -entropy_terms.sum(dim=-1).double()
    gap = ess_log_gap(pair.logp_theta_s, pair.delta, alpha)  # NaN on empty rows
    return diagnostics_from_moments(
        alpha, log_partition.double(), mean_delta, entropy_q, gap, pair.empty, empty_support
    )


def diagnostics_from_moments(
    alpha: torch.Tensor,
    log_partition: torch.Tensor,
    mean_delta: torch.Tensor,
    entropy_q: torch.Tensor,
    ess_gap: torch.Tensor,
    empty: torch.Tensor,
    empty_support: str = "teacher",
) -> MixtureDiagnostics:
    """The six diagnostics from A(α), E_q[Δ], H(q) and `ess_log_gap` (`[B]` float64 each),
    by the identities in `diagnostics_on_support`. The C q* step for CPU tensors
    (`optimal_sampling.cpu_kernel.mixture_cpu`) returns these four directly."""
    a = alpha.to(torch.float64)
    kl_theta = a * mean_delta - log_partition  # +inf on empty rows (A = −inf) ...
    kl_t = (a - 1) * mean_delta - log_partition
    if empty_support == "teacher":  # ... except against the fallback model itself
        kl_t = torch.where(empty, 0.0, kl_t)
    else:
        kl_theta = torch.where(empty, 0.0, kl_theta)
    return MixtureDiagnostics(
        kl_theta=kl_theta,
        kl_t=kl_t,
        kl_diff=kl_theta - kl_t,
        ess_ratio=torch.exp(-ess_gap),  # NaN on empty rows
        entropy_q=entropy_q,
        chernoff=-log_partition,
    )


def truncate_log_probs(logq: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Optional top-k / top-p on q after mixing, renormalised: the distribution actually sampled.

    `top_k=0` and `top_p=1.0` leave q unchanged. The most likely token is always kept.
    """
    if top_k < 0:
        raise ValueError(f"`top_k` (={top_k}) must be >= 0 (0 disables it).")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"`top_p` (={top_p}) must be in (0, 1] (1.0 disables it).")
    if top_k == 0 and top_p >= 1.0:
        return logq
    keep = has_mass(logq)
    if top_k > 0 and top_k < logq.shape[-1]:
        kth = torch.topk(logq, top_k, dim=-1).values[..., -1:]
        keep = keep & (logq >= kth)
    if top_p < 1.0:
        sorted_logq, order = torch.sort(logq.masked_fill(~keep, NEG_INF), dim=-1, descending=True)
        probs = sorted_logq.exp()
        probs = probs / probs.sum(dim=-1, keepdim=True)
        keep_sorted = (torch.cumsum(probs, dim=-1) - probs) < top_p
        keep_sorted[..., 0] = True
        keep = keep & torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = logq.masked_fill(~keep, NEG_INF)
    return kept - torch.logsumexp(kept, dim=-1, keepdim=True)


@dataclass
class Mixture:
    """One decoding step of q* for a batch (all tensors have batch size B).

    Attributes:
        logq: `[B, V]` log of the distribution to sample (after top-k / top-p on q*).
        alpha: `[B]` α per row.
        solution: the solver's per-row info (iterations, degenerate / empty-support flags).
        diagnostics: `MixtureDiagnostics` of the untruncated q*, or None when not requested.
    """

    logq: torch.Tensor
    alpha: torch.Tensor
    solution: AlphaSolution
    diagnostics: MixtureDiagnostics | None


def compute_mixture(
    logp_theta: torch.Tensor,
    logp_t: torch.Tensor,
    q_star: QStarOptions | None = None,
    *,
    forced: torch.Tensor | None = None,
    log_multiplicity: torch.Tensor | None = None,
    return_diagnostics: bool = True,
    validate: bool = True,
    **options,
) -> Mixture:
    """α, log q* and diagnostics for one step: the whole q* computation in one place.

    Args:
        logp_theta, logp_t: the two models' `[B, V]` log-probs after temperature
            (`log_probs_from_logits(logits, q_star.temperature, vocab_size)`).
        q_star: the `QStarOptions`; keyword `options` (its field names) change single ones.
        forced: `[B]` (or `[]`) bool, rows at a `force_teacher_first_tokens` position: α = 1
            there (the empty-support fallback on a row without a common token), clamped to
            [alpha_min, alpha_max], selected on the device. None: no row is forced.
        log_multiplicity: `[B, V]` for the sparse path's rest bucket (see `solve_alpha`).
        return_diagnostics: also compute `MixtureDiagnostics` (several passes over `[B, V]`).
        validate: check the pair first (one host synchronisation).

    α is solved by `solve_on_support` with the backend `solver_backend` picks once for the
    step, q* formed by `mixture_on_support`, and `top_k` / `top_p` applied after mixing give
    the distribution actually sampled, whose log-probs are `logq`.

    Example:
        >>> import torch
        >>> from optimal_sampling import QStarOptions
        >>> from optimal_sampling.mixture import compute_mixture
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> lp = torch.log_softmax(torch.randn(2, 10), -1)
        >>> lr = torch.log_softmax(torch.randn(2, 10), -1)
        >>> step = compute_mixture(lp, lr)
        >>> step.logq.shape, bool(step.diagnostics.kl_diff.abs().max() < 1e-5)
        (torch.Size([2, 10]), True)
        >>> compute_mixture(lp, lr, QStarOptions(alpha_max=0.2), forced=torch.tensor([True, False])).alpha <= 0.2
        tensor([True, True])
    """
    q_star = QStarOptions.build(q_star, **options)
    if validate:
        check_log_prob_pair(logp_theta, logp_t)
    # Column multiplicities leave the KL-symmetric α as it is (they enter the entropy only), so the
    # kernels take the sparse path's columns too; a nucleus over columns that stand for many
    # tokens is the torch path's (and the top-k step refuses it).
    kl_symmetry = q_star.alpha_method == "kl_symmetry" and (log_multiplicity is None or q_star.teacher_top_p is None)
    backend = solver_backend(logp_theta) if kl_symmetry else "torch"
    if backend == "c":  # float32 CPU rows: the whole step in C (optimal_sampling/cpu_kernel.py), two calls
        lp, lr = restrict_to_nucleus(logp_theta, logp_t, q_star.teacher_top_p)
        solution = _kernel_solution(
            backend, lp, lr, q_star.tol, q_star.max_iter, q_star.empty_support, q_star.alpha_min, q_star.alpha_max
        )
        solution = force_teacher(solution, forced, q_star)
        logq_full, moments = mixture_cpu(
            lp, lr, solution.alpha, log_multiplicity=log_multiplicity, empty_support=q_star.empty_support
        )
        diagnostics = None
        if return_diagnostics:
            log_partition, mean_delta, entropy_q, ess_gap = moments.unbind(-1)
            diagnostics = diagnostics_from_moments(
                solution.alpha,
                log_partition,
                mean_delta,
                entropy_q,
                ess_gap,
                solution.empty_support,
                q_star.empty_support,
            )
    else:
        pair = common_support(logp_theta, logp_t, teacher_top_p=q_star.teacher_top_p)
        solution = solve_on_support(
            pair,
            q_star.alpha_method,
            alpha=q_star.alpha,
            kl_budget=q_star.kl_budget,
            tol=q_star.tol,
            max_iter=q_star.max_iter,
            alpha_min=q_star.alpha_min,
            alpha_max=q_star.alpha_max,
            empty_support=q_star.empty_support,
            log_multiplicity=log_multiplicity,
            backend=backend,
        )
        solution = force_teacher(solution, forced, q_star)
        logq_full, log_partition = mixture_on_support(pair, solution.alpha, q_star.empty_support)
        diagnostics = None
        if return_diagnostics:
            diagnostics = diagnostics_on_support(
                pair, solution.alpha, logq_full, log_partition, log_multiplicity, q_star.empty_support
            )
    logq = truncate_log_probs(logq_full, top_k=q_star.top_k, top_p=q_star.top_p)
    return Mixture(logq=logq, alpha=solution.alpha, solution=solution, diagnostics=diagnostics)


def force_teacher(solution: AlphaSolution, forced: torch.Tensor | None, q_star: QStarOptions) -> AlphaSolution:
    """`solution` with α = 1 on the `forced` rows (the fallback's α on an empty row), clamped; no host sync."""
    if forced is None:
        return solution
    fallback = 1.0 if q_star.empty_support == "teacher" else 0.0
    teacher_alpha = torch.where(solution.empty_support, fallback, 1.0).clamp(q_star.alpha_min, q_star.alpha_max)
    return AlphaSolution(
        alpha=torch.where(forced, teacher_alpha.to(solution.alpha.dtype), solution.alpha),
        iterations=torch.where(forced, torch.zeros_like(solution.iterations), solution.iterations),
        degenerate=solution.degenerate & ~forced,
        empty_support=solution.empty_support,
        converged=solution.converged | forced,
    )


def token_records(
    mixture: Mixture,
    index: torch.Tensor,
    logp_theta: torch.Tensor,
    logp_t: torch.Tensor,
    *,
    sampled_logq: torch.Tensor | None = None,
    log_multiplicity: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The per-token record of one step, `[B]` per name: what every decode loop appends.

    Args:
        mixture: the step's `compute_mixture` result.
        index: `[B]` the sampled token's column in the `[B, V]` tensors.
        logp_theta, logp_t: the step's `[B, V]` log-probs of the two models.
        sampled_logq: the `[B, V]` log-probs actually sampled where they differ from q* (rows
            sampled on-policy); default `mixture.logq`.
        log_multiplicity: the sparse path's `[B, V]` column sizes (a rest bucket's token has
            the column's log-prob minus the log of its size).

    Returns `alpha`, `logq` (the distribution sampled), `logq_star` (q*), `logp_theta`, `logp_t`,
    the solver's `iterations`, `empty_support` and `converged` flags, and the diagnostics
    (`RECORDED_DIAGNOSTICS`) when the step computed them.
    """
    column = index.unsqueeze(-1)

    def at_token(values: torch.Tensor) -> torch.Tensor:
        picked = values.gather(-1, column).squeeze(-1)
        return picked if log_multiplicity is None else picked - log_multiplicity.gather(-1, column).squeeze(-1)

    solution = mixture.solution
    record = {
        "alpha": mixture.alpha,
        "logq": at_token(mixture.logq if sampled_logq is None else sampled_logq),
        "logq_star": at_token(mixture.logq),
        "logp_theta": at_token(logp_theta),
        "logp_t": at_token(logp_t),
        "iterations": solution.iterations,
        "empty_support": solution.empty_support,
        "converged": solution.converged,
    }
    if mixture.diagnostics is not None:
        record.update(mixture.diagnostics.as_dict())
    return record
