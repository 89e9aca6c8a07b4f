#!/usr/bin/env python
"""Where does a teacher pay off? q* rollouts in GRPO and in TRL's DistillationTrainer, four regimes.

Runs on CPU with the shipped toy models (`optimal_sampling.toy`): one weak base (two-digit
addition, plain format) and three teachers of the same size and tokenizer. The protocol (regimes,
arms, seeds, endpoints, tests, the default rule) is pre-registered in
`recipes/PREREGISTRATION_TEACHER_PAYOFF.md`; the results are in `recipes/RESULTS.md`.

Regimes (the metric is exact: one forward pass per evaluation problem, no sampling noise):

- `hard`, `ordinary`: the issue-13 regimes (addition; the pair's own teacher), metric
  π_θ(answer + EOS | x) on the hard / ordinary held-out problems.
- `beyond`: subtraction, which the base never saw (exact success 0.000) and the `arithmetic` teacher
  solves; metric π_θ(answer + EOS | x) on 256 held-out subtraction problems.
- `style`: addition with the `scratchpad` teacher, which writes a 21-22-token worked solution
  before the sum; the reward is the completion's last number (either style scores), so teacher
  rows are far off-policy. Metric: π_θ(answer + EOS | x) + π_θ(worked solution + EOS | x), the
  exact probability of the two canonical correct writings (a lower bound of the reward's success).

Every run evaluates every metric (the guard of one regime is the metric of another) and counts
its cost: generated tokens, and token positions run through the policy's and the teacher's
backbone (prefill, decode and loss forwards, padding included).

Commands::

    python recipes/teacher_payoff.py run --regime beyond --arm qstar_distill --seed 0 --output_dir outputs/payoff
    python recipes/teacher_payoff.py grid --regime hard ordinary beyond style --seeds 0-7 --workers 2 --output_dir outputs/payoff
    python recipes/teacher_payoff.py analyze --output_dir outputs/payoff [--plot recipes/teacher_payoff.png]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_toy  # noqa: E402  (the issue-13 experiment: its problem sets, exact metric and statistics)

G = 8  # GRPO completions per prompt
ROLLOUTS_PER_STEP = 64  # every arm: 8 prompts x 8 completions (GRPO) or 64 prompts x 1 (distillation)
KL_BUDGET = 0.25  # ε of the TRB-style arms, nats per token (pre-registered)
EVAL_SIZE = 256

#: regime -> the teacher, the problems' operator, the reward, the completion cap and the primary metric.
REGIMES: dict[str, dict] = {
    "hard": dict(teacher="addition", op="+", reward="exact", tokens=5, metric="hard"),
    "ordinary": dict(teacher="addition", op="+", reward="exact", tokens=5, metric="ordinary"),
    "beyond": dict(teacher="arithmetic", op="-", reward="exact", tokens=5, metric="sub"),
    "style": dict(teacher="scratchpad", op="+", reward="final", tokens=24, metric="style"),
}

#: Every arm names its trainer and its α rule explicitly, so the table reproduces whatever the
#: package defaults become. Pre-registered; do not edit an arm after its confirmatory runs exist.
ARMS: dict[str, dict] = {
    "vanilla": dict(trainer="trl_grpo"),
    "distill": dict(trainer="trl_distill"),
    "mixed_teacher": dict(
        trainer="grpo", num_on_policy_generations=4, alpha_method="fixed", alpha=1.0, importance_weighting="none"
    ),
    "mixed_qstar": dict(
        trainer="grpo", num_on_policy_generations=4, alpha_method="kl_symmetry", importance_weighting="none"
    ),
    "trb_grpo": dict(
        trainer="grpo",
        num_on_policy_generations=0,
        alpha_method="kl_budget",
        kl_budget=KL_BUDGET,
        teacher_decay_ratio=0.5,
        importance_weighting="none",
    ),
    "luffy_teacher": dict(
        trainer="grpo", num_on_policy_generations=7, alpha_method="fixed", alpha=1.0, importance_weighting="shaping"
    ),
    "qstar_distill": dict(trainer="distill", alpha_method="kl_symmetry"),
    "trb_distill": dict(trainer="distill", alpha_method="kl_budget", kl_budget=KL_BUDGET, teacher_decay_ratio=0.5),
}
ARM_LABELS = {
    "vanilla": "vanilla GRPO (TRL GRPOTrainer)",
    "distill": "on-policy distillation (TRL DistillationTrainer, reverse KL)",
    "mixed_teacher": "GRPO 4 + 4 teacher rows (α = 1): the current default",
    "mixed_qstar": "GRPO 4 + 4 q* rows (KL symmetry)",
    "trb_grpo": f"GRPO 0 + 8 q*, KL(q‖π_θ) ≤ {KL_BUDGET} annealed to 0 (TRB-style)",
    "luffy_teacher": "GRPO 7 + 1 teacher rows, shaping (LUFFY-style)",
    "qstar_distill": "distillation on q* rollouts (KL symmetry)",
    "trb_distill": f"distillation on q*, KL(q‖π_θ) ≤ {KL_BUDGET} annealed to 0 (TRB)",
}


# --- problems and metrics ---------------------------------------------------------------------


def problem_sets(base, tokenizer) -> dict[str, list[dict]]:
    """Training pools per regime and the five evaluation sets every run measures."""
    from optimal_sampling.toy import all_pairs, format_prompt, format_teacher_prompt, worked_solution

    sets = grpo_toy.problem_sets(base, tokenizer)  # train/test x all/hard addition, by the base's exact success

    def rows(split, op):
        out = []
        for a, b in all_pairs(split, op):
            prompt = format_prompt(a, b, op)
            row = {"prompt": prompt, "teacher_prompt": format_teacher_prompt(prompt)}
            row["answer"] = str(a + b if op == "+" else a - b)
            if op == "+":
                row["worked"] = worked_solution(a, b)
            out.append(row)
        return out

    ordinary = rows("test", "+")
    random.Random("grpo-toy-eval").shuffle(ordinary)  # the issue-13 ordinary set, with worked solutions
    subtraction = rows("test", "-")
    random.Random("teacher-payoff-eval-sub").shuffle(subtraction)
    return {
        "train_hard": sets["train_hard"],
        "train_add": rows("train", "+"),
        "train_sub": rows("train", "-"),
        "eval_hard": sets["test_hard"],
        "eval_add": ordinary[:EVAL_SIZE],
        "eval_sub": subtraction[:EVAL_SIZE],
    }


def evaluate(model, tokenizer, sets) -> dict[str, float]:
    """Every metric at once: exact probabilities of correct continuations, averaged over problems."""
    p = lambda rows, key="answer": grpo_toy.answer_log_probs(model, tokenizer, rows, key=key).exp()  # noqa: E731
    plain, worked = p(sets["eval_add"]), p(sets["eval_add"], "worked")
    return {
        "hard": float(p(sets["eval_hard"]).mean()),
        "ordinary": float(plain.mean()),
        "sub": float(p(sets["eval_sub"]).mean()),
        "style": float((plain + worked).mean()),
        "worked": float(worked.mean()),
    }


def training_rows(sets, regime: str, count: int, seed: int) -> list[dict]:
    """The seed's prompt order for a regime (the same for every arm with the same number of rows)."""
    pool = {"hard": "train_hard", "beyond": "train_sub"}.get(regime, "train_add")
    rng = random.Random(f"teacher-payoff-{regime}-{seed}")
    rows: list[dict] = []
    while len(rows) < count:
        order = sets[pool][:]
        rng.shuffle(order)
        rows.extend(order[: count - len(rows)])
    return [{k: r[k] for k in ("prompt", "teacher_prompt", "answer")} for r in rows]


class ForwardTokens:
    """Counts the token positions a model's backbone processes (every forward: prefill, decode, loss)."""

    def __init__(self, model):
        self.count = 0
        self.paused = False  # the experiment's own evaluation forwards are not training cost
        backbone = getattr(model, "model", model)
        backbone.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.paused:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = ids.shape if ids is not None else embeds.shape[:2]
        self.count += int(shape[0] * shape[1])


# --- one run --------------------------------------------------------------------------------


run_path = grpo_toy.run_path  # <output_dir>/<regime>/<arm>-seed<seed>.json, as the grid expects


def run(args) -> Path:
    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer, GRPOConfig, GRPOTrainer

    from optimal_sampling.toy import exact_match_reward, final_answer_reward, load_toy_pair
    from optimal_sampling.trainers import (
        OptimalSamplingDistillationConfig,
        OptimalSamplingDistillationTrainer,
        OptimalSamplingGRPOConfig,
        OptimalSamplingGRPOTrainer,
    )

    regime, arm = REGIMES[args.regime], dict(ARMS[args.arm])
    kind = arm.pop("trainer")
    path = run_path(args.output_dir, args.regime, args.arm, args.seed)
    base, teacher, tokenizer = load_toy_pair(teacher=regime["teacher"])
    sets = problem_sets(base, tokenizer)
    distill = kind in ("trl_distill", "distill")
    prompts_per_step = ROLLOUTS_PER_STEP if distill else ROLLOUTS_PER_STEP // G
    dataset = Dataset.from_list(training_rows(sets, args.regime, args.steps * prompts_per_step, args.seed))
    reward = exact_match_reward if regime["reward"] == "exact" else final_answer_reward
    common = dict(
        output_dir=str(path.with_suffix("")) + "-trainer",
        seed=args.seed,
        max_steps=args.steps,
        per_device_train_batch_size=ROLLOUTS_PER_STEP,
        max_completion_length=regime["tokens"],
        temperature=1.0,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        log_completions=False,
    )
    grpo = dict(num_generations=G, beta=0.0, shuffle_dataset=False)
    distillation = dict(beta=1.0, shuffle_dataset=False, gradient_checkpointing=False)
    teacher_prompts = dict(teacher_prompt_template="{teacher_prompt}")
    counters = {"policy": ForwardTokens(base)}
    if kind != "trl_grpo":
        counters["teacher"] = ForwardTokens(teacher)
    curve: list[dict] = []
    generated = {"tokens": 0}

    class Evaluate(TrainerCallback):
        def _record(self, state, model):
            for counter in counters.values():
                counter.paused = True
            point = {"step": state.global_step, **evaluate(model, tokenizer, sets)}
            for counter in counters.values():
                counter.paused = False
            point["generated_tokens"] = generated["tokens"]
            point.update({f"{name}_forward_tokens": c.count for name, c in counters.items()})
            curve.append(point)
            print(
                f"[eval] {args.regime}/{args.arm} seed {args.seed} step {point['step']}: "
                f"{regime['metric']} {point[regime['metric']]:.3f}",
                file=sys.stderr,
                flush=True,
            )

        def on_train_begin(self, args_, state, control, model=None, **kwargs):
            self._record(state, model)

        def on_step_end(self, args_, state, control, model=None, **kwargs):
            if state.global_step % args.eval_every == 0:
                self._record(state, model)

    trainer_kwargs = dict(train_dataset=dataset, processing_class=tokenizer, callbacks=[Evaluate()])
    if kind == "trl_grpo":
        trainer = GRPOTrainer(base, reward_funcs=reward, args=GRPOConfig(**common, **grpo), **trainer_kwargs)
    elif kind == "grpo":
        config = OptimalSamplingGRPOConfig(**common, **grpo, **arm, **teacher_prompts)
        trainer = OptimalSamplingGRPOTrainer(
            base, reward_funcs=reward, args=config, teacher_model=teacher, **trainer_kwargs
        )
    elif kind == "trl_distill":
        trainer = DistillationTrainer(
            base, teacher_model=teacher, args=DistillationConfig(**common, **distillation), **trainer_kwargs
        )
    else:
        config = OptimalSamplingDistillationConfig(**common, **distillation, **arm, **teacher_prompts)
        trainer = OptimalSamplingDistillationTrainer(base, teacher_model=teacher, args=config, **trainer_kwargs)
    sample = trainer._generate_single_turn

    def counting(*a, **kw):  # every trainer's completions pass here: count what was generated
        out = sample(*a, **kw)
        ids = out[0] if isinstance(out, tuple) else out
        generated["tokens"] += sum(len(row) for row in ids)
        return out

    trainer._generate_single_turn = counting
    started = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints every log dict
        trainer.train()
    result = {
        "regime": args.regime,
        "arm": args.arm,
        "seed": args.seed,
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "config": ARMS[args.arm],
        "regime_config": regime,
        "eval_sizes": {name: len(rows) for name, rows in sets.items() if name.startswith("eval")},
        "seconds": round(time.time() - started, 1),
        "eval": curve,
        "log_history": trainer.state.log_history,
        "versions": grpo_toy._versions(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(result))
    partial.replace(path)  # a run's file exists only once the run is complete
    print(f"wrote {path} ({result['seconds']} s)")
    return path


# --- the grid ---------------------------------------------------------------------------------


def grid(args) -> None:
    """Every (regime, arm, seed) run without a result file, `--workers` at a time, slowest regimes first."""
    arms = list(ARMS) if args.arms == ["all"] else args.arms
    seeds = grpo_toy.parse_seeds(args.seeds)
    order = sorted(args.regime, key=lambda r: -REGIMES[r]["tokens"])  # long completions first: better packing
    jobs = [(regime, arm, seed) for seed in seeds for regime in order for arm in arms]

    def summarize(result: dict) -> str:
        metric = REGIMES[result["regime"]]["metric"]
        return f"final {metric} {result['eval'][-1][metric]:.3f} ({result['seconds']:.0f} s)"

    grpo_toy.run_grid(__file__, jobs, args, summarize)


# --- analysis -------------------------------------------------------------------------------

#: The pre-registered families (PREREGISTRATION_TEACHER_PAYOFF.md), each Holm-adjusted on its own.
FAMILY_A = [(arm, "vanilla") for arm in ARMS if arm != "vanilla"]  # x every regime: each arm vs vanilla GRPO
FAMILY_B = [("mixed_qstar", "mixed_teacher")]  # x every regime: the default rule
FAMILY_C = [("qstar_distill", "distill"), ("trb_distill", "distill")]  # x every regime: q* in distillation
NON_INFERIORITY = 0.01  # AUC margin of "at least as good"


def auc(result: dict, metric: str) -> float:
    steps, values = grpo_toy.curve_of(result, metric)
    return grpo_toy.area_under_curve(steps, values)


def auc_at_tokens(result: dict, metric: str, budget: float) -> float:
    """Mean accuracy over the first `budget` generated tokens (trapezoid, linear interpolation)."""
    tokens = [e["generated_tokens"] for e in result["eval"]]
    values = [e[metric] for e in result["eval"]]
    area, previous = 0.0, (tokens[0], values[0])
    for t, v in zip(tokens[1:], values[1:]):
        t0, v0 = previous
        if t0 >= budget:
            break
        if t > budget:  # cut the segment at the budget
            v = v0 + (v - v0) * (budget - t0) / (t - t0)
            t = budget
        area += (t - t0) * (v0 + v) / 2
        previous = (t, v)
    return area / budget


def compare(runs, regime: str, pairs, endpoint) -> dict[str, dict]:
    """Paired tests of `endpoint(run)` for each (arm, reference) pair present in `regime`."""
    tests = {}
    for arm, reference in pairs:
        a, b = runs.get((regime, arm), {}), runs.get((regime, reference), {})
        seeds = sorted(set(a) & set(b))
        if len(seeds) >= 2:
            tests[f"{regime}: {arm} − {reference}"] = grpo_toy.paired_tests(
                [endpoint(a[s]) - endpoint(b[s]) for s in seeds]
            )
    return tests


def family_table(title: str, tests: dict[str, dict]) -> list[str]:
    adjusted = grpo_toy.holm({name: t["t_p"] for name, t in tests.items() if not math.isnan(t["t_p"])})
    lines = [
        f"{title} (t-test p Holm-adjusted over the {len(adjusted)} comparisons of this table; Wilcoxon p unadjusted):",
        "",
        "| comparison | seeds | mean difference [95% CI] | t-test p | Holm p | Wilcoxon p |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in tests.items():
        t["holm"] = adjusted.get(name, float("nan"))
        lines.append(
            f"| {name} | {t['n']} | {t['mean']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}] | {t['t_p']:.3g} | "
            f"{t['holm']:.3g} | {t['wilcoxon_p']:.3g} |"
        )
    return lines + [""]


def default_decision(tests: dict[str, dict], regimes: list[str]) -> str:
    """The pre-registered rule: the blend becomes every trainer's default if it is non-inferior to teacher
    rows in every regime (95% CI lower bound > −margin) and Holm-significantly better in at least one."""
    rows = [tests.get(f"{r}: mixed_qstar − mixed_teacher") for r in regimes]
    if not rows or any(t is None for t in rows):
        return "undecided: the comparison is missing in some regime"
    non_inferior = all(t["low"] > -NON_INFERIORITY for t in rows)
    better = [r for r, t in zip(regimes, rows) if t["mean"] > 0 and t["holm"] < 0.05]
    verdict = "the KL-symmetric blend becomes the default" if non_inferior and better else "the default stays"
    return (
        f"non-inferior everywhere (margin {NON_INFERIORITY}): {non_inferior}; significantly better in: "
        f"{', '.join(better) or 'none'} → {verdict}"
    )


def analyze(args) -> str:
    runs = grpo_toy.load_runs(args.output_dir)
    regimes = [r for r in REGIMES if (r, "vanilla") in runs]
    lines: list[str] = []
    family_a, family_b, family_c, by_tokens = {}, {}, {}, {}
    for regime in regimes:
        metric = REGIMES[regime]["metric"]
        vanilla = runs[(regime, "vanilla")]
        arms = [a for a in ARMS if (regime, a) in runs]
        budget = min(r["eval"][-1]["generated_tokens"] for a in arms for r in runs[(regime, a)].values())
        lines += [
            f"### Regime `{regime}`: metric `{metric}` (teacher `{REGIMES[regime]['teacher']}`)",
            "",
            "| arm | seeds | start | final | AUC | AUC − vanilla [95% CI] | AUC at equal tokens | generated tokens "
            "| policy fwd tokens | teacher fwd tokens | α mean | s/run |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for arm in arms:
            rs = runs[(regime, arm)]
            finals = [r["eval"][-1][metric] for r in rs.values()]
            aucs = [auc(r, metric) for r in rs.values()]
            seeds = sorted(set(rs) & set(vanilla))
            diff = (
                grpo_toy.paired_tests([auc(rs[s], metric) - auc(vanilla[s], metric) for s in seeds])
                if arm != "vanilla" and len(seeds) >= 2
                else None
            )
            last = [r["eval"][-1] for r in rs.values()]
            history = [h for r in rs.values() for h in r["log_history"]]
            cell = lambda key: f"{sum(e.get(key, 0) for e in last) / len(last):,.0f}"  # noqa: E731
            lines.append(
                f"| {ARM_LABELS[arm]} | {len(rs)} | {rs[min(rs)]['eval'][0][metric]:.3f} | {grpo_toy._mean_sd(finals)} | "
                f"{grpo_toy._mean_sd(aucs)} | "
                + (f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]" if diff else "–")
                + f" | {grpo_toy._mean_sd([auc_at_tokens(r, metric, budget) for r in rs.values()])} | "
                f"{cell('generated_tokens')} | {cell('policy_forward_tokens')} | {cell('teacher_forward_tokens')} | "
                f"{grpo_toy._number(grpo_toy.mean_of(history, 'optimal_sampling/alpha_mean'), 2)} | "
                f"{sum(r['seconds'] for r in rs.values()) / len(rs):.0f} |"
            )
        lines += [
            "",
            f"AUC at equal tokens: the mean metric over the first {budget:,.0f} generated tokens (the fewest any run generated).",
            "",
        ]
        family_a.update(compare(runs, regime, FAMILY_A, lambda r, m=metric: auc(r, m)))
        family_b.update(compare(runs, regime, FAMILY_B, lambda r, m=metric: auc(r, m)))
        family_c.update(compare(runs, regime, FAMILY_C, lambda r, m=metric: auc(r, m)))
        by_tokens.update(compare(runs, regime, FAMILY_A, lambda r, m=metric, b=budget: auc_at_tokens(r, m, b)))
    lines += family_table("Family A, primary: AUC of each arm − vanilla GRPO's, per regime", family_a)
    lines += family_table("Family B, the default rule: AUC of 4 + 4 q* rows − 4 + 4 teacher rows", family_b)
    lines += ["Default rule: " + default_decision(family_b, regimes), ""]
    lines += family_table("Family C, q* in distillation: AUC − TRL's on-policy distillation", family_c)
    lines += family_table("Secondary, at equal generated tokens: AUC − vanilla GRPO's", by_tokens)
    text = "\n".join(lines)
    print(text, flush=True)
    if args.plot:
        try:
            _plot(runs, regimes, args.plot)
        except ImportError:
            print("--plot needs matplotlib: pip install 'optimal-sampling[recipes]' (or pip install matplotlib)")
    return text


def _plot(runs, regimes, path: str) -> None:
    """One panel per regime: each arm's metric over training (mean over seeds, ± sd band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 5), squeeze=False)
    colours = dict(zip(ARMS, plt.get_cmap("tab10").colors))
    for ax, regime in zip(axes[0], regimes):
        metric = REGIMES[regime]["metric"]
        for arm in ARMS:
            if (regime, arm) not in runs:
                continue
            rs = list(runs[(regime, arm)].values())
            steps = [e["step"] for e in rs[0]["eval"]]
            values = torch.tensor([[e[metric] for e in r["eval"]] for r in rs])
            mean = values.mean(0)
            sd = values.std(0) if len(rs) > 1 else torch.zeros_like(mean)
            style = "--" if ARMS[arm]["trainer"] in ("trl_distill", "distill") else "-"
            ax.plot(
                steps,
                mean,
                style,
                color=colours[arm],
                label=ARM_LABELS[arm],
                linewidth=2.5 if arm == "vanilla" else 1.5,
            )
            ax.fill_between(steps, mean - sd, mean + sd, color=colours[arm], alpha=0.1)
        ax.set(title=f"{regime}: {metric} (mean ± sd over seeds)", xlabel="optimizer step", ylabel="exact success")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --- command line -----------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--output_dir", default="outputs/payoff", help="where runs are written (default: %(default)s)")
        p.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default: %(default)s)")
        p.add_argument("--eval_every", type=int, default=10, help="steps between evaluations (default: %(default)s)")

    one = commands.add_parser("run", help="one training run")
    common(one)
    one.add_argument("--regime", choices=list(REGIMES), required=True)
    one.add_argument("--arm", choices=list(ARMS), required=True)
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--learning_rate", type=float, default=3e-4)
    one.set_defaults(func=run)

    many = commands.add_parser("grid", help="every missing run of a grid, in parallel")
    common(many)
    many.add_argument("--regime", choices=list(REGIMES), nargs="+", default=list(REGIMES))
    many.add_argument("--arms", nargs="+", default=["all"], help="arm names, or 'all' (default)")
    many.add_argument("--seeds", default="0-7", help="e.g. 0-7 or 0,2,5 (default: %(default)s)")
    many.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="runs at a time (default: the CPUs)")
    many.set_defaults(func=grid)

    report = commands.add_parser("analyze", help="tables, paired tests and the default rule of the finished runs")
    report.add_argument("--output_dir", default="outputs/payoff")
    report.add_argument("--plot", help="also write the curves to this PNG (needs matplotlib)")
    report.set_defaults(func=analyze)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
