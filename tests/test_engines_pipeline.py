"""Two engine pairs (pipeline groups) on the toy pair, and what happens when an engine dies.

Runs where `vllm` imports (see `tests/test_engines.py`). The last test kills engines, so
the module-scoped pairs are not usable after it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_fixtures import engine_spec, http_reference, toy_prompts  # noqa: E402

from optimal_sampling.engines import EngineFailedError, InProcessVLLMSampler  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def pipelined():
    sampler = InProcessVLLMSampler(
        engine_spec("base"), engine_spec("teacher"), top_k=16, max_concurrency=64, pipeline_groups=2, step_timeout=120
    )
    yield sampler
    sampler.close()


@pytest.fixture(scope="module")
def reference(servers):
    prompts, teacher_prompts = toy_prompts(64, seed=4)
    outputs = http_reference(servers, prompts, teacher_prompts, max_tokens=4, seed=9, top_k=16)
    assert all(o.error is None for o in outputs)
    return prompts, teacher_prompts, outputs


def test_two_pipeline_groups_draw_the_http_coordinators_tokens(pipelined, reference):
    prompts, teacher_prompts, expected = reference
    outputs = pipelined.generate(prompts, teacher_prompts=teacher_prompts, max_new_tokens=4, seed=9)
    assert [o.generated_tokens for o in outputs] == [r.generated_tokens for r in expected]
    assert [o.logq for o in outputs] == [pytest.approx(r.logq, abs=1e-6) for r in expected]
    assert pipelined.get_statistics()["mean_batch_size"] <= 32  # each pair stepped its own half


def test_engines_killed_mid_batch_keep_completed_samples_and_fail_the_rest(pipelined, reference):
    """Both teachers die when about a third of the tokens are drawn (each pair then holds two
    sequences and the queue still holds many, which no pair can take over)."""
    prompts, teacher_prompts, expected = reference
    victims = pipelined.coordinator.engine_process_ids()["teacher"]
    stepper = pipelined.coordinator.stepper
    pipelined.coordinator.config.max_concurrency = 4  # two sequences per pair: many small steps
    start = stepper.stats["tokens"]

    def kill_when_a_third_is_done():
        deadline = time.monotonic() + 120
        while stepper.stats["tokens"] - start < 70 and time.monotonic() < deadline:
            time.sleep(0.001)
        for victim in victims:
            os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_a_third_is_done)
    killer.start()
    try:
        outputs = pipelined.generate(prompts, teacher_prompts=teacher_prompts, max_new_tokens=4, seed=9)
    finally:
        killer.join()
    completed = [i for i, o in enumerate(outputs) if o.error is None]
    failed = [i for i, o in enumerate(outputs) if o.error is not None]
    assert len(completed) >= 12 and len(failed) >= 16, (len(completed), len(failed))
    for i in completed:  # nothing lost or altered
        assert outputs[i].generated_tokens == expected[i].generated_tokens
    for i in failed:
        assert "EngineFailedError" in outputs[i].error and "teacher engine of pipeline group" in outputs[i].error
        assert outputs[i].generated_tokens == []
    assert pipelined.get_statistics()["failed_samples"] == len(failed)
    with pytest.raises(EngineFailedError, match="create a new InProcessVLLMCoordinator"):
        pipelined.generate(prompts[:1], max_new_tokens=2)
