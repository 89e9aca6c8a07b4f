#!/usr/bin/env python
"""Build the toy model pair that ships with optimal-sampling (CPU, a few minutes).

Deterministic: fixed seeds, one CPU thread, ``torch.use_deterministic_algorithms``.
It

1. trains ONE byte-level BPE tokenizer (digits always split into single tokens) with
   the ``tokenizers`` library, with special tokens ``<|pad|> <|bos|> <|eos|> <|user|>
   <|assistant|>`` and a chat template, and saves it as ``PreTrainedTokenizerFast``;
2. trains two Llama models from scratch with the same architecture and vocabulary:
   - the *teacher*: all training pairs, in its own chat format
     (``<|user|>\\n12+34=\\n<|assistant|>\\n``) and in the base's plain format
     (``12+34=``), long enough to be strong (>= 90% exact match at temperature 1);
   - the *base*: the training pairs in the plain format only, stopped early (constant
     LR, 1000 steps) so it is weak (about 20-40% exact match at temperature 1);
   the loss covers only the answer tokens (the digits and EOS);
3. evaluates both on held-out problems (greedy and temperature-1 sampling) and
4. saves ``base/`` and ``teacher/`` (each with the tokenizer files next to the model,
   as vLLM needs) and ``tokenizer/`` into ``--output-dir`` (default: the package's
   ``optimal_sampling/toy/assets``), plus ``metrics.json``.

Run from the repository root::

    python recipes/train_toy_pair.py

Update ``optimal_sampling/toy/assets/TRAINING.md`` with the printed numbers.

The teachers of the teacher-payoff regimes (``recipes/teacher_payoff.py``) are trained the same
way on another task, with the shipped tokenizer, and saved beside the pair as
``teacher_<task>/`` (the base is not retrained)::

    python recipes/train_toy_pair.py --teacher-task arithmetic --teacher-steps 1200
    python recipes/train_toy_pair.py --teacher-task scratchpad

- ``arithmetic``: addition and subtraction (``57-23=`` -> ``34``), which the base never saw;
- ``scratchpad``: addition answered with a worked solution (``12+34=`` -> ``2+4=06 1+3+0=04 => 46``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from optimal_sampling.toy.task import (  # noqa: E402
    EOS_TEXT,
    TEACHER_PROMPT_TEMPLATE,
    all_pairs,
    exact_match_reward,
    final_answer_reward,
    format_prompt,
    format_teacher_prompt,
    make_problems,
    solve,
    worked_solution,
)

DEFAULT_OUTPUT_DIR = REPO_ROOT / "optimal_sampling" / "toy" / "assets"

# What each teacher is trained on: the operators of its problems, how it writes an answer, how
# an answer is graded, and how many tokens an answer takes at most.
TEACHER_TASKS = {
    "addition": dict(ops=("+",), answer=lambda a, b, op: str(solve(a, b, op)), reward=exact_match_reward, tokens=5),
    "arithmetic": dict(
        ops=("+", "-"), answer=lambda a, b, op: str(solve(a, b, op)), reward=exact_match_reward, tokens=5
    ),
    "scratchpad": dict(
        ops=("+",), answer=lambda a, b, op: worked_solution(a, b), reward=final_answer_reward, tokens=32
    ),
}

PAD, BOS, EOS, USER, ASSISTANT = "<|pad|>", "<|bos|>", EOS_TEXT, "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, USER, ASSISTANT]  # ids 0..4

# Renders exactly TEACHER_PROMPT_TEMPLATE for one user message + generation prompt;
# an assistant message renders as its content followed by EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n' }}"
    "{% else %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# A little general text so that the BPE learns some merges besides the task's.
_EXTRA_TEXT = """\
What is the sum of two numbers? Add the numbers and answer with the digits only.
Question: what is twelve plus thirty four? Answer: forty six.
The answer is the sum. Compute the sum of the two numbers below.
Please answer the question. The teacher knows the answer; the student is learning.
user assistant system question answer number numbers plus add sum equals the and
"""


# --------------------------------------------------------------------------- utils


def set_determinism(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on task text; digits are always single tokens."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus: list[str] = []
    for split in ("train", "test"):
        for a, b in all_pairs(split):
            prompt = format_prompt(a, b)
            corpus.append(prompt + str(a + b))
            corpus.append(format_teacher_prompt(prompt) + str(a + b) + EOS)
    corpus.extend(_EXTRA_TEXT.splitlines() * 20)
    tok.train_from_iterator(corpus, trainer=trainer)
    # No post-processor: encoding adds no BOS/EOS, with or without add_special_tokens.

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def patch_tokenizer_config(directory: Path) -> None:
    """Make tokenizer_config.json readable by vLLM and older transformers."""
    path = directory / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5 writes TokenizersBackend
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):  # transformers 4 expects a dict there; the list is the old key
        cfg["additional_special_tokens"] = extra
    cfg["chat_template"] = CHAT_TEMPLATE  # older readers look only here (also chat_template.jinja)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def make_config(tokenizer, args) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        head_dim=args.hidden_size // args.num_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def encode_examples(tokenizer, pairs, formats, op="+", answer=None):
    """(input_ids, labels) lists; labels are -100 on the prompt. `answer(a, b, op)` writes the
    continuation (default: the result's digits)."""
    answer = answer or (lambda a, b, op: str(solve(a, b, op)))
    examples = []
    for a, b in pairs:
        prompt = format_prompt(a, b, op)
        answer_ids = tokenizer.encode(answer(a, b, op), add_special_tokens=False) + [tokenizer.eos_token_id]
        for fmt in formats:
            text = prompt if fmt == "plain" else format_teacher_prompt(prompt)
            prompt_ids = tokenizer.encode(text, add_special_tokens=False)
            examples.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    return examples


def collate(batch, pad_id):
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):  # right padding for training
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return input_ids, mask, labels


def train_model(
    name,
    model,
    examples,
    *,
    steps,
    batch_size,
    lr,
    warmup,
    weight_decay,
    seed,
    pad_id,
    schedule="cosine",
    log_every=250,
    callback=None,
):
    """AdamW with linear warmup, then cosine decay to 5% (``"cosine"``) or a constant LR."""
    gen = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) * 0.95 + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    order = torch.randperm(len(examples), generator=gen).tolist()
    cursor = 0
    t0 = time.time()
    for step in range(steps):
        if cursor + batch_size > len(order):
            order = torch.randperm(len(examples), generator=gen).tolist()
            cursor = 0
        batch = [examples[i] for i in order[cursor : cursor + batch_size]]
        cursor += batch_size
        input_ids, mask, labels = collate(batch, pad_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step == 0 or step + 1 == steps:
            print(f"[{name}] step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        if callback is not None:
            callback(step + 1, model)
    model.eval()
    return time.time() - t0


@torch.no_grad()
def evaluate(
    model, tokenizer, rows, prompt_key, *, do_sample, seed, batch_size=500, reward=exact_match_reward, max_new_tokens=5
):
    """Accuracy under `reward` (default: exact match) with batched, left-padded model.generate."""
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    completions = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = tokenizer([r[prompt_key] for r in chunk], return_tensors="pt", padding=True)
        kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        completions.extend(tokenizer.batch_decode(new, skip_special_tokens=False))
    rewards = reward(completions, [r["answer"] for r in rows])
    return sum(rewards) / len(rewards)


def save_model(model, tokenizer, directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    patch_tokenizer_config(directory)


# ---------------------------------------------------------------------------- main


def _display(value):
    if isinstance(value, Path):
        try:
            return str(value.resolve().relative_to(REPO_ROOT))
        except ValueError:
            return str(value)
    return str(value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=320)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=384)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--teacher-steps", type=int, default=800, help="cosine schedule")
    p.add_argument(
        "--base-steps", type=int, default=1000, help="constant LR; stopping early is what keeps the base weak"
    )
    p.add_argument(
        "--base-train-pairs",
        type=int,
        default=None,
        help="size of the fixed subset of training pairs the base sees (default: all)",
    )
    p.add_argument("--eval-size", type=int, default=500, help="held-out problems per evaluation")
    p.add_argument("--only", choices=["base", "teacher"], default=None, help="train only one model (tuning)")
    p.add_argument(
        "--teacher-task",
        choices=sorted(TEACHER_TASKS),
        default="addition",
        help="the task of a teacher for the teacher-payoff regimes: trains only that teacher, with the tokenizer "
        "already in --output-dir, and saves it as teacher_<task>/ (default: addition, the shipped pair)",
    )
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.teacher_task != "addition":
        return train_task_teacher(args)
    t_start = time.time()
    set_determinism(args.seed)
    tokenizer = build_tokenizer(args.vocab_size)
    print(f"tokenizer: {len(tokenizer)} tokens; specials {tokenizer.all_special_tokens}")
    for text in ("12+34=", TEACHER_PROMPT_TEMPLATE.format(prompt="12+34=") + "46"):
        print(repr(text), "->", tokenizer.convert_ids_to_tokens(tokenizer.encode(text)))

    train_pairs = all_pairs("train")
    rng = random.Random(args.seed)
    base_pairs = rng.sample(train_pairs, args.base_train_pairs or len(train_pairs))
    heldout = make_problems(args.eval_size, seed=args.seed + 1, split="test")

    metrics = {
        "seed": args.seed,
        "eval_size": args.eval_size,
        "eval_split": "test",
        "eval_seed_rows": args.seed + 1,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "args": {k: _display(v) for k, v in vars(args).items()},
        "vocab_size": len(tokenizer),
    }
    models_out = {}
    for name in ("teacher", "base"):
        if args.only and args.only != name:
            continue
        torch.manual_seed(args.seed + (1 if name == "teacher" else 2))
        model = LlamaForCausalLM(make_config(tokenizer, args))
        n_params = sum(p.numel() for p in model.parameters())
        if name == "teacher":
            examples = encode_examples(tokenizer, train_pairs, ["chat", "plain"])
            steps, schedule, warmup = args.teacher_steps, "cosine", min(100, args.teacher_steps // 10)
        else:
            examples = encode_examples(tokenizer, base_pairs, ["plain"])
            steps, schedule, warmup = args.base_steps, "constant", 50
        print(f"[{name}] {n_params} parameters, {len(examples)} training sequences, {steps} steps")
        secs = train_model(
            name,
            model,
            examples,
            steps=steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup=warmup,
            weight_decay=0.01,
            seed=args.seed,
            pad_id=tokenizer.pad_token_id,
            schedule=schedule,
        )
        m = {
            "parameters": n_params,
            "train_sequences": len(examples),
            "steps": steps,
            "schedule": schedule,
            "train_seconds": round(secs, 1),
        }
        keys = ["prompt", "teacher_prompt"] if name == "teacher" else ["prompt"]
        for key in keys:
            fmt = "teacher_format" if key == "teacher_prompt" else "plain_format"
            m[f"{fmt}_greedy"] = evaluate(model, tokenizer, heldout, key, do_sample=False, seed=args.seed)
            m[f"{fmt}_temp1"] = evaluate(model, tokenizer, heldout, key, do_sample=True, seed=args.seed)
        print(
            f"[{name}] held-out accuracy (n={args.eval_size}): {json.dumps({k: v for k, v in m.items() if 'format' in k})}"
        )
        metrics[name] = m
        models_out[name] = model

    metrics["total_seconds"] = round(time.time() - t_start, 1)
    print(json.dumps(metrics, indent=2))
    if args.no_save or args.only:
        return metrics
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    for name, model in models_out.items():
        save_model(model, tokenizer, out / name)
    tok_dir = out / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tokenizer.save_pretrained(tok_dir)
    patch_tokenizer_config(tok_dir)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"saved to {out}")
    return metrics


def train_task_teacher(args):
    """Train the teacher of one teacher-payoff regime (`--teacher-task`) with the shipped tokenizer,
    evaluate it and the shipped base on the task's held-out problems, and save it as teacher_<task>/."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.time()
    set_determinism(args.seed)
    task = TEACHER_TASKS[args.teacher_task]
    out = args.output_dir
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)
    examples = []
    for op in task["ops"]:
        examples += encode_examples(tokenizer, all_pairs("train", op), ["chat", "plain"], op, task["answer"])
    torch.manual_seed(args.seed + 1)
    model = LlamaForCausalLM(make_config(tokenizer, args))
    steps = args.teacher_steps
    print(f"[teacher_{args.teacher_task}] {len(examples)} training sequences, {steps} steps", flush=True)
    seconds = train_model(
        f"teacher_{args.teacher_task}",
        model,
        examples,
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=min(100, steps // 10),
        weight_decay=0.01,
        seed=args.seed,
        pad_id=tokenizer.pad_token_id,
    )
    base = AutoModelForCausalLM.from_pretrained(str(out / "base"), local_files_only=True, dtype="float32").eval()
    metrics = {
        "seed": args.seed,
        "teacher_task": args.teacher_task,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "args": {k: _display(v) for k, v in vars(args).items()},
        "train_sequences": len(examples),
        "steps": steps,
        "train_seconds": round(seconds, 1),
    }
    for op in task["ops"]:
        rows = make_problems(args.eval_size, seed=args.seed + 1, split="test", op=op)
        grade = dict(reward=task["reward"], max_new_tokens=task["tokens"])
        for name, who, key in (
            ("teacher", model, "teacher_prompt"),
            ("teacher", model, "prompt"),
            ("base", base, "prompt"),
        ):
            fmt = "teacher_format" if key == "teacher_prompt" else "plain_format"
            for mode, sample in (("greedy", False), ("temp1", True)):
                value = evaluate(who, tokenizer, rows, key, do_sample=sample, seed=args.seed, **grade)
                metrics[f"{name}_{'add' if op == '+' else 'sub'}_{fmt}_{mode}"] = value
    metrics["total_seconds"] = round(time.time() - t_start, 1)
    print(json.dumps(metrics, indent=2))
    if not args.no_save:
        target = out / f"teacher_{args.teacher_task}"
        save_model(model, tokenizer, target)
        for shared in (out / "tokenizer").iterdir():  # byte for byte the pair's tokenizer files
            shutil.copyfile(shared, target / shared.name)
        (out / f"metrics_teacher_{args.teacher_task}.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"saved to {out / f'teacher_{args.teacher_task}'}")
    return metrics


if __name__ == "__main__":
    main()
