"""The two-server backend against two real vLLM servers (base + teacher).

The servers come from `tests/vllm_servers.py` (CI starts them in `.ci/run`); the tests read
their URLs and model directories from the environment or `.ci/vllm_servers.env`
(`servers_from_env()`, through the `servers` fixture of conftest.py). Faults
(5xx, dropped connections, stalls, malformed JSON, a server that dies) come from a small
HTTP proxy in this file, placed in front of the real base server.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket

import httpx
import pytest
import torch

from optimal_sampling.mixture import compute_mixture, log_probs_from_logits
from optimal_sampling.servers import (
    CoordinatorConfig,
    DualVLLMCoordinator,
    generate_with_optimal_sampling,
)

TEXT_PROMPTS = ["12+34=", "56+7=", "81+19="]  # every tokenizer here encodes digits and "+="


# -- fixtures (`servers` is in conftest.py) ----------------------------------------------------


def config(servers, **fields) -> CoordinatorConfig:
    defaults = dict(
        theta_url=servers["OPTIMAL_SAMPLING_THETA_URL"],
        t_url=servers["OPTIMAL_SAMPLING_T_URL"],
        top_k=16,
        retry_delay=0.01,
        request_timeout=30.0,
    )
    return CoordinatorConfig(**{**defaults, **fields})


@pytest.fixture(scope="module")
def exact(servers):
    """The same two models in transformers (float32): the exact reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, teacher_dir = servers["OPTIMAL_SAMPLING_THETA_MODEL_DIR"], servers["OPTIMAL_SAMPLING_T_MODEL_DIR"]
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return {"base": load(base_dir), "teacher": load(teacher_dir), "tokenizer": tokenizer, "V": len(tokenizer)}


def id_prompts(exact, count: int = 4, *, teacher: bool = False) -> list[list[int]]:
    """Token-id prompts of different lengths and first tokens (any vocabulary of > 20 ids).

    Ids, not text, so the tests do not depend on what the served tokenizer can encode."""
    special = set(exact["tokenizer"].all_special_ids)
    ids = [t for t in range(exact["V"]) if t not in special]
    start = 2 if teacher else 0
    return [[ids[(start + 5 * i + 7 * j) % len(ids)] for j in range(3 + i + start)] for i in range(count)]


@torch.no_grad()
def exact_log_probs(model, prefix: list[int], n: int, temperature: float, vocab: int) -> torch.Tensor:
    """`[n, V]` log-probs of the next token after prefix[:len - n + 1], ..., after the whole prefix."""
    logits = model(torch.tensor([prefix])).logits[0, len(prefix) - n :]
    return log_probs_from_logits(logits.double(), temperature, vocab)


def run(coroutine):
    return asyncio.run(coroutine)


async def generate(servers, prompts, *, teacher_prompts=None, max_tokens=6, temperature=1.0, seed=0, **fields):
    async with DualVLLMCoordinator(config(servers, **fields)) as coordinator:
        outputs = await coordinator.generate_batch(
            prompts, teacher_prompts=teacher_prompts, max_tokens=max_tokens, temperature=temperature, seed=seed
        )
        return outputs, coordinator.get_statistics(), coordinator


# -- exactness and the top-k theory --------------------------------------------------------


def test_full_vocabulary_top_k_matches_the_exact_transformers_path(servers, exact):
    V, temperature = exact["V"], 0.8
    prompts, teacher_prompts = id_prompts(exact, 3), id_prompts(exact, 3, teacher=True)
    outputs, stats, _ = run(
        generate(servers, prompts, teacher_prompts=teacher_prompts, max_tokens=6, temperature=temperature, top_k=V)
    )
    assert stats["covered_mass_theta_mean"] == pytest.approx(1.0, abs=1e-4)
    for out, prompt, teacher_prompt in zip(outputs, prompts, teacher_prompts):
        assert out.error is None
        tokens = out.generated_tokens
        n = len(tokens)
        assert n >= 1 and len(out.alpha_history) == len(out.logq) == len(out.logp_theta) == len(out.logp_t) == n
        lp = exact_log_probs(exact["base"], prompt + tokens[:-1], n, temperature, V)
        lr = exact_log_probs(exact["teacher"], teacher_prompt + tokens[:-1], n, temperature, V)
        step = compute_mixture(lp, lr)
        index = torch.tensor(tokens)[:, None]
        torch.testing.assert_close(
            torch.tensor(out.alpha_history, dtype=torch.float64), step.alpha.double(), atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            torch.tensor(out.logq, dtype=torch.float64), step.logq.gather(-1, index)[:, 0], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            torch.tensor(out.logp_theta, dtype=torch.float64), lp.gather(-1, index)[:, 0], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            torch.tensor(out.logp_t, dtype=torch.float64), lr.gather(-1, index)[:, 0], atol=1e-4, rtol=0
        )
        assert out.diagnostics["kl_diff_mean"] == pytest.approx(0.0, abs=1e-4)


def _topk_bounds(p: torch.Tensor, r: torch.Tensor, k: int, alpha: torch.Tensor):
    """theory/derivation.md §6.3-6.4 from the exact distributions: Z_B(α), η(α) (eq. 6.4)."""
    tp = torch.zeros_like(p, dtype=torch.bool).scatter(-1, p.topk(k, -1).indices, True)
    tr = torch.zeros_like(r, dtype=torch.bool).scatter(-1, r.topk(k, -1).indices, True)
    a_ = alpha[:, None]
    z_b = torch.where(tp & tr, p ** (1 - a_) * r**a_, 0).sum(-1)
    a, b = torch.where(tp & ~tr, p, 0).sum(-1), torch.where(tr & ~tp, r, 0).sum(-1)
    u_p = (1 - torch.where(tp, p, 0).sum(-1)).clamp_min(0)
    u_r = (1 - torch.where(tr, r, 0).sum(-1)).clamp_min(0)
    al = alpha
    eta = a ** (1 - al) * u_r**al + u_p ** (1 - al) * b**al + u_p ** (1 - al) * u_r**al
    return z_b, eta, torch.where(tp, p, 0).sum(-1), torch.where(tr, r, 0).sum(-1)


def test_small_top_k_covered_mass_and_error_follow_the_theory(servers, exact):
    """Covered mass is the true top-k mass and grows with k; the top-k q̂ stays within the
    proved bounds of theory/derivation.md (6.5) |Â−A| ≤ δ and (6.6) TV(q_α, q̂_α) ≤ η/(Z_B+η),
    and the error vanishes at k = V."""
    V = exact["V"]
    prefixes, teacher_prefixes = id_prompts(exact), id_prompts(exact, teacher=True)
    lp = torch.cat([exact_log_probs(exact["base"], x, 1, 1.0, V) for x in prefixes])  # [B, V]
    lr = torch.cat([exact_log_probs(exact["teacher"], x, 1, 1.0, V) for x in teacher_prefixes])
    p, r = lp.exp(), lr.exp()

    async def steps():
        async with DualVLLMCoordinator(config(servers)) as coordinator:
            return {
                k: await coordinator.next_token_distribution(prefixes, teacher_prefixes, top_k=k)
                for k in sorted({min(k, V) for k in (1, 4, 16, 64, V)})
            }

    previous = torch.zeros(len(prefixes), dtype=torch.float64)
    for k, step in run(steps()).items():
        c = step.candidates
        alpha_hat = step.mixture.alpha.double()
        z_b, eta, covered_p, covered_r = _topk_bounds(p, r, k, alpha_hat)
        torch.testing.assert_close(c.covered_theta, covered_p, atol=1e-4, rtol=0)
        torch.testing.assert_close(c.covered_t, covered_r, atol=1e-4, rtol=0)
        assert bool((c.covered_theta >= previous - 1e-6).all()), "covered mass must not shrink as k grows"
        previous = c.covered_theta

        # q̂ as a distribution over the vocabulary: candidates at their column, the bucket spread over R.
        q_cols = step.mixture.logq.double().exp()
        q_hat = torch.zeros_like(p)
        for row in range(len(prefixes)):
            listed = c.token_ids[row] >= 0
            q_hat[row, c.token_ids[row][listed]] = q_cols[row, :-1][listed]
            rest = torch.ones(V, dtype=torch.bool)
            rest[c.token_ids[row][listed]] = False
            if rest.any():
                q_hat[row, rest] = q_cols[row, -1] / rest.sum()
        mixed = (1 - alpha_hat[:, None]) * lp + alpha_hat[:, None] * lr
        log_z = torch.logsumexp(mixed, -1)
        q_exact_at_alpha_hat = (mixed - log_z[:, None]).exp()
        tv = 0.5 * (q_hat - q_exact_at_alpha_hat).abs().sum(-1)
        assert bool((tv <= eta / (z_b + eta) + 1e-5).all()), f"k={k}: TV {tv} above the bound (6.6)"
        delta = torch.log1p(eta / z_b)
        a_hat = -step.mixture.diagnostics.chernoff  # Â(α̂) over the candidate columns
        assert bool(((a_hat - log_z).abs() <= delta + 1e-5).all()), f"k={k}: |Â − A| above δ (6.5)"
        if k == V:
            assert bool((tv < 1e-4).all()) and bool((c.covered_theta > 1 - 1e-4).all())


# -- sequences and stopping ----------------------------------------------------------------


def test_a_stop_token_of_either_model_ends_the_sequence(servers, exact):
    prompts, teacher_prompts = id_prompts(exact), id_prompts(exact, teacher=True)

    async def first_step_candidates():
        async with DualVLLMCoordinator(config(servers)) as coordinator:
            eos = {exact["tokenizer"].eos_token_id} - {None}
            assert eos <= coordinator.stop_token_ids  # both tokenizers' EOS always stop a row
            step = await coordinator.next_token_distribution(prompts, teacher_prompts, top_k=min(64, exact["V"]))
            return set(step.candidates.token_ids[step.candidates.token_ids >= 0].tolist())

    # Every token either model ranks in its top 64 at the first step: most of q's mass.
    stop_ids = sorted(run(first_step_candidates()))
    outputs, _, coordinator = run(
        generate(
            servers, prompts * 2, teacher_prompts=teacher_prompts * 2, max_tokens=5, stop_token_ids=stop_ids, seed=3
        )
    )
    stops = coordinator.stop_token_ids
    for out in outputs:
        assert out.error is None
        assert not any(t in stops for t in out.generated_tokens[:-1]), "no token after a stop token"
        assert out.generated_tokens[-1] in stops or len(out.generated_tokens) == 5
    # P(no row stops at its first token) <= (1 - covered)^8, below 1e-6 for these models.
    assert any(len(out.generated_tokens) == 1 for out in outputs)


def test_outputs_and_fields_do_not_depend_on_concurrency_or_pipelining(servers, exact):
    prompts = id_prompts(exact)
    one, stats_one, _ = run(generate(servers, prompts, max_tokens=5, max_concurrency=1, seed=7))
    many, stats_many, _ = run(generate(servers, prompts, max_tokens=5, max_concurrency=4, pipeline_groups=2, seed=7))
    assert [o.generated_tokens for o in one] == [o.generated_tokens for o in many]
    for a, b in zip(one, many):
        assert a.logq == pytest.approx(b.logq, abs=1e-4)
        assert set(a.diagnostics) >= {
            "alpha_mean",
            "kl_theta_mean",
            "kl_t_mean",
            "kl_diff_mean",
            "ess_ratio_mean",
            "entropy_q_mean",
            "covered_theta_mean",
            "covered_t_mean",
        }
    total = sum(len(o.generated_tokens) for o in one)
    assert stats_one["total_tokens"] == stats_many["total_tokens"] == total
    assert stats_one["steps"] == total and stats_many["mean_batch_size"] > 1
    assert stats_one["requests"] >= 2 * stats_one["steps"] and stats_one["tokens_per_second"] > 0
    assert 0 < stats_many["covered_mass_theta_mean"] <= 1 and stats_many["failed_requests"] == 0


# -- errors at start -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_fails_at_start_naming_the_url_and_how_to_start_one(servers):
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(RuntimeError, match="vllm.entrypoints.openai.api_server") as error:
        run(DualVLLMCoordinator(config(servers, theta_url=url, max_retries=1)).start())
    assert url in str(error.value) and "base server" in str(error.value)


def test_top_k_above_the_servers_max_logprobs_fails_at_start_with_the_servers_message(servers, exact):
    with pytest.raises(ValueError, match="max allowed") as error:
        run(DualVLLMCoordinator(config(servers, top_k=exact["V"] + 1)).start())
    assert "--max-logprobs" in str(error.value)


def test_a_tokenizer_that_does_not_match_fails_at_start(servers, tmp_path):
    import make_tiny_models

    other = make_tiny_models.build_tokenizer(vocab_size=300)
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="different vocabularies"):
        run(DualVLLMCoordinator(config(servers, t_tokenizer=str(tmp_path))).start())
    # Both local tokenizers agree, but not with what the servers serve.
    with pytest.raises(ValueError, match="tokenizes text differently"):
        run(DualVLLMCoordinator(config(servers, theta_tokenizer=str(tmp_path), t_tokenizer=str(tmp_path))).start())


def test_an_http_400_marks_only_that_sample_with_the_servers_message(servers, exact):
    prompts = id_prompts(exact, 2)
    too_long = prompts[0] * (600 // len(prompts[0]) + 1)  # beyond the servers' --max-model-len 512
    outputs, stats, _ = run(generate(servers, [prompts[0], too_long, prompts[1]], max_tokens=3))
    assert outputs[0].error is None and outputs[2].error is None and len(outputs[2].generated_tokens) >= 1
    assert "maximum context length" in outputs[1].error and "HTTP 400" in outputs[1].error
    assert outputs[1].generated_tokens == [] and stats["failed_samples"] == 1


# -- faults: a proxy in front of the real base server --------------------------------------


class FaultProxy:
    """An HTTP/1.1 proxy to `upstream` that injects faults into `/v1/completions` requests.

    `rule(n, body)` sees the n-th completion request (1-based) and its JSON body and returns
    None (forward), "500", "drop" (close the connection), "stall" (never answer),
    "malformed" (HTTP 200 with broken JSON) or "kill" (stop listening and drop every
    connection, like a server that died).
    """

    def __init__(self, upstream: str, rule=None):
        self.upstream, self.rule = upstream, rule or (lambda n, body: None)
        self.completions, self.writers, self.killed = 0, set(), False

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        self.client = httpx.AsyncClient(base_url=self.upstream, timeout=60)
        return self

    async def __aexit__(self, *exc_info):
        self.kill()
        await self.client.aclose()

    def kill(self):
        self.killed = True
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()

    async def _handle(self, reader, writer):
        self.writers.add(writer)
        try:
            while not self.killed:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                method, path, _ = head.split("\r\n")[0].split(" ")
                headers = dict(line.split(":", 1) for line in head.split("\r\n")[1:] if ":" in line)
                length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), 0))
                body = await reader.readexactly(length)
                fault = None
                if path == "/v1/completions":
                    self.completions += 1
                    fault = self.rule(self.completions, json.loads(body))
                if fault == "kill":
                    self.kill()
                    return
                if fault == "drop":
                    return
                if fault == "stall":
                    await reader.read()  # until the client gives up and closes
                    return
                if fault == "500":
                    status, payload = 500, b'{"error": {"message": "injected failure", "code": 500}}'
                elif fault == "malformed":
                    status, payload = 200, b'{"choices": [{"index": 0, "logprobs": {"top_logp'
                else:
                    upstream = await self.client.request(
                        method, path, content=body, headers={"Content-Type": "application/json"}
                    )
                    status, payload = upstream.status_code, upstream.content
                writer.write(
                    b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (status, len(payload), payload)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.transport.abort()


async def generate_through_proxy(servers, rule, prompts, **fields):
    """Generate with the base server behind a FaultProxy whose rule is active once the
    coordinator has started (its start-up probe passes untouched)."""
    async with FaultProxy(servers["OPTIMAL_SAMPLING_THETA_URL"]) as proxy:
        async with DualVLLMCoordinator(config(servers, theta_url=proxy.url, **fields)) as coordinator:
            offset = proxy.completions
            proxy.rule = lambda n, body: rule(n - offset, body)
            outputs = await coordinator.generate_batch(prompts, max_tokens=3, seed=11)
            return outputs, coordinator.get_statistics(), proxy


def test_transient_faults_are_retried_and_change_no_sample(servers, exact):
    prompts = id_prompts(exact)
    faults = {1: "500", 2: "drop", 3: "stall"}
    outputs, stats, _ = run(
        generate_through_proxy(servers, lambda n, body: faults.get(n), prompts, request_timeout=2.0, max_retries=3)
    )
    reference, _, _ = run(generate(servers, prompts, max_tokens=3, seed=11))
    assert all(o.error is None for o in outputs)
    assert [o.generated_tokens for o in outputs] == [o.generated_tokens for o in reference]
    assert stats["retries"] >= 3 and stats["failed_requests"] == 0


def test_malformed_responses_and_timeouts_mark_only_their_samples(servers, exact):
    prompts = id_prompts(exact)
    malformed_prefix, stalled_prefix = prompts[1], prompts[3]

    def rule(n, body):
        rows = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        if any(row[: len(malformed_prefix)] == malformed_prefix for row in rows):
            return "malformed"
        if any(row[: len(stalled_prefix)] == stalled_prefix for row in rows):
            return "stall"
        return None

    outputs, stats, _ = run(generate_through_proxy(servers, rule, prompts, request_timeout=1.5, max_retries=1))
    assert outputs[0].error is None and outputs[2].error is None
    assert len(outputs[0].generated_tokens) >= 1
    assert "MalformedResponseError" in outputs[1].error and "not JSON" in outputs[1].error
    assert "request_timeout" in outputs[3].error
    assert outputs[1].generated_tokens == outputs[3].generated_tokens == []
    assert stats["failed_samples"] == 2 and stats["retries"] >= 1


def test_a_server_killed_mid_batch_fails_the_rest_and_keeps_completed_samples(servers, exact):
    prompts = id_prompts(exact) * 2
    # Two sequences in flight, three tokens each: requests 1-3 complete the first two samples.
    outputs, stats, proxy = run(
        generate_through_proxy(
            servers,
            lambda n, body: "kill" if n == 5 else None,
            prompts,
            max_concurrency=2,
            max_retries=2,
            stop_token_ids=[],
        )
    )
    reference, _, _ = run(generate(servers, prompts, max_tokens=3, max_concurrency=2, seed=11, stop_token_ids=[]))
    completed = [i for i, o in enumerate(outputs) if o.error is None]
    failed = [i for i, o in enumerate(outputs) if o.error is not None]
    assert proxy.killed and len(completed) >= 2 and failed
    for i in completed:
        assert outputs[i].generated_tokens == reference[i].generated_tokens  # nothing lost or altered
    for i in failed:
        assert "ServerUnavailableError" in outputs[i].error and proxy.url in outputs[i].error
    assert stats["retries"] >= 2 and stats["failed_samples"] == len(failed)


# -- one-call helper and command line ------------------------------------------------------


def test_generate_with_optimal_sampling_works_from_sync_and_async_code(servers):
    urls = servers["OPTIMAL_SAMPLING_THETA_URL"], servers["OPTIMAL_SAMPLING_T_URL"]
    outputs = generate_with_optimal_sampling(TEXT_PROMPTS[:1], *urls, max_tokens=2, top_k=8)
    assert len(outputs) == 1 and outputs[0].error is None and 1 <= len(outputs[0].generated_tokens) <= 2

    async def inside_a_loop():
        return await generate_with_optimal_sampling(TEXT_PROMPTS[:1], *urls, max_tokens=2, top_k=8)

    again = run(inside_a_loop())
    assert again[0].generated_tokens == outputs[0].generated_tokens


def test_cli_backend_vllm_writes_a_jsonl_dataset(servers, tmp_path, capsys):
    from optimal_sampling.cli import main

    out, prompts = tmp_path / "samples.jsonl", tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TEXT_PROMPTS) + "\n")
    code = main(
        [
            "generate",
            "--backend",
            "vllm",
            "--prompts",
            str(prompts),
            "--theta-url",
            servers["OPTIMAL_SAMPLING_THETA_URL"],
            "--t-url",
            servers["OPTIMAL_SAMPLING_T_URL"],
            "--top-k-candidates",
            "16",
            "--limit",
            "3",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "3",
            "--no-progress",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["error"] is None
        n = len(row["generated_tokens"])
        assert 1 <= n <= 3 and len(row["logq"]) == len(row["alpha_history"]) == len(row["logp_t"]) == n
        assert all(math.isfinite(v) and v <= 0 for v in row["logq"])
    assert "tokens/s" in capsys.readouterr().out


def test_cli_backend_vllm_runs_from_any_directory_and_compares(servers, tmp_path, monkeypatch, capsys):
    """The servers report absolute model directories, so no tokenizer flag is needed outside the repo."""
    from optimal_sampling.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "generate",
            "--backend",
            "vllm",
            "--theta-url",
            servers["OPTIMAL_SAMPLING_THETA_URL"],
            "--t-url",
            servers["OPTIMAL_SAMPLING_T_URL"],
            "--top-k-candidates",
            "16",
            "--limit",
            "3",
            "--max-new-tokens",
            "4",
            "--no-progress",
            "--compare",
            "--output",
            "samples.jsonl",
        ]
    )
    assert code == 0, capsys.readouterr().err
    summary = capsys.readouterr().out
    assert "exact-match accuracy, base only (α=0)" in summary and "exact-match accuracy, teacher only (α=1)" in summary
    settings = json.loads((tmp_path / "samples.jsonl.settings.json").read_text())["settings"]
    assert settings["base_fingerprint"].startswith("sha256:") and settings["teacher_fingerprint"].startswith("sha256:")
