"""The GRPO trainer with q* rollouts from two in-process vLLM engines (`sampler_backend="vllm-inprocess"`).

Runs where `vllm` imports (see `tests/test_engines.py`): the same two-step run and checks as
`tests/test_trainers_vllm.py` does on two servers. The engines start from the policy as it is
when the first rollout begins; the policy engine reloads the weights after each optimizer step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_trainers_vllm import (  # noqa: E402
    PREFIXES,
    check_distillation_log_history,
    check_log_history,
    distill_two_steps,
    served_matches,
    train_two_steps,
)

pytestmark = pytest.mark.filterwarnings("ignore")


def test_two_step_grpo_through_in_process_engines_loads_each_steps_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")  # the engines' processes inherit it: no compile on CPU
    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")
    trainer, _, after_step = train_two_steps(
        tmp_path, sampler_backend="vllm-inprocess", sampler_top_k=16, sampler_engine_args=["max_model_len=256"]
    )
    try:
        check_log_history(trainer)
        sampler = trainer._vllm_sampler
        assert sampler.get_statistics()["weight_loads"] == 1  # the engines started with step 0's weights

        def distribution(prefixes, vocab):
            return sampler.next_token_distribution(prefixes, top_k=vocab)

        assert served_matches(distribution, after_step[1], PREFIXES) < 1e-4
        assert served_matches(distribution, after_step[2], PREFIXES) > 1e-3
    finally:
        trainer.close_sampler()
    assert trainer._vllm_sampler is None


def test_distillation_on_q_star_rollouts_through_in_process_engines(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")
    trainer = distill_two_steps(tmp_path, sampler_backend="vllm-inprocess", sampler_engine_args=["max_model_len=256"])
    try:
        check_distillation_log_history(trainer)
        assert trainer._vllm_sampler.get_statistics()["weight_loads"] == 1  # the engines started with step 0's weights
    finally:
        trainer.close_sampler()


def test_two_processes_each_run_their_own_engine_pair_and_load_their_own_weights(tmp_path):
    """Colocate-style (TRL's colocate mode): every rank starts a base and a teacher engine, samples its own
    rows from them, and reloads its (DDP-identical) policy weights into its own base engine."""
    from test_trainers_vllm import launch_two_ranks

    first, second = launch_two_ranks(tmp_path, "vllm-inprocess", timeout=1200)
    pids = [set(r["engine_pids"]["base"] + r["engine_pids"]["teacher"]) for r in (first, second)]
    assert len(pids[0]) == len(pids[1]) == 2 and not pids[0] & pids[1]  # two engines per rank, none shared
    for record in (first, second):
        assert record["weight_loads"] == 1  # started from step 0's weights, reloaded after step 1
        assert record["logged_versions"] == [0.0, 1.0]
        assert record["gap_to_step_1"] < 1e-4 < 1e-3 < record["gap_to_step_2"]
