"""Time of one top-k q* step as the vLLM coordinators run it, per batch of sequences.

What the driven (in-process) coordinator does per engine step once both engines' top-k lists
are in: `canonical_top_k` for each side, then `TopKStepper.advance` (merge the lists into
candidate columns, the KL-symmetric α solve, log q*, the counter-based draw, the records).
Rows: the lists in id order (what a driven engine sends since 2026-12-06, so the canonical
form needs no sort) against the same lists in value order (what a server or an older engine
sends): the baseline of the ratio. `--rest` sets how much of each side's mass lies outside its
top-k list, which decides how often the rest bucket is drawn.

    python benchmarks/topk_step.py [--batch 64] [--k 20] [--vocab 320 49152] [--repeats 300]

Prints a Markdown table and appends it to benchmarks/RESULTS.md (unless --no-append).
Times are process CPU time on one torch thread, the median call after `--warmup` calls.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate_speed import save  # noqa: E402

from optimal_sampling.options import QStarOptions  # noqa: E402
from optimal_sampling.topk_decoding import TopKSequence, TopKStepper, canonical_top_k  # noqa: E402


def top_k_lists(batch: int, vocab: int, k: int, rest: float, seed: int):
    """Base and teacher top-k lists `(ids, logp)` in value order; `rest` of the mass lies outside each list."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, vocab, generator=generator, dtype=torch.float64) * 3
    teacher = base + torch.randn(batch, vocab, generator=generator, dtype=torch.float64)
    lists = []
    for logits in (base, teacher):
        values, ids = logits.topk(k)
        inside = torch.log_softmax(values, -1) + torch.log1p(torch.tensor(-rest))  # the list holds 1 - rest
        lists.append((ids, inside.float()))
    return lists


def one_step(stepper: TopKStepper, sequences, lists, k: int, vocab: int) -> None:
    (ids_b, lp_b), (ids_t, lp_t) = lists
    base = canonical_top_k(ids_b, lp_b, k, vocab)[:2]
    teacher = canonical_top_k(ids_t, lp_t, k, vocab)[:2]
    stepper.advance(
        sequences,
        *base,
        *teacher,
        seed=0,
        temperature=1.0,
        max_tokens=1 << 30,
        stop_token_ids=set(),
        return_diagnostics=False,
    )


def time_step(lists, batch: int, k: int, vocab: int, warmup: int, repeats: int) -> float:
    stepper = TopKStepper(QStarOptions(), vocab)
    sequences = [TopKSequence(index=i, prompt="", teacher_prompt="", base_ids=[], teacher_ids=[]) for i in range(batch)]
    times = []
    for call in range(warmup + repeats):
        if call % 64 == 0:  # keep the records short; each call is one more position of every sequence
            for s in sequences:
                s.tokens.clear()
                for values in s.records.values():
                    values.clear()
        started = time.process_time()
        one_step(stepper, sequences, lists, k, vocab)
        if call >= warmup:
            times.append(time.process_time() - started)
    return 1000 * statistics.median(times)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--vocab", type=int, nargs="+", default=[320, 49152])
    parser.add_argument("--rest", type=float, default=0.05, help="mass outside each top-k list (default 0.05)")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = [
        "| vocabulary | lists in value order (baseline) ms | lists in id order (driven engines) ms | × baseline speed |",
        "|---|---:|---:|---:|",
    ]
    for vocab in args.vocab:
        by_value = top_k_lists(args.batch, vocab, args.k, args.rest, seed=vocab)
        by_id = []
        for ids, logp in by_value:
            ids, order = ids.sort(-1)
            by_id.append((ids, logp.gather(-1, order)))
        baseline = time_step(by_value, args.batch, args.k, vocab, args.warmup, args.repeats)
        driven = time_step(by_id, args.batch, args.k, vocab, args.warmup, args.repeats)
        lines.append(f"| {vocab:,} | {baseline:.3f} | {driven:.3f} | {baseline / driven:.2f}× |")
    table = "\n".join(lines)
    import importlib.metadata as metadata

    heading = (
        f"### topk_step — batch {args.batch}, k = {args.k}, {args.rest:.0%} of the mass outside each list "
        f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)\n\n"
        f"- command: `{' '.join(['python benchmarks/topk_step.py', *(argv or [])])}`\n"
        f"- machine: {platform.machine()}, {platform.processor() or 'CPU'}; torch {torch.__version__} (1 thread), "
        f"transformers {metadata.version('transformers')}, Python {platform.python_version()}\n"
        "- timing: process CPU time, median of the timed calls\n"
    )
    if args.no_append:
        print(heading + "\n" + table)
    else:  # appended to RESULTS.md (and copied to $OUT on the GPU machine) as every benchmark does
        save([heading, table + "\n"], "topk_step", {"settings": vars(args), "table": table})
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
