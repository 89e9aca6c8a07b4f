"""Every q* option through the fast path's captured step on a GPU: the CUDA graph must draw the
eager step's tokens with the same records, without falling back to eager.

    python benchmarks/check_fast_options.py [--rows 32] [--new 24] [--no-append]

The CPU tests check each option through every decode loop eagerly (tests/test_options.py); a
captured step can only be checked on a GPU. For each option set, the shipped toy pair (float32)
decodes the same prompts twice from one random state, with `FastPathConfig(mode="cuda_graph")`
and with `mode="eager"` (no batch padding in either, so the random stream is the same), and the
table shows: the mode that ran (a capture failure would fall back to eager and count), the rows
whose tokens agree, the largest |Δ log q| and |Δ α| on the common tokens, and the largest
KL(q‖π_θ) of a sampled token (bounded by the budget for `kl_budget`).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from generate_speed import append_results  # noqa: E402

from optimal_sampling import QStarOptions  # noqa: E402
from optimal_sampling.fast import FastDecoder, FastPathConfig  # noqa: E402
from optimal_sampling.toy import load_toy_pair, make_problems  # noqa: E402

OPTION_SETS = {
    "defaults (kl_symmetry)": QStarOptions(),
    "kl_budget=0.05": QStarOptions(alpha_method="kl_budget", kl_budget=0.05),
    "force_teacher_first_tokens=3, alpha_max=0.7": QStarOptions(force_teacher_first_tokens=3, alpha_max=0.7),
    "teacher_top_p=0.9, top_k=20, top_p=0.95": QStarOptions(teacher_top_p=0.9, top_k=20, top_p=0.95),
    "fixed alpha=0.4, empty_support=base, T=0.7": QStarOptions(
        alpha_method="fixed", alpha=0.4, empty_support="base", temperature=0.7
    ),
    "entropy": QStarOptions(alpha_method="entropy"),
    "ess_balance": QStarOptions(alpha_method="ess_balance"),
}


def decode(decoder, ids, mask, args, q_star, pad, eos):
    torch.manual_seed(0)
    return decoder.generate(ids, mask, max_new_tokens=args.new, q_star=q_star, pad_token_id=pad, stop_token_ids=[eos])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--new", type=int, default=24)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/check_fast_options.py needs a CUDA GPU.")
    base, teacher, tokenizer = load_toy_pair("cuda")
    prompts = [p["prompt"] for p in make_problems(args.rows, seed=0, split="test")]
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    ids, mask = enc["input_ids"].cuda(), enc["attention_mask"].cuda()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    rows = [
        "| options | mode (fallbacks) | rows with equal tokens | max abs diff log q | max abs diff alpha | "
        "max KL(q‖π_θ) |",
        "|---|---|---|---|---|---|",
    ]
    failures = 0
    for name, q_star in OPTION_SETS.items():
        graph = FastDecoder(base, teacher, FastPathConfig(mode="cuda_graph", bucket_batch=False, diagnostics=True))
        eager = FastDecoder(
            base, teacher, FastPathConfig(mode="eager", bucket_batch=False, diagnostics=True, max_iter=8)
        )  # the graph's iteration count
        g, e = decode(graph, ids, mask, args, q_star, pad, eos), decode(eager, ids, mask, args, q_star, pad, eos)
        width = min(g.alpha.shape[1], e.alpha.shape[1])
        common = g.token_mask[:, :width] & e.token_mask[:, :width]
        tokens_g, tokens_e = g.sequences[:, ids.shape[1] :][:, :width], e.sequences[:, ids.shape[1] :][:, :width]
        equal = int(((tokens_g == tokens_e) | ~common).all(dim=1).sum())
        dlogq = float((g.logq[:, :width] - e.logq[:, :width]).abs()[common].max())
        dalpha = float((g.alpha[:, :width] - e.alpha[:, :width]).abs()[common].max())
        kl = float(g.diagnostics["kl_theta"][g.token_mask].max())
        ok = graph.stats["mode"] == "cuda_graph" and graph.stats["fallbacks"] == 0 and equal == args.rows
        ok &= q_star.kl_budget is None or kl <= q_star.kl_budget + 1e-4
        failures += not ok
        print(
            f"[check_fast_options] {name}: {graph.stats['mode']} ({graph.stats['fallbacks']} fallbacks"
            f"{'; ' + graph.stats['errors'][0][:300] if graph.stats['errors'] else ''}), {equal}/{args.rows} rows "
            f"equal, |dlogq| {dlogq:.2e}, |dalpha| {dalpha:.2e}, max KL(q|p) {kl:.4f}",
            flush=True,
        )
        rows.append(
            f"| {name} | {graph.stats['mode']} ({graph.stats['fallbacks']}) | {equal}/{args.rows} | "
            f"{dlogq:.1e} | {dalpha:.1e} | {kl:.4f} |"
        )
    import transformers

    now = datetime.datetime.now(datetime.timezone.utc)
    header = (
        f"### Every q* option through the captured step ({now:%Y-%m-%d %H:%M} UTC, "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}; toy pair float32, {args.rows} rows, "
        f"{args.new} new tokens, CUDA graph vs eager from one random state)"
    )
    command = f"- command: `python benchmarks/check_fast_options.py {' '.join(argv or sys.argv[1:])}`".rstrip()
    table = "\n".join([header, "", command, "", *rows]) + "\n"
    print(table)
    if not args.no_append:
        append_results(table)
    if failures:
        raise SystemExit(f"{failures} option set(s) did not reproduce the eager step in the captured one")


if __name__ == "__main__":
    main()
