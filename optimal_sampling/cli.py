"""The `optimal-sampling` command line: `optimal-sampling generate` writes q* samples as a dataset."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

from .io import UsageError, ResumableWriter, load_rows, output_kind, teacher_prompts_from_template

DEFAULT_TOY_PROMPTS = 200


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimal-sampling",
        description="Sample completions from q* ∝ π_θ^(1-α*) · π_t^α* and write them as a dataset.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("version", help="print the package version")

    gen = commands.add_parser(
        "generate",
        help="sample q* completions for a set of prompts and write a dataset",
        description=(
            "Sample one q* completion per prompt. With no model or prompt arguments it runs on the small "
            "model pair and the 2-digit addition task shipped with the package (offline)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    models = gen.add_argument_group("models")
    models.add_argument("--base", help="base model π_θ: a local path or hub id (default: the shipped toy base)")
    models.add_argument("--teacher", help="teacher model π_t: a local path or hub id (default: the shipped toy teacher)")
    models.add_argument("--backend", choices=("transformers", "vllm", "vllm-inprocess"), default="transformers",
                        help="in-process transformers (exact), two vLLM servers, or two vLLM engines in this "
                             "process (both vLLM backends: top-k approximation, the same samples)")
    models.add_argument("--theta-url", help="with --backend vllm: the base model's server, e.g. http://127.0.0.1:8000")
    models.add_argument("--t-url", help="with --backend vllm: the teacher's server")
    models.add_argument("--top-k-candidates", type=int, default=100,
                        help="with --backend vllm / vllm-inprocess: log-probs per side")
    models.add_argument("--vllm-engine-arg", action="append", metavar="KEY=VALUE",
                        help="with --backend vllm-inprocess: an engine argument of both engines (`base.KEY=VALUE` or "
                             "`teacher.KEY=VALUE` for one), e.g. dtype=bfloat16 or base.gpu_memory_utilization=0.4; "
                             "repeat it for more")
    models.add_argument("--device", default="auto", help="torch device for --backend transformers (auto: cuda if available)")

    data = gen.add_argument_group("prompts")
    data.add_argument("--prompts", help="a .jsonl file, a text file (one prompt per line) or a saved `datasets` dir "
                                        "(default: held-out problems of the toy task)")
    data.add_argument("--prompt-column", default="prompt", help="the column holding the prompt")
    data.add_argument("--answer-column", default="answer",
                      help="if present, exact-match accuracy of the samples against it is reported")
    data.add_argument("--teacher-prompt-template",
                      help="str.format template over the row's columns giving the teacher's prompt, e.g. "
                           "'{prompt} (the answer is {answer})'; default: the row's `teacher_prompt` column if any, "
                           "else the base prompt")
    data.add_argument("--limit", type=int, help=f"use the first N prompts (toy default: {DEFAULT_TOY_PROMPTS})")

    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=16)
    sampling.add_argument("--temperature", type=float, default=1.0)
    sampling.add_argument("--alpha-method", default="kl_symmetry", choices=("kl_symmetry", "fixed", "entropy", "ess_balance"))
    sampling.add_argument("--alpha", type=float, help="the constant α for --alpha-method fixed")
    sampling.add_argument("--batch-size", type=int, default=16)
    sampling.add_argument("--seed", type=int, default=0)

    out = gen.add_argument_group("output")
    out.add_argument("--output", required=True, help="a .jsonl or .parquet file, or a directory (datasets save_to_disk)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output instead of resuming it")
    out.add_argument("--compare", action="store_true",
                     help="also sample base-only (α=0) and teacher-only (α=1) on the same prompts and report accuracies")
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        from . import __version__

        print(__version__)
        return 0
    if args.command != "generate":
        parser.print_help()
        return 0
    try:
        return run_generate(args)
    except UsageError as error:
        print(f"optimal-sampling generate: error: {error}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------


def _check_args(args) -> None:
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}.")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UsageError("--batch-size and --max-new-tokens must be >= 1.")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}.")
    if args.alpha_method == "fixed" and args.alpha is None:
        raise UsageError("--alpha-method fixed needs --alpha (a number in [0, 1]).")
    if args.backend == "vllm" and not (args.theta_url and args.t_url):
        raise UsageError("--backend vllm needs --theta-url and --t-url (the two servers' base URLs).")
    output_kind(args.output)


def _load_prompts(args) -> tuple[list[dict[str, Any]], str]:
    if args.prompts is None:
        from .toy import make_problems

        rows = make_problems(args.limit or DEFAULT_TOY_PROMPTS, seed=args.seed, split="test")
        return rows, "toy:addition/test"
    rows = load_rows(args.prompts, prompt_column=args.prompt_column)
    return (rows[: args.limit] if args.limit else rows), os.path.abspath(args.prompts)


def _teacher_prompts(args, rows) -> list[Any] | None:
    if args.teacher_prompt_template:
        return teacher_prompts_from_template(rows, args.teacher_prompt_template)
    if all("teacher_prompt" in row for row in rows):
        return [row["teacher_prompt"] for row in rows]
    return None


def _load_transformers_sampler(args, **overrides):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .generation import OptimalSampler
    from .toy import TOY_PAIR_DIR

    base_path = args.base or str(TOY_PAIR_DIR / "base")
    teacher_path = args.teacher or str(TOY_PAIR_DIR / "teacher")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = {}
    for role, path in (("base", base_path), ("teacher", teacher_path)):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if device == "cpu" else "auto")
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UsageError(f"--{role} {path!r} could not be loaded as a causal LM with its tokenizer: {first_line}") from None
        loaded[role] = (model.to(device), tokenizer)
    options = dict(alpha_method=args.alpha_method, alpha=args.alpha, temperature=args.temperature)
    options.update(overrides)
    try:
        return OptimalSampler(loaded["base"][0], loaded["teacher"][0], loaded["base"][1],
                              teacher_tokenizer=loaded["teacher"][1], **options)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _batch_seed(seed: int, batch_index: int) -> int:
    return (seed * 1_000_003 + batch_index) % (2**63)


def _sample_rows(sampler, rows, teacher_prompts, args, indices, progress=None):
    """Run the sampler over `indices` batch by batch; yields (batch rows as dicts)."""
    for start in range(0, len(indices), args.batch_size):
        batch = indices[start : start + args.batch_size]
        batch_index = batch[0] // args.batch_size
        outputs = sampler.generate(
            [rows[i][args.prompt_column] for i in batch],
            teacher_prompts=None if teacher_prompts is None else [teacher_prompts[i] for i in batch],
            max_new_tokens=args.max_new_tokens,
            batch_size=len(batch),
            seed=_batch_seed(args.seed, batch_index),
        )
        records = []
        for i, out in zip(batch, outputs):
            record = {"index": i, **out.to_dict()}
            if record["teacher_prompt"] is None:
                record["teacher_prompt"] = record["prompt"]
            records.append(record)
        if progress is not None:
            progress.update(len(batch))
        yield records


def run_generate(args) -> int:
    _check_args(args)
    rows, prompt_source = _load_prompts(args)
    teacher_prompts = _teacher_prompts(args, rows)
    settings = {
        "backend": args.backend,
        "base": args.base or "toy:base",
        "teacher": args.teacher or "toy:teacher",
        "theta_url": args.theta_url,
        "t_url": args.t_url,
        "prompts": prompt_source,
        "prompt_column": args.prompt_column,
        "teacher_prompt_template": args.teacher_prompt_template,
        "limit": args.limit,
        "num_prompts": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "alpha_method": args.alpha_method,
        "alpha": args.alpha,
        "batch_size": args.batch_size,
        "seed": args.seed,
        **({"vllm_engine_args": args.vllm_engine_arg} if args.vllm_engine_arg else {}),
    }
    writer = ResumableWriter(args.output, settings, batch_size=args.batch_size, total=len(rows), overwrite=args.overwrite)
    done = writer.start()
    if args.backend == "vllm":
        sampler = _load_vllm_sampler(args)
    elif args.backend == "vllm-inprocess":
        from .engines import InProcessVLLMSampler

        sampler = InProcessVLLMSampler.from_cli_args(args)
    else:
        sampler = _load_transformers_sampler(args)

    todo = list(range(len(done), len(rows)))
    if done:
        print(f"resuming {args.output}: {len(done)} of {len(rows)} rows already written", file=sys.stderr)
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(rows), initial=len(done), desc="q* sampling", unit="sample")
    started = time.perf_counter()
    new_rows: list[dict[str, Any]] = []
    for records in _sample_rows(sampler, rows, teacher_prompts, args, todo, progress):
        writer.append(records)
        new_rows.extend(records)
    elapsed = time.perf_counter() - started
    if progress is not None:
        progress.close()
    all_rows = done + new_rows
    writer.finish(all_rows)
    getattr(sampler, "close", lambda: None)()  # the vLLM backends hold connections or engines

    answers = [row.get(args.answer_column) for row in rows]
    comparisons = {}
    if args.compare:
        for name, alpha in (("base only (α=0)", 0.0), ("teacher only (α=1)", 1.0)):
            if args.backend != "transformers":
                print("--compare is only available with --backend transformers", file=sys.stderr)
                break
            solo = _load_transformers_sampler(args, alpha_method="fixed", alpha=alpha)
            solo_rows = [r for batch in _sample_rows(solo, rows, teacher_prompts, args, list(range(len(rows)))) for r in batch]
            comparisons[name] = solo_rows
    print(format_summary(all_rows, new_rows, elapsed, answers, comparisons, args.output))
    return 0


def _load_vllm_sampler(args):
    try:
        from .servers import VLLMSampler
    except ImportError:
        raise UsageError("--backend vllm is not available in this install (optimal_sampling.servers is missing).") from None
    return VLLMSampler.from_cli_args(args)


# -- the summary table --------------------------------------------------------------------


def _accuracy(rows, answers) -> float | None:
    if any(a is None for a in answers):
        return None
    from .toy import exact_match_reward

    by_index = {row["index"]: row for row in rows}
    texts = [by_index[i]["generated_text"] if i in by_index else "" for i in range(len(answers))]
    rewards = exact_match_reward(texts, [str(a) for a in answers])
    return sum(rewards) / len(rewards)


def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else float("nan")


def format_summary(all_rows, new_rows, elapsed, answers, comparisons, output) -> str:
    ok = [r for r in all_rows if not r.get("error")]
    tokens = sum(len(r["generated_tokens"]) for r in ok)
    new_tokens = sum(len(r["generated_tokens"]) for r in new_rows if not r.get("error"))
    alphas = [a for r in ok for a in r["alpha_history"]]
    mean_alpha = _mean(alphas)
    std_alpha = math.sqrt(_mean([(a - mean_alpha) ** 2 for a in alphas])) if alphas else float("nan")

    def diag(key):
        return _mean([r["diagnostics"].get(key) for r in ok if r.get("diagnostics")])

    lines = [
        "",
        f"| q* samples → {output} | |",
        "|---|---|",
        f"| samples (errors) | {len(all_rows)} ({len(all_rows) - len(ok)}) |",
        f"| generated tokens | {tokens} |",
        f"| tokens/s (this run) | {new_tokens / elapsed:.1f} |" if elapsed > 0 and new_rows else "| tokens/s (this run) | - |",
        f"| α mean ± std | {mean_alpha:.3f} ± {std_alpha:.3f} |",
        f"| KL(q‖π_θ) mean | {diag('kl_theta_mean'):.4f} |",
        f"| KL(q‖π_t) mean | {diag('kl_t_mean'):.4f} |",
        f"| KL difference mean | {diag('kl_diff_mean'):.2e} |",
        f"| ESS ratio mean | {diag('ess_ratio_mean'):.3f} |",
        f"| entropy of q mean | {diag('entropy_q_mean'):.3f} |",
    ]
    accuracy = _accuracy(all_rows, answers)
    if accuracy is not None:
        lines.append(f"| exact-match accuracy, q* | {accuracy:.3f} |")
        for name, rows in comparisons.items():
            lines.append(f"| exact-match accuracy, {name} | {_accuracy(rows, answers):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
