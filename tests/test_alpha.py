"""`solve_alpha`: the KL-symmetric α* and the other α rules, checked against independent
float64 numpy implementations of their defining equations (never against the package).

The KL-symmetry tests run on both CPU solvers (the `solver` fixture): the C solve that
float32 CPU tensors get by default (`optimal_sampling/cpu_kernel.py`) and the batched torch
path (float64 inputs, no C compiler, `OPTIMAL_SAMPLING_CPU_KERNEL=0`; on torch columns, GPUs
under torch.compile)."""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from optimal_sampling import solve_alpha
from optimal_sampling.alpha import solver_backend
from optimal_sampling.cpu_kernel import library
from optimal_sampling.testing import random_log_prob_pairs

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------
# Independent float64 references


def ref_slope(lp: np.ndarray, lr: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """A'(α) = E_{q_α}[Δ] on the common support, float64, `[B]`."""
    support = np.isfinite(lp) & np.isfinite(lr)
    lp0 = np.where(support, lp, 0.0)
    delta = np.where(support, lr, 0.0) - lp0
    t = np.where(support, lp0 + alpha[:, None] * delta, -np.inf)
    w = np.exp(t - t.max(axis=1, keepdims=True))
    return (w * delta).sum(axis=1) / w.sum(axis=1)


def ref_kl_symmetric_alpha(lp: np.ndarray, lr: np.ndarray) -> np.ndarray:
    """Per row: the root of A'(α) = E_q[Δ] on [0, 1] by scipy's brentq in float64 to 1e-14,
    or the boundary where A' does not change sign."""
    alphas = []
    for lp_row, lr_row in zip(np.asarray(lp, np.float64), np.asarray(lr, np.float64)):
        support = np.isfinite(lp_row) & np.isfinite(lr_row)
        log_p, delta = lp_row[support], lr_row[support] - lp_row[support]

        def slope(alpha, log_p=log_p, delta=delta):
            t = log_p + alpha * delta
            w = np.exp(t - t.max())
            return np.dot(w, delta) / w.sum()

        if slope(0.0) >= 0:
            alphas.append(0.0)
        elif slope(1.0) <= 0:
            alphas.append(1.0)
        else:
            alphas.append(brentq(slope, 0.0, 1.0, xtol=1e-14, rtol=4 * np.finfo(float).eps))
    return np.array(alphas)


def ref_kls(lp: np.ndarray, lr: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """KL(q‖p), KL(q‖r) and Var_q[Δ] of q_α ∝ p^(1-α) r^α on the common support, float64."""
    support = np.isfinite(lp) & np.isfinite(lr)
    lp0, lr0 = np.where(support, lp, 0.0), np.where(support, lr, 0.0)
    mixed = np.where(support, (1 - alpha[:, None]) * lp0 + alpha[:, None] * lr0, -np.inf)
    top = mixed.max(axis=1, keepdims=True)
    logq = mixed - top - np.log(np.exp(mixed - top).sum(axis=1, keepdims=True))
    q = np.exp(logq)
    logq0 = np.where(support, logq, 0.0)
    kl_p = (q * (logq0 - lp0)).sum(axis=1)
    kl_r = (q * (logq0 - lr0)).sum(axis=1)
    delta = lr0 - lp0
    mean = (q * delta).sum(axis=1)
    var = (q * (delta - mean[:, None]) ** 2).sum(axis=1)
    return kl_p, kl_r, var


def ref_entropy(lp: np.ndarray) -> np.ndarray:
    return -np.where(np.isfinite(lp), np.exp(lp) * np.where(np.isfinite(lp), lp, 0.0), 0.0).sum(axis=1)


def ref_ess(lp_pi: np.ndarray, lp: np.ndarray, lr: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """ESS_π(q_α) = 1 / Σ_S π²/q_α, float64, with q_α normalised on the common support S."""
    support = np.isfinite(lp) & np.isfinite(lr)
    lp0, lr0 = np.where(support, lp, 0.0), np.where(support, lr, 0.0)
    mixed = np.where(support, (1 - alpha[:, None]) * lp0 + alpha[:, None] * lr0, -np.inf)
    top = mixed.max(axis=1, keepdims=True)
    logq = mixed - top - np.log(np.exp(mixed - top).sum(axis=1, keepdims=True))
    pi0 = np.where(support, lp_pi, 0.0)
    return 1.0 / np.where(support, np.exp(2 * pi0 - np.where(support, logq, 0.0)), 0.0).sum(axis=1)


# ---------------------------------------------------------------------------------------
# Random test distributions

SCALES = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # logit std: from nearly flat to very peaked


def stacked_pairs(seed: int, rows_per_setting: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every scale in SCALES, half the rows with masks on both sides (30% of tokens each)."""
    rng = np.random.default_rng(seed)
    pairs = [
        random_log_prob_pairs(rng, rows_per_setting, vocab, scale, mask) for scale in SCALES for mask in (0.0, 0.3)
    ]
    return torch.cat([p for p, _ in pairs]), torch.cat([r for _, r in pairs])


# (vocabulary, rows per (scale, mask) setting): 12 settings each, 2,424 rows in all.
VOCAB_CASES = [(8, 150), (1000, 50), (151936, 2)]


def require_c_solver() -> None:
    """The C solve needs a C compiler: CI has one (it must not skip), elsewhere skip."""
    if library() is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("the C α solve did not build (see the RuntimeWarning): CI must have a C compiler")
        pytest.skip("no C compiler: the C α solve is not built")


@pytest.fixture(scope="module", params=["c", "torch"])
def solver(request):
    """Run the test on the C solve or on the batched torch path (env switch, read per call)."""
    if request.param == "c":
        require_c_solver()
    patch = pytest.MonkeyPatch()
    patch.setenv("OPTIMAL_SAMPLING_CPU_KERNEL", "1" if request.param == "c" else "0")
    assert (solver_backend(torch.zeros(1)) == "c") == (request.param == "c")
    yield request.param
    patch.undo()


@functools.cache
def random_inputs(vocab: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    lp, lr = stacked_pairs(seed=vocab, rows_per_setting=rows, vocab=vocab)
    return lp, lr, ref_kl_symmetric_alpha(lp.double().numpy(), lr.double().numpy())


@pytest.fixture(scope="module", params=VOCAB_CASES, ids=lambda case: f"V{case[0]}")
def random_batch(request, solver):
    lp, lr, reference = random_inputs(*request.param)
    return lp, lr, solve_alpha(lp, lr, return_info=True), reference


# ---------------------------------------------------------------------------------------
# KL symmetry


def test_kl_symmetric_alpha_matches_float64_root(random_batch):
    lp, lr, solution, reference = random_batch
    error = np.abs(solution.alpha.double().numpy() - reference)
    assert error.max() <= 1e-6, f"worst row {error.argmax()}: |α - α_ref| = {error.max():.2e}"


def test_kl_symmetric_alpha_balances_the_two_kls(random_batch):
    lp, lr, solution, reference = random_batch
    lp64, lr64 = lp.double().numpy(), lr.double().numpy()
    interior = (reference > 0) & (reference < 1)
    kl_p, kl_r, var = ref_kls(lp64, lr64, solution.alpha.double().numpy())
    residual = np.abs(kl_p - kl_r)[interior]
    # KL(q‖p) − KL(q‖r) = A'(α) ≈ Var_q[Δ] · (α − α*); |α − α*| ≤ 1e-6 bounds it.
    assert np.all(residual <= 2e-6 * var[interior] + 1e-12)
    # ... which is negligible next to the KLs themselves.
    kl = np.maximum(kl_p, kl_r)[interior]
    assert np.all(residual <= 1e-4 * kl + 1e-12)


def test_kl_symmetric_alpha_newton_needs_at_most_8_iterations(random_batch):
    _, _, solution, _ = random_batch
    assert bool(solution.converged.all())
    assert int(solution.iterations.max()) <= 8, torch.bincount(solution.iterations).tolist()


@pytest.mark.parametrize("case", VOCAB_CASES, ids=lambda case: f"V{case[0]}")
def test_the_torch_bookkeeping_used_on_gpus_matches_the_numpy_one_used_on_cpu(case, edge_batch, monkeypatch):
    """The torch path keeps its per-row Newton state in numpy for CPU tensors; on a GPU
    (without the Triton kernel, e.g. under torch.compile) the same code runs on torch columns.
    Both must solve alike."""
    import optimal_sampling.support as support_module

    monkeypatch.setenv("OPTIMAL_SAMPLING_CPU_KERNEL", "0")
    lp, lr, reference = random_inputs(*case)
    names, edge_lp, edge_lr = edge_batch
    on_host = [solve_alpha(p, r, return_info=True) for p, r in ((lp, lr), (edge_lp, edge_lr))]
    monkeypatch.setattr(support_module, "on_host", lambda x: False)
    for (p, r), host in zip(((lp, lr), (edge_lp, edge_lr)), on_host):
        on_device = solve_alpha(p, r, return_info=True)
        assert (on_device.alpha - host.alpha).abs().max().item() <= 1e-7
        for flag in ("iterations", "degenerate", "empty_support", "converged"):
            assert torch.equal(getattr(on_device, flag), getattr(host, flag)), flag
    on_device = solve_alpha(lp, lr)
    assert np.abs(on_device.double().numpy() - reference).max() <= 1e-6


def test_masked_supports_put_the_root_on_the_boundary_when_not_bracketed(random_batch):
    lp, lr, solution, reference = random_batch
    at_zero, at_one = reference == 0.0, reference == 1.0
    assert solution.alpha[torch.from_numpy(at_zero)].eq(0.0).all()
    assert solution.alpha[torch.from_numpy(at_one)].eq(1.0).all()


def test_alpha_is_zero_when_the_slope_at_zero_is_nonnegative(solver):
    # The teacher masks token 2, where the base puts most of its mass; on the common support
    # {0, 1} the teacher is the heavier side everywhere that matters: A'(0) = E_p|S[Δ] > 0.
    lp = torch.log(torch.tensor([[0.10, 0.05, 0.85]]))
    lr = torch.log(torch.tensor([[0.09, 0.91, 0.0]]))
    slope_0 = ref_slope(lp.double().numpy(), lr.double().numpy(), np.zeros(1))
    assert slope_0[0] > 0 and (lr - lp)[0, 0] < 0  # Δ changes sign, yet the root is not inside
    assert solve_alpha(lp, lr).item() == 0.0


def test_alpha_is_one_when_the_slope_at_one_is_nonpositive(solver):
    lp = torch.log(torch.tensor([[0.09, 0.91, 0.0]]))
    lr = torch.log(torch.tensor([[0.10, 0.05, 0.85]]))
    slope_1 = ref_slope(lp.double().numpy(), lr.double().numpy(), np.ones(1))
    assert slope_1[0] < 0 and (lr - lp)[0, 0] > 0
    assert solve_alpha(lp, lr).item() == 1.0


# ---------------------------------------------------------------------------------------
# Low-precision inputs


@pytest.fixture(scope="module")
def moderate_batch():
    """Flat to peaked rows (no masks) on a 1,000-token vocabulary, float32."""
    rng = np.random.default_rng(7)
    pairs = [random_log_prob_pairs(rng, 50, 1000, scale) for scale in (0.3, 1.0, 3.0, 10.0)]
    return torch.cat([p for p, _ in pairs]), torch.cat([r for _, r in pairs])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_solve_their_own_rounded_problem_exactly(moderate_batch, dtype, solver):
    lp, lr = (x.to(dtype) for x in moderate_batch)
    reference = ref_kl_symmetric_alpha(lp.double().numpy(), lr.double().numpy())
    alpha = solve_alpha(lp, lr)
    assert alpha.dtype == torch.float32
    assert np.abs(alpha.double().numpy() - reference).max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_stay_close_to_the_float32_root(moderate_batch, dtype, solver):
    """Rounding the log-probs is a perturbation of the problem, not solver error: to first
    order α moves by E_q[δΔ + (Δ − E_q Δ)·δt] / Var_q[Δ], where δt = (1 − α)δp + αδr is the
    change of the mixture's log-weights. We assert the float64 first-order bound (doubled)
    per row, and state the absolute shift seen on these rows: below 2e-2 (bf16 rounds
    log-probs of size ~10 by up to 0.03)."""
    lp32, lr32 = moderate_batch
    lp, lr = lp32.to(dtype), lr32.to(dtype)
    alpha_low = solve_alpha(lp, lr).double().numpy()
    alpha_32 = ref_kl_symmetric_alpha(lp32.double().numpy(), lr32.double().numpy())
    shift = np.abs(alpha_low - alpha_32)

    lp64, lr64 = lp32.double().numpy(), lr32.double().numpy()
    d_p, d_r = lp.double().numpy() - lp64, lr.double().numpy() - lr64
    mixed = (1 - alpha_32[:, None]) * lp64 + alpha_32[:, None] * lr64
    q = np.exp(mixed - mixed.max(axis=1, keepdims=True))
    q /= q.sum(axis=1, keepdims=True)
    delta = lr64 - lp64
    centred = delta - (q * delta).sum(axis=1, keepdims=True)
    d_t = (1 - alpha_32[:, None]) * d_p + alpha_32[:, None] * d_r
    first_order = np.abs((q * ((d_r - d_p) + centred * d_t)).sum(axis=1)) / (q * centred**2).sum(axis=1)
    assert np.all(shift <= 2 * first_order + 1e-6)
    assert shift.max() <= 2e-2


# ---------------------------------------------------------------------------------------
# Edge rows: decided per row, never per batch


def _row(probs) -> torch.Tensor:
    return torch.log(torch.tensor(probs, dtype=torch.float64)).float()


@pytest.fixture(scope="module")
def edge_batch():
    rng = np.random.default_rng(3)
    ordinary_p, ordinary_r = random_log_prob_pairs(rng, 2, 6, 1.0)
    peaked_p, peaked_r = random_log_prob_pairs(rng, 1, 6, 30.0)
    rows = {
        "ordinary_0": (ordinary_p[0], ordinary_r[0]),
        "identical": (ordinary_p[1], ordinary_p[1]),
        "one_hot_teacher": (ordinary_p[0], _row([0, 0, 1, 0, 0, 0])),
        "one_common_token": (_row([0.5, 0.3, 0.2, 0, 0, 0]), _row([0, 0, 0.1, 0.6, 0.3, 0])),
        "empty_support": (_row([0.5, 0.5, 0, 0, 0, 0]), _row([0, 0, 0, 0.2, 0.3, 0.5])),
        "very_peaked": (peaked_p[0], peaked_r[0]),
        # Each model all but excludes the other's top token: near the root the largest term of
        # q_α is e^-139, far below the maxima at α = 0 and 1 (a shift taken from those would
        # underflow float32 to 0).
        # Nearly all mass on a token both models agree on (Δ = 0): the tokens that decide α
        # are e^-120 below it, and the teacher is above the base on each, so α* = 0.
        "shared_top_token": (
            torch.tensor([0.0, -120.0, -122.0, -150.0, -150.0, -150.0]),
            torch.tensor([0.0, -119.0, -121.5, -150.0, -150.0, -150.0]),
        ),
        "disagreeing_peaks": (
            torch.tensor([0.0, -300.0, -350.0, -350.0, -350.0, -350.0]),
            torch.tensor([-260.0, 0.0, -350.0, -350.0, -350.0, -350.0]),
        ),
        "ordinary_1": (ordinary_p[1], ordinary_r[1]),
    }
    names = list(rows)
    lp = torch.stack([rows[n][0] for n in names])
    lr = torch.stack([rows[n][1] for n in names])
    return names, lp, lr


def test_edge_rows_are_flagged_and_get_their_conventional_alpha(edge_batch, solver):
    names, lp, lr = edge_batch
    solution = solve_alpha(lp, lr, return_info=True)
    alpha = dict(zip(names, solution.alpha.tolist()))
    degenerate = {n for n, flag in zip(names, solution.degenerate.tolist()) if flag}
    empty = {n for n, flag in zip(names, solution.empty_support.tolist()) if flag}
    assert degenerate == {"identical", "one_hot_teacher", "one_common_token"}
    assert empty == {"empty_support"}
    assert alpha["identical"] == alpha["one_hot_teacher"] == alpha["one_common_token"] == 0.5
    assert alpha["empty_support"] == 1.0  # default fallback: the teacher
    # On the two tokens that count, h(α) = 560 α − 300 + log(300 / 260): linear, root below.
    assert abs(alpha["disagreeing_peaks"] - (300 - math.log(300 / 260)) / 560) <= 1e-6
    assert all(solution.converged.tolist())
    i = names.index("shared_top_token")
    assert alpha["shared_top_token"] == 0.0 and solution.iterations[i].item() == 0


def test_ordinary_rows_in_a_batch_with_edge_rows_solve_as_if_alone(edge_batch, solver):
    names, lp, lr = edge_batch
    batched = solve_alpha(lp, lr, return_info=True)
    for name in ("ordinary_0", "very_peaked", "ordinary_1"):
        i = names.index(name)
        alone = solve_alpha(lp[i : i + 1], lr[i : i + 1], return_info=True)
        assert abs(batched.alpha[i].item() - alone.alpha.item()) <= 1e-7, name
        assert batched.iterations[i].item() == alone.iterations.item(), name
    ordinary = [names.index(n) for n in ("ordinary_0", "very_peaked", "ordinary_1")]
    reference = ref_kl_symmetric_alpha(lp[ordinary].double().numpy(), lr[ordinary].double().numpy())
    assert np.abs(batched.alpha[ordinary].double().numpy() - reference).max() <= 1e-6


def test_empty_support_falls_back_to_the_base_when_asked(edge_batch, solver):
    names, lp, lr = edge_batch
    solution = solve_alpha(lp, lr, empty_support="base", return_info=True)
    i = names.index("empty_support")
    assert solution.alpha[i].item() == 0.0 and bool(solution.empty_support[i])


# ---------------------------------------------------------------------------------------
# Options and the other rules


def test_alpha_is_clamped_to_alpha_min_and_alpha_max(solver):
    lp, lr = stacked_pairs(seed=11, rows_per_setting=20, vocab=50)
    free = solve_alpha(lp, lr)
    clamped = solve_alpha(lp, lr, alpha_min=0.3, alpha_max=0.6)
    assert free.min() < 0.3 and free.max() > 0.6  # the clamp has something to do
    torch.testing.assert_close(clamped, free.clamp(0.3, 0.6), rtol=0, atol=0)


def test_teacher_top_p_solves_on_the_teacher_nucleus_only(solver):
    rng = np.random.default_rng(12)
    pairs = [random_log_prob_pairs(rng, 20, 200, scale) for scale in (0.3, 1.0, 3.0)]
    lp, lr = torch.cat([p for p, _ in pairs]), torch.cat([r for _, r in pairs])
    top_p = 0.8
    # Independent nucleus: sort teacher probs, keep tokens whose preceding mass is < top_p.
    r = lr.double().exp().numpy()
    order = np.argsort(-r, axis=1, kind="stable")
    before = np.cumsum(np.take_along_axis(r, order, 1), axis=1) - np.take_along_axis(r, order, 1)
    keep = np.zeros_like(r, dtype=bool)
    np.put_along_axis(keep, order, before < top_p, axis=1)
    assert (keep.sum(axis=1) >= 2).all() and (keep.sum(axis=1) < 200).all()  # a real, non-trivial nucleus
    lp_n = np.where(keep, lp.double().numpy(), -np.inf)
    lr_n = np.where(keep, lr.double().numpy(), -np.inf)
    reference = ref_kl_symmetric_alpha(lp_n, lr_n)
    alpha = solve_alpha(lp, lr, teacher_top_p=top_p).double().numpy()
    assert np.abs(alpha - reference).max() <= 1e-6
    assert np.abs(alpha - ref_kl_symmetric_alpha(lp.double().numpy(), lr.double().numpy())).max() > 1e-3


def test_entropy_alpha_is_the_entropy_share_of_the_base():
    lp, lr = stacked_pairs(seed=13, rows_per_setting=10, vocab=100)
    h_p, h_r = ref_entropy(lp.double().numpy()), ref_entropy(lr.double().numpy())
    alpha = solve_alpha(lp, lr, "entropy").double().numpy()
    np.testing.assert_allclose(alpha, h_p / (h_p + h_r), rtol=0, atol=1e-6)


def test_ess_balance_alpha_equalises_the_two_effective_sample_sizes():
    rng = np.random.default_rng(14)
    pairs = [random_log_prob_pairs(rng, 30, 100, scale) for scale in (0.3, 1.0, 3.0)]  # full support: always bracketed
    lp, lr = torch.cat([p for p, _ in pairs]), torch.cat([r for _, r in pairs])
    alpha = solve_alpha(lp, lr, "ess_balance", tol=1e-9, max_iter=60).double().numpy()
    lp64, lr64 = lp.double().numpy(), lr.double().numpy()
    ess_p, ess_r = ref_ess(lp64, lp64, lr64, alpha), ref_ess(lr64, lp64, lr64, alpha)
    np.testing.assert_allclose(np.log(ess_p), np.log(ess_r), rtol=0, atol=1e-5)
    assert (alpha > 0).all() and (alpha < 1).all()


def test_ess_balance_takes_the_closer_endpoint_when_not_bracketed():
    # On the common support {0, 1} the teacher is flatter than the base at every α, so
    # log ESS_t − log ESS_p keeps one sign on [0, 1]; the rule returns the endpoint where it
    # is smaller in magnitude.
    lp = torch.log(torch.tensor([[0.02, 0.18, 0.8]]))
    lr = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    lp64, lr64 = lp.double().numpy(), lr.double().numpy()
    gaps = [
        math.log(ref_ess(lr64, lp64, lr64, np.array([a]))[0]) - math.log(ref_ess(lp64, lp64, lr64, np.array([a]))[0])
        for a in (0.0, 1.0)
    ]
    assert np.sign(gaps[0]) == np.sign(gaps[1])  # the construction is not bracketed
    expected = 0.0 if abs(gaps[0]) <= abs(gaps[1]) else 1.0
    assert solve_alpha(lp, lr, "ess_balance").item() == expected


def test_fixed_alpha_returns_the_constant_per_row():
    lp, lr = stacked_pairs(seed=15, rows_per_setting=1, vocab=10)
    assert solve_alpha(lp, lr, "fixed", alpha=0.25).eq(0.25).all()
    per_row = torch.linspace(0, 1, lp.shape[0])
    torch.testing.assert_close(solve_alpha(lp, lr, "fixed", alpha=per_row), per_row)


# ---------------------------------------------------------------------------------------
# KL budget: the largest α with KL(q_α‖π_θ) ≤ ε


def ref_kl_budget_alpha(lp: np.ndarray, lr: np.ndarray, budget: float) -> np.ndarray:
    """Per row: the largest α in [0, 1] with KL(q_α‖p) ≤ ε, by scipy's brentq on the KL itself
    (Σ q log(q/p) in float64, not the package's αA' − A identity)."""
    alphas = []
    for lp_row, lr_row in zip(np.asarray(lp, np.float64), np.asarray(lr, np.float64)):

        def excess(alpha, lp_row=lp_row, lr_row=lr_row):
            return ref_kls(lp_row[None], lr_row[None], np.array([alpha]))[0][0] - budget

        if excess(1.0) <= 0:
            alphas.append(1.0)
        elif excess(0.0) >= 0:
            alphas.append(0.0)
        else:
            alphas.append(brentq(excess, 0.0, 1.0, xtol=1e-14, rtol=4 * np.finfo(float).eps))
    return np.array(alphas)


@pytest.mark.parametrize("budget", [1e-4, 0.01, 0.1, 0.5])
@pytest.mark.parametrize("vocab, rows", [(8, 40), (1000, 10)], ids=["V8", "V1000"])
def test_kl_budget_alpha_matches_float64_root(budget, vocab, rows):
    lp, lr = stacked_pairs(seed=vocab + 17, rows_per_setting=rows, vocab=vocab)
    solution = solve_alpha(lp, lr, "kl_budget", kl_budget=budget, return_info=True)
    reference = ref_kl_budget_alpha(lp.double().numpy(), lr.double().numpy(), budget)
    np.testing.assert_allclose(solution.alpha.double().numpy(), reference, rtol=0, atol=1e-5)
    assert bool(solution.converged.all())
    interior = (reference > 0) & (reference < 1)
    assert interior.sum() > 0.3 * len(reference)  # the budget is binding on many rows
    # Newton on √KL takes 3-5 steps on typical rows; rows whose KL jumps (q switching from one
    # dominant token to another) fall back to bisection but still converge within max_iter.
    iterated = solution.iterations[solution.iterations > 0].float()
    assert float(iterated.mean()) <= 6


def test_kl_budget_alpha_spends_exactly_the_budget_where_it_binds():
    lp, lr = stacked_pairs(seed=18, rows_per_setting=20, vocab=200)
    alpha = solve_alpha(lp.double(), lr.double(), "kl_budget", kl_budget=0.05).double().numpy()
    kl_p = ref_kls(lp.double().numpy(), lr.double().numpy(), alpha)[0]
    interior = (alpha > 0) & (alpha < 1)
    np.testing.assert_allclose(kl_p[interior], 0.05, rtol=1e-4)
    assert (kl_p[alpha == 1] <= 0.05 + 1e-9).all()


def test_kl_budget_zero_keeps_the_base_and_a_large_budget_takes_the_teacher():
    lp, lr = stacked_pairs(seed=19, rows_per_setting=5, vocab=50)
    full = torch.isfinite(lp).all(-1) & torch.isfinite(lr).all(-1)
    assert solve_alpha(lp, lr, "kl_budget", kl_budget=0.0)[full].eq(0).all()
    assert solve_alpha(lp, lr, "kl_budget", kl_budget=1e6).eq(1).all()


def test_kl_budget_alpha_grows_with_the_budget():
    lp, lr = stacked_pairs(seed=20, rows_per_setting=5, vocab=50)
    alphas = torch.stack([solve_alpha(lp, lr, "kl_budget", kl_budget=b) for b in (0.01, 0.03, 0.1, 0.3, 1.0)])
    assert bool((alphas[1:] >= alphas[:-1] - 1e-6).all())


def test_kl_budget_alpha_is_clamped_and_rows_without_a_common_token_fall_back():
    lp = torch.log(torch.tensor([[0.7, 0.3, 0.0], [0.5, 0.5, 0.0]]))
    lr = torch.log(torch.tensor([[0.1, 0.9, 0.0], [0.0, 0.0, 1.0]]))
    solution = solve_alpha(lp, lr, "kl_budget", kl_budget=10.0, alpha_max=0.4, return_info=True)
    assert solution.alpha.tolist() == pytest.approx([0.4, 0.4])  # the empty row's fallback α = 1 is clamped too
    assert solution.empty_support.tolist() == [False, True]
    assert solve_alpha(lp, lr, "kl_budget", kl_budget=10.0, empty_support="base")[1].item() == 0.0


def test_kl_budget_is_required_and_must_be_nonnegative():
    with pytest.raises(ValueError, match="method='kl_budget' needs `kl_budget=`"):
        solve_alpha(*_pair(), "kl_budget")
    with pytest.raises(ValueError, match="`kl_budget` must be a finite number >= 0"):
        solve_alpha(*_pair(), "kl_budget", kl_budget=-0.1)


# ---------------------------------------------------------------------------------------
# Clear errors


def _pair(rows=2, vocab=5):
    return torch.log_softmax(torch.randn(rows, vocab), -1), torch.log_softmax(torch.randn(rows, vocab), -1)


def test_shape_mismatch_is_reported():
    lp, lr = _pair()
    with pytest.raises(ValueError, match="same shape"):
        solve_alpha(lp, lr[:, :4])


def test_nan_input_is_reported():
    lp, lr = _pair()
    lr[1, 2] = float("nan")
    with pytest.raises(ValueError, match="`logp_t` contains NaN"):
        solve_alpha(lp, lr)


def test_alpha_min_above_alpha_max_is_reported():
    with pytest.raises(ValueError, match="alpha_min <= alpha_max"):
        solve_alpha(*_pair(), alpha_min=0.7, alpha_max=0.2)


def test_unknown_method_is_reported():
    with pytest.raises(ValueError, match="Unknown alpha method 'chernof'"):
        solve_alpha(*_pair(), "chernof")


def test_fixed_without_alpha_is_reported():
    with pytest.raises(ValueError, match="method='fixed' needs `alpha=`"):
        solve_alpha(*_pair(), "fixed")


def test_fixed_alpha_outside_unit_interval_is_reported():
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        solve_alpha(*_pair(), "fixed", alpha=1.5)
