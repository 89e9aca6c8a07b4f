"""The GPU fast path for q* sampling against single-model HF generate (the Task A table).

Rows (same random-weight models, prompts and lengths):

  HF generate, eager                 base-only and teacher-only (DynamicCache)
  HF generate, static cache+compile  base-only and teacher-only
                                     (`cache_implementation="static"`, `compile_config=CompileConfig()`,
                                     i.e. torch.compile mode="reduce-overhead"; warm-up = the compile)
  q* processor                       `generate(logits_processor=[OptimalSamplingLogitsProcessor])`
  q* fast path                       `FastDecoder` in modes cuda_graph, compile_mixture, compile
                                     (warm-up = the first call: prefill, compile, capture)

Targets (Task A): the fast path ≥ 1.0× the harmonic combination 1 / (1/a + 1/b) of the two
compiled single-model throughputs, and ≥ 1.8× teacher-only eager HF generate.

A GPU correctness check follows the table: the graph modes against the eager fast path
under the same seed (identical tokens expected for cuda_graph, which replays the same
kernels), and the recorded log q against a full-sequence recompute with `compute_mixture`.

Rows run one after the other within `--time-budget` seconds (a row that would not fit is
skipped; a row that fails or overruns is recorded as such and the rest go on). After every
row the partial table is written to $OUT (when set), so a cut-off run still reports.

    python benchmarks/fast_path.py --preset cpu-tiny                       # smoke test on CPU
    python benchmarks/fast_path.py --preset h100 --with-generate-speed     # the H100 run (≈ 8 min)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate_speed as gs  # noqa: E402

FAST_MODES_GPU = ("cuda_graph", "compile_mixture", "compile")


def hf_static_compiled(bench: gs.Bench, model, new_tokens=None) -> int:
    from transformers import CompileConfig

    kwargs = dict(cache_implementation="static")
    if bench.device == "cuda":
        kwargs["compile_config"] = CompileConfig()
    return bench.hf_generate(model, new_tokens, **kwargs)


def static_name(which: str, cuda: bool) -> str:
    return f"HF generate {which}-only, static cache" + (" + compile" if cuda else " (not compiled on CPU)")


def fast_row(bench: gs.Bench, mode: str, estimate_s: float, timeout_s: float | None = None, repeats: int | None = None):
    name = f"q* fast path, mode={mode}"
    holder = {}

    def warmup():
        holder["decoder"] = bench.fast_decoder(mode)
        bench.decoders[mode] = holder["decoder"]
        bench.fast(holder["decoder"])

    row = bench.measure_many(
        [dict(name=name, run=lambda: bench.fast(holder["decoder"]), warmup=warmup, estimate_s=estimate_s)],
        repeats=repeats,
        timeout_s=timeout_s,
    )[0]
    decoder = holder.get("decoder")
    if decoder is not None:
        row["fast_stats"] = dict(decoder.stats)
        used = decoder.stats.get("mode")
        notes = [
            f"warm-up (prefill + compile/capture + one call) {row.get('warmup_s', float('nan')):.1f} s",
            f"build {decoder.stats['build_seconds']:.1f} s",
        ]
        if used != mode:
            notes.append(f"FELL BACK to {used}: {' | '.join(decoder.stats['errors'])[:300]}")
        row["note"] = "; ".join(notes)
    return row


@torch.no_grad()
def gpu_checks(bench: gs.Bench, check_tokens: int = 32) -> list[str]:
    """Graph modes vs the eager fast path under one seed; recorded log q vs a full recompute."""
    from optimal_sampling import compute_mixture, log_probs_from_logits
    from optimal_sampling.teacher import position_ids_from_mask

    lines = []
    eager = bench.fast_decoder("eager")
    torch.manual_seed(7)
    ref = eager.generate(
        bench.ids,
        bench.mask,
        max_new_tokens=check_tokens,
        pad_token_id=gs.PAD,
        stop_token_ids=[gs.EOS],
        vocab_size=bench.vocab,
    )
    width = ref.logq.shape[1]
    for mode, decoder in bench.decoders.items():
        if mode == "eager":
            continue
        try:
            torch.manual_seed(7)
            out = decoder.generate(
                bench.ids,
                bench.mask,
                max_new_tokens=bench.preset["new_tokens"],
                pad_token_id=gs.PAD,
                stop_token_ids=[gs.EOS],
                vocab_size=bench.vocab,
            )
            p, w = bench.ids.shape[1], min(width, out.logq.shape[1])
            same = (out.sequences[:, : p + w] == ref.sequences[:, : p + w]).all(dim=1).float().mean().item()
            both = ref.token_mask[:, :w] & out.token_mask[:, :w]
            dlogq = (out.logq[:, :w] - ref.logq[:, :w])[both].abs()
            conv = out.diagnostics["converged"][out.token_mask].float().mean().item()
            lines.append(
                f"- mode={mode} (ran as {decoder.stats['mode']}) vs eager fast path, seed 7, first {width} tokens: "
                f"{same:.1%} of rows identical over {w} tokens; max |Δ log q| on common tokens {dlogq.max().item():.2e}; "
                f"α solve converged (max_iter={decoder.config.max_iter}) on {conv:.2%} of tokens"
            )
        except Exception as error:  # a failed check is reported, not fatal
            lines.append(f"- mode={mode}: check failed: {type(error).__name__}: {error}"[:400])
    try:
        generated = ref.sequences[:, bench.ids.shape[1] :]
        seq = torch.cat([bench.ids, generated], 1)
        seq_mask = torch.ones_like(seq)
        positions = position_ids_from_mask(seq_mask)
        lp_all = bench.base(seq, attention_mask=seq_mask, position_ids=positions, logits_to_keep=width + 1).logits
        lr_all = bench.teacher(seq, attention_mask=seq_mask, position_ids=positions, logits_to_keep=width + 1).logits
        diffs = []
        for t in range(width):
            lp = log_probs_from_logits(lp_all[:, t].float(), 1.0, bench.vocab)
            lr = log_probs_from_logits(lr_all[:, t].float(), 1.0, bench.vocab)
            step = compute_mixture(lp, lr, return_diagnostics=False)
            y = generated[:, t : t + 1]
            diffs.append((step.logq.gather(1, y)[:, 0] - ref.logq[:, t]).abs())
        d = torch.stack(diffs, 1)[ref.token_mask]
        lines.append(
            f"- eager fast path: recorded log q vs compute_mixture on full-sequence forwards ({bench.preset['dtype']} "
            f"models, so cached and full forwards differ by rounding): median |Δ| {d.median().item():.2e}, "
            f"99th pct {d.quantile(0.99).item():.2e}, max {d.max().item():.2e}"
        )
    except Exception as error:
        lines.append(f"- recompute check failed: {type(error).__name__}: {error}"[:400])
    return lines


def fast_path_table(bench: gs.Bench, rows: list[dict], env: dict, checks: list[str]) -> str:
    p = bench.preset
    cuda = bench.device == "cuda"
    key = "tokens_per_s" if cuda else "cpu_tokens_per_s"
    get = lambda name: bench.rows.get(name, {}).get(key)  # noqa: E731
    base_c, teacher_c = get(static_name("base", cuda)), get(static_name("teacher", cuda))
    teacher_eager = get("teacher-only generate (eager)")
    harmonic = 1 / (1 / base_c + 1 / teacher_c) if base_c and teacher_c else None
    lines = [
        f"### fast_path — preset `{bench.preset_name}` ({env['date']})",
        "",
        f"- command: `{env['command']}`",
        f"- machine: {env.get('gpu', 'no GPU')}; {env['cpu']}; torch threads {env['threads']}",
        f"- versions: torch {env['torch']}, transformers {env['transformers']}"
        + (f", CUDA {env['cuda']}" if "cuda" in env else "")
        + f", Python {env['python']}",
        f"- models: random {p['dtype']} Qwen2, base {gs._shape(p['base'])}, teacher {gs._shape(p['teacher'])}; "
        f"batch {p['batch']}, prompt {p['prompt']}, {p['new_tokens']} new tokens, top_k=0",
        "- timing: median of the timed runs listed (after the warm-up call) by "
        + ("wall time with cuda.synchronize" if cuda else "process CPU time (shared machine; compile rows need CUDA)"),
        "",
        "| path | tokens/s | ms/step | warm-up s | × teacher eager | × harmonic(compiled) | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if "seconds" not in row:
            lines.append(f"| {row['name']} | — | — | — | — | — | {row.get('error', 'not run')} |")
            continue
        tps = row[key]
        ms = row["ms_per_step"] if cuda else row["cpu_ms_per_step"]
        vs_t = f"{tps / teacher_eager:.2f}×" if teacher_eager else "—"
        vs_h = f"{tps / harmonic:.2f}×" if harmonic else "—"
        runs = ", ".join(f"{t:.2f}" for t in (row["times"] if cuda else row["cpu_times"]))
        warm = f"{row['warmup_s']:.1f}" if "warmup_s" in row else "—"
        lines.append(
            f"| {row['name']} | {tps:,.0f} | {ms:.2f} | {warm} | {vs_t} | {vs_h} | runs (s): {runs}"
            f"{'; ' + row['note'] if row.get('note') else ''} |"
        )
    lines.append("")
    if harmonic:
        lines.append(
            f"- harmonic combination of the compiled single-model throughputs: 1 / (1/{base_c:,.0f} + 1/{teacher_c:,.0f}) "
            f"= {harmonic:,.0f} tokens/s; 1.8 × teacher-only eager = {1.8 * teacher_eager:,.0f} tokens/s"
            if teacher_eager
            else f"- harmonic combination: {harmonic:,.0f} tokens/s"
        )
    if not cuda:
        lines.append("- CPU smoke test: the targets below are for the H100 run (compiled references, CUDA graphs)")
    for row in rows:
        if row["name"].startswith("q* fast path") and "seconds" in row:
            tps = row[key]
            verdicts = []
            if harmonic:
                verdicts.append(
                    f"{tps / harmonic:.2f}× harmonic (target ≥ 1.0: {'PASS' if tps >= harmonic else 'FAIL'})"
                )
            if teacher_eager:
                verdicts.append(
                    f"{tps / teacher_eager:.2f}× teacher eager (target ≥ 1.8: "
                    f"{'PASS' if tps >= 1.8 * teacher_eager else 'FAIL'})"
                )
            lines.append(f"- {row['name']}: " + "; ".join(verdicts or ["no reference rows"]))
    if checks:
        lines += ["", "GPU correctness checks:", *checks]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gs.common_args(parser)
    parser.add_argument("--modes", default=",".join(FAST_MODES_GPU), help="fast-path modes to time on CUDA")
    parser.add_argument(
        "--with-generate-speed",
        action="store_true",
        help="also time the rest of benchmarks/generate_speed.py on the same models and append its table",
    )
    parser.add_argument("--no-checks", action="store_true", help="skip the GPU correctness checks")
    parser.add_argument(
        "--only-fast",
        action="store_true",
        help="CUDA: time only the fast-path modes (and the checks), e.g. for a second call with "
        "--modes compile; the ratios then need the reference rows of an earlier run",
    )
    args = parser.parse_args()
    bench = gs.setup(args)
    bench.decoders = {}
    env = gs.environment(bench.device)
    cuda = bench.device == "cuda"
    print(f"[{bench.elapsed():6.0f}s] models built in {bench.build_s:.1f} s", flush=True)
    name = f"fast_path_{bench.preset_name}"
    est = bench.eager_estimate
    short = dict(new_tokens=4)
    rows, checks, done = [], [], set()

    def checkpoint():
        """The partial table to $OUT after every row, so a run cut off by the device limit still reports."""
        out = os.environ.get("OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / f"{name}.partial.md").write_text(fast_path_table(bench, rows, env, checks))
            (Path(out) / f"{name}.partial.json").write_text(
                json.dumps({"env": env, "rows": rows}, indent=1, default=str)
            )

    def add(row):
        rows.append(row)
        done.add(row["name"])
        checkpoint()

    eager_specs = [
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
    ]
    static_specs = [
        dict(
            name=static_name("base", cuda),
            run=lambda: hf_static_compiled(bench, bench.base),
            warmup=lambda: hf_static_compiled(bench, bench.base),
            estimate_s=60 if cuda else est(10),
            note="warm-up = compile + one call" if cuda else "",
        ),
        dict(
            name=static_name("teacher", cuda),
            run=lambda: hf_static_compiled(bench, bench.teacher),
            warmup=lambda: hf_static_compiled(bench, bench.teacher),
            estimate_s=100 if cuda else est(10),
            note="warm-up = compile + one call" if cuda else "",
        ),
    ]
    processor_spec = dict(
        name="q* processor (generate + OptimalSamplingLogitsProcessor)",
        run=bench.processor,
        warmup=lambda: bench.processor(**short),
        estimate_s=est(70 if cuda else 25),
    )
    modes = [m for m in args.modes.split(",") if m]

    if not cuda:  # CPU smoke test: everything interleaved, the fast path eager
        holder = {}

        def fast_warmup():
            holder["decoder"] = bench.fast_decoder("eager")
            bench.decoders["eager"] = holder["decoder"]
            bench.fast(holder["decoder"])

        fast_spec = dict(
            name="q* fast path, mode=eager",
            run=lambda: bench.fast(holder["decoder"]),
            warmup=fast_warmup,
            estimate_s=est(20),
            note="graph modes need CUDA",
        )
        for row in bench.measure_many([*eager_specs, *static_specs, processor_spec, fast_spec], interleave=True):
            add(row)
    else:
        # Most important first: the references of both targets, then the fast path, the
        # compiled references, the processor; the full compile (longest, riskiest) last.
        if args.only_fast:
            eager_specs, static_specs, processor_spec = [], [], None
        for spec in eager_specs:
            add(bench.measure_many([spec])[0])
        if "cuda_graph" in modes:
            add(fast_row(bench, "cuda_graph", estimate_s=30, repeats=3))
        for spec in static_specs:
            add(bench.measure_many([spec])[0])
        if "compile_mixture" in modes:
            add(fast_row(bench, "compile_mixture", estimate_s=90, repeats=3))
        if processor_spec is not None:
            add(bench.measure_many([processor_spec])[0])
        if not args.no_checks and bench.decoders and bench.budget_s - bench.elapsed() > 40:
            status = {"name": "GPU checks"}
            bench._guarded(status, lambda: checks.extend(gpu_checks(bench)), timeout_s=60)
            if "error" in status:
                checks.append(f"- checks stopped: {status['error']}")
            print("\n".join(checks), flush=True)
            checkpoint()
        if args.with_generate_speed and not args.only_fast:
            gs_rows = gs.run_generate_speed(bench, fast_mode=None)
            bench.gs_rows = gs_rows
        if "compile" in modes:
            left = bench.budget_s - bench.elapsed()
            add(fast_row(bench, "compile", estimate_s=min(150, left), timeout_s=left - 5, repeats=3))

    sections = [fast_path_table(bench, rows, env, checks)]
    if getattr(bench, "gs_rows", None):
        sections.append(gs.generate_speed_table(bench, bench.gs_rows, env))
    gs.save(
        sections,
        name,
        {"env": env, "rows": rows, "checks": checks, "generate_speed_rows": getattr(bench, "gs_rows", None)},
    )


if __name__ == "__main__":
    main()
