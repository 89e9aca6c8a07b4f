"""q* from two top-k lists (`sparse_candidates`): exact when k = V, converging as k grows,
and sampled consistently with its candidate columns (`sample_candidates`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from optimal_sampling import compute_mixture, log_probs_from_logits, sample_candidates, sparse_candidates


def top_k(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log-probs) of the k most likely tokens per row, as a server returns them."""
    values, ids = torch.topk(logp, k, dim=-1)
    return ids, values


def sparse_mixture(logp_theta, logp_t, k, temperature=1.0):
    candidates = sparse_candidates(
        *top_k(logp_theta, k), *top_k(logp_t, k), logp_theta.shape[-1], temperature=temperature
    )
    step = compute_mixture(candidates.logp_theta, candidates.logp_t, log_multiplicity=candidates.log_multiplicity)
    return candidates, step


def to_vocabulary(logq_columns: torch.Tensor, candidates, vocab_size: int) -> np.ndarray:
    """`[B, V]` token probabilities from candidate-column log q: the rest bucket's mass is
    spread evenly over the tokens outside the union, as `sample_candidates` draws them."""
    q_columns = logq_columns.double().exp().numpy()
    ids = candidates.token_ids.numpy()
    q = np.zeros((len(ids), vocab_size))
    for row in range(len(ids)):
        listed = ids[row] >= 0
        q[row, ids[row][listed]] = q_columns[row, :-1][listed]
        outside = np.ones(vocab_size, dtype=bool)
        outside[ids[row][listed]] = False
        if outside.any():
            q[row, outside] = q_columns[row, -1] / outside.sum()
    return q


def random_pair(seed: int, rows: int, vocab: int, scale: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.log_softmax(scale * torch.randn(rows, vocab, generator=gen), -1) for _ in range(2))


# ---------------------------------------------------------------------------------------
# k = V: the dense computation, keyed by id


def test_full_vocabulary_lists_reproduce_the_dense_mixture():
    lp, lr = random_pair(seed=1, rows=8, vocab=300)
    dense = compute_mixture(lp, lr)
    candidates, sparse = sparse_mixture(lp, lr, k=300)  # both lists are full permutations
    assert torch.isneginf(sparse.logq[:, -1]).all()  # no rest bucket
    np.testing.assert_allclose(sparse.alpha.numpy(), dense.alpha.numpy(), rtol=0, atol=1e-6)
    ids = candidates.token_ids[:, :300]
    assert (ids.sort(-1).values == torch.arange(300)).all()
    np.testing.assert_allclose(sparse.logq[:, :300].numpy(), dense.logq.gather(-1, ids).numpy(), rtol=0, atol=1e-5)


def test_full_vocabulary_lists_at_a_temperature_reproduce_the_dense_mixture_at_that_temperature():
    lp, lr = random_pair(seed=2, rows=8, vocab=300)
    temperature = 0.7
    dense = compute_mixture(log_probs_from_logits(lp, temperature), log_probs_from_logits(lr, temperature))
    candidates, sparse = sparse_mixture(lp, lr, k=300, temperature=temperature)
    ids = candidates.token_ids[:, :300]
    np.testing.assert_allclose(sparse.alpha.numpy(), dense.alpha.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sparse.logq[:, :300].numpy(), dense.logq.gather(-1, ids).numpy(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# k < V: the approximation improves with k


@pytest.fixture(scope="module")
def zipf_pair():
    """Zipf-like rows over V = 5000 (p ∝ 1/rank^s), each model with its own random rank order
    and exponent, so α* is away from 1/2 and the top-k lists overlap little."""
    rng = np.random.default_rng(0)
    vocab, exponents = 5000, [(0.8, 1.4), (1.0, 1.6), (1.3, 0.9), (1.6, 1.1)]
    logp = np.zeros((2, len(exponents), vocab))
    for row, pair in enumerate(exponents):
        for side, s in enumerate(pair):
            log_w = -s * np.log(rng.permutation(vocab) + 1.0)
            logp[side, row] = log_w - np.log(np.exp(log_w).sum())
    return torch.from_numpy(logp[0]).float(), torch.from_numpy(logp[1]).float()


def test_sparse_error_shrinks_as_k_grows(zipf_pair):
    lp, lr = zipf_pair
    vocab = lp.shape[-1]
    dense = compute_mixture(lp, lr)
    q_dense = dense.logq.double().exp().numpy()
    alpha_errors, tv_errors = [], []
    for k in (10, 50, 200, 1000):
        candidates, sparse = sparse_mixture(lp, lr, k)
        alpha_errors.append(np.abs(sparse.alpha.numpy() - dense.alpha.numpy()))
        tv_errors.append(0.5 * np.abs(to_vocabulary(sparse.logq, candidates, vocab) - q_dense).sum(axis=1))
    alpha_errors, tv_errors = np.array(alpha_errors), np.array(tv_errors)  # [k, row]
    assert (np.diff(alpha_errors, axis=0) < 0).all(), alpha_errors
    assert (np.diff(tv_errors, axis=0) < 0).all(), tv_errors
    assert alpha_errors[-1].max() < 0.01 and tv_errors[-1].max() < 0.12


def test_covered_mass_is_the_true_top_k_mass(zipf_pair):
    lp, lr = zipf_pair
    for k in (10, 1000):
        candidates, _ = sparse_mixture(lp, lr, k)
        for side, covered in ((lp, candidates.covered_theta), (lr, candidates.covered_t)):
            true_mass = np.sort(side.double().exp().numpy(), axis=1)[:, ::-1][:, :k].sum(axis=1)
            np.testing.assert_allclose(covered.numpy(), true_mass, rtol=1e-5)


def test_a_token_missing_from_one_list_gets_that_sides_uncovered_mass_spread_evenly():
    vocab = 10
    lp = torch.log(torch.tensor([[0.6, 0.3]]))  # base lists ids 4, 7: uncovered 0.1 over 8 tokens
    lr = torch.log(torch.tensor([[0.5, 0.2]]))  # teacher lists ids 7, 1: uncovered 0.3 over 8 tokens
    c = sparse_candidates(torch.tensor([[4, 7]]), lp, torch.tensor([[7, 1]]), lr, vocab_size=vocab)
    column = {int(i): j for j, i in enumerate(c.token_ids[0].tolist()) if i >= 0}
    probs_theta, probs_t = c.logp_theta[0].double().exp(), c.logp_t[0].double().exp()
    assert probs_t[column[4]].item() == pytest.approx(0.3 / 8)
    assert probs_theta[column[1]].item() == pytest.approx(0.1 / 8)
    assert probs_theta[column[7]].item() == pytest.approx(0.3) and probs_t[column[7]].item() == pytest.approx(0.5)
    # The rest bucket: the 7 ids outside {1, 4, 7}, each at its side's even-spread value.
    assert c.log_multiplicity[0, -1].exp().item() == pytest.approx(7)
    assert probs_theta[-1].item() == pytest.approx(7 * 0.1 / 8) and probs_t[-1].item() == pytest.approx(7 * 0.3 / 8)


# ---------------------------------------------------------------------------------------
# Sampling from candidate columns


def _candidates_with_a_heavy_rest_bucket(rows: int):
    """10-token vocabulary; base lists ids 4, 7; teacher lists 7, 1. logq puts 0.4 on the bucket."""
    vocab = 10
    ids_theta, ids_t = torch.tensor([[4, 7]] * rows), torch.tensor([[7, 1]] * rows)
    lp, lr = torch.log(torch.tensor([[0.6, 0.3]] * rows)), torch.log(torch.tensor([[0.5, 0.2]] * rows))
    candidates = sparse_candidates(ids_theta, lp, ids_t, lr, vocab_size=vocab)
    q_columns = torch.tensor([0.3, 0.2, 0.0, 0.1, 0.4])  # columns: id 4, id 7, (duplicate 7), id 1, rest
    logq = torch.log(q_columns).expand(rows, -1).clone()
    return candidates, logq, q_columns


def test_sampled_candidates_return_the_id_and_log_q_of_their_column():
    candidates, logq, q_columns = _candidates_with_a_heavy_rest_bucket(rows=2000)
    ids, token_logq = sample_candidates(logq, candidates, generator=torch.Generator().manual_seed(0))
    listed = {4: 0.3, 7: 0.2, 1: 0.1}
    assert 0 < sum(i not in listed for i in ids.tolist()) < len(ids)  # both kinds of draw occur
    for token_id, log_q in zip(ids.tolist(), token_logq.tolist()):
        if token_id in listed:
            assert log_q == pytest.approx(np.log(listed[token_id]))
        else:  # a rest-bucket draw: an id outside the union, at the bucket mass over its 7 ids
            assert 0 <= token_id < 10 and token_id not in listed
            assert log_q == pytest.approx(np.log(0.4) - np.log(7))


def test_sampled_token_frequencies_match_q():
    """χ² goodness of fit over the 10 token ids (rest-bucket mass spread over its 7 ids),
    N = 20,000 draws, fixed seed; at the 0.999 quantile the false-failure rate is 0.1%."""
    candidates, logq, _ = _candidates_with_a_heavy_rest_bucket(rows=20000)
    ids, _ = sample_candidates(logq, candidates, generator=torch.Generator().manual_seed(1))
    expected_q = np.full(10, 0.4 / 7)
    expected_q[[4, 7, 1]] = [0.3, 0.2, 0.1]
    counts = np.bincount(ids.numpy(), minlength=10)
    expected = expected_q * len(ids)
    statistic = ((counts - expected) ** 2 / expected).sum()
    assert statistic < chi2.ppf(0.999, df=9)


# ---------------------------------------------------------------------------------------
# Clear errors


def test_mismatched_ids_and_log_probs_are_reported():
    with pytest.raises(ValueError, match=r"must both be \[batch, k\]"):
        sparse_candidates(
            torch.tensor([[1, 2]]), torch.tensor([[-1.0]]), torch.tensor([[1]]), torch.tensor([[-1.0]]), 5
        )


def test_out_of_range_ids_are_reported():
    with pytest.raises(ValueError, match=r"token ids outside \[0, 5\)"):
        sparse_candidates(torch.tensor([[7]]), torch.tensor([[-1.0]]), torch.tensor([[1]]), torch.tensor([[-1.0]]), 5)


def test_nan_log_probs_are_reported():
    with pytest.raises(ValueError, match="log-probs contain NaN"):
        sparse_candidates(
            torch.tensor([[1]]), torch.tensor([[float("nan")]]), torch.tensor([[1]]), torch.tensor([[-1.0]]), 5
        )


def test_logits_instead_of_log_probs_are_reported():
    with pytest.raises(ValueError, match="log-probs > 0"):
        sparse_candidates(torch.tensor([[1]]), torch.tensor([[3.0]]), torch.tensor([[1]]), torch.tensor([[-1.0]]), 5)


def test_batch_size_mismatch_is_reported():
    with pytest.raises(ValueError, match="Batch sizes differ"):
        sparse_candidates(
            torch.tensor([[1], [2]]), torch.tensor([[-1.0], [-1.0]]), torch.tensor([[1]]), torch.tensor([[-1.0]]), 5
        )


def test_non_positive_temperature_is_reported():
    with pytest.raises(ValueError, match=r"`temperature` \(=0.0\) has to be a strictly positive"):
        sparse_candidates(
            torch.tensor([[1]]), torch.tensor([[-1.0]]), torch.tensor([[1]]), torch.tensor([[-1.0]]), 5, temperature=0.0
        )


def test_a_rest_bucket_draw_is_the_unlisted_id_of_its_rank_for_every_row_at_once():
    from optimal_sampling.sparse import unlisted_ids

    rng = np.random.default_rng(0)
    vocab = 50
    for _ in range(200):
        rows = []
        for _ in range(8):
            listed = rng.choice(vocab, size=rng.integers(0, 12), replace=False).tolist()
            rows.append(listed + [-1] * (12 - len(listed)))
        listed = torch.tensor(rows)
        u = torch.from_numpy(rng.random(8))
        got = unlisted_ids(listed, vocab, u).tolist()
        for row, value, draw in zip(rows, got, u.tolist()):  # the definition: sort the unlisted ids, take rank
            free = [i for i in range(vocab) if i not in row]
            assert value == free[int(draw * len(free))]
    with pytest.raises(RuntimeError, match="covers the whole vocabulary"):
        unlisted_ids(torch.arange(4)[None], 4, torch.tensor([0.5]))


def test_rest_bucket_draws_are_uniform_over_the_unlisted_ids():
    # Two rows whose lists leave 6 of 10 ids unlisted, all of q's mass in the rest bucket; n draws of each.
    n = 6000
    tiny = torch.log(torch.full((2 * n, 2), 1e-9, dtype=torch.float64))
    c = sparse_candidates(
        torch.tensor([[1, 4], [0, 9]]).repeat(n, 1), tiny, torch.tensor([[2, 7], [3, 5]]).repeat(n, 1), tiny, 10
    )
    logq = torch.full((2 * n, c.rest_column + 1), float("-inf"), dtype=torch.float64)
    logq[:, c.rest_column] = 0.0
    ids, _ = sample_candidates(logq, c, generator=torch.Generator().manual_seed(0))
    for row, free in ((0, [0, 3, 5, 6, 8, 9]), (1, [1, 2, 4, 6, 7, 8])):
        counts = np.bincount(ids[row::2].numpy(), minlength=10)
        assert set(np.flatnonzero(counts)) == set(free)
        # chi-square against uniform over the 6 ids (5 degrees of freedom); false-failure rate 1e-4 per row
        expected = n / 6
        statistic = float(((counts[free] - expected) ** 2 / expected).sum())
        assert statistic < chi2.ppf(1 - 1e-4, 5), statistic
