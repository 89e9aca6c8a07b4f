"""Tokens/s of the two-server coordinator against one server's own generation, same run.

    python benchmarks/vllm_coordinator.py [--theta-url URL --t-url URL] [--tokens 32]
        [--concurrency 1 16 64] [--top-k 20] [--pipeline-groups 1 2] [--repeats 3] [--no-append]

Servers default to those in the environment / `.ci/vllm_servers.env` (tests/vllm_servers.py).
For each concurrency c: c prompts × `--tokens` tokens,
  * native: ONE `/v1/completions` request to the base server with the c prompts,
    `max_tokens=--tokens`, `ignore_eos` (the server decodes in its own batched loop);
  * coordinator: `generate_batch` of the same c prompts with `max_concurrency=c`
    (one batched 1-token request per server per step, q* and sampling on this side).
Measurements alternate (native, coordinator, native, ...) and the median of `--repeats`
is reported, so both share the machine's load. The ratio is coordinator / native tokens/s.
"ceiling ratio" is what a coordinator with free q* maths and both servers answering as fast
as ONE batched 1-token request to one server could reach: c / (that request's time) / native.
Prints a Markdown table and appends it to benchmarks/RESULTS.md (unless --no-append).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from optimal_sampling.servers import CoordinatorConfig, DualVLLMCoordinator  # noqa: E402


def prompt_ids(tokenizer, count: int) -> list[list[int]]:
    texts = [f"Question {i}: what is {i} + {2 * i + 1}? Answer:" for i in range(count)]
    return [tokenizer(t)["input_ids"] for t in texts]


async def native_tokens_per_second(url: str, model: str, prompts, tokens: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        started = time.perf_counter()
        response = await http.post(
            "/v1/completions",
            json={
                "model": model,
                "prompt": prompts,
                "max_tokens": tokens,
                "ignore_eos": True,
                "temperature": 1.0,
            },
        )
        elapsed = time.perf_counter() - started
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"] / elapsed


async def one_step_seconds(url: str, model: str, prompts, top_k: int) -> float:
    """One batched 1-token request with top-k log-probs to one server: the floor of a coordinator step."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        started = time.perf_counter()
        response = await http.post(
            "/v1/completions",
            json={
                "model": model,
                "prompt": prompts,
                "max_tokens": 1,
                "temperature": 1.0,
                "logprobs": top_k,
                "return_tokens_as_token_ids": True,
            },
        )
        response.json()
        return time.perf_counter() - started


async def coordinator_run(coordinator: DualVLLMCoordinator, prompts, tokens: int, seed: int):
    before = coordinator.get_statistics()
    started = time.perf_counter()
    outputs = await coordinator.generate_batch(prompts, max_tokens=tokens, seed=seed)
    elapsed = time.perf_counter() - started
    after = coordinator.get_statistics()
    errors = sum(o.error is not None for o in outputs)
    if errors:
        raise RuntimeError(f"{errors} samples failed, e.g. {next(o.error for o in outputs if o.error)}")
    generated = sum(len(o.generated_tokens) for o in outputs)
    steps = after["steps"] - before["steps"]
    return {
        "tps": generated / elapsed,
        "ms_per_step": 1000 * elapsed / max(steps, 1),
        "server_ms_per_step": 1000 * (after["server_seconds"] - before["server_seconds"]) / max(steps, 1),
        "compute_ms_per_step": 1000 * (after["compute_seconds"] - before["compute_seconds"]) / max(steps, 1),
        "covered": after["covered_mass_theta_mean"],
    }


async def main_async(args) -> str:
    rows = []
    for groups in args.pipeline_groups:
        config = CoordinatorConfig(
            theta_url=args.theta_url, t_url=args.t_url, top_k=args.top_k, pipeline_groups=groups, stop_token_ids=[]
        )
        async with DualVLLMCoordinator(config) as coordinator:
            model = coordinator._theta.model
            for concurrency in args.concurrency:
                prompts = prompt_ids(coordinator.theta_tokenizer, concurrency)
                coordinator.config.max_concurrency = concurrency
                await native_tokens_per_second(args.theta_url, model, prompts, 2)  # warm-up
                await coordinator_run(coordinator, prompts, 2, seed=0)
                native, coord, step = [], [], []
                for repeat in range(args.repeats):
                    native.append(await native_tokens_per_second(args.theta_url, model, prompts, args.tokens))
                    coord.append(await coordinator_run(coordinator, prompts, args.tokens, seed=repeat))
                    step.append(await one_step_seconds(args.theta_url, model, prompts, args.top_k))
                median = lambda key: statistics.median(c[key] for c in coord)  # noqa: E731
                native_tps = statistics.median(native)
                step_s = statistics.median(step)
                rows.append(
                    (
                        concurrency,
                        groups,
                        native_tps,
                        median("tps"),
                        median("tps") / native_tps,
                        median("ms_per_step"),
                        median("server_ms_per_step"),
                        median("compute_ms_per_step"),
                        1000 * step_s,
                        concurrency / step_s / native_tps,
                    )
                )
                print(
                    f"c={concurrency} groups={groups}: native {native_tps:.0f} tok/s, coordinator "
                    f"{median('tps'):.0f} tok/s, ratio {median('tps') / native_tps:.3f}",
                    flush=True,
                )
    header = (
        "| concurrency | pipeline groups | native tok/s (1 server) | coordinator tok/s | ratio | "
        "coordinator ms/step | of which servers | of which q* + sampling | one 1-token request, 1 server, ms | "
        "ceiling ratio |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header] + [
        f"| {c} | {g} | {n:.0f} | {t:.0f} | {r:.3f} | {ms:.1f} | {sv:.1f} | {cp:.1f} | {one:.1f} | {ceil:.3f} |"
        for c, g, n, t, r, ms, sv, cp, one, ceil in rows
    ]
    return "\n".join(lines)


def environment(args) -> str:
    import torch
    import transformers

    try:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return (
        f"{datetime.date.today().isoformat()}, {platform.machine()} {os.cpu_count()} cores "
        f"(load average at the end: {load}), Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, httpx {httpx.__version__}; servers {args.theta_url} / {args.t_url}; "
        f"{args.tokens} tokens per prompt, top_k={args.top_k}, median of {args.repeats}"
    )


def main(argv=None) -> int:
    import vllm_servers

    env = vllm_servers.servers_from_env() or {}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--theta-url", default=env.get("OPTIMAL_SAMPLING_THETA_URL"))
    parser.add_argument("--t-url", default=env.get("OPTIMAL_SAMPLING_T_URL"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--pipeline-groups", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    if not (args.theta_url and args.t_url):
        parser.error("no servers: pass --theta-url/--t-url or start them with tests/vllm_servers.py")
    table = asyncio.run(main_async(args))
    text = f"\n### vLLM coordinator vs native generation ({environment(args)})\n\n{table}\n"
    print(text)
    if not args.no_append:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
