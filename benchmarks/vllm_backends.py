"""Tokens/s of both vLLM q* backends against the base engine's own generation, in one run.

    python benchmarks/vllm_backends.py [--concurrency 1 16 64 128] [--tokens 32] [--top-k 20]
        [--repeats 3] [--no-append]

Run it in the vLLM venv (the in-process engines need `vllm`), with the two servers of
`tests/vllm_servers.py` running (their URLs come from the environment or its env file).
On the shipped toy pair (float32, one core per engine), for each concurrency c, c prompts
x `--tokens` tokens (end-of-sequence ignored everywhere, so every row makes the same tokens):

  * native:      the base engine of the in-process pair generating on its own (vLLM's sampler,
                 c concurrent requests): the reference of every ratio;
  * HTTP:        the two-server coordinator (`DualVLLMCoordinator`, max_concurrency=c);
  * driven:      the in-process coordinator, one base + teacher engine pair;
  * driven x2:   two pairs (`pipeline_groups=2`), c/2 sequences each, so q* for one group runs
                 while the other pair's engines work.

At each concurrency the HTTP runs come first (the servers share the engines' cores, and a run
leaves them busy for a moment), then after a pause native and driven runs alternate; the
median of `--repeats` is reported. The two-pair phase measures its own native reference.
"ms/step" splits a driven step into waiting for the engines and the q* step (two pairs: per
pair-step, and the pairs' waits overlap). Prints a Markdown table and appends it to benchmarks/RESULTS.md
(unless --no-append).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from vllm_coordinator import prompt_ids  # noqa: E402

from optimal_sampling.engines import InProcessVLLMCoordinator, VLLMEngineSpec  # noqa: E402
from optimal_sampling.servers import CoordinatorConfig, DualVLLMCoordinator  # noqa: E402
from optimal_sampling.toy import TOY_PAIR_DIR  # noqa: E402

SETTLE = 2.0  # seconds between the HTTP runs and the in-process ones


def engine_spec(role: str) -> VLLMEngineSpec:
    cpus = sorted(os.sched_getaffinity(0))
    return VLLMEngineSpec(
        str(TOY_PAIR_DIR / role),
        dtype="float32",
        max_model_len=512,
        kv_cache_memory_bytes=128 << 20,
        enforce_eager=True,
        env={"VLLM_CPU_OMP_THREADS_BIND": str(cpus[(role == "teacher") % len(cpus)]), "TORCHDYNAMO_DISABLE": "1"},
    )


async def native_tps(engine, prompts, tokens: int) -> float:
    """The engine's own sampler generating `tokens` per prompt, all prompts at once."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=tokens, ignore_eos=True, temperature=1.0, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY
    )

    async def one(i, prompt):
        async for output in engine.generate(
            TokensPrompt(prompt_token_ids=prompt), params, f"native-{time.time_ns()}-{i}"
        ):
            last = output
        return len(last.outputs[0].token_ids)

    started = time.perf_counter()
    generated = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return sum(generated) / (time.perf_counter() - started)


async def qstar_run(coordinator, prompts, tokens: int, seed: int) -> dict:
    """One `generate_batch` with end-of-sequence ignored; tokens/s and where a step's time went."""
    coordinator.stop_token_ids = set()  # every row makes `tokens` tokens, as native does
    coordinator.config.max_concurrency = len(prompts)
    before = coordinator.get_statistics()
    started = time.perf_counter()
    outputs = await coordinator.generate_batch(prompts, max_tokens=tokens, seed=seed, return_diagnostics=False)
    elapsed = time.perf_counter() - started
    after = coordinator.get_statistics()
    failed = [o.error for o in outputs if o.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} samples failed, e.g. {failed[0]}")
    steps = max(after["steps"] - before["steps"], 1)
    wait = "engine_seconds" if "engine_seconds" in after else "server_seconds"
    return {
        "tps": sum(len(o.generated_tokens) for o in outputs) / elapsed,
        "ms_per_step": 1000 * elapsed / steps,
        "wait_ms": 1000 * (after[wait] - before[wait]) / steps,
        "qstar_ms": 1000 * (after["compute_seconds"] - before["compute_seconds"]) / steps,
    }


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


async def phase(args, groups: int, http: DualVLLMCoordinator | None) -> dict[int, dict]:
    """Native, (HTTP,) and driven decode with `groups` engine pairs at every concurrency."""
    results = {}
    config = dict(top_k=args.top_k, max_concurrency=max(args.concurrency), pipeline_groups=groups, step_timeout=300)
    async with InProcessVLLMCoordinator(engine_spec("base"), engine_spec("teacher"), **config) as driven:
        base = driven.engine("base")
        for c in args.concurrency:
            if c < groups:
                continue
            prompts = prompt_ids(driven.tokenizers["base"], c)
            await native_tps(base, prompts, 2)  # warm-up
            await qstar_run(driven, prompts, 2, seed=0)
            if http is not None:
                await qstar_run(http, prompts, 2, seed=0)
            runs = {"native": [], "http": [], "driven": []}
            if http is not None:
                runs["http"] = [
                    await qstar_run(http, prompts, args.tokens, seed=repeat) for repeat in range(args.repeats)
                ]
                await asyncio.sleep(SETTLE)
            for repeat in range(args.repeats):
                runs["native"].append({"tps": await native_tps(base, prompts, args.tokens)})
                runs["driven"].append(await qstar_run(driven, prompts, args.tokens, seed=repeat))
            results[c] = {name: {key: median(r, key) for key in r[0]} for name, r in runs.items() if r}
            line = ", ".join(f"{name} {v['tps']:.0f} tok/s" for name, v in results[c].items())
            print(f"c={c} pairs={groups}: {line}", flush=True)
    return results


async def main_async(args) -> str:
    config = CoordinatorConfig(
        theta_url=args.theta_url,
        t_url=args.t_url,
        top_k=args.top_k,
        theta_tokenizer=str(TOY_PAIR_DIR / "base"),
        t_tokenizer=str(TOY_PAIR_DIR / "teacher"),
    )
    async with DualVLLMCoordinator(config) as http:
        one_pair = await phase(args, 1, http)
    two_pairs = await phase(args, 2, None)
    header = (
        "| concurrency | native tok/s | HTTP coordinator tok/s (ratio) | driven tok/s (ratio) | driven ms/step: "
        "engines / q* | native tok/s (2-pair phase) | driven x2 tok/s (ratio) | driven x2 ms/step: engines / q* |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for c in args.concurrency:
        one, two = one_pair[c], two_pairs.get(c)
        native, http_row, driven = one["native"]["tps"], one["http"], one["driven"]
        cells = [
            str(c),
            f"{native:.0f}",
            f"{http_row['tps']:.0f} ({http_row['tps'] / native:.3f}x)",
            f"{driven['tps']:.0f} ({driven['tps'] / native:.3f}x)",
            f"{driven['ms_per_step']:.1f}: {driven['wait_ms']:.1f} / {driven['qstar_ms']:.1f}",
        ]
        if two is None:
            cells += ["-", "-", "-"]
        else:
            native2, d2 = two["native"]["tps"], two["driven"]
            cells += [
                f"{native2:.0f}",
                f"{d2['tps']:.0f} ({d2['tps'] / native2:.3f}x)",
                f"{d2['ms_per_step']:.1f}: {d2['wait_ms']:.1f} / {d2['qstar_ms']:.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def environment(args, load_at_start: str) -> str:
    import importlib.metadata as metadata

    load = f"{load_at_start} at the start, {load_average()} at the end"
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("vllm-cpu", "torch", "transformers"))
    return (
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} "
        f"{os.cpu_count()} cores (load average {load}; other sessions share the machine), Python {platform.python_version()}, {versions}; "
        f"toy pair float32, one core per engine; {args.tokens} tokens per prompt (EOS ignored), top_k={args.top_k}, "
        f"median of {args.repeats}"
    )


def main(argv=None) -> int:
    import vllm_servers

    env = vllm_servers.servers_from_env() or {}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--theta-url", default=env.get("OPTIMAL_SAMPLING_THETA_URL"))
    parser.add_argument("--t-url", default=env.get("OPTIMAL_SAMPLING_T_URL"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    if not (args.theta_url and args.t_url):
        parser.error("no servers: pass --theta-url/--t-url or start them with tests/vllm_servers.py")
    load_at_start = load_average()
    table = asyncio.run(main_async(args))
    command = "python benchmarks/vllm_backends.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"\n### vLLM backends vs native generation ({environment(args, load_at_start)})\n\n- command: `{command.strip()}`\n\n{table}\n"
    print(text)
    if not args.no_append:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
