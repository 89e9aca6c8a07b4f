"""Server settings that would make the two-server coordinator inexact, on two more real servers.

One base server runs with `--logprobs-mode processed_logprobs` (what TRL's server mode sets)
and truncating sampling defaults (`--override-generation-config`, as a model's
generation_config.json can supply); the other returns logits (`--logprobs-mode raw_logits`).
Both start next to the servers of `tests/vllm_servers.py` (about a minute on the CI machine).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_servers  # noqa: E402
from test_servers import FaultProxy, config, id_prompts  # noqa: E402

from optimal_sampling.servers import DualVLLMCoordinator  # noqa: E402
from optimal_sampling.servers.client import NEUTRAL_SAMPLING  # noqa: E402

TRUNCATING_DEFAULTS = {"top_k": 5, "top_p": 0.5, "temperature": 0.7, "repetition_penalty": 1.3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def odd_servers(servers):
    venv = servers.get("OPTIMAL_SAMPLING_VLLM_VENV") or os.environ.get("VLLM_VENV")
    if not venv:
        pytest.fail(
            "the servers' env file names no vLLM venv (OPTIMAL_SAMPLING_VLLM_VENV); restart them with "
            "tests/vllm_servers.py start, or set VLLM_VENV"
        )
    base = servers["OPTIMAL_SAMPLING_THETA_MODEL_DIR"]
    with vllm_servers.running_servers(
        base,
        base,
        venv=venv,
        base_port=_free_port(),
        teacher_port=_free_port(),
        base_name="processed",
        teacher_name="logits",
        verbose=False,
        base_extra_args=[
            "--logprobs-mode",
            "processed_logprobs",
            "--override-generation-config",
            json.dumps(TRUNCATING_DEFAULTS),
        ],
        teacher_extra_args=["--logprobs-mode", "raw_logits"],
    ) as cfg:
        yield {"processed": cfg["OPTIMAL_SAMPLING_THETA_URL"], "logits": cfg["OPTIMAL_SAMPLING_T_URL"]}


async def _generate(servers, prompts, teacher_prompts, **fields):
    async with DualVLLMCoordinator(config(servers, **fields)) as coordinator:
        outputs = await coordinator.generate_batch(prompts, teacher_prompts=teacher_prompts, max_tokens=5, seed=4)
        return outputs, coordinator.get_statistics()


def test_a_processed_log_prob_server_with_truncating_defaults_gives_the_raw_servers_samples(servers, odd_servers):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(servers["OPTIMAL_SAMPLING_THETA_MODEL_DIR"])
    vocabulary = {"tokenizer": tokenizer, "V": len(tokenizer)}
    prompts, teacher_prompts = id_prompts(vocabulary, 6), id_prompts(vocabulary, 6, teacher=True)
    raw, raw_stats = asyncio.run(_generate(servers, prompts, teacher_prompts, top_k=3))
    processed, stats = asyncio.run(
        _generate(servers, prompts, teacher_prompts, top_k=3, theta_url=odd_servers["processed"])
    )
    assert all(o.error is None for o in raw + processed)
    assert [o.generated_tokens for o in processed] == [o.generated_tokens for o in raw]
    for a, b in zip(processed, raw):
        assert a.logp_theta == pytest.approx(b.logp_theta, abs=1e-5) and a.logq == pytest.approx(b.logq, abs=1e-5)
    # Truncated lists would cover all the mass; the raw top-3 does not.
    assert stats["covered_mass_theta_mean"] == pytest.approx(raw_stats["covered_mass_theta_mean"], abs=1e-7)
    assert raw_stats["covered_mass_theta_mean"] < 1 - 1e-4


def test_a_server_that_returns_logits_fails_at_start_naming_the_flag(servers, odd_servers):
    with pytest.raises(ValueError, match="--logprobs-mode raw_logprobs") as error:
        asyncio.run(DualVLLMCoordinator(config(servers, theta_url=odd_servers["logits"])).start())
    assert odd_servers["logits"] in str(error.value) and "not log-probabilities" in str(error.value)
    assert "raw_logits" in str(error.value)


def test_every_request_carries_neutral_sampling_parameters_and_never_a_seed(servers):
    bodies = []

    async def run():
        async with FaultProxy(servers["OPTIMAL_SAMPLING_THETA_URL"], lambda n, body: bodies.append(body)) as proxy:
            async with DualVLLMCoordinator(config(servers, theta_url=proxy.url, seed=123)) as coordinator:
                await coordinator.generate_batch([[5, 6, 7], [8, 9]], max_tokens=3)

    asyncio.run(run())
    assert len(bodies) >= 3  # the start-up probe and at least two steps
    for body in bodies:
        assert "seed" not in body
        assert {name: body.get(name) for name in NEUTRAL_SAMPLING} == NEUTRAL_SAMPLING
