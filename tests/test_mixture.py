"""q*, its diagnostics and its truncation, against independent float64 numpy formulas.

`compute_mixture` takes the C q* step for float32 CPU rows (`optimal_sampling/cpu_kernel.py`)
and torch ops otherwise; its tests run on both (the `solver` fixture of test_alpha.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from optimal_sampling import (
    compute_mixture,
    log_probs_from_logits,
    mixture_diagnostics,
    optimal_log_probs,
    solve_alpha,
    truncate_log_probs,
)
from optimal_sampling.testing import random_log_prob_pairs

sys.path.insert(0, str(Path(__file__).parent))
from test_alpha import solver  # noqa: E402,F401  (a fixture: the C q* step or torch ops)


def ref_logq(lp: np.ndarray, lr: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """log q_α = (1-α) log p + α log r − log Σ_S(...) on S = common support, −inf elsewhere."""
    support = np.isfinite(lp) & np.isfinite(lr)
    mixed = np.where(
        support, (1 - alpha[:, None]) * np.where(support, lp, 0) + alpha[:, None] * np.where(support, lr, 0), -np.inf
    )
    top = mixed.max(axis=1, keepdims=True)
    return mixed - top - np.log(np.exp(mixed - top).sum(axis=1, keepdims=True))


def finite(x: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(x), x, 0.0)


# ---------------------------------------------------------------------------------------
# optimal_log_probs


def test_optimal_log_probs_is_the_normalised_geometric_mixture_on_the_common_support():
    lp, lr = random_log_prob_pairs(1, rows=64, vocab=50, mask_fraction=0.3)
    alpha = torch.from_numpy(np.random.default_rng(1).random(64)).float()
    logq = optimal_log_probs(lp, lr, alpha)
    expected = ref_logq(lp.double().numpy(), lr.double().numpy(), alpha.double().numpy())
    support = torch.isfinite(lp) & torch.isfinite(lr)
    assert torch.isneginf(logq[~support]).all()
    np.testing.assert_allclose(logq[support].double().numpy(), expected[support.numpy()], rtol=0, atol=2e-6)
    np.testing.assert_allclose(torch.logsumexp(logq.double(), -1).numpy(), 0.0, atol=1e-6)


def test_optimal_log_probs_at_the_endpoints_is_each_model_on_the_common_support():
    lp, lr = random_log_prob_pairs(2, rows=4, vocab=20, mask_fraction=0.3)
    support = (torch.isfinite(lp) & torch.isfinite(lr)).numpy()
    for alpha, source in ((0.0, lp), (1.0, lr)):
        logq = optimal_log_probs(lp, lr, alpha).double().numpy()
        s = np.where(support, source.double().numpy(), -np.inf)
        expected = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
        np.testing.assert_allclose(logq[support], expected[support], atol=2e-6)


def test_optimal_log_probs_falls_back_on_rows_without_a_common_token():
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]))
    lr = torch.log(torch.tensor([[0.0, 0.0, 0.4, 0.6], [0.1, 0.2, 0.3, 0.4]]))
    teacher = optimal_log_probs(lp, lr, 0.5)
    base = optimal_log_probs(lp, lr, 0.5, empty_support="base")
    torch.testing.assert_close(teacher[0], lr[0])
    torch.testing.assert_close(base[0], lp[0])
    torch.testing.assert_close(teacher[1], base[1])  # an ordinary row is unaffected


# ---------------------------------------------------------------------------------------
# Diagnostics


def ref_diagnostics(lp: np.ndarray, lr: np.ndarray, alpha: np.ndarray) -> dict[str, np.ndarray]:
    logq = ref_logq(lp, lr, alpha)
    q = np.exp(logq)
    support = np.isfinite(logq)
    lp0, lr0, logq0 = finite(lp), finite(lr), finite(logq)
    kl_theta = (q * (logq0 - lp0)).sum(axis=1)
    kl_t = (q * (logq0 - lr0)).sum(axis=1)
    ess = {
        name: 1.0 / np.where(support, np.exp(2 * x - logq0), 0.0).sum(axis=1) for name, x in (("p", lp0), ("r", lr0))
    }
    mixed = np.where(support, (1 - alpha[:, None]) * lp0 + alpha[:, None] * lr0, -np.inf)
    return {
        "kl_theta": kl_theta,
        "kl_t": kl_t,
        "kl_diff": kl_theta - kl_t,
        "ess_ratio": ess["p"] / ess["r"],
        "entropy_q": -(q * logq0).sum(axis=1),
        "chernoff": -np.log(np.exp(mixed).sum(axis=1)),
    }


def test_mixture_diagnostics_match_float64_formulas():
    lp, lr = random_log_prob_pairs(3, rows=32, vocab=40, mask_fraction=0.3)
    alpha = torch.from_numpy(np.random.default_rng(3).random(32)).float()
    diagnostics = mixture_diagnostics(lp, lr, alpha).as_dict()
    expected = ref_diagnostics(lp.double().numpy(), lr.double().numpy(), alpha.double().numpy())
    assert set(diagnostics) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(diagnostics[name].numpy(), value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_full_support_batches_skip_the_masking_passes_without_changing_the_mixture(monkeypatch):
    """On CPU `common_support` checks on the host whether any token is masked and, if none is,
    skips the masking passes; the device path always masks. Both must give the same step."""
    import optimal_sampling.support as support_module

    monkeypatch.setenv("OPTIMAL_SAMPLING_CPU_KERNEL", "0")  # the C step has no masking passes to skip
    lp, lr = random_log_prob_pairs(5, rows=16, vocab=300, scale=2.0)  # full support
    assert support_module.common_support(lp, lr).off is None  # the host shortcut is taken
    lean = compute_mixture(lp, lr)
    monkeypatch.setattr(support_module, "on_host", lambda x: False)
    masked = compute_mixture(lp, lr)
    torch.testing.assert_close(lean.logq, masked.logq, rtol=0, atol=1e-6)
    torch.testing.assert_close(lean.alpha, masked.alpha, rtol=0, atol=1e-7)
    for name, value in lean.diagnostics.as_dict().items():
        torch.testing.assert_close(value, getattr(masked.diagnostics, name), rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("empty_support", ["teacher", "base"])
def test_compute_mixture_diagnostics_match_float64_formulas(solver, empty_support):
    """log q* and every diagnostic at the α the step chose, masked rows and an empty row
    included (the empty row: q is the fallback model, KL to it 0, to the other +inf, the
    ESS ratio undefined)."""
    lp, lr = random_log_prob_pairs(10, rows=24, vocab=1003, mask_fraction=0.3)
    lp[0, :500], lr[0, 500:] = float("-inf"), float("-inf")  # row 0: no common token
    step = compute_mixture(lp, lr, empty_support=empty_support)
    lp64, lr64, alpha = lp.double().numpy(), lr.double().numpy(), step.alpha.double().numpy()
    ordinary = slice(1, None)
    logq = step.logq.double().numpy()
    expected_logq = ref_logq(lp64[ordinary], lr64[ordinary], alpha[ordinary])
    assert (np.isfinite(logq[ordinary]) == np.isfinite(expected_logq)).all()
    np.testing.assert_allclose(finite(logq[ordinary]), finite(expected_logq), atol=2e-6)
    expected = ref_diagnostics(lp64[ordinary], lr64[ordinary], alpha[ordinary])
    diagnostics = step.diagnostics.as_dict()
    for name, value in expected.items():
        np.testing.assert_allclose(diagnostics[name].numpy()[ordinary], value, rtol=1e-5, atol=1e-6, err_msg=name)

    fallback = (lr64 if empty_support == "teacher" else lp64)[0]
    np.testing.assert_array_equal(logq[0], fallback.astype(np.float32))
    assert diagnostics["entropy_q"][0].item() == pytest.approx(-(np.exp(fallback) * finite(fallback)).sum(), rel=1e-6)
    kl_to_fallback, kl_to_other = ("kl_t", "kl_theta") if empty_support == "teacher" else ("kl_theta", "kl_t")
    assert diagnostics[kl_to_fallback][0].item() == 0.0 and diagnostics[kl_to_other][0].item() == float("inf")
    assert diagnostics["chernoff"][0].item() == float("inf") and np.isnan(diagnostics["ess_ratio"][0].item())


def test_compute_mixture_without_validation_lets_nan_through_to_logq(solver):
    """Callers that skip the input check (`validate=False`) find NaN inputs in log q."""
    lp, lr = random_log_prob_pairs(11, rows=4, vocab=50)
    lr[2, 7] = float("nan")
    logq = compute_mixture(lp, lr, validate=False).logq
    assert torch.isnan(logq[2]).any() and not torch.isnan(logq[[0, 1, 3]]).any()


def test_chernoff_information_equals_both_kls_at_the_kl_symmetric_alpha():
    lp, lr = random_log_prob_pairs(4, rows=32, vocab=100, scale=3.0)  # full support
    alpha = solve_alpha(lp, lr)
    diagnostics = mixture_diagnostics(lp, lr, alpha)
    expected = ref_diagnostics(lp.double().numpy(), lr.double().numpy(), alpha.double().numpy())
    assert (expected["chernoff"] > 1e-3).all()  # a non-trivial value to compare
    np.testing.assert_allclose(expected["kl_theta"], expected["chernoff"], rtol=1e-5)
    np.testing.assert_allclose(expected["kl_t"], expected["chernoff"], rtol=1e-5)
    np.testing.assert_allclose(diagnostics.chernoff.numpy(), diagnostics.kl_theta.numpy(), rtol=1e-5)
    np.testing.assert_allclose(diagnostics.chernoff.numpy(), diagnostics.kl_t.numpy(), rtol=1e-5)


def test_chernoff_information_is_at_most_the_two_kls_product_over_their_sum():
    """theory/derivation.md (9.2): KL(q*‖π_θ) = C ≤ ab/(a+b) ≤ min(a, b), a = KL(p‖r), b = KL(r‖p), the bound
    on how far q*-distillation's prefixes depart from the student's own."""
    lp, lr = random_log_prob_pairs(5, rows=256, vocab=64, scale=3.0)  # full support
    chernoff = compute_mixture(lp, lr).diagnostics.chernoff.double()
    p, r = lp.double(), lr.double()
    a, b = (p.exp() * (p - r)).sum(-1), (r.exp() * (r - p)).sum(-1)
    bound = a * b / (a + b)
    assert bool((chernoff <= bound * (1 + 1e-5)).all())
    assert float((chernoff / bound).max()) > 0.5  # the bound is not vacuous on these rows


# ---------------------------------------------------------------------------------------
# Truncation after mixing


def test_truncate_top_k_keeps_the_k_most_likely_tokens_renormalised():
    logq = torch.log_softmax(torch.randn(8, 30, generator=torch.Generator().manual_seed(5)), -1)
    out = truncate_log_probs(logq, top_k=5).double().numpy()
    x = logq.double().numpy()
    top5 = np.argsort(-x, axis=1)[:, :5]
    kept = np.zeros_like(x, dtype=bool)
    np.put_along_axis(kept, top5, True, axis=1)
    assert (np.isfinite(out) == kept).all()
    expected = x - np.log(np.where(kept, np.exp(x), 0).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(out[kept], expected[kept], atol=1e-6)


def test_truncate_top_p_keeps_the_smallest_nucleus_reaching_p_renormalised():
    logq = torch.log_softmax(2 * torch.randn(8, 30, generator=torch.Generator().manual_seed(6)), -1)
    top_p = 0.7
    out = truncate_log_probs(logq, top_p=top_p).double().numpy()
    x = logq.double().numpy()
    for row, out_row in zip(x, out):
        probs = np.sort(np.exp(row))[::-1]
        size = int(np.searchsorted(np.cumsum(probs), top_p) + 1)  # smallest n with mass >= p
        assert probs[: size - 1].sum() < top_p <= probs[:size].sum()
        kept = np.isfinite(out_row)
        assert kept.sum() == size
        assert np.exp(row[kept]).min() >= probs[size - 1]  # the kept tokens are the most likely
        np.testing.assert_allclose(out_row[kept], row[kept] - np.log(np.exp(row[kept]).sum()), atol=1e-6)


def test_truncate_without_top_k_or_top_p_returns_q_unchanged():
    logq = torch.log_softmax(torch.randn(2, 10), -1)
    assert truncate_log_probs(logq) is logq


# ---------------------------------------------------------------------------------------
# compute_mixture


def test_compute_mixture_samples_q_star_truncated_after_mixing(solver):
    lp, lr = random_log_prob_pairs(7, rows=16, vocab=60)
    step = compute_mixture(lp, lr, top_k=10)
    q = ref_logq(lp.double().numpy(), lr.double().numpy(), step.alpha.double().numpy())
    top10 = np.argsort(-q, axis=1)[:, :10]
    kept = np.zeros_like(q, dtype=bool)
    np.put_along_axis(kept, top10, True, axis=1)
    expected = q - np.log(np.where(kept, np.exp(q), 0).sum(axis=1, keepdims=True))
    out = step.logq.double().numpy()
    assert (np.isfinite(out) == kept).all()
    np.testing.assert_allclose(out[kept], expected[kept], atol=2e-6)


def test_compute_mixture_teacher_top_p_samples_only_the_nucleus_and_balances_kls_there(solver):
    # Teacher = base + noise, so the base also puts most of its mass on the teacher's nucleus
    # and most rows have an interior root on the restricted support.
    rng = np.random.default_rng(8)
    logits = 1.5 * rng.standard_normal((32, 100))
    lp = torch.log_softmax(torch.from_numpy(logits).float(), -1)
    lr = torch.log_softmax(torch.from_numpy(logits + 0.7 * rng.standard_normal((32, 100))).float(), -1)
    top_p = 0.8
    step = compute_mixture(lp, lr, teacher_top_p=top_p)
    r = lr.double().exp().numpy()
    order = np.argsort(-r, axis=1, kind="stable")
    before = np.cumsum(np.take_along_axis(r, order, 1), axis=1) - np.take_along_axis(r, order, 1)
    nucleus = np.zeros_like(r, dtype=bool)
    np.put_along_axis(nucleus, order, before < top_p, axis=1)
    assert (nucleus.sum(axis=1) >= 2).all() and (nucleus.sum(axis=1) < 100).all()
    logq = step.logq.double().numpy()
    assert (np.isfinite(logq) == nucleus).all()
    # On the restricted support S = nucleus, the models keep their own (unrenormalised)
    # log-probs, so A(0) = log π_θ(S) and A(1) = log π_t(S): the root may sit on a boundary.
    # Where it is interior, KL(q‖π_θ) = KL(q‖π_t) against the models' own distributions.
    q = np.exp(logq)
    kl_p = (q * (finite(logq) - lp.double().numpy())).sum(axis=1)
    kl_r = (q * (finite(logq) - lr.double().numpy())).sum(axis=1)
    alpha = step.alpha.numpy()
    interior = (alpha > 0) & (alpha < 1)
    assert interior.sum() >= 16
    np.testing.assert_allclose(kl_p[interior], kl_r[interior], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(step.diagnostics.kl_diff.numpy()[interior], 0.0, atol=1e-5)
    # At α = 0 the gap has the sign that puts the minimum of A there: KL(q‖π_θ) ≥ KL(q‖π_t).
    assert (kl_p[alpha == 0] >= kl_r[alpha == 0]).all() and (kl_p[alpha == 1] <= kl_r[alpha == 1]).all()


def test_compute_mixture_empty_support_row_samples_the_fallback_model(solver):
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]))
    lr = torch.log(torch.tensor([[0.0, 0.0, 0.4, 0.6], [0.1, 0.2, 0.3, 0.4]]))
    teacher = compute_mixture(lp, lr)
    base = compute_mixture(lp, lr, empty_support="base")
    assert teacher.solution.empty_support.tolist() == [True, False]
    assert teacher.alpha[0].item() == 1.0 and base.alpha[0].item() == 0.0
    torch.testing.assert_close(teacher.logq[0], lr[0])
    torch.testing.assert_close(base.logq[0], lp[0])


def test_log_probs_from_logits_slices_the_vocabulary_then_applies_temperature():
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(9))
    out = log_probs_from_logits(logits, temperature=0.7, vocab_size=10).double().numpy()
    z = logits[:, :10].double().numpy() / 0.7
    expected = z - z.max(axis=1, keepdims=True)
    expected -= np.log(np.exp(expected).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(out, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Clear errors


def test_non_positive_temperature_is_reported():
    with pytest.raises(ValueError, match=r"`temperature` \(=0\) has to be a strictly positive"):
        log_probs_from_logits(torch.randn(1, 4), temperature=0)


def test_bad_truncation_arguments_are_reported():
    logq = torch.log_softmax(torch.randn(1, 4), -1)
    with pytest.raises(ValueError, match="`top_k`"):
        truncate_log_probs(logq, top_k=-1)
    with pytest.raises(ValueError, match="`top_p`"):
        truncate_log_probs(logq, top_p=0.0)


def test_compute_mixture_reports_nan_inputs():
    lp, lr = random_log_prob_pairs(10, rows=2, vocab=5)
    lp[0, 1] = float("nan")
    with pytest.raises(ValueError, match="`logp_theta` contains NaN"):
        compute_mixture(lp, lr)


def test_compute_mixture_reports_shape_mismatch():
    lp, lr = random_log_prob_pairs(11, rows=2, vocab=5)
    with pytest.raises(ValueError, match="same shape"):
        compute_mixture(lp, lr[:1])
