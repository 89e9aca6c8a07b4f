"""How q* rollouts enter a policy-gradient update: importance weights, baselines, diagnostics.

Pure torch functions (no TRL), used by both trainers. Each prompt's group of G completions
holds k rows sampled from π_θ itself (*on-policy* rows, α = 0) and G − k rows sampled from q*.
The policy-gradient estimate of ∇J(x) = E_{π_θ}[R ∇log π_θ(y)] is then

    Σ_i  c_i · (R_i − b) · ∇log π_θ(y_i)          (per token: c_{i,t}, the same R_i − b)

with a weight c and a baseline b. Only exact weights (c = π_θ(y)/q(y), or the
multiple-importance-sampling weights below) make it unbiased, and only then does *any*
baseline cancel in expectation. With truncated weights c = min(w, C) the baseline term leaves
+b · Σ_y (π_θ(y) − C q(y))₊ ∇log π_θ(y): an ascent on what the policy likes and q* rejects,
scaled by b. With the group mean of q* rewards as b (today's GRPO) that is most of the
update on hard prompts (theory/derivation.md §8.7). So every weighting names the baselines it
is consistent with (`check_consistent`).

Weightings (`importance_weighting`), applied to q* rows; on-policy rows always get weight 1
except under `"mis"`:

- `"none"`: c = 1. Trains on q* samples as if on-policy: biased toward q* (the teacher) by
  design; any baseline.
- `"shaping"`: LUFFY's policy shaping f(r) = r / (r + γ) of the per-token ratio r = π_θ/q:
  the gradient of f(r)·A is f'(r)·r·A·∇log π_θ, so c = γr / (r + γ)². It boosts tokens the
  policy finds unlikely (c peaks at r = γ) and damps the rest; biased by design; any baseline.
- `"token_truncate"`, `"token_mask"`, `"sequence_truncate"`, `"sequence_mask"`: TRL's
  modes: the per-token (or whole-sequence) ratio truncated at C, or zeroed above C. Consistent
  only with a baseline that estimates π_θ's own success (`"on_policy"`, `"is"`) or none.
- `"mis"`: multiple importance sampling (balance heuristic) over the whole group, which is a
  stratified sample of the mixture m = λπ_θ + (1 − λ)q* with λ = k/G: every row, on-policy
  ones included, gets w = π_θ(y) / (λπ_θ(y) + (1 − λ)q*(y)) ≤ 1/λ. Unbiased and bounded
  (for k ≥ 1), any baseline; it cannot pull toward the teacher, so it helps only through
  variance.

Baselines (`advantage_baseline`), per group:

- `"group"`: the trainer's own (GRPO: the mean of all G rewards; RLOO: leave-one-out).
  Correct for on-policy rows and exact weights.
- `"on_policy"`: the mean reward of the group's on-policy rows: an unbiased estimate of
  π_θ's success that does not look at q* rewards (needs k ≥ 1).
- `"is"`: the self-normalised importance-sampling estimate of π_θ's success over the whole
  group, Σ w_i R_i / Σ w_i with the mixture weights w above (w = π_θ/q* when k = 0).
- `"none"`: b = 0 (GRPO only).
"""

from __future__ import annotations

import math

import torch

IMPORTANCE_WEIGHTINGS = (
    "none",
    "shaping",
    "token_truncate",
    "token_mask",
    "sequence_truncate",
    "sequence_mask",
    "mis",
)
ADVANTAGE_BASELINES = ("group", "on_policy", "is", "none")
TRUNCATING = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
SEQUENCE_LEVEL = ("sequence_truncate", "sequence_mask", "mis")


def check_consistent(
    weighting: str, baseline: str, num_on_policy: int, num_generations: int, *, allow_inconsistent: bool = False
) -> None:
    """Raise for a weighting/baseline pair that biases the update toward the policy's own mistakes.

    A truncated or masked weight with the trainer's group baseline over q* rewards leaves
    +b·Σ_y (π_θ(y) − C q(y))₊ ∇log π_θ(y) in the expected update (module docstring). It is
    harmless only when no row comes from q* (k = G).
    """
    if weighting not in IMPORTANCE_WEIGHTINGS:
        raise ValueError(f"`importance_weighting` must be one of {IMPORTANCE_WEIGHTINGS}, got {weighting!r}.")
    if baseline not in ADVANTAGE_BASELINES:
        raise ValueError(f"`advantage_baseline` must be one of {ADVANTAGE_BASELINES}, got {baseline!r}.")
    if not 0 <= num_on_policy <= num_generations:
        raise ValueError(
            f"`num_on_policy_generations` (={num_on_policy}) must lie in [0, num_generations={num_generations}]."
        )
    if baseline == "on_policy" and num_on_policy == 0:
        raise ValueError(
            "`advantage_baseline='on_policy'` averages the rewards of each group's on-policy rows, but "
            "`num_on_policy_generations` is 0. Set `num_on_policy_generations` >= 1, or use `advantage_baseline='is'`."
        )
    if weighting in TRUNCATING and baseline == "group" and num_on_policy < num_generations and not allow_inconsistent:
        raise ValueError(
            f"`importance_weighting={weighting!r}` with `advantage_baseline='group'` is biased: the group mean of "
            "q* rewards (high: q* is teacher-guided) times the policy mass that truncation drops, "
            "b·Σ_y (π_θ(y) − C·q(y))₊ ∇log π_θ(y), pushes the policy toward the completions it likes and q* "
            "rejects — its own mistakes (it made the policy worse than vanilla GRPO in recipes/RESULTS.md). Use "
            "`advantage_baseline='on_policy'` (with num_on_policy_generations >= 1) or 'is', or "
            "`importance_weighting='none'`/'shaping'/'mis'. Set `allow_inconsistent_baseline=True` only to "
            "reproduce this bias in an ablation."
        )


def mixture_log_weights(log_ratio_star: torch.Tensor, on_policy_fraction: float) -> torch.Tensor:
    """log w = log π_θ(y) − log(λπ_θ(y) + (1 − λ)q*(y)) per sequence, `[N]` float64.

    `log_ratio_star`: `[N]` log π_θ(y) − log q*(y) of each whole sequence (q* rows and
    on-policy rows alike); λ = `on_policy_fraction` = k/G. λ = 0 gives the plain ratio
    π_θ/q*, λ = 1 gives 1.
    """
    lam = float(on_policy_fraction)
    x = log_ratio_star.double()
    if lam <= 0.0:
        return x
    if lam >= 1.0:
        return torch.zeros_like(x)
    # log(λ + (1 − λ) e^{−x}), stably
    return -torch.logaddexp(torch.full_like(x, math.log(lam)), math.log1p(-lam) - x)


def importance_weights(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    on_policy: torch.Tensor,
    *,
    weighting: str,
    cap: float,
    gamma: float,
    log_ratio_star: torch.Tensor | None = None,
    on_policy_fraction: float = 0.0,
) -> torch.Tensor:
    """The stop-gradient weight that multiplies each token's policy-gradient loss.

    Args:
        log_ratio: `[B, T]` log π_θ(y_t) − log q(y_t) per sampled token (q: the distribution
            the row was sampled from; 0 on padding).
        mask: `[B, T]` the tokens that count.
        on_policy: `[B]` bool, rows sampled from π_θ.
        weighting: one of `IMPORTANCE_WEIGHTINGS`.
        cap: C of the truncating and masking modes.
        gamma: γ of `"shaping"`.
        log_ratio_star: `[B]` log π_θ(y) − log q*(y) per sequence, for `"mis"`.
        on_policy_fraction: λ = k/G, for `"mis"`.

    Returns:
        `[B, T]` per-token weights, or `[B, 1]` for the sequence-level modes and `"none"`.
        On-policy rows get exactly 1, except under `"mis"`.
    """
    on_policy = on_policy.bool()
    log_ratio = torch.nan_to_num(log_ratio * mask, nan=0.0)
    if weighting == "none":
        return torch.ones(log_ratio.shape[0], 1, dtype=log_ratio.dtype, device=log_ratio.device)
    if weighting == "mis":
        if log_ratio_star is None:
            raise ValueError("`importance_weighting='mis'` needs each sequence's log π_θ(y) − log q*(y).")
        return mixture_log_weights(log_ratio_star, on_policy_fraction).exp().to(log_ratio.dtype).unsqueeze(-1)
    if weighting in ("sequence_truncate", "sequence_mask"):
        ratio = log_ratio.sum(-1, keepdim=True).exp()  # [B, 1]
    else:
        ratio = log_ratio.exp()  # [B, T]
    if weighting == "shaping":
        weight = gamma * ratio / (ratio + gamma) ** 2
    elif weighting.endswith("_truncate"):
        weight = ratio.clamp(max=cap)
    elif weighting.endswith("_mask"):
        weight = ratio.masked_fill(ratio > cap, 0.0)
    else:
        raise ValueError(f"`importance_weighting` must be one of {IMPORTANCE_WEIGHTINGS}, got {weighting!r}.")
    return torch.where(on_policy.unsqueeze(-1), torch.ones_like(weight), weight)


def baseline_weights(
    rewards: torch.Tensor,
    on_policy: torch.Tensor,
    log_mixture_weight: torch.Tensor,
    num_generations: int,
    baseline: str,
) -> torch.Tensor:
    """`[N/G, G]` float64 weights ω (each group's sum 1, or all 0) with b = Σ_j ω_j R_j.

    Unscorable rows (NaN reward) get ω = 0. A group with nothing to average (no scorable
    on-policy row for `"on_policy"`) gets all zeros, i.e. b = 0.
    """
    scorable = ~torch.isnan(rewards.view(-1, num_generations))
    if baseline == "on_policy":
        raw = (scorable & on_policy.view(-1, num_generations)).double()
    elif baseline == "is":
        log_w = log_mixture_weight.view(-1, num_generations).double().masked_fill(~scorable, float("-inf"))
        top = log_w.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).min)
        raw = (log_w - top).exp()
    elif baseline == "group":
        raw = scorable.double()
    else:
        raise ValueError(f"no baseline weights for advantage_baseline={baseline!r}")
    total = raw.sum(-1, keepdim=True)
    return torch.where(total > 0, raw / total.clamp_min(1e-300), torch.zeros_like(raw))


def grpo_advantages(
    rewards: torch.Tensor,
    on_policy: torch.Tensor,
    log_mixture_weight: torch.Tensor,
    *,
    num_generations: int,
    baseline: str,
    scale_rewards: str,
) -> torch.Tensor:
    """GRPO advantages (R − b) / s over the whole (gathered) batch, `[N]` float32.

    `rewards`: `[N]` (NaN = unscorable, advantage 0); groups are consecutive runs of
    `num_generations` rows. b follows `baseline` (see `baseline_weights`; `"none"`: 0). s is
    TRL's reward scale, unchanged: the group's reward std + 1e-4 (`"group"`), the batch's
    (`"batch"`) or 1 (`"none"`). A group whose rewards are all equal has R − b = 0 for every
    baseline but `"none"`, as in TRL.
    """
    grouped = rewards.view(-1, num_generations).double()
    if baseline == "none":
        base = torch.zeros(grouped.shape[0], 1, dtype=torch.float64, device=rewards.device)
    else:
        omega = baseline_weights(rewards, on_policy, log_mixture_weight, num_generations, baseline)
        base = (omega * torch.nan_to_num(grouped, nan=0.0)).sum(-1, keepdim=True)
    if scale_rewards == "group":
        scale = _nanstd(grouped, dim=-1, keepdim=True) + 1e-4
    elif scale_rewards == "batch":
        scale = _nanstd(grouped.flatten(), dim=0) + 1e-4
    elif scale_rewards == "none":
        scale = torch.ones((), dtype=torch.float64, device=rewards.device)
    else:
        raise ValueError(f"`scale_rewards` must be 'group', 'batch' or 'none', got {scale_rewards!r}.")
    advantages = (grouped - base) / scale
    return torch.nan_to_num(advantages, nan=0.0).flatten().float()


def recentre_advantages(
    advantages: torch.Tensor,
    rewards: torch.Tensor,
    on_policy: torch.Tensor,
    log_mixture_weight: torch.Tensor,
    *,
    num_generations: int,
    baseline: str,
) -> torch.Tensor:
    """Change the baseline of RLOO advantages without the rewards that produced them.

    RLOO's leave-one-out advantage of a group with n scorable rows is
    A_i = (n R_i − Σ R)/(n − 1), an affine image of R with the group's mean removed; for any
    baseline b = Σ ω_j R_j with Σ ω = 1, R_i − b = (n − 1)/n · (A_i − Σ ω_j A_j). So the
    KL-penalised, clipped rewards RLOO computed internally never need to be rebuilt. A global
    affine normalisation of A (`normalize_advantages`) carries through unchanged. `rewards` is
    used only for which rows are scorable. Returns `[N]` float32.
    """
    if baseline == "group":
        return advantages
    grouped = advantages.view(-1, num_generations).double()
    omega = baseline_weights(rewards, on_policy, log_mixture_weight, num_generations, baseline)
    scorable = ~torch.isnan(rewards.view(-1, num_generations))
    n = scorable.sum(-1, keepdim=True).double()
    centred = (n - 1) / n.clamp_min(1) * (grouped - (omega * grouped).sum(-1, keepdim=True))
    centred = torch.where(scorable & (omega.sum(-1, keepdim=True) > 0), centred, torch.zeros_like(centred))
    return centred.flatten().to(advantages.dtype)


def group_statistics(
    rewards: torch.Tensor,
    on_policy: torch.Tensor,
    log_ratio: torch.Tensor,
    log_mixture_weight: torch.Tensor,
    num_generations: int,
    cap: float,
) -> dict[str, float]:
    """Per-batch numbers that show what the q* rows do to the update (gathered tensors, `[N]`).

    - `on_policy_frac`: the fraction of rows sampled from π_θ (k/G by construction).
    - `reward_on_policy`, `reward_qstar`: mean reward of each kind of row: the policy's own
      success next to the rollouts' (teacher-guided) success.
    - `reward_policy_is`: the self-normalised mixture-weight estimate of π_θ's success, averaged
      over groups (what the `"is"` baseline uses).
    - `zero_std_frac_on_policy`, `zero_std_frac_qstar`: fraction of groups whose on-policy
      (resp. q*) rows all got the same reward (among groups with ≥ 2 such rows): no learning
      signal from that part of the group.
    - `policy_mass_truncated_seq`: mean over q* rows of (W − C)₊ with W = π_θ(y)/q(y): an
      unbiased estimate of Σ_y (π_θ(y) − C q(y))₊, the policy mass that sequence truncation
      at C drops, which bounds that mode's bias (`log_ratio` is the `[N]` log W).
    """
    on_policy = on_policy.bool()
    grouped = rewards.view(-1, num_generations).double()
    groups_on = on_policy.view(-1, num_generations)
    stats: dict[str, float] = {"on_policy_frac": float(on_policy.double().mean())}
    for name, rows in (("on_policy", on_policy), ("qstar", ~on_policy)):
        values = rewards[rows & ~torch.isnan(rewards)]
        if values.numel():
            stats[f"reward_{name}"] = float(values.double().mean())
        member = groups_on if name == "on_policy" else ~groups_on
        counted = (member & ~torch.isnan(grouped)).sum(-1) >= 2
        if bool(counted.any()):
            high = torch.where(member, grouped, float("-inf")).nan_to_num(nan=float("-inf")).amax(-1)
            low = torch.where(member, grouped, float("inf")).nan_to_num(nan=float("inf")).amin(-1)
            stats[f"zero_std_frac_{name}"] = float((high[counted] == low[counted]).double().mean())
    omega = baseline_weights(rewards, on_policy, log_mixture_weight, num_generations, "is")
    has = omega.sum(-1) > 0
    if bool(has.any()):
        stats["reward_policy_is"] = float((omega * torch.nan_to_num(grouped, nan=0.0)).sum(-1)[has].mean())
    q_rows = ~on_policy
    if bool(q_rows.any()):
        stats["policy_mass_truncated_seq"] = float((log_ratio[q_rows].double().exp() - cap).clamp_min(0).mean())
    return stats


def _nanstd(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Sample standard deviation ignoring NaN (as TRL's `nanstd`: Bessel-corrected)."""
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) / (count - 1)
    return var.sqrt() if keepdim else var.sqrt().squeeze(dim)
