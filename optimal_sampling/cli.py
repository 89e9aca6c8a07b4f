"""The `optimal-sampling` command line: `optimal-sampling generate` writes q* samples as a dataset.

Only the standard library is imported until sampling starts, so `--help` and argument
errors answer at once; torch and transformers load with the models.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import fields
from typing import Any

from .io import (
    PromptSet,
    ResumableWriter,
    UsageError,
    check_output_apart_from_prompts,
    load_rows,
    output_kind,
    template_fields,
)
from .options import QStarOptions
from .summary import format_summary

FAST_MODES = ("off", "auto", "eager", "cuda_graph", "compile_mixture", "compile")

DEFAULT_TOY_PROMPTS = 200

# What a user of this command does when a server does not answer (the library's own hint is for any caller).
SERVERS_HINT = (
    "Start the two servers on the shipped pair with `python tests/vllm_servers.py up` (from a checkout of "
    "optimal-sampling: ports 8000 and 8001; `--base DIR --teacher DIR` serves your pair), or fix --theta-url / --t-url."
)


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's default once, after its help, and only when there is one to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        # By identity: a default of 0 or 0.0 (`--seed`, `--alpha-min`, `--top-k`) equals False but is a value.
        hidden = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "%(default)" in text or action.required or hidden:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimal-sampling",
        description="Sample completions from q* ∝ π_θ^(1-α*) · π_t^α* and write them as a dataset.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("version", help="print the package version")

    gen = commands.add_parser(
        "generate",
        help="sample q* completions for a set of prompts and write a dataset",
        description=(
            "Sample one q* completion per prompt. With no model or prompt arguments it runs on the small "
            "model pair and the 2-digit addition task shipped with the package (offline). Rerunning the same "
            "command resumes an interrupted run."
        ),
        formatter_class=_HelpFormatter,
    )
    models = gen.add_argument_group("models")
    models.add_argument(
        "--base",
        help="base model π_θ: a local directory or Hub id (default: the shipped toy base); "
        "with --backend vllm, where its tokenizer is, if not in the server's model directory; "
        "with --backend vllm-inprocess, the base engine's model",
    )
    models.add_argument(
        "--teacher",
        help="teacher model π_t: a local directory or Hub id (default: the shipped toy "
        "teacher); with --backend vllm, where its tokenizer is",
    )
    models.add_argument(
        "--backend",
        choices=("transformers", "vllm", "vllm-inprocess"),
        default="transformers",
        help="in-process transformers (exact), two vLLM servers, or two vLLM engines in this "
        "process (both vLLM backends: top-k approximation, the same samples)",
    )
    models.add_argument("--theta-url", help="with --backend vllm: the base model's server, e.g. http://127.0.0.1:8000")
    models.add_argument("--t-url", help="with --backend vllm: the teacher's server, e.g. http://127.0.0.1:8001")
    models.add_argument(
        "--top-k-candidates",
        type=int,
        default=100,
        help="with --backend vllm / vllm-inprocess: log-probs each model contributes per token",
    )
    models.add_argument(
        "--vllm-engine-arg",
        action="append",
        metavar="KEY=VALUE",
        help="with --backend vllm-inprocess: an engine argument of both engines (`base.KEY=VALUE` or "
        "`teacher.KEY=VALUE` for one), e.g. dtype=bfloat16 or base.gpu_memory_utilization=0.4; "
        "repeat it for more (without GPU, the toy pair's CPU settings are the defaults)",
    )
    models.add_argument(
        "--device", default="auto", help="torch device for --backend transformers; auto: cuda if available, else cpu"
    )

    data = gen.add_argument_group("prompts")
    data.add_argument(
        "--prompts",
        help="a .jsonl, .json, .csv or .parquet file (one row per prompt, columns as "
        "`datasets` reads them), a .txt file (one prompt per line) or a directory "
        "saved with `save_to_disk` (default: held-out problems of the toy task)",
    )
    data.add_argument("--prompt-column", default="prompt", help="the column holding the prompt")
    data.add_argument(
        "--answer-column",
        default="answer",
        help="if every row has it, exact-match accuracy of the samples against it is reported",
    )
    data.add_argument(
        "--teacher-prompt-template",
        help="str.format template over the row's columns giving the teacher's prompt, e.g. "
        "'{prompt} (the answer is {answer})'; without it, the rows' `teacher_prompt` column if "
        "they have one, else the base prompt",
    )
    data.add_argument(
        "--limit", type=int, help=f"use the first N prompts (default: all; {DEFAULT_TOY_PROMPTS} for the toy task)"
    )

    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=16, help="most tokens generated per prompt")
    sampling.add_argument(
        "--fast",
        choices=FAST_MODES,
        default="off",
        help="with --backend transformers, the decode loop: 'off': transformers' own sampling loop; the "
        "others use the fast path (static KV caches, the same tokens under the same seed): 'eager': its step "
        "run from Python (CPU or GPU); 'cuda_graph': the step captured in one CUDA graph; 'compile_mixture': "
        "the α solve and mixing compiled with torch.compile, then captured; 'compile': the whole step "
        "compiled, then captured; 'auto': 'compile_mixture' on a GPU, 'eager' elsewhere (the GPU modes need "
        "CUDA and fall back to a simpler one when compiling or capturing fails)",
    )
    sampling.add_argument(
        "--batch-size", type=int, default=16, help="prompts sampled together; also the unit of resuming"
    )
    sampling.add_argument(
        "--seed", type=int, default=0, help="sampling seed: each batch is seeded from it and the batch's index"
    )

    add_q_star_arguments(gen.add_argument_group("q* options (QStarOptions)"))

    out = gen.add_argument_group("output")
    out.add_argument(
        "--output", required=True, help="a .jsonl or .parquet file, or a directory (datasets save_to_disk)"
    )
    out.add_argument("--overwrite", action="store_true", help="replace an existing output instead of resuming it")
    out.add_argument(
        "--compare",
        action="store_true",
        help="also sample base-only (α=0) and teacher-only (α=1) on the same prompts and report accuracies",
    )
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


_ARGUMENT_TYPES = {"str": str, "float": float, "int": int}


def add_q_star_arguments(group) -> None:
    """One `--option-name` per `QStarOptions` field, with its default, choices and help text:
    an option added to `QStarOptions` is on the command line with nothing else to edit."""
    for option in fields(QStarOptions):
        kind = _ARGUMENT_TYPES[str(option.type).split(" | ")[0]]
        group.add_argument(
            f"--{option.name.replace('_', '-')}",
            dest=option.name,
            type=kind,
            default=option.default,
            choices=option.metadata.get("choices"),
            help=option.metadata["help"],
        )


def q_star_from_args(args, **changes) -> QStarOptions:
    """The `QStarOptions` of the command line (with `changes`), or a usage error naming the problem."""
    try:
        return QStarOptions(**{f.name: getattr(args, f.name) for f in fields(QStarOptions)}).replace(**changes)
    except ValueError as error:
        raise UsageError(str(error)) from None


class Interrupted(Exception):
    """Ctrl-C during a run; the message says how many rows are safe."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command == "version":
        from . import __version__

        print(__version__)
        return 0
    try:
        return run_generate(args)
    except UsageError as error:
        print(f"optimal-sampling generate: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"optimal-sampling generate: {stop}; rerun to resume: {resume_command(argv)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(
            "optimal-sampling generate: interrupted before any row was written (nothing to resume); to start: "
            f"{resume_command(argv)}",
            file=sys.stderr,
        )
        return 130


def resume_command(argv: list[str]) -> str:
    """The command that continues an interrupted run (without --overwrite, which would start over).

    >>> resume_command(["generate", "--output", "my samples.jsonl", "--overwrite"])
    "optimal-sampling generate --output 'my samples.jsonl'"
    """
    return shlex.join(["optimal-sampling", *(a for a in argv if a != "--overwrite")])


# ---------------------------------------------------------------------------------------


def _check_args(args) -> None:
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}.")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UsageError("--batch-size and --max-new-tokens must be >= 1.")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        # (QStarOptions' own message points notebook users at an argmax, which this command has no option for.)
        raise UsageError(
            f"--temperature must be a positive number, got {args.temperature}: this command samples, so for "
            "nearly greedy samples give a small temperature such as 0.1."
        )
    q_star_from_args(args)
    if args.fast != "off" and args.backend != "transformers":
        raise UsageError(f"--fast is the transformers backend's decoder; drop it for --backend {args.backend}.")
    if args.backend == "vllm" and not (args.theta_url and args.t_url):
        raise UsageError("--backend vllm needs --theta-url and --t-url (the two servers' base URLs).")
    if args.vllm_engine_arg and args.backend != "vllm-inprocess":
        raise UsageError("--vllm-engine-arg sets the engines of --backend vllm-inprocess; add that option or drop it.")
    if args.teacher_prompt_template is not None:
        template_fields(args.teacher_prompt_template)
    output_kind(args.output)
    if args.prompts is not None:
        check_output_apart_from_prompts(args.prompts, args.output)


def _load_prompts(args) -> tuple[PromptSet, str]:
    if args.prompts is None:
        from .toy import make_problems

        rows = make_problems(args.limit or DEFAULT_TOY_PROMPTS, seed=args.seed, split="test")
        source = "toy:addition/test"
    else:
        rows = load_rows(args.prompts, prompt_column=args.prompt_column)
        rows, source = (rows[: args.limit] if args.limit else rows), args.prompts
    prompts = PromptSet.from_rows(rows, args.prompt_column, args.teacher_prompt_template)
    if not prompts.sample_rows():
        first = min(prompts.problems)
        raise UsageError(
            f"no row of {source!r} can be sampled (row {first}: {prompts.problems[first]}); "
            "check --prompt-column and --teacher-prompt-template."
        )
    if prompts.problems:
        shown = "; ".join(f"row {i}: {why}" for i, why in sorted(prompts.problems.items())[:3])
        more = f"; and {len(prompts.problems) - 3} more" if len(prompts.problems) > 3 else ""
        print(
            f"optimal-sampling generate: {len(prompts.problems)} of {len(rows)} rows cannot be sampled and are "
            f"written with `error` set ({shown}{more})",
            file=sys.stderr,
        )
    return prompts, source


# -- the models ---------------------------------------------------------------------------


def _resolve_models(args) -> dict:
    """Both models' sources, checked before anything is loaded (see `model_source`)."""
    from .model_source import resolve_model
    from .toy import BASE_DIR, TEACHER_DIR

    if args.backend == "vllm":  # --base / --teacher are only where the tokenizers are, and optional
        return {
            role: resolve_model(name, f"--{role}")
            for role, name in (("base", args.base), ("teacher", args.teacher))
            if name is not None
        }
    return {
        "base": resolve_model(args.base or str(BASE_DIR), "--base"),
        "teacher": resolve_model(args.teacher or str(TEACHER_DIR), "--teacher"),
    }


def _load_transformers_models(args, sources) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = {}
    for role, source in sources.items():
        try:
            kwargs = source.from_pretrained_kwargs()  # revision, or the file of a GGUF model
            tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                source.location, dtype=torch.float32 if device == "cpu" else "auto", **kwargs
            )
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UsageError(
                f"--{role} {getattr(args, role) or source.location!r} could not be loaded as a causal LM with its "
                f"tokenizer: {first_line}"
            ) from None
        loaded[role] = (model.to(device), tokenizer)
    return loaded


def _transformers_sampler(args, loaded, **overrides):
    from .generation import OptimalSampler

    try:
        return OptimalSampler(
            loaded["base"][0],
            loaded["teacher"][0],
            loaded["base"][1],
            q_star_from_args(args, **overrides),
            teacher_tokenizer=loaded["teacher"][1],
            fast=False if args.fast == "off" else args.fast,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None


def _vllm_fields(args, **overrides) -> dict:
    """The `CoordinatorConfig` / `DrivenDecodeConfig` fields the command line sets."""
    from .topk_decoding import topk_config_fields

    return dict(
        top_k=args.top_k_candidates,
        max_concurrency=max(args.batch_size, 1),
        seed=args.seed,
        **topk_config_fields(q_star_from_args(args, **overrides)),
    )


def _vllm_sampler(args, **overrides):
    """The two-server sampler; `--base` / `--teacher`, when given, are where the tokenizers are
    (by default the servers' model directories)."""
    from .servers import CoordinatorConfig, VLLMSampler
    from .servers.client import START_HINT, ServerUnavailableError

    try:
        config = CoordinatorConfig(
            theta_url=args.theta_url,
            t_url=args.t_url,
            theta_tokenizer=args.base,
            t_tokenizer=args.teacher,
            **_vllm_fields(args, **overrides),
        )
        return VLLMSampler(config, temperature=args.temperature)
    except ServerUnavailableError as error:
        raise UsageError(f"{str(error).replace(START_HINT, '').rstrip(' .')}. {SERVERS_HINT}") from None
    except (ValueError, RuntimeError, OSError) as error:  # tokenizer mismatch, k too large, bad answers
        raise UsageError(str(error)) from None


def _inprocess_sampler(args, sources):
    """The in-process engines: `--vllm-engine-arg KEY=VALUE` sets an engine argument of both
    engines, `base.KEY=VALUE` / `teacher.KEY=VALUE` one engine's (values are JSON when they parse)."""
    from .engines import DrivenDecodeConfig, InProcessVLLMSampler, VLLMEngineSpec
    from .engines.sync import engine_arguments

    try:
        specs = {}
        for role, source in sources.items():
            given = getattr(args, role)
            if source.gguf_file is not None:
                raise ValueError(
                    f"--{role} {given!r} is a GGUF file, which the in-process vLLM engines do not load here; save it "
                    "as a model directory first (AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)"
                    ".save_pretrained(out)), or use --backend transformers."
                )
            spec_fields = engine_arguments(args.vllm_engine_arg or [], role, default_cpu=given is None)
            if source.revision is not None:
                spec_fields.setdefault("engine_kwargs", {})["revision"] = source.revision
            specs[role] = VLLMEngineSpec(source.location, **spec_fields)
        return InProcessVLLMSampler(
            specs["base"], specs["teacher"], DrivenDecodeConfig(**_vllm_fields(args)), temperature=args.temperature
        )
    except (ValueError, TypeError, RuntimeError, OSError, ImportError) as error:
        raise UsageError(str(error)) from None


def _model_fingerprints(args, sources, sampler) -> dict[str, str]:
    """What identifies each model's weights: its files, or for a server whose model directory is
    not on this machine, the served model's name and URL."""
    if args.backend != "vllm":
        return {f"{role}_fingerprint": source.fingerprint for role, source in sources.items()}
    from .model_source import directory_fingerprint

    fingerprints = {}
    for role, served in sampler.served_models().items():
        root = served["root"]
        fingerprints[f"{role}_fingerprint"] = (
            directory_fingerprint(root) if root else f"{served['url']} {served['model']}"
        )
    return fingerprints


def _hide_library_progress_bars() -> None:
    """`--no-progress` hides every bar: transformers' weight-loading bars and huggingface_hub's download
    bars too, not only the sampling bar. transformers takes huggingface_hub's setting when it is imported;
    if it already was (a caller of `main`), it is told directly."""
    import huggingface_hub.utils

    huggingface_hub.utils.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


# -- sampling -----------------------------------------------------------------------------


def _batch_seed(seed: int, batch_index: int) -> int:
    return (seed * 1_000_003 + batch_index) % (2**63)


def _generate(sampler, prompts: PromptSet, rows: list[int], args, seed: int) -> dict[int, Any]:
    """Samples for `rows` (indices of sampleable rows), in one call; if that call raises, each
    row alone, so a prompt the sampler refuses marks only its own row."""
    from .records import GenerationOutput

    def call(indices, call_seed):
        return sampler.generate(
            [prompts.prompts[i] for i in indices],
            teacher_prompts=None if prompts.teacher_prompts is None else [prompts.teacher_prompts[i] for i in indices],
            max_new_tokens=args.max_new_tokens,
            batch_size=len(indices),
            seed=call_seed,
        )

    try:
        return dict(zip(rows, call(rows, seed)))
    except (ValueError, TypeError):
        outputs = {}
        for i in rows:
            try:
                [outputs[i]] = call([i], _batch_seed(seed, i))
            except (ValueError, TypeError) as error:
                outputs[i] = GenerationOutput(prompt=prompts.prompts[i], error=f"{type(error).__name__}: {error}")
        return outputs


def _sample_rows(sampler, prompts: PromptSet, args, indices, progress=None):
    """Run the sampler over `indices` batch by batch; yields each batch's output rows."""
    from .records import GenerationOutput

    for start in range(0, len(indices), args.batch_size):
        batch = indices[start : start + args.batch_size]
        sampled = [i for i in batch if i not in prompts.problems]
        outputs = (
            _generate(sampler, prompts, sampled, args, _batch_seed(args.seed, batch[0] // args.batch_size))
            if sampled
            else {}
        )
        records = []
        for i in batch:
            output = outputs.get(i) or GenerationOutput(prompt=prompts.prompts[i], error=prompts.problems[i])
            records.append(prompts.record(i, output.to_dict()))
        if progress is not None:
            progress.update(len(batch))
        yield records


def run_generate(args) -> int:
    _check_args(args)
    prompts, prompt_source = _load_prompts(args)
    writer = ResumableWriter(args.output, batch_size=args.batch_size, total=len(prompts.rows), overwrite=args.overwrite)
    if writer.created_directory is not None:
        print(
            f"optimal-sampling generate: created the directory {str(writer.created_directory)!r} for --output",
            file=sys.stderr,
        )
    if args.no_progress:
        _hide_library_progress_bars()
    sources = _resolve_models(args)
    sampler = _vllm_sampler(args) if args.backend == "vllm" else None
    settings = {
        "backend": args.backend,
        **_model_fingerprints(args, sources, sampler),
        "prompts_sha256": prompts.digest(),
        "prompt_column": args.prompt_column,
        "teacher_prompt_template": args.teacher_prompt_template,
        "num_prompts": len(prompts.rows),
        "max_new_tokens": args.max_new_tokens,
        **q_star_from_args(args).in_use(),  # only what the α rule uses: a changed unused option is no change
        "batch_size": args.batch_size,
        "seed": args.seed,
        **({"vllm_engine_args": args.vllm_engine_arg} if args.vllm_engine_arg else {}),
    }
    done = writer.start(settings)
    total = len(prompts.rows)
    progress = None
    try:
        if sampler is None and args.backend == "vllm-inprocess":
            sampler = _inprocess_sampler(args, sources)
        elif sampler is None:
            loaded = _load_transformers_models(args, sources)
            sampler = _transformers_sampler(args, loaded)
        todo = list(range(len(done), total))
        if done:
            print(f"resuming {args.output}: {len(done)} of {total} rows already written", file=sys.stderr)
        if not args.no_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=total, initial=len(done), desc="q* sampling", unit="sample")
        started = time.perf_counter()
        new_rows: list[dict[str, Any]] = []
        for records in _sample_rows(sampler, prompts, args, todo, progress):
            writer.append(records)
            new_rows.extend(records)
        elapsed = time.perf_counter() - started
        if progress is not None:
            progress.close()
        all_rows = done + new_rows
        writer.finish(all_rows)

        comparisons = {}
        if args.compare:
            for name, alpha in (("base only (α=0)", 0.0), ("teacher only (α=1)", 1.0)):
                solo_alpha = dict(alpha_method="fixed", alpha=alpha, kl_budget=None)
                if args.backend == "vllm-inprocess":  # the same engines, another α rule
                    solo = sampler.with_config(**solo_alpha)
                elif args.backend == "vllm":
                    solo = _vllm_sampler(args, **solo_alpha)
                else:
                    solo = _transformers_sampler(args, loaded, **solo_alpha)
                comparisons[name] = [
                    r for batch in _sample_rows(solo, prompts, args, list(range(total))) for r in batch
                ]
    except KeyboardInterrupt:
        if progress is not None:
            progress.close()
        saved = writer.rows_on_disk()
        if not saved:
            raise KeyboardInterrupt from None  # before any row was written: nothing is saved anywhere
        raise Interrupted(f"interrupted: {saved} of {total} rows are saved in {writer.journal}") from None
    finally:
        getattr(sampler, "close", lambda: None)()  # the vLLM backends hold connections or engines
    answers = [row.get(args.answer_column) for row in prompts.rows]
    print(format_summary(all_rows, new_rows, elapsed, answers, comparisons, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
