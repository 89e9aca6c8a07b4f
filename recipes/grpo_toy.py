#!/usr/bin/env python
"""The toy experiment: where do teacher-guided rollouts help GRPO, and how should they be weighted?

Runs on CPU with the model pair that ships with the package (a weak base and a strong teacher
on two-digit addition, `optimal_sampling.toy`). The protocol (regimes, arms, seeds, endpoints,
tests) is pre-registered in `recipes/PREREGISTRATION.md`; the results are in
`recipes/RESULTS.md`.

The metric is the policy's *exact* expected accuracy on held-out problems,
mean_x π_θ(answer + EOS | x) at temperature 1: one forward pass, no sampling noise. (Every
digit is its own token in the shipped tokenizer, so the canonical answer is the only short
way to write it; other accepted spellings, with leading spaces or zeros, have negligible
probability.)

Regimes:
- `ordinary`: training prompts from the whole training split; evaluation on 256 held-out problems.
- `hard`: training and evaluation only on problems whose exact base success is below 0.05
  (the teacher solves them); the ordinary held-out accuracy is tracked as the guard.

Commands::

    # one run
    python recipes/grpo_toy.py run --regime hard --arm mixed_qstar --seed 0 --output_dir outputs/toy
    # the whole grid (resumable: finished runs are skipped), N runs at a time
    python recipes/grpo_toy.py grid --regime hard ordinary --seeds 0-7 --workers 2 --output_dir outputs/toy
    # tables, paired tests and plots
    python recipes/grpo_toy.py analyze --output_dir outputs/toy --plot recipes/grpo_toy.png

Each run writes `<output_dir>/<regime>/<arm>-seed<seed>.json` (its settings, the accuracy
curves and the trainer's full `log_history`, every `optimal_sampling/*` metric included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REGIMES = ("ordinary", "hard")
HARD_THRESHOLD = 0.05  # exact base success below this makes a problem "hard"
G = 8  # completions per prompt

# Every arm: the trainer ("vanilla" = TRL's GRPOTrainer) and the OptimalSamplingGRPOConfig fields.
# Pre-registered in recipes/PREREGISTRATION.md; do not edit an arm after its runs exist. Each arm names
# its α rule (the q* arms ran with the KL-symmetric α, the trainer default of the time), so the table
# reproduces whatever the defaults become.
ARMS: dict[str, dict] = {
    "vanilla": {},
    "old_default": dict(  # the package default before issue 13: every row q*, token truncation at 3, group mean
        num_on_policy_generations=0,
        alpha_method="kl_symmetry",
        importance_weighting="token_truncate",
        advantage_baseline="group",
        allow_inconsistent_baseline=True,
    ),
    "qstar_none": dict(num_on_policy_generations=0, alpha_method="kl_symmetry", importance_weighting="none"),
    "mixed_qstar": dict(num_on_policy_generations=G // 2, alpha_method="kl_symmetry", importance_weighting="none"),
    "mixed_teacher": dict(
        num_on_policy_generations=G // 2, importance_weighting="none", alpha_method="fixed", alpha=1.0
    ),
    "luffy_teacher": dict(
        num_on_policy_generations=G - 1, importance_weighting="shaping", alpha_method="fixed", alpha=1.0
    ),
    "luffy_qstar": dict(num_on_policy_generations=G - 1, alpha_method="kl_symmetry", importance_weighting="shaping"),
    "anneal": dict(
        num_on_policy_generations=0, alpha_method="kl_symmetry", importance_weighting="none", teacher_decay_ratio=0.5
    ),
    "kl_budget": dict(
        num_on_policy_generations=G // 2, importance_weighting="none", alpha_method="kl_budget", kl_budget=0.1
    ),
    "mixed_qstar_is": dict(
        num_on_policy_generations=G // 2,
        alpha_method="kl_symmetry",
        importance_weighting="token_truncate",
        advantage_baseline="is",
    ),
    "mixed_qstar_shaping": dict(
        num_on_policy_generations=G // 2, alpha_method="kl_symmetry", importance_weighting="shaping"
    ),
    "mixed_anneal": dict(
        num_on_policy_generations=G // 2,
        alpha_method="kl_symmetry",
        importance_weighting="none",
        teacher_decay_ratio=0.5,
    ),
    "mixed_mis": dict(num_on_policy_generations=G // 2, alpha_method="kl_symmetry", importance_weighting="mis"),
}
ARM_LABELS = {
    "vanilla": "vanilla GRPO (TRL)",
    "old_default": "old default: all q*, token-truncated IS, group mean",
    "qstar_none": "all q*, no weights",
    "mixed_qstar": "4 on-policy + 4 q*, no weights",
    "mixed_teacher": "4 on-policy + 4 teacher, no weights",
    "luffy_teacher": "7 on-policy + 1 teacher, shaping",
    "luffy_qstar": "7 on-policy + 1 q*, shaping",
    "anneal": "all q*, α_max 1→0 over half the run",
    "kl_budget": "4 on-policy + 4 q* with KL(q‖π_θ) ≤ 0.1",
    "mixed_qstar_is": "4 on-policy + 4 q*, truncated IS, IS baseline",
    "mixed_qstar_shaping": "4 on-policy + 4 q*, shaping",
    "mixed_anneal": "4 on-policy + 4 q*, α_max 1→0 over half the run",
    "mixed_mis": "4 on-policy + 4 q*, multiple importance sampling",
}


# --- problems and the exact metric --------------------------------------------------------------


def answer_log_probs(
    model, tokenizer, problems: list[dict], batch_size: int = 512, key: str = "answer"
) -> torch.Tensor:
    """`[N]` log π(problem[key] + EOS | prompt) at temperature 1, float64 (default: the bare answer)."""
    eos = tokenizer.eos_token_id
    rows = [
        (
            tokenizer(p["prompt"], add_special_tokens=False)["input_ids"],
            tokenizer(p[key], add_special_tokens=False)["input_ids"] + [eos],
        )
        for p in problems
    ]
    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(p) + len(a) for p, a in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros_like(ids)
            target = torch.zeros_like(ids, dtype=torch.bool)
            for i, (p, a) in enumerate(chunk):  # right padding: every prompt starts at 0
                ids[i, : len(p) + len(a)] = torch.tensor(p + a)
                attention[i, : len(p) + len(a)] = 1
                target[i, len(p) : len(p) + len(a)] = True
            ids, attention, target = ids.to(model.device), attention.to(model.device), target.to(model.device)
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            out.append((logp * target[:, 1:]).sum(-1).double().cpu())
    model.train(was_training)
    return torch.cat(out)


def exact_accuracy(model, tokenizer, problems: list[dict]) -> float:
    """mean_x π(answer + EOS | x): the policy's expected exact-match accuracy at T = 1."""
    return float(answer_log_probs(model, tokenizer, problems).exp().mean())


def problem_sets(base, tokenizer) -> dict[str, list[dict]]:
    """Every training and held-out problem, split by the base's exact success."""
    from optimal_sampling.toy import all_pairs, format_prompt, format_teacher_prompt

    sets = {}
    for split in ("train", "test"):
        rows = [
            {
                "prompt": format_prompt(a, b),
                "teacher_prompt": format_teacher_prompt(format_prompt(a, b)),
                "answer": str(a + b),
            }
            for a, b in all_pairs(split)
        ]
        success = answer_log_probs(base, tokenizer, rows).exp()
        sets[f"{split}_all"] = rows
        sets[f"{split}_hard"] = [r for r, s in zip(rows, success.tolist()) if s < HARD_THRESHOLD]
    return sets


def training_rows(sets, regime: str, count: int, seed: int) -> list[dict]:
    """The seed's prompt order (the same for every arm of a seed)."""
    import random

    pool = sets["train_hard"] if regime == "hard" else sets["train_all"]
    rng = random.Random(f"grpo-toy-{regime}-{seed}")
    rows: list[dict] = []
    while len(rows) < count:
        order = pool[:]
        rng.shuffle(order)
        rows.extend(order[: count - len(rows)])
    return rows


def eval_sets(sets) -> dict[str, list[dict]]:
    import random

    ordinary = sets["test_all"][:]
    random.Random("grpo-toy-eval").shuffle(ordinary)
    return {"hard": sets["test_hard"], "ordinary": ordinary[:256]}


# --- one run ------------------------------------------------------------------------------------


def run_path(output_dir, regime: str, arm: str, seed: int) -> Path:
    return Path(output_dir) / regime / f"{arm}-seed{seed}.json"


def run(args) -> Path:
    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from optimal_sampling.toy import TEACHER_PROMPT_TEMPLATE, exact_match_reward, load_toy_pair
    from optimal_sampling.trainers import OptimalSamplingGRPOConfig, OptimalSamplingGRPOTrainer

    path = run_path(args.output_dir, args.regime, args.arm, args.seed)
    base, teacher, tokenizer = load_toy_pair()
    sets = problem_sets(base, tokenizer)
    evals = eval_sets(sets)
    dataset = Dataset.from_list(training_rows(sets, args.regime, args.steps * args.prompts_per_step, args.seed))
    common = dict(
        output_dir=str(path.with_suffix("")) + "-trainer",
        seed=args.seed,
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts_per_step * G,
        num_generations=G,
        max_completion_length=5,
        temperature=1.0,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        beta=0.0,
        shuffle_dataset=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        log_completions=False,
    )
    curve: list[dict] = []

    class ExactAccuracy(TrainerCallback):
        def _record(self, state, model):
            point = {"step": state.global_step}
            point.update({name: exact_accuracy(model, tokenizer, rows) for name, rows in evals.items()})
            curve.append(point)
            print(
                f"[eval] {args.regime}/{args.arm} seed {args.seed} step {point['step']}: "
                f"hard {point['hard']:.3f} ordinary {point['ordinary']:.3f}",
                file=sys.stderr,
                flush=True,
            )

        def on_train_begin(self, args_, state, control, model=None, **kwargs):
            self._record(state, model)

        def on_step_end(self, args_, state, control, model=None, **kwargs):
            if state.global_step % args.eval_every == 0:
                self._record(state, model)

    if args.arm == "vanilla":
        trainer = GRPOTrainer(
            base,
            reward_funcs=exact_match_reward,
            args=GRPOConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[ExactAccuracy()],
        )
    else:
        config = OptimalSamplingGRPOConfig(**common, **ARMS[args.arm], teacher_prompt_template=TEACHER_PROMPT_TEMPLATE)
        trainer = OptimalSamplingGRPOTrainer(
            base,
            reward_funcs=exact_match_reward,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[ExactAccuracy()],
            teacher_model=teacher,
        )
    started = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints every log dict
        trainer.train()
    result = {
        "regime": args.regime,
        "arm": args.arm,
        "seed": args.seed,
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "config": ARMS[args.arm],
        "hard_train_problems": len(sets["train_hard"]),
        "hard_eval_problems": len(evals["hard"]),
        "seconds": round(time.time() - started, 1),
        "eval": curve,
        "log_history": trainer.state.log_history,
        "versions": _versions(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(result))
    partial.replace(path)  # a run's file exists only once the run is complete
    print(f"wrote {path} ({result['seconds']} s)")
    return path


def _versions() -> dict[str, str]:
    import platform

    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "machine": platform.machine(),
        "node": platform.node(),
    }


# --- the grid -------------------------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds.extend(range(int(low), int(high or low) + 1))
    return seeds


def grid(args) -> None:
    """Every (regime, arm, seed) run that has no result file yet, `--workers` at a time."""
    arms = list(ARMS) if args.arms == ["all"] else args.arms
    jobs = [(regime, arm, seed) for regime in args.regime for seed in parse_seeds(args.seeds) for arm in arms]
    run_grid(
        __file__,
        jobs,
        args,
        lambda result: f"final {result['regime']} accuracy {result['eval'][-1][result['regime']]:.3f}",
    )


def run_grid(script: str, jobs: list[tuple[str, str, int]], args, summarize) -> None:
    """`script run --regime R --arm A --seed S ...` for every (R, A, S) job without a result file, in
    single-threaded subprocesses (`run_jobs`). Shared by the toy recipes."""

    def command(job):
        regime, arm, seed = job
        return [sys.executable, script, "run", "--regime", regime, "--arm", arm, "--seed", str(seed)] + [
            *("--output_dir", args.output_dir, "--steps", str(args.steps), "--eval_every", str(args.eval_every))
        ]

    run_jobs(
        jobs,
        command=command,
        result_path=lambda job: run_path(args.output_dir, *job),
        log_dir=Path(args.output_dir) / "logs",
        workers=args.workers,
        summarize=summarize,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )


def run_jobs(
    jobs: list[tuple],
    *,
    command,
    result_path,
    log_dir: Path,
    workers: int,
    summarize,
    env=None,
    crowded=None,
    deadline: float | None = None,
    expected_seconds=None,
    poll: float = 1.0,
) -> None:
    """Run `command(job)` for every job (a tuple ending in its seed) whose `result_path(job)` does not exist,
    `workers` subprocesses at a time, each logging to `log_dir`; print one line per finished run
    (`summarize(result)` of its result file) and exit non-zero if any run failed. Shared by every recipe's grid.

    `crowded(log_text)` says whether a failed run failed for want of a shared resource (the GPU's memory): such
    a run, if others ran beside it, goes back to the front of the queue, and from then on at most as many runs
    go at once as ran beside it, so a grid started with too many workers for its GPU still finishes every run.

    `deadline` (a `time.time()` value) with `expected_seconds(job)`: a run starts only when it is expected to
    finish by then; a free worker takes the first queued run that fits, so short runs fill the time that a long
    one would not. Runs that fit nowhere are left undone and named (a later grid runs them), not failed."""
    todo = [job for job in jobs if not result_path(job).exists()]
    print(
        f"{len(jobs) - len(todo)} of {len(jobs)} runs already done; running {len(todo)} with {workers} workers",
        flush=True,
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def log_of(job) -> Path:
        return log_dir / ("-".join(str(part) for part in job[:-1]) + f"-seed{job[-1]}.log")

    def name_of(job) -> str:
        return "/".join(str(part) for part in job[:-1]) + f" seed {job[-1]}"

    queue, running, tried = list(todo), {}, set()  # running: process -> [job, where its log starts, most beside]
    limit, done, failed = workers, 0, 0

    def fits(job) -> bool:
        return deadline is None or time.time() + expected_seconds(job) <= deadline

    while running or any(fits(job) for job in queue):
        while len(running) < limit and (job := next((job for job in queue if fits(job)), None)) is not None:
            queue.remove(job)
            with open(log_of(job), "a" if job in tried else "w") as log:  # a retry keeps the crowded try's log
                running[subprocess.Popen(command(job), stdout=log, stderr=subprocess.STDOUT, env=env)] = [
                    job,
                    log.tell(),
                    0,
                ]
            tried.add(job)
        for entry in running.values():
            entry[2] = max(entry[2], len(running) - 1)
        time.sleep(poll)
        for process in [p for p in running if p.poll() is not None]:
            job, start, beside = running.pop(process)
            code = process.returncode
            with open(log_of(job), errors="replace") as log:
                log.seek(start)
                this_try = log.read()
            if code != 0 and beside and crowded is not None and crowded(this_try):
                limit = min(limit, beside)
                queue.insert(0, job)
                print(
                    f"[{time.time() - started:.0f}s] {name_of(job)}: short of GPU memory beside {beside} other run(s);"
                    f" again, with at most {limit} at a time",
                    flush=True,
                )
                continue
            done += 1
            failed += code != 0
            if code == 0:
                summary = summarize(json.loads(result_path(job).read_text()))
            else:
                summary = f"FAILED (exit {code}), see {log_of(job)}"
            print(f"[{done}/{len(todo)} {time.time() - started:.0f}s] {name_of(job)}: {summary}", flush=True)
    if queue:
        print(
            f"[{time.time() - started:.0f}s] left for a later grid, as they would not finish by the deadline: "
            + ", ".join(f"{name_of(job)} (~{expected_seconds(job):.0f} s)" for job in queue),
            flush=True,
        )
    if failed:
        sys.exit(f"{failed} runs failed")


# --- analysis -------------------------------------------------------------------------------------


def load_runs(output_dir) -> dict[tuple[str, str], dict[int, dict]]:
    runs: dict[tuple[str, str], dict[int, dict]] = {}
    for path in sorted(Path(output_dir).glob("*/*-seed*.json")):
        r = json.loads(path.read_text())
        runs.setdefault((r["regime"], r["arm"]), {})[r["seed"]] = r
    return runs


def curve_of(run_result: dict, metric: str) -> tuple[list[int], list[float]]:
    return [e["step"] for e in run_result["eval"]], [e[metric] for e in run_result["eval"]]


def area_under_curve(steps: list[int], values: list[float]) -> float:
    """Trapezoid area divided by the span: the mean accuracy over training."""
    area = sum((s1 - s0) * (v0 + v1) / 2 for s0, s1, v0, v1 in zip(steps, steps[1:], values, values[1:]))
    return area / (steps[-1] - steps[0])


def steps_to_reach(steps: list[int], values: list[float], target: float) -> float:
    """First evaluated step whose accuracy reaches `target` (inf if never)."""
    return next((s for s, v in zip(steps, values) if v >= target), math.inf)


def endpoints(run_result: dict, metric: str) -> dict[str, float]:
    steps, values = curve_of(run_result, metric)
    return {"auc": area_under_curve(steps, values), "final": values[-1]}


def mean_of(history: list[dict], key: str) -> float:
    values = [h[key] for h in history if key in h]
    return sum(values) / len(values) if values else float("nan")


def paired_tests(differences: list[float]) -> dict[str, float]:
    """Paired t-test and Wilcoxon signed-rank test of mean difference 0, with a 95% t interval."""
    from scipy import stats

    n = len(differences)
    mean = sum(differences) / n
    sd = (sum((d - mean) ** 2 for d in differences) / (n - 1)) ** 0.5 if n > 1 else float("nan")
    half = stats.t.ppf(0.975, n - 1) * sd / n**0.5 if n > 1 else float("nan")
    t_p = float(stats.ttest_1samp(differences, 0.0).pvalue) if n > 1 and sd > 0 else float("nan")
    try:
        w_p = float(stats.wilcoxon(differences).pvalue)
    except ValueError:
        w_p = float("nan")
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "t_p": t_p, "wilcoxon_p": w_p}


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone)."""
    order = sorted(p_values, key=lambda k: p_values[k])
    m, running, adjusted = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[key]))
        adjusted[key] = running
    return adjusted


def analyze(args) -> str:
    runs = load_runs(args.output_dir)
    lines: list[str] = []
    for regime, metric in (("hard", "hard"), ("ordinary", "ordinary")):
        arms = [a for a in ARMS if (regime, a) in runs]
        if "vanilla" not in arms:
            continue
        vanilla = runs[(regime, "vanilla")]
        lines += [
            f"### Regime `{regime}`: exact held-out accuracy on the {metric} set",
            "",
            "| arm | seeds | start | final | AUC (mean over training) | steps to vanilla's final | "
            "rollout reward | policy reward (on-policy rows) | zero-variance groups | α mean | s/run |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for arm in arms:
            rs = runs[(regime, arm)]
            ends = [endpoints(r, metric) for r in rs.values()]
            reach = []
            for seed, r in rs.items():
                if seed in vanilla:
                    target = curve_of(vanilla[seed], metric)[1][-1]
                    reach.append(steps_to_reach(*curve_of(r, metric), target))
            finite = [x for x in reach if math.isfinite(x)]
            median = sorted(reach)[len(reach) // 2] if reach else math.nan
            reach_text = (
                "–"
                if not reach
                else (f"{median:.0f}" if math.isfinite(median) else "never") + f" ({len(finite)}/{len(reach)} reach)"
            )
            history = [h for r in rs.values() for h in r["log_history"]]
            start = sum(curve_of(r, metric)[1][0] for r in rs.values()) / len(rs)
            lines.append(
                f"| {ARM_LABELS[arm]} | {len(rs)} | {start:.3f} | {_mean_sd([e['final'] for e in ends])} | "
                f"{_mean_sd([e['auc'] for e in ends])} | {reach_text} | {_number(mean_of(history, 'reward'), 3)} | "
                f"{_number(mean_of(history, 'optimal_sampling/reward_on_policy'), 3)} | "
                f"{_number(mean_of(history, 'frac_reward_zero_std'), 2)} | "
                f"{_number(mean_of(history, 'optimal_sampling/alpha_mean'), 2)} | "
                f"{sum(r['seconds'] for r in rs.values()) / len(rs):.0f} |"
            )
        lines.append("")
        diagnostics = (
            "reward_qstar",
            "reward_on_policy",
            "reward_policy_is",
            "zero_std_frac_qstar",
            "zero_std_frac_on_policy",
            "policy_mass_truncated_token",
            "policy_mass_truncated_seq",
            "kl_theta",
            "sampling/importance_sampling_ratio/mean",
        )
        lines += [
            f"What the q* rows did ({regime} regime; means over every step and seed of the trainer's "
            "`optimal_sampling/*` metrics):",
            "",
            "| arm | " + " | ".join(diagnostics) + " |",
            "|---" * (len(diagnostics) + 1) + "|",
        ]
        for arm in arms:
            if arm == "vanilla":
                continue
            history = [h for r in runs[(regime, arm)].values() for h in r["log_history"]]
            lines.append(
                f"| {ARM_LABELS[arm]} | "
                + " | ".join(
                    _number(mean_of(history, d if "/" in d else "optimal_sampling/" + d), 3) for d in diagnostics
                )
                + " |"
            )
        lines.append("")
        for endpoint in ("auc", "final"):
            comparisons = {}
            for arm in arms:
                if arm == "vanilla":
                    continue
                seeds = sorted(set(runs[(regime, arm)]) & set(vanilla))
                comparisons[f"{arm} − vanilla"] = [
                    endpoints(runs[(regime, arm)][s], metric)[endpoint] - endpoints(vanilla[s], metric)[endpoint]
                    for s in seeds
                ]
            if ("mixed_qstar" in arms) and ("mixed_teacher" in arms):
                seeds = sorted(set(runs[(regime, "mixed_qstar")]) & set(runs[(regime, "mixed_teacher")]))
                comparisons["mixed_qstar − mixed_teacher"] = [
                    endpoints(runs[(regime, "mixed_qstar")][s], metric)[endpoint]
                    - endpoints(runs[(regime, "mixed_teacher")][s], metric)[endpoint]
                    for s in seeds
                ]
            tests = {name: paired_tests(d) for name, d in comparisons.items() if len(d) >= 2}
            adjusted = holm({name: t["t_p"] for name, t in tests.items() if not math.isnan(t["t_p"])})
            lines += [
                f"Paired differences of the {endpoint.upper()} ({regime} regime; t-test p Holm-adjusted over "
                f"{len(adjusted)} comparisons; Wilcoxon p unadjusted):",
                "",
                "| comparison | seeds | mean difference [95% CI] | t-test p | Holm p | Wilcoxon p |",
                "|---|---|---|---|---|---|",
            ]
            for name, t in tests.items():
                lines.append(
                    f"| {name} | {t['n']} | {t['mean']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}] | "
                    f"{t['t_p']:.3g} | {adjusted.get(name, float('nan')):.3g} | {t['wilcoxon_p']:.3g} |"
                )
            lines.append("")
        if regime == "hard":  # the guard: ordinary held-out accuracy tracked during hard-regime training
            lines += [
                "Guard, ordinary held-out accuracy at the end of hard-regime training (difference to vanilla):",
                "",
                "| arm | final ordinary accuracy | difference [95% CI] |",
                "|---|---|---|",
            ]
            for arm in arms:
                finals = {s: curve_of(r, "ordinary")[1][-1] for s, r in runs[(regime, arm)].items()}
                seeds = sorted(set(finals) & set(vanilla))
                d = paired_tests([finals[s] - curve_of(vanilla[s], "ordinary")[1][-1] for s in seeds])
                lines.append(
                    f"| {ARM_LABELS[arm]} | {_mean_sd(list(finals.values()))} | "
                    f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] |"
                )
            lines.append("")
    text = "\n".join(lines)
    print(text, flush=True)
    if args.plot:
        try:
            _plot(runs, args.plot)
        except ImportError:
            print("--plot needs matplotlib: pip install 'optimal-sampling[recipes]' (or pip install matplotlib)")
    return text


def _number(value: float, digits: int) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def _mean_sd(values: list[float]) -> str:
    n = len(values)
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


MAIN_ARMS = ("vanilla", "old_default", "qstar_none", "mixed_qstar", "mixed_teacher", "luffy_teacher")


def _plot(runs, path: str) -> None:
    """Top: accuracy curves of the main arms (mean ± sd over seeds). Bottom: every arm's paired
    difference to vanilla (mean over seeds with a 95% t band), old_default left out of scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    regimes = [r for r in ("hard", "ordinary") if (r, "vanilla") in runs]
    fig, axes = plt.subplots(2, len(regimes), figsize=(7.5 * len(regimes), 10), squeeze=False)
    colours = dict(zip(ARMS, plt.get_cmap("tab20").colors))
    for column, regime in enumerate(regimes):
        top, bottom = axes[0][column], axes[1][column]
        vanilla = runs[(regime, "vanilla")]
        for arm in ARMS:
            if (regime, arm) not in runs:
                continue
            seeds = sorted(runs[(regime, arm)])
            steps = curve_of(runs[(regime, arm)][seeds[0]], regime)[0]
            acc = torch.tensor([curve_of(runs[(regime, arm)][s], regime)[1] for s in seeds])
            if arm in MAIN_ARMS:
                mean, sd = acc.mean(0), acc.std(0) if len(seeds) > 1 else torch.zeros(acc.shape[1])
                top.plot(
                    steps, mean, label=ARM_LABELS[arm], color=colours[arm], linewidth=2.5 if arm == "vanilla" else 1.5
                )
                top.fill_between(steps, mean - sd, mean + sd, alpha=0.12, color=colours[arm])
            if arm in ("vanilla", "old_default"):
                continue
            paired = [s for s in seeds if s in vanilla]
            diff = acc[[seeds.index(s) for s in paired]] - torch.tensor(
                [curve_of(vanilla[s], regime)[1] for s in paired]
            )
            mean = diff.mean(0)
            half = stats.t.ppf(0.975, len(paired) - 1) * diff.std(0) / len(paired) ** 0.5
            style = "-" if arm.startswith("mixed") else "--"
            bottom.plot(steps, mean, style, label=ARM_LABELS[arm], color=colours[arm])
            bottom.fill_between(steps, mean - half, mean + half, alpha=0.08, color=colours[arm])
        bottom.axhline(0.0, color="black", linewidth=1)
        top.set(
            xlabel="optimizer step",
            ylabel="exact accuracy mean_x π_θ(answer | x)",
            title=f"{regime} regime: held-out {regime} problems (mean ± sd, {len(vanilla)} seeds)",
        )
        bottom.set(
            xlabel="optimizer step",
            ylabel="accuracy − vanilla's (same seed)",
            title=f"{regime} regime: paired difference to vanilla (mean, 95% band)",
        )
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    handles, labels = axes[1][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)


# --- command line -----------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--output_dir", default="outputs/toy", help="where runs are written (default: %(default)s)")
        p.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default: %(default)s)")
        p.add_argument("--eval_every", type=int, default=10, help="steps between evaluations (default: %(default)s)")

    one = commands.add_parser("run", help="one training run")
    common(one)
    one.add_argument("--regime", choices=REGIMES, required=True)
    one.add_argument("--arm", choices=list(ARMS), required=True)
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--prompts_per_step", type=int, default=8)
    one.add_argument("--learning_rate", type=float, default=3e-4)
    one.set_defaults(func=run)

    many = commands.add_parser("grid", help="every missing run of a grid, in parallel")
    common(many)
    many.add_argument("--regime", choices=REGIMES, nargs="+", default=list(REGIMES))
    many.add_argument("--arms", nargs="+", default=["all"], help="arm names, or 'all' (default)")
    many.add_argument("--seeds", default="0-7", help="e.g. 0-7 or 0,2,5 (default: %(default)s)")
    many.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="runs at a time (default: the CPUs)")
    many.set_defaults(func=grid)

    report = commands.add_parser("analyze", help="tables, paired tests and plots of the finished runs")
    report.add_argument("--output_dir", default="outputs/toy")
    report.add_argument("--plot", help="write the accuracy curves to this PNG")
    report.set_defaults(func=analyze)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
