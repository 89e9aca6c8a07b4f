"""`optimal_sampling.trainers.estimators`: the weights and baselines of q* rows against their defining formulas,
on hand-built batches, and the expected updates they give on a small problem enumerated exactly.

The expectations are computed by enumerating every sequence of a tiny sequence space, so
unbiasedness and bias are checked exactly, with no sampling noise."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from optimal_sampling.trainers.estimators import (
    baseline_weights,
    check_consistent,
    group_statistics,
    grpo_advantages,
    importance_weights,
    mixture_log_weights,
    recentre_advantages,
)

# Two q* rows and one on-policy row, three token positions; the last position of row 1 is padding.
LOG_RATIO = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.2, 0.0], [0.3, 0.3, 0.3]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
ON_POLICY = torch.tensor([False, False, True])


def weights(weighting, **kw):
    options = dict(weighting=weighting, cap=3.0, gamma=0.1)
    options.update(kw)
    return importance_weights(LOG_RATIO, MASK, ON_POLICY, **options)


# --- weights ------------------------------------------------------------------------------


def test_token_truncate_is_the_ratio_capped_at_c_and_on_policy_rows_weigh_exactly_one():
    w = weights("token_truncate")
    expected = torch.tensor([[math.exp(0.5), math.exp(-1.0), 3.0], [3.0, math.exp(0.2), 1.0]], dtype=torch.float64)
    torch.testing.assert_close(w[:2], expected)
    assert w[2].eq(1.0).all()


def test_token_mask_zeroes_ratios_above_c():
    w = weights("token_mask")
    expected = torch.tensor([[math.exp(0.5), math.exp(-1.0), 0.0], [0.0, math.exp(0.2), 1.0]], dtype=torch.float64)
    torch.testing.assert_close(w[:2], expected)
    assert w[2].eq(1.0).all()


def test_sequence_modes_use_one_ratio_of_the_whole_masked_sequence():
    truncate, mask = weights("sequence_truncate"), weights("sequence_mask")
    assert truncate.shape == (3, 1)
    # row 0: Σ = 1.5 → e^1.5 = 4.48 > 3; row 1: Σ = 1.7 (the padded 0.0 not counted either way)
    assert truncate[:2, 0].tolist() == pytest.approx([3.0, 3.0])
    assert mask[:2, 0].tolist() == [0.0, 0.0]
    assert truncate[2, 0] == 1.0 and mask[2, 0] == 1.0
    small = importance_weights(LOG_RATIO * 0.1, MASK, ON_POLICY, weighting="sequence_truncate", cap=3.0, gamma=0.1)
    assert small[0, 0].item() == pytest.approx(math.exp(0.15))


def test_shaping_weight_is_the_gradient_of_luffys_f_of_the_ratio():
    # d/dθ f(π_θ/q) with f(r) = r/(r+γ) equals c · d/dθ log π_θ: c must be f'(r)·r, computed here by autograd.
    gamma = 0.1
    log_pi = LOG_RATIO.clone().requires_grad_(True)  # log π_θ − log q with log q held fixed
    ratio = log_pi.exp()
    (ratio / (ratio + gamma)).sum().backward()
    expected = torch.where(MASK, log_pi.grad, torch.zeros_like(log_pi.grad))
    w = weights("shaping", gamma=gamma)
    torch.testing.assert_close(torch.where(MASK[:2], w[:2], 0.0), expected[:2])
    assert w[2].eq(1.0).all()
    assert float(w[:2].max()) <= 1 / (4 * gamma) + 1e-12  # peaks at r = γ


def test_no_weighting_is_one_everywhere():
    assert weights("none").eq(1.0).all()


def test_mis_weight_is_the_balance_heuristic_on_every_row():
    log_pi = torch.tensor([-2.0, -0.5, -3.0], dtype=torch.float64)
    log_q_star = torch.tensor([-1.0, -2.5, -3.5], dtype=torch.float64)
    lam = 1 / 3
    w = importance_weights(
        LOG_RATIO,
        MASK,
        ON_POLICY,
        weighting="mis",
        cap=3.0,
        gamma=0.1,
        log_ratio_star=log_pi - log_q_star,
        on_policy_fraction=lam,
    )
    pi, q = log_pi.exp(), log_q_star.exp()
    torch.testing.assert_close(w[:, 0], pi / (lam * pi + (1 - lam) * q))
    assert float(w.max()) <= 1 / lam
    assert mixture_log_weights(log_pi - log_q_star, 0.0).tolist() == pytest.approx((log_pi - log_q_star).tolist())
    assert mixture_log_weights(log_pi - log_q_star, 1.0).eq(0).all()


# --- the expected update, enumerated exactly ------------------------------------------------

# A sequence space of 3 binary tokens (8 sequences); a softmax policy with one logit per
# sequence, so ∇_θ log π(y) = e_y − π; a q that shares π's support but prefers other sequences.
SEQUENCES = list(itertools.product([0, 1], repeat=3))
REWARD = torch.tensor([float(sum(y) >= 2) for y in SEQUENCES], dtype=torch.float64)
PI = torch.softmax(torch.tensor([2.0, 1.5, 1.0, -1.0, 0.5, -0.5, -1.5, -2.0], dtype=torch.float64), 0)
Q = torch.softmax(torch.tensor([-2.0, -1.0, -1.0, 1.0, -1.0, 1.0, 1.0, 2.0], dtype=torch.float64), 0)
SCORE = torch.eye(8, dtype=torch.float64) - PI  # row y: ∇ log π(y)
TRUE_GRADIENT = (PI * REWARD) @ SCORE  # ∇ E_π[R]


def expected_update(weight_of, baseline: float) -> torch.Tensor:
    """E_{y~q}[c(y) (R(y) − b) ∇log π(y)], by enumeration."""
    c = weight_of(PI / Q)
    return (Q * c * (REWARD - baseline)) @ SCORE


def test_exact_weights_give_the_true_gradient_for_any_baseline():
    for b in (0.0, 0.4, 0.9):
        torch.testing.assert_close(expected_update(lambda w: w, b), TRUE_GRADIENT)


def test_truncated_weights_with_a_baseline_leave_b_times_the_truncated_policy_mass_term():
    cap = 1.5
    assert bool((PI / Q > cap).any())  # truncation binds on some sequences
    lost = (PI - cap * Q).clamp_min(0)  # (π − Cq)₊
    for b in (0.0, 0.8):
        got = expected_update(lambda w: w.clamp(max=cap), b)
        no_baseline = expected_update(lambda w: w.clamp(max=cap), 0.0)
        # the baseline's contribution is exactly +b Σ_y (π − Cq)₊ ∇log π(y) (DESIGN.md §7)
        torch.testing.assert_close(got - no_baseline, b * (lost @ SCORE))
    # and the policy mass it drops is what group_statistics estimates, E_q[(W − C)₊]
    torch.testing.assert_close((Q * (PI / Q - cap).clamp_min(0)).sum(), lost.sum())


def test_mixed_group_mis_weights_are_unbiased_for_the_stratified_sample():
    # k rows from π and G − k from q, every row weighted π/(λπ + (1−λ)q): the expectation of
    # the weighted sum over the group, divided by G, is E_π[R ∇log π].
    groups, k = 4, 1
    lam = k / groups
    w = PI / (lam * PI + (1 - lam) * Q)
    on_part = k * (PI * w * REWARD) @ SCORE
    q_part = (groups - k) * (Q * w * REWARD) @ SCORE
    torch.testing.assert_close((on_part + q_part) / groups, TRUE_GRADIENT)
    assert float(w.max()) <= 1 / lam


# --- baselines and advantages -----------------------------------------------------------------

REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, float("nan")])  # two groups of 4, one unscorable row
ROWS_ON_POLICY = torch.tensor([True, True, False, False, True, True, False, False])
LOG_W = torch.tensor([0.0, 0.0, math.log(0.5), math.log(2.0), 0.0, 0.0, math.log(4.0), 0.0], dtype=torch.float64)


def test_on_policy_baseline_is_the_mean_of_each_groups_on_policy_rows():
    adv = grpo_advantages(REWARDS, ROWS_ON_POLICY, LOG_W, num_generations=4, baseline="on_policy", scale_rewards="none")
    expected = torch.tensor([0.5, -0.5, 0.5, 0.5, 0.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(adv, expected)


def test_is_baseline_is_the_self_normalised_weighted_mean_reward():
    adv = grpo_advantages(REWARDS, ROWS_ON_POLICY, LOG_W, num_generations=4, baseline="is", scale_rewards="none")
    b1 = (1 * 1 + 1 * 0 + 0.5 * 1 + 2.0 * 1) / (1 + 1 + 0.5 + 2.0)
    b2 = (1 * 0 + 1 * 0 + 4.0 * 1) / (1 + 1 + 4.0)  # the NaN row is left out
    expected = torch.tensor([1 - b1, -b1, 1 - b1, 1 - b1, -b2, -b2, 1 - b2, 0.0])
    torch.testing.assert_close(adv, expected)


def test_group_baseline_and_scale_reproduce_trls_advantages():
    adv = grpo_advantages(REWARDS, ROWS_ON_POLICY, LOG_W, num_generations=4, baseline="group", scale_rewards="group")
    g1, g2 = REWARDS[:4], REWARDS[4:7]
    expected = torch.cat([(g1 - g1.mean()) / (g1.std() + 1e-4), (g2 - g2.mean()) / (g2.std() + 1e-4), torch.zeros(1)])
    torch.testing.assert_close(adv, expected)


def test_no_baseline_keeps_the_reward_and_trls_scale():
    adv = grpo_advantages(REWARDS, ROWS_ON_POLICY, LOG_W, num_generations=4, baseline="none", scale_rewards="group")
    g1 = REWARDS[:4]
    torch.testing.assert_close(adv[:4], g1 / (g1.std() + 1e-4))


def test_groups_with_equal_rewards_get_zero_advantage_for_every_mean_baseline():
    rewards = torch.ones(4)
    for baseline in ("group", "on_policy", "is"):
        adv = grpo_advantages(
            rewards, ROWS_ON_POLICY[:4], LOG_W[:4], num_generations=4, baseline=baseline, scale_rewards="group"
        )
        assert adv.eq(0).all(), baseline


def test_baseline_weights_sum_to_one_per_group_or_vanish():
    omega = baseline_weights(REWARDS, ROWS_ON_POLICY, LOG_W, 4, "on_policy")
    assert omega.sum(-1).tolist() == [1.0, 1.0]
    no_on_policy = baseline_weights(REWARDS, torch.zeros(8, dtype=torch.bool), LOG_W, 4, "on_policy")
    assert no_on_policy.eq(0).all()


def test_recentred_rloo_advantages_equal_reward_minus_the_new_baseline():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.0, 1.0, 0.25])
    grouped = rewards.view(2, 4)
    loo = ((4 * grouped - grouped.sum(-1, keepdim=True)) / 3).flatten()  # TRL's leave-one-out advantages
    for baseline in ("on_policy", "is"):
        omega = baseline_weights(rewards, ROWS_ON_POLICY, LOG_W, 4, baseline)
        expected = (grouped - (omega * grouped.double()).sum(-1, keepdim=True)).flatten().float()
        got = recentre_advantages(loo, rewards, ROWS_ON_POLICY, LOG_W, num_generations=4, baseline=baseline)
        torch.testing.assert_close(got, expected)
    assert recentre_advantages(loo, rewards, ROWS_ON_POLICY, LOG_W, num_generations=4, baseline="group") is loo


def test_group_statistics_split_rewards_and_zero_variance_by_row_kind():
    rewards = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    log_ratio = torch.tensor([0.0, 0.0, math.log(5.0), math.log(0.5), 0.0, 0.0, math.log(2.0), math.log(4.0)])
    stats = group_statistics(rewards, ROWS_ON_POLICY, log_ratio, LOG_W, 4, cap=3.0)
    assert stats["on_policy_frac"] == 0.5
    assert stats["reward_on_policy"] == pytest.approx(0.25)
    assert stats["reward_qstar"] == pytest.approx(0.75)
    assert stats["zero_std_frac_on_policy"] == pytest.approx(0.5)  # group 1's on-policy rows agree, group 2's do not
    assert stats["zero_std_frac_qstar"] == pytest.approx(0.5)  # group 1's q* rows agree, group 2's do not
    assert stats["policy_mass_truncated_seq"] == pytest.approx((5.0 - 3.0 + 4.0 - 3.0) / 4)


# --- refused combinations ----------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_truncated_weights_with_the_group_baseline_are_refused_with_the_reason(weighting):
    with pytest.raises(ValueError, match=r"biased.*its own mistakes.*advantage_baseline='on_policy'"):
        check_consistent(weighting, "group", 4, 8)
    check_consistent(weighting, "group", 8, 8)  # no q* row: nothing to bias
    check_consistent(weighting, "group", 4, 8, allow_inconsistent=True)
    check_consistent(weighting, "is", 0, 8)


def test_on_policy_baseline_needs_on_policy_rows():
    with pytest.raises(ValueError, match="num_on_policy_generations` is 0"):
        check_consistent("none", "on_policy", 0, 8)


def test_unknown_names_and_impossible_counts_are_reported():
    with pytest.raises(ValueError, match="importance_weighting"):
        check_consistent("clip", "group", 0, 8)
    with pytest.raises(ValueError, match="advantage_baseline"):
        check_consistent("none", "mean", 0, 8)
    with pytest.raises(ValueError, match=r"must lie in \[0, num_generations=8\]"):
        check_consistent("none", "group", 9, 8)
