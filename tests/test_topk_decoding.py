"""The shared top-k step (`topk_decoding`) and the engine backend's pure parts, without any server or engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optimal_sampling.engines import DrivenDecodeConfig, VLLMEngineSpec
from optimal_sampling.engines.protocol import pack_step, pack_tokens, unpack_step, unpack_step_header
from optimal_sampling.engines.sync import engine_arguments
from optimal_sampling.mixture import compute_mixture
from optimal_sampling.topk_decoding import TopKSequence, TopKStepper, canonical_top_k, mix_top_k


def _reference_row(ids: list[int], logp: list[float], k: int, vocab_size: int) -> list[tuple[int, float]]:
    """One row the slow way: unique ids, the k largest by (-logp, id), ids < V, sorted by id."""
    unique = {}
    for i, v in zip(ids, logp):
        if i >= 0:
            unique.setdefault(i, v)
    top = sorted(unique.items(), key=lambda item: (-item[1], item[0]))[:k]
    return sorted((i, v) for i, v in top if i < vocab_size)


def test_canonical_top_k_keeps_the_k_largest_unique_ids_in_id_order():
    generator = torch.Generator().manual_seed(0)
    B, m, k, V = 64, 12, 5, 20
    ids = torch.randint(-1, V + 4, (B, m), generator=generator)  # padding, ids beyond V, repeats
    logp = -torch.randint(0, 6, (B, m), generator=generator).double() / 2  # many ties
    logp = torch.where(ids >= 0, logp, -math.inf)
    for row in range(B):  # a repeated id carries the same value, as in a server's list
        first = {}
        for col in range(m):
            logp[row, col] = first.setdefault(int(ids[row, col]), float(logp[row, col]))
    got_ids, got_logp, dropped = canonical_top_k(ids, logp, k, V)
    assert got_ids.shape == got_logp.shape == (B, k)
    total_dropped = 0
    for row in range(B):
        expected = _reference_row(ids[row].tolist(), logp[row].tolist(), k, V)
        kept = [(i, v) for i, v in zip(got_ids[row].tolist(), got_logp[row].tolist()) if i >= 0]
        assert kept == expected
        assert got_ids[row, len(kept) :].eq(-1).all() and got_logp[row, len(kept) :].eq(-math.inf).all()
        unique = {i: v for i, v in zip(ids[row].tolist(), logp[row].tolist()) if i >= 0}
        top = sorted(unique.items(), key=lambda item: (-item[1], item[0]))[:k]
        total_dropped += sum(i >= V for i, _ in top)
    assert dropped == total_dropped > 0


def test_lists_already_in_canonical_form_come_back_unchanged_and_match_the_reference():
    # What a driven engine sends: k distinct in-vocabulary ids per row, in id order (the step skips its sorts).
    generator = torch.Generator().manual_seed(3)
    B, k, V = 32, 6, 40
    logp = torch.log_softmax(torch.randn(B, V, generator=generator, dtype=torch.float64), -1)
    values, ids = logp.topk(k)
    ids, by_id = ids.sort(-1)
    values = values.gather(-1, by_id)
    got_ids, got_logp, dropped = canonical_top_k(ids, values, k, V)
    assert torch.equal(got_ids, ids) and torch.equal(got_logp, values) and dropped == 0
    for row in range(B):
        assert list(zip(got_ids[row].tolist(), got_logp[row].tolist())) == _reference_row(
            ids[row].tolist(), values[row].tolist(), k, V
        )
    shuffled = torch.randperm(k, generator=generator)
    again = canonical_top_k(ids[:, shuffled], values[:, shuffled], k, V)
    assert torch.equal(again[0], ids) and torch.equal(again[1], values)
    # An id at or beyond the vocabulary is not canonical: it is dropped and counted, as before.
    beyond = ids.clone()
    beyond[0, -1] = V
    assert canonical_top_k(beyond, values, k, V)[2] == 1


def _top_k_lists(generator, B=6, V=50, k=8):
    p = torch.log_softmax(torch.randn(B, V, generator=generator, dtype=torch.float64) * 2, -1)
    r = torch.log_softmax(torch.randn(B, V, generator=generator, dtype=torch.float64) * 2, -1)
    (lp, ip), (lr, ir) = p.topk(k), r.topk(k)
    return ip, lp, ir, lr, V


def test_on_policy_rows_get_alpha_zero_and_the_others_are_unchanged():
    ids_theta, lp_theta, ids_t, lp_t, V = _top_k_lists(torch.Generator().manual_seed(1))
    settings = DrivenDecodeConfig().q_star
    on_policy = torch.tensor([True, False, False, True, False, True])
    mixed = mix_top_k(ids_theta, lp_theta, ids_t, lp_t, vocab_size=V, q_star=settings, on_policy=on_policy)
    plain = mix_top_k(ids_theta, lp_theta, ids_t, lp_t, vocab_size=V, q_star=settings)
    c = mixed.candidates
    assert mixed.mixture.alpha[on_policy].eq(0).all() and plain.mixture.alpha[on_policy].gt(0).all()
    torch.testing.assert_close(mixed.mixture.logq[on_policy], c.logp_theta[on_policy], atol=1e-12, rtol=0)
    kl_theta = mixed.mixture.diagnostics.kl_theta[on_policy]  # KL(q‖π_θ) = 0 when q = π_θ
    torch.testing.assert_close(kl_theta, torch.zeros_like(kl_theta), atol=1e-9, rtol=0)
    q_star = ~on_policy
    # (the merged rows are held in the on-policy rows' float64; the q* rows' values are the same)
    torch.testing.assert_close(mixed.mixture.logq[q_star], plain.mixture.logq[q_star].double(), atol=0, rtol=0)
    torch.testing.assert_close(mixed.mixture.alpha[q_star], plain.mixture.alpha[q_star], atol=0, rtol=0)
    alone = compute_mixture(c.logp_theta[q_star], c.logp_t[q_star], log_multiplicity=c.log_multiplicity[q_star])
    torch.testing.assert_close(mixed.mixture.alpha[q_star], alone.alpha, atol=1e-6, rtol=0)


@pytest.mark.parametrize("side", ["base", "teacher"])
def test_a_nan_row_of_either_model_fails_that_row_alone_and_names_the_model(side):
    # With one model's row NaN the solver finds no common support and falls back to the other model (α = 0 or 1)
    # with a finite log q: the row used to be sampled from the other model without a word.
    ids_theta, lp_theta, ids_t, lp_t, V = _top_k_lists(torch.Generator().manual_seed(2), B=3)
    (lp_theta if side == "base" else lp_t)[1] = float("nan")
    stepper = TopKStepper(DrivenDecodeConfig().q_star, V)
    rows = [TopKSequence(i, None, None, [0], [0]) for i in range(3)]
    stepper.advance(
        rows, ids_theta, lp_theta, ids_t, lp_t,
        seed=0, temperature=1.0, max_tokens=4, stop_token_ids=set(), return_diagnostics=False,
    )  # fmt: skip
    model = "the base (π_θ)" if side == "base" else "the teacher (π_t)"
    assert rows[1].error is not None and f"NaN log-probabilities from {model}" in rows[1].error
    assert rows[1].tokens == []
    assert [len(r.tokens) for r in (rows[0], rows[2])] == [1, 1] and rows[0].error is rows[2].error is None


def test_the_step_message_round_trips():
    slot, position = np.array([7, 3]), np.array([0, 12])
    ids = np.array([[5, 1, 9], [2, 8, 4]], dtype=np.int32)
    logp = np.array([[-0.1, -2.5, -3.0], [-0.7, -0.8, -4.0]], dtype=np.float32)
    data = pack_step(1, slot, position, ids, logp)
    rank, n, k, size = unpack_step_header(data[:16])
    message = unpack_step(rank, n, k, data[16:])
    assert (rank, n, k, size) == (1, 2, 3, len(data) - 16)
    assert message.slot.tolist() == [7, 3] and message.position.tolist() == [0, 12]
    assert np.array_equal(message.ids, ids) and np.array_equal(message.logp, logp)
    assert len(pack_tokens([4, 2])) == 8 + 16


def test_engine_settings_that_break_driven_decode_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="enable_chunked_prefill.*Drop it"):
        VLLMEngineSpec("m", engine_kwargs={"enable_chunked_prefill": True})
    with pytest.raises(ValueError, match="async_scheduling"):
        VLLMEngineSpec("m", engine_kwargs={"async_scheduling": True})
    with pytest.raises(ValueError, match="logits_processors"):
        VLLMEngineSpec("m", engine_kwargs={"logits_processors": ["x:Y"]})
    kwargs = VLLMEngineSpec("m", max_model_len=16384, engine_kwargs={"block_size": 32}).engine_kwargs_for(
        max_num_seqs=8
    )
    assert kwargs["max_num_batched_tokens"] == 16384 and kwargs["block_size"] == 32 and kwargs["max_num_seqs"] == 8
    assert kwargs["enable_chunked_prefill"] is False and kwargs["async_scheduling"] is False
    with pytest.raises(ValueError, match="cannot exceed `max_concurrency`"):
        DrivenDecodeConfig(max_concurrency=2, pipeline_groups=3)
    with pytest.raises(ValueError, match="alpha_min <= alpha_max"):
        DrivenDecodeConfig(alpha_min=0.9, alpha_max=0.1)


def test_engine_arguments_from_the_command_line():
    items = ["dtype=float32", "base.max_model_len=1024", "teacher.gpu_memory_utilization=0.4", "block_size=32"]
    assert engine_arguments(items, "base") == {
        "dtype": "float32",
        "max_model_len": 1024,
        "engine_kwargs": {"block_size": 32},
    }
    assert engine_arguments(items, "teacher") == {
        "dtype": "float32",
        "gpu_memory_utilization": 0.4,
        "engine_kwargs": {"block_size": 32},
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        engine_arguments(["dtype"], "base")
    with pytest.raises(ValueError, match="`base.` or `teacher.`"):
        engine_arguments(["student.dtype=float32"], "base")
