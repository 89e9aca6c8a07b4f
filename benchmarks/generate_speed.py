"""Tokens per second of q* sampling through the transformers front, against plain generate.

Rows (same prompts, same lengths, random-weight models built from configs):

  base-only generate      HF `generate`, eager, DynamicCache, the base model alone
  teacher-only generate   the same with the teacher
  q* processor            `generate(logits_processor=[OptimalSamplingLogitsProcessor(teacher)])`
  q* processor, torch ops (CPU only) the same with the C q* step switched off
                          (`OPTIMAL_SAMPLING_CPU_KERNEL=0`): α solve, log q* and diagnostics in torch ops
  q* custom generate      `generate(custom_generate=optimal_generate, teacher_model=teacher)`
  plain two-model loop    an own loop, two DynamicCaches, fixed-α mix (no α solve, no records)
  plain loop, q* step     the same loop with the processor's q* step (`compute_mixture`):
                          the same maths as the processor without generate's machinery
  q* fast path            `FastDecoder` (optimal_sampling/fast.py), the default mode for the device

Each row: one warm-up call (excluded; 4 new tokens on CPU, the full length on CUDA, where the
first call at each new sequence length pays a one-time per-shape setup that made the first
timed run 2-3x slower), then `--repeats` timed calls; the table shows
the median and each row's throughput over base-only generate (the q* target is ≥ 0.45×;
two forwards per token put q* near 0.5× when both models have one shape, as in the CPU
preset, unless the mixing itself is cheaper than generate's own per-step overhead). On CPU the runs go round-robin over the rows and throughput is taken from
the process's CPU time (the development machines are shared; wall time is shown too);
on CUDA it is wall time with `torch.cuda.synchronize()`. The timed runs go round-robin over
the rows on both devices, so that the host's load changes (eager generate is host-bound on a
GPU too) hit every row alike.

    python benchmarks/generate_speed.py --preset cpu-tiny            # CPU, seconds
    python benchmarks/generate_speed.py --device cuda --preset h100  # Qwen2.5-0.5B/1.5B shapes, bf16

The table is printed, appended to benchmarks/RESULTS.md and, when $OUT is set (the GPU
machine), also written there with a copy of the whole results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "RESULTS.md"

# Qwen2.5-0.5B and -1.5B shapes (tied embeddings, as the released models).
QWEN25_05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    tie_word_embeddings=True,
)
QWEN25_15B = dict(
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    vocab_size=151936,
    tie_word_embeddings=True,
)
# Tiny CPU pair: the same shape for both models, so that two forwards per token bound the
# q* throughput at 0.5× single-model generate and the ratio measures the q* overhead.
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=4096,
    tie_word_embeddings=False,
)

PRESETS = {
    "cpu-tiny": dict(dtype="float32", batch=8, prompt=32, new_tokens=32, base=TINY, teacher=TINY),
    "h100": dict(dtype="bfloat16", batch=64, prompt=128, new_tokens=256, base=QWEN25_05B, teacher=QWEN25_15B),
}
PAD, EOS = 0, 2


def build_model(shape: dict, seed: int, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **shape,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=EOS,
        use_sliding_window=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


def environment(device: str) -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": f"{cpu} ({os.cpu_count()} logical cores)",
        "threads": torch.get_num_threads(),
        "command": "python " + " ".join(sys.argv),
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


class RowTimeout(BaseException):
    """Raised by SIGALRM when a row overruns; a BaseException so that no `except Exception`
    on the way (e.g. the fast path's compile fallbacks) can swallow it."""


class Bench:
    """Models, prompts, a wall-clock budget and the rows measured so far."""

    def __init__(self, preset: str, device: str, repeats: int, budget_s: float, seed: int = 0):
        self.start = time.perf_counter()
        self.preset_name, self.preset = preset, PRESETS[preset]
        self.device, self.repeats, self.budget_s = device, repeats, budget_s
        self.dtype = getattr(torch, self.preset["dtype"])
        p = self.preset
        t0 = time.perf_counter()
        self.base = build_model(p["base"], seed + 1, device, self.dtype)
        self.teacher = build_model(p["teacher"], seed + 2, device, self.dtype)
        self.build_s = time.perf_counter() - t0
        self.vocab = min(p["base"]["vocab_size"], p["teacher"]["vocab_size"])
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(10, self.vocab, (p["batch"], p["prompt"]), generator=g).to(device)
        self.mask = torch.ones_like(self.ids)
        self.rows: dict[str, dict] = {}

    # -- timing ---------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def measure(
        self,
        name: str,
        run,
        *,
        warmup=None,
        repeats: int | None = None,
        estimate_s: float = 0.0,
        timeout_s: float | None = None,
        note: str = "",
    ) -> dict:
        """Time `run()` (it returns the generated width) after `warmup()`; never raises."""
        return self.measure_many(
            [dict(name=name, run=run, warmup=warmup, estimate_s=estimate_s, note=note)],
            repeats=repeats,
            timeout_s=timeout_s,
        )[0]

    def measure_many(
        self, specs: list[dict], *, interleave: bool = False, repeats: int | None = None, timeout_s: float | None = None
    ) -> list[dict]:
        """Warm up and time several rows; with `interleave`, the timed runs go round-robin over
        the rows, so that a shared machine's load changes hit every row alike.

        Each run records wall time and this process's CPU time (`time.process_time`); on a
        CPU machine shared with other jobs the CPU time is the steadier measure.
        """
        repeats = repeats or self.repeats
        rows, live = [], []
        for spec in specs:
            if spec["name"] in self.rows:
                rows.append(self.rows[spec["name"]])
                continue
            row = {"name": spec["name"], "note": spec.get("note", ""), "times": [], "cpu_times": [], "steps": []}
            self.rows[spec["name"]] = row
            rows.append(row)
            left = self.budget_s - self.elapsed()
            if spec.get("estimate_s", 0.0) > left:
                row["error"] = f"skipped: needs ~{spec['estimate_s']:.0f} s, {left:.0f} s of the time budget left"
                continue
            if spec.get("warmup") is not None:
                self._guarded(row, lambda: row.__setitem__("warmup_s", self._timed(spec["warmup"])[0]), timeout_s)
            if "error" not in row:
                live.append((spec, row))
        rounds = [[pair] * repeats for pair in live] if not interleave else [live] * repeats
        for group in rounds:
            for spec, row in group:
                if "error" in row:
                    continue

                def once(spec=spec, row=row):
                    wall, cpu, width = self._timed(spec["run"])
                    row["times"].append(wall)
                    row["cpu_times"].append(cpu)
                    row["steps"].append(int(width))

                self._guarded(row, once, timeout_s)
        for _, row in live:
            if "error" not in row and row["times"]:
                steps, batch = row["steps"][0], self.preset["batch"]
                row["best_seconds"], row["cpu_best_seconds"] = min(row["times"]), min(row["cpu_times"])
                row["seconds"] = statistics.median(row["times"])
                row["cpu_seconds"] = statistics.median(row["cpu_times"])
                row["tokens_per_s"] = batch * steps / row["seconds"]
                row["cpu_tokens_per_s"] = batch * steps / row["cpu_seconds"]
                row["ms_per_step"] = 1000 * row["seconds"] / steps
                row["cpu_ms_per_step"] = 1000 * row["cpu_seconds"] / steps
        for _, row in live:
            self.report(row)
        return rows

    def _timed(self, fn) -> tuple[float, float, object]:
        torch.manual_seed(len(self.rows))
        self.sync()
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        self.sync()
        return time.perf_counter() - wall, time.process_time() - cpu, result

    def _guarded(self, row: dict, fn, timeout_s: float | None):
        """Run `fn`; a failure or a timeout marks the row (the other rows go on)."""
        timeout_s = timeout_s if timeout_s is not None else self.budget_s - self.elapsed()
        if timeout_s <= 1:
            row["error"] = "skipped: time budget used up"
            return
        old = signal.signal(signal.SIGALRM, _raise_timeout)
        signal.alarm(int(timeout_s))
        try:
            fn()
        except RowTimeout:
            row["error"] = f"stopped after {timeout_s:.0f} s (time budget)"
        except Exception as error:  # one failing row must not lose the others
            row["error"] = f"{type(error).__name__}: {error}"[:500].replace("\n", " ")
            row["traceback"] = traceback.format_exc()[-3000:]
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
            if self.device == "cuda":
                torch.cuda.empty_cache()

    def report(self, row: dict):
        if "error" in row:
            print(f"[{self.elapsed():6.0f}s] {row['name']}: {row['error']}", flush=True)
        elif "seconds" in row:
            warm = f", warm-up {row['warmup_s']:.1f} s" if "warmup_s" in row else ""
            print(
                f"[{self.elapsed():6.0f}s] {row['name']}: {row['tokens_per_s']:.0f} tok/s wall "
                f"({row['cpu_tokens_per_s']:.0f} by CPU time), {row['ms_per_step']:.2f} ms/step{warm}",
                flush=True,
            )

    # -- the rows ---------------------------------------------------------------------------

    def hf_generate(self, model, new_tokens=None, **kwargs) -> int:
        out = model.generate(
            input_ids=self.ids,
            attention_mask=self.mask,
            do_sample=True,
            top_k=0,
            max_new_tokens=new_tokens or self.preset["new_tokens"],
            pad_token_id=PAD,
            eos_token_id=EOS,
            **kwargs,
        )
        return out.shape[1] - self.ids.shape[1]

    def processor(self, new_tokens=None) -> int:
        from optimal_sampling import OptimalSamplingLogitsProcessor

        processor = OptimalSamplingLogitsProcessor(
            self.teacher, vocab_size=self.vocab, pad_token_id=PAD, eos_token_id=[EOS]
        )
        return self.hf_generate(self.base, new_tokens, logits_processor=[processor])

    def custom_generate(self, new_tokens=None) -> int:
        from optimal_sampling import optimal_generate

        return self.hf_generate(
            self.base, new_tokens, custom_generate=optimal_generate, teacher_model=self.teacher, vocab_size=self.vocab
        )

    @torch.no_grad()
    def plain_loop(self, new_tokens=None, mix=None) -> int:
        """An own decode loop: both models with a DynamicCache each, then `mix(lp, lr)` → the
        `[B, V]` log-probs to sample (default: a fixed-α mix with α = 0.5)."""
        from transformers import DynamicCache

        mix = mix or (lambda lp, lr: torch.log_softmax(0.5 * lp + 0.5 * lr, -1))
        new_tokens = new_tokens or self.preset["new_tokens"]
        mask = self.mask
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        caches = [DynamicCache(config=m.config) for m in (self.base, self.teacher)]
        tokens = self.ids
        for _ in range(new_tokens):
            lp, lr = (
                torch.log_softmax(
                    m(
                        input_ids=tokens,
                        attention_mask=mask,
                        position_ids=positions,
                        cache=c,
                        use_cache=True,
                        logits_to_keep=1,
                    )
                    .logits[:, -1, : self.vocab]
                    .float(),
                    -1,
                )
                for m, c in zip((self.base, self.teacher), caches)
            )
            tokens = torch.multinomial(mix(lp, lr).exp(), 1)
            mask = torch.cat([mask, torch.ones_like(tokens)], 1)
            positions = positions[:, -1:] + 1
        return new_tokens

    def plain_q_star_loop(self, new_tokens=None) -> int:
        """The plain loop with the processor's q* step (`compute_mixture`: kl_symmetry α,
        diagnostics) instead of a fixed α: what the processor adds beyond the math is the
        integration (generate's loop, the teacher cache's bookkeeping, the records)."""
        from optimal_sampling import compute_mixture

        return self.plain_loop(new_tokens, mix=lambda lp, lr: compute_mixture(lp, lr).logq)

    def fast_decoder(self, mode: str, **config):
        from optimal_sampling.fast import FastDecoder, FastPathConfig

        return FastDecoder(self.base, self.teacher, FastPathConfig(mode=mode, **config))

    def fast(self, decoder, new_tokens=None) -> int:
        out = decoder.generate(
            self.ids,
            self.mask,
            max_new_tokens=new_tokens or self.preset["new_tokens"],
            pad_token_id=PAD,
            stop_token_ids=[EOS],
            vocab_size=self.vocab,
        )
        return out.logq.shape[1]

    def eager_estimate(self, per_step_ms: float) -> float:
        warmup = 1.0 if self.device == "cuda" else 0.2  # full-length warm-up on CUDA
        return per_step_ms / 1000 * self.preset["new_tokens"] * (self.repeats + warmup)


def _raise_timeout(signum, frame):
    raise RowTimeout()


def default_fast_mode(device: str) -> str:
    return "compile_mixture" if device == "cuda" else "eager"


def run_generate_speed(bench: Bench, fast_mode: str | None = None) -> list[dict]:
    """The rows of this benchmark (rows another script already measured are reused)."""
    cuda = bench.device == "cuda"
    short = {} if cuda else dict(new_tokens=4)
    est = bench.eager_estimate
    mode = fast_mode or default_fast_mode(bench.device)
    holder = {}

    def fast_warmup():
        holder["decoder"] = bench.fast_decoder(mode)
        bench.fast(holder["decoder"])
        getattr(bench, "decoders", {})[mode] = holder["decoder"]

    specs = [
        dict(
            name="base-only generate (eager)",
            run=lambda: bench.hf_generate(bench.base),
            warmup=lambda: bench.hf_generate(bench.base, **short),
            estimate_s=est(30 if cuda else 10),
        ),
        dict(
            name="teacher-only generate (eager)",
            run=lambda: bench.hf_generate(bench.teacher),
            warmup=lambda: bench.hf_generate(bench.teacher, **short),
            estimate_s=est(30 if cuda else 10),
        ),
        dict(
            name="q* processor (generate + OptimalSamplingLogitsProcessor)",
            run=bench.processor,
            warmup=lambda: bench.processor(**short),
            estimate_s=est(70 if cuda else 25),
        ),
        dict(
            name="q* custom generate (optimal_generate)",
            run=bench.custom_generate,
            warmup=lambda: bench.custom_generate(**short),
            estimate_s=est(70 if cuda else 25),
        ),
        dict(
            name="plain two-model loop (DynamicCache, fixed α)",
            run=bench.plain_loop,
            warmup=lambda: bench.plain_loop(**short),
            estimate_s=est(45 if cuda else 15),
        ),
        dict(
            name="plain two-model loop, q* step (compute_mixture)",
            run=bench.plain_q_star_loop,
            warmup=lambda: bench.plain_q_star_loop(**short),
            estimate_s=est(60 if cuda else 22),
        ),
        dict(
            name=f"q* fast path, mode={mode}",
            run=lambda: bench.fast(holder["decoder"]),
            warmup=fast_warmup,
            estimate_s=est(15 if cuda else 20),
            note="warm-up = first call, incl. capture/compile",
        ),
    ]
    if not cuda:  # the same processor with the C q* step switched off: torch ops throughout
        specs.insert(
            3,
            dict(
                name="q* processor, torch-ops q* step (OPTIMAL_SAMPLING_CPU_KERNEL=0)",
                run=lambda: switched_off("OPTIMAL_SAMPLING_CPU_KERNEL", bench.processor),
                warmup=lambda: switched_off("OPTIMAL_SAMPLING_CPU_KERNEL", bench.processor, **short),
                estimate_s=est(30),
            ),
        )
    return bench.measure_many(specs, interleave=True)


def switched_off(switch: str, fn, **kwargs):
    """`fn(**kwargs)` with the environment switch `switch` (OPTIMAL_SAMPLING_CPU_KERNEL,
    OPTIMAL_SAMPLING_TRITON) set to 0: the fused code off, torch ops instead."""
    os.environ[switch] = "0"
    try:
        return fn(**kwargs)
    finally:
        del os.environ[switch]


def generate_speed_table(bench: Bench, rows: list[dict], env: dict) -> str:
    p = bench.preset
    cpu = bench.device == "cpu"
    key = "cpu_tokens_per_s" if cpu else "tokens_per_s"
    reference = bench.rows.get("base-only generate (eager)", {}).get(key)
    basis = (
        "CPU time of this process (`time.process_time`, 1 thread; the machine is shared, so wall time is also shown)"
        if cpu
        else "wall time, with `torch.cuda.synchronize()` around each run"
    )
    order = "interleaved round-robin over the rows" + ("" if cpu else "; full-length warm-up")
    lines = [
        f"### generate_speed — preset `{bench.preset_name}` ({env['date']})",
        "",
        f"- command: `{env['command']}`",
        f"- machine: {env.get('gpu', 'no GPU')}; {env['cpu']}; torch.get_num_threads() = {env['threads']}",
        f"- versions: torch {env['torch']}, transformers {env['transformers']}"
        + (f", CUDA {env['cuda']}" if "cuda" in env else "")
        + f", Python {env['python']}",
        f"- models: random {p['dtype']} Qwen2, base {_shape(p['base'])}, teacher {_shape(p['teacher'])}; "
        f"batch {p['batch']}, prompt {p['prompt']}, {p['new_tokens']} new tokens, sampling with top_k=0",
        f"- timing: median of {bench.repeats} runs after one warm-up call per row ({order}); "
        f"throughput and ratio by {basis}",
        "",
        "| path | tokens/s | ms/step | × base-only generate | " + ("wall tokens/s | " if cpu else "") + "notes |",
        "|---|---:|---:|---:|" + ("---:|" if cpu else "") + "---|",
    ]
    for row in rows:
        if "error" in row or "seconds" not in row:
            lines.append(
                f"| {row['name']} | — | — | — | " + ("— | " if cpu else "") + f"{row.get('error', 'not run')} |"
            )
            continue
        ratio = f"{row[key] / reference:.2f}×" if reference else "—"
        ms = row["cpu_ms_per_step"] if cpu else row["ms_per_step"]
        runs = ", ".join(f"{t:.3f}" for t in (row["cpu_times"] if cpu else row["times"]))
        warm = f"warm-up {row['warmup_s']:.1f} s; " if "warmup_s" in row else ""
        wall = f"{row['tokens_per_s']:,.0f} | " if cpu else ""
        lines.append(
            f"| {row['name']} | {row[key]:,.0f} | {ms:.2f} | {ratio} | {wall}"
            f"{warm}runs (s): {runs}{'; ' + row['note'] if row['note'] else ''} |"
        )
    # Ratios of medians decide PASS; the ratio of the fastest runs is shown beside it (noise on
    # a shared host only ever adds time, so the fastest run is the steadier estimate).
    best = "cpu_best_seconds" if cpu else "best_seconds"
    base_row = bench.rows.get("base-only generate (eager)", {})
    qstar = [r for r in rows if r["name"].startswith("q*") and "seconds" in r]
    if reference and qstar:
        lines.append("")
        for r in qstar:
            ratio = r[key] / reference
            fastest = base_row[best] / r[best] * r["steps"][0] / base_row["steps"][0]
            lines.append(
                f"- {r['name']}: {ratio:.2f}× base-only generate, fastest runs {fastest:.2f}× "
                f"(target ≥ 0.45×; the original tool reached 0.31×): {'PASS' if ratio >= 0.45 else 'below target'}"
            )
    processor = bench.rows.get("q* processor (generate + OptimalSamplingLogitsProcessor)", {})
    for name in ("plain two-model loop (DynamicCache, fixed α)", "plain two-model loop, q* step (compute_mixture)"):
        loop = bench.rows.get(name, {})
        if processor.get(key) and loop.get(key):
            ratio = processor[key] / loop[key]
            fastest = loop[best] / processor[best] * processor["steps"][0] / loop["steps"][0]
            lines.append(
                f"- q* processor vs {name}: {ratio:.2f}×, fastest runs {fastest:.2f}× (target: within 10%, "
                f"≥ 0.90×): {'PASS' if ratio >= 0.9 else 'below target'}"
            )
    return "\n".join(lines) + "\n"


def _shape(shape: dict) -> str:
    return (
        f"h{shape['hidden_size']}/L{shape['num_hidden_layers']}/heads {shape['num_attention_heads']}"
        f"/kv {shape['num_key_value_heads']}/ffn {shape['intermediate_size']}/V {shape['vocab_size']}"
    )


def append_results(text: str, name: str | None = None, raw: dict | None = None) -> None:
    """Append `text` to benchmarks/RESULTS.md, the one way every script in `benchmarks/` records a result.
    Where $OUT is set (the lent GPU machine), RESULTS.md goes there too, with `name`.md and `name`.json (`raw`)."""
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in `benchmarks/`; newest last.\n")
    with RESULTS.open("a") as f:
        f.write("\n" + text.rstrip("\n") + "\n")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        if name:
            (Path(out) / f"{name}.md").write_text(text)
            (Path(out) / f"{name}.json").write_text(json.dumps(raw, indent=1, default=str))
        shutil.copy(RESULTS, Path(out) / "RESULTS.md")


def save(sections: list[str], name: str, raw: dict):
    """Append the sections to benchmarks/RESULTS.md (`append_results`) and print them."""
    text = "\n".join(sections)
    append_results(text, name, raw)
    print("\n" + text)


def common_args(parser: argparse.ArgumentParser):
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda for h100, else cpu)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default: 2 on CUDA, 5 on CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU (default 1)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=500.0,
        help="seconds for the rows (after imports); rows that would not fit are skipped, a row "
        "that overruns is stopped (default 500)",
    )


def setup(args) -> Bench:
    device = args.device or ("cuda" if args.preset == "h100" else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if device == "cuda" else 5)
    return Bench(args.preset, device, repeats, args.time_budget)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    parser.add_argument("--fast-mode", default=None, help="FastPathConfig mode for the fast-path row")
    args = parser.parse_args()
    bench = setup(args)
    env = environment(bench.device)
    rows = run_generate_speed(bench, args.fast_mode)
    save([generate_speed_table(bench, rows, env)], f"generate_speed_{bench.preset_name}", {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
