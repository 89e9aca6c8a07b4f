#!/usr/bin/env python
"""The toy experiment: does sampling from q* help GRPO, and does the importance correction matter?

Runs on CPU in minutes with the model pair that ships with the package (a weak base and a
strong teacher on two-digit addition, see `optimal_sampling.toy`). Three arms, same seeds,
same budget (steps × prompts × generations):

- `vanilla`: TRL's `GRPOTrainer`, rollouts from π_θ.
- `qstar`: `OptimalSamplingGRPOTrainer`, rollouts from q* (KL-symmetric α per token, the
  teacher sees its own chat prompt), per-token importance weights min(π_θ/q, 3).
- `teacher`: `OptimalSamplingGRPOTrainer` with α = 1 (teacher samples) and no importance
  correction: training on teacher samples as if they were on-policy.

Ablations of the q* arm: `qstar_nocap` (token weights not truncated: run it with
`--clip_max 1e4`), `qstar_seq` (sequence-level truncated weights, `sequence_truncate`) and
`qstar_nocorr` (q* samples, no correction).

Every `--eval_every` steps the policy π_θ itself is evaluated on held-out problems
(exact match, sampled at temperature 1 and greedy), so the curves compare the trained
policies, not the rollouts (whose reward depends on the sampler). One run::

    python recipes/grpo_toy.py --arm qstar --seed 0 --output_dir outputs/toy

The full experiment (3 arms × 3 seeds), then the table and plot::

    for seed in 0 1 2; do for arm in vanilla qstar teacher; do
        python recipes/grpo_toy.py --arm $arm --seed $seed --output_dir outputs/toy; done; done
    python recipes/grpo_toy.py --summarize outputs/toy --plot recipes/grpo_toy.png

Each run writes `<output_dir>/<arm>-seed<seed>.json` (arguments, evaluation curve and the
trainer's log history).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ARMS = ("vanilla", "qstar", "teacher", "qstar_nocap", "qstar_seq", "qstar_nocorr")
ARM_LABELS = {
    "vanilla": "vanilla GRPO (π_θ samples)",
    "qstar": "q*-GRPO + IS correction",
    "teacher": "teacher samples, no correction",
    # Ablations (not part of the three-arm comparison):
    "qstar_nocap": "q*-GRPO + untruncated token IS (ablation)",
    "qstar_seq": "q*-GRPO + sequence-level IS (ablation)",
    "qstar_nocorr": "q*-GRPO, no correction (ablation)",
}
SAMPLING = {  # OptimalSamplingGRPOConfig fields of each q* arm
    "qstar": dict(alpha_method="kl_symmetry"),
    "teacher": dict(alpha_method="fixed", alpha=1.0, vllm_importance_sampling_correction=False),
    "qstar_nocap": dict(alpha_method="kl_symmetry"),  # run with --clip_max 1e4
    "qstar_seq": dict(alpha_method="kl_symmetry", vllm_importance_sampling_mode="sequence_truncate"),
    "qstar_nocorr": dict(alpha_method="kl_symmetry", vllm_importance_sampling_correction=False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arm", choices=ARMS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/toy")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (one generation batch each)")
    p.add_argument("--prompts_per_step", type=int, default=8)
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--clip_max", type=float, default=3.0, help="IS truncation cap of the qstar arm")
    p.add_argument("--eval_every", type=int, default=10)
    p.add_argument("--eval_problems", type=int, default=256)
    p.add_argument("--summarize", metavar="DIR", nargs="+", help="aggregate the runs in DIR(s) into a Markdown table")
    p.add_argument("--plot", metavar="PNG", help="with --summarize: write the curves to this PNG")
    return p.parse_args(argv)


# --- evaluation -------------------------------------------------------------------------


@torch.no_grad()
def evaluate_policy(model, tokenizer, problems, *, do_sample: bool, seed: int = 1234) -> float:
    """Exact-match accuracy of the policy on its plain prompts (T = 1 sampling or greedy)."""
    from optimal_sampling.toy import exact_match_reward

    was_training = model.training
    model.eval()
    enc = tokenizer([p["prompt"] for p in problems], return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    # A private RNG stream: evaluating must not change the training run's samples.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            **enc, do_sample=do_sample, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=5,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=False)
    texts = [t.replace(tokenizer.pad_token, "") for t in texts]
    rewards = exact_match_reward(texts, [p["answer"] for p in problems])
    return sum(rewards) / len(rewards)


def make_eval_callback(tokenizer, problems, every: int, curve: list):
    from transformers import TrainerCallback

    class HeldOutAccuracy(TrainerCallback):
        def _record(self, state, model):
            curve.append(
                {
                    "step": state.global_step,
                    "sampled_accuracy": evaluate_policy(model, tokenizer, problems, do_sample=True),
                    "greedy_accuracy": evaluate_policy(model, tokenizer, problems, do_sample=False),
                }
            )
            print(f"[eval] step {curve[-1]['step']}: sampled {curve[-1]['sampled_accuracy']:.3f} "
                  f"greedy {curve[-1]['greedy_accuracy']:.3f}", flush=True)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._record(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0:
                self._record(state, model)

    return HeldOutAccuracy()


# --- one run ------------------------------------------------------------------------------


def run(args) -> Path:
    torch.set_num_threads(1)
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from optimal_sampling.toy import TEACHER_PROMPT_TEMPLATE, exact_match_reward, load_toy_pair, make_problems
    from trainers import OptimalSamplingGRPOConfig, OptimalSamplingGRPOTrainer

    base, teacher, tokenizer = load_toy_pair()
    train_rows = make_problems(args.steps * args.prompts_per_step, seed=args.seed, split="train")
    eval_rows = make_problems(args.eval_problems, seed=10_000, split="test")  # the same for every run
    dataset = Dataset.from_list(train_rows)
    common = dict(
        output_dir=str(Path(args.output_dir) / f"{args.arm}-seed{args.seed}-trainer"),
        seed=args.seed,
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        num_generations=args.num_generations,
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
    callbacks = [make_eval_callback(tokenizer, eval_rows, args.eval_every, curve)]
    if args.arm == "vanilla":
        trainer = GRPOTrainer(
            base, reward_funcs=exact_match_reward, args=GRPOConfig(**common), train_dataset=dataset,
            processing_class=tokenizer, callbacks=callbacks,
        )
    else:
        sampling = dict(SAMPLING[args.arm], vllm_importance_sampling_clip_max=args.clip_max)
        trainer = OptimalSamplingGRPOTrainer(
            base,
            reward_funcs=exact_match_reward,
            args=OptimalSamplingGRPOConfig(**common, **sampling, teacher_prompt_template=TEACHER_PROMPT_TEMPLATE),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            teacher_model=teacher,
        )
    started = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints every log dict; keep stdout for [eval]
        trainer.train()
    result = {
        "arm": args.arm,
        "seed": args.seed,
        "args": vars(args),
        "seconds": round(time.time() - started, 1),
        "eval": curve,
        "log_history": trainer.state.log_history,
    }
    path = Path(args.output_dir) / f"{args.arm}-seed{args.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path} ({result['seconds']} s)")
    return path


# --- summary --------------------------------------------------------------------------------


def _mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True)) if len(values) > 1 else 0.0


def _last_mean(values, n):
    tail = values[-n:]
    return sum(tail) / len(tail)


def summarize(directories: list[str], plot: str | None = None) -> str:
    runs = [json.loads(p.read_text()) for d in directories for p in sorted(Path(d).glob("*-seed*.json"))]
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in ARMS}
    lines = [
        "| arm | seeds | held-out accuracy at start (T=1) | at end (T=1) | last 5 evals (T=1) | at end (greedy) "
        "| mean rollout reward, last 20 steps | seconds / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, arm_runs in by_arm.items():
        if not arm_runs:
            continue
        start = _mean_std([r["eval"][0]["sampled_accuracy"] for r in arm_runs])
        end = _mean_std([r["eval"][-1]["sampled_accuracy"] for r in arm_runs])
        last5 = _mean_std([_last_mean([e["sampled_accuracy"] for e in r["eval"]], 5) for r in arm_runs])
        greedy = _mean_std([r["eval"][-1]["greedy_accuracy"] for r in arm_runs])
        rollout = _mean_std([_last_mean([h["reward"] for h in r["log_history"] if "reward" in h], 20) for r in arm_runs])
        seconds = _mean_std([r["seconds"] for r in arm_runs])[0]
        lines.append(
            f"| {ARM_LABELS[arm]} | {', '.join(str(r['seed']) for r in arm_runs)} | {start[0]:.3f} ± {start[1]:.3f} | "
            f"{end[0]:.3f} ± {end[1]:.3f} | {last5[0]:.3f} ± {last5[1]:.3f} | {greedy[0]:.3f} ± {greedy[1]:.3f} | {rollout[0]:.3f} ± {rollout[1]:.3f} | "
            f"{seconds:.0f} |"
        )
    table = "\n".join(lines)
    if plot:
        _plot(by_arm, plot)
    return table


def _plot(by_arm, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for arm, arm_runs in by_arm.items():
        if not arm_runs:
            continue
        steps = [e["step"] for e in arm_runs[0]["eval"]]
        acc = torch.tensor([[e["sampled_accuracy"] for e in r["eval"]] for r in arm_runs])
        mean, std = acc.mean(0), acc.std(0) if len(arm_runs) > 1 else torch.zeros(acc.shape[1])
        style = "--" if arm.startswith("qstar_") else "-"  # ablations dashed
        line, = axes[0].plot(steps, mean, style, label=ARM_LABELS[arm])
        axes[0].fill_between(steps, mean - std, mean + std, alpha=0.2, color=line.get_color())
        rewards = torch.tensor([[h["reward"] for h in r["log_history"] if "reward" in h] for r in arm_runs])
        kernel = 5
        smooth = torch.nn.functional.avg_pool1d(rewards[:, None], kernel, stride=1).squeeze(1)
        x = list(range(kernel, rewards.shape[1] + 1))
        axes[1].plot(x, smooth.mean(0), style, label=ARM_LABELS[arm], color=line.get_color())
    axes[0].set(xlabel="optimizer step", ylabel="exact match (T = 1)", title="policy π_θ on held-out problems")
    axes[1].set(xlabel="optimizer step", ylabel="mean reward of the rollouts", title="rollout reward (5-step mean)")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    cli = parse_args()
    if cli.summarize:
        print(summarize(cli.summarize, cli.plot))
    elif cli.arm is None:
        sys.exit("pass --arm (one run) or --summarize DIR")
    else:
        run(cli)
