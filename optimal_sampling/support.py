"""A base/teacher pair of `[B, V]` log-probs, checked and prepared for every q* computation.

`common_support` splits the pair into what the α solvers (`solvers.py`, the kernels) and the
mixture (`mixture.py`) reuse: both log-probs in the compute dtype, restricted to the teacher's
top-p nucleus if asked, log π_θ on the common support S and Δ = log π_t − log π_θ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_SUM_CHUNK = 1024


class NaNLogProbsError(ValueError):
    """A model's log-probabilities (or q's) hold NaN: the model produced NaN logits."""


#: The per-token records that carry each model's log-prob of the sampled token, then q's, in the order checked.
SAMPLED_LOG_PROBS = ("logp_theta", "logp_t", "logq")


def check_sampled_log_probs(
    records: dict[str, torch.Tensor], mask: torch.Tensor | None = None, *, policy: str = "the policy"
) -> None:
    """`NaNLogProbsError`, naming the model, if a sampled token's log-prob in `records` (where `mask`, if
    given) is NaN: each of `SAMPLED_LOG_PROBS` in turn, `policy` naming π_θ (the fast path's policy, the
    top-k coordinator's base).

    Each model's record is checked, not log q alone: on a row that is NaN throughout, q*'s solver finds
    no common support and falls back to the other model (α = 0 or 1), so log q stays finite."""
    for name, source in zip(SAMPLED_LOG_PROBS, (f"{policy} (π_θ)", "the teacher (π_t)", "q*")):
        values = records[name] if mask is None else records[name][mask]
        if bool(torch.isnan(values).any()):
            raise NaNLogProbsError(
                f"NaN log-probabilities from {source} (`{name}` of the sampled tokens): a model produced NaN "
                "logits. Check its weights (a NaN optimizer step) and its dtype (fp16 overflow is the usual "
                "cause; try bfloat16 or float32)."
            )


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
            raise NaNLogProbsError(
                f"`{name}` contains NaN. The model produced NaN logits (check the dtype: fp16 "
                "overflow is the usual cause; try bfloat16 or float32), or a mask was applied "
                "with NaN instead of -inf."
            )
        if bool(torch.isposinf(x).any()):
            raise ValueError(f"`{name}` contains +inf; pass log-probabilities (log_softmax), not raw scores.")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 at least, whatever the models' dtype (fp16/bf16 inputs are upcast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def on_host(x: torch.Tensor) -> bool:
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


def common_support(
    logp_theta: torch.Tensor, logp_t: torch.Tensor, *, teacher_top_p: float | None = None
) -> CommonSupport:
    """Prepare a validated pair for `solve_on_support` and the mixture (a few passes over `[B, V]`)."""
    lp, lr = restrict_to_nucleus(logp_theta, logp_t, teacher_top_p)
    # Log-probs are never +inf, so the sum is -inf exactly off S (one pass instead of two
    # comparisons). A NaN entry stays NaN in Δ and log q, but a row that is NaN throughout (NaN
    # logits) ends with α at a bound and log q the other model's: callers that skip
    # `check_log_prob_pair` (the fast path, the top-k step) check each model's log-prob of the
    # sampled token as well (`check_sampled_log_probs`).
    both = lp + lr
    if on_host(both) and bool(both.amin() > float("-inf")):  # full support (and no NaN): no masking needed
        return CommonSupport(lp, lr, lp, lr - lp, None, torch.zeros(both.shape[0], dtype=torch.bool))
    off = torch.isneginf(both)
    delta = torch.where(off, 0.0, lr - lp)
    lp_s = torch.where(off, float("-inf"), lp)
    return CommonSupport(lp, lr, lp_s, delta, off, off.all(dim=-1))
