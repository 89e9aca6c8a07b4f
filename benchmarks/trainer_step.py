"""One `OptimalSamplingGRPOTrainer` step against TRL's own `GRPOTrainer` step on a GPU, split into
sampling and the rest, on the same policy, prompts and lengths.

    python benchmarks/trainer_step.py [--batch 64] [--generations 8] [--prompt 128] [--new 256]
        [--steps 4] [--configs vanilla loop fast compiled] [--check] [--no-append]

Models: a Qwen2.5-0.5B-shaped policy and a Qwen2.5-1.5B-shaped teacher (3x the policy), random
bf16 weights, sharing a word-level tokenizer whose 151,936 tokens fill Qwen's output layer (built
here: no Hub), so the q* step works on a real vocabulary width. Random weights almost never
sample EOS, so every row makes `--new` tokens in every configuration. Each configuration
trains a fresh copy of the same policy with the same seed:

  vanilla  trl.GRPOTrainer (use_vllm=False: the policy's own `generate`)
  loop     OptimalSamplingGRPOTrainer, sampler_fast="off" (the decode engine's eager step, one
           Python-driven step per token)
  fast     OptimalSamplingGRPOTrainer, sampler_fast="cuda_graph" (static caches, one captured
           step per token)
  compiled OptimalSamplingGRPOTrainer, sampler_fast="compile_mixture" (the q* part of the step
           compiled with torch.compile, then the whole step captured)

The q* trainers run their defaults but with alpha_method="kl_symmetry" (half of each group
on-policy, half from the KL-symmetric q*). Reported: medians over the steps after the first
(which builds caches and captures graphs) of the step time, the sampling time
(`_generate_single_turn`) and the rest of the step, the sampling tokens/s, and ratios to
vanilla in the same run.

`--check` first trains the shipped toy pair in float32 on the GPU for two steps with
sampler_fast="off" and "cuda_graph" under one seed and compares their rollouts: the captured
step must keep drawing the eager loop's tokens after the optimizer updated the weights in place.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from generate_speed import QWEN25_05B, QWEN25_15B, append_results  # noqa: E402

DTYPE = torch.bfloat16


def word_tokenizer(size: int):
    """A word-level tokenizer with `size` tokens: <pad>, <eos>, <unk>, then t3 ... t{size-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


# `--smoke`: the same script on CPU with tiny models, to check it runs before spending GPU time.
SMOKE_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=512,
    tie_word_embeddings=True,
)


def build_pair(directory: Path, shapes) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = word_tokenizer(shapes[0]["vocab_size"])
    for name, shape, seed in (("policy", shapes[0], 0), ("teacher", shapes[1], 1)):
        torch.manual_seed(seed)
        config = Qwen2Config(**shape, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=None)
        Qwen2ForCausalLM(config).to(DTYPE).save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)


class StepTimer:
    """A TrainerCallback timing each optimizer step (CUDA-synchronised)."""

    def __init__(self):
        self.steps: list[float] = []
        self._start = 0.0

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_begin(self, *args, **kwargs):
        sync()
        self._start = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        sync()
        self.steps.append(time.perf_counter() - self._start)


def time_sampling(trainer) -> dict:
    """Wrap `_generate_single_turn` to time it and count the tokens it returns."""
    record = {"seconds": [], "tokens": []}
    original = trainer._generate_single_turn

    def timed(*args, **kwargs):
        sync()
        start = time.perf_counter()
        out = original(*args, **kwargs)
        sync()
        record["seconds"].append(time.perf_counter() - start)
        completions = out[0] if isinstance(out, tuple) else out
        record["tokens"].append(sum(len(c) for c in completions))
        return out

    trainer._generate_single_turn = timed
    return record


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_reward(completions, **kwargs):
    return [random.random() for _ in completions]


def run_config(name: str, pair: Path, args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from optimal_sampling.trainers import OptimalSamplingGRPOConfig, OptimalSamplingGRPOTrainer

    rng = random.Random(0)
    # (AutoTokenizer would pick Qwen2's tokenizer class from the model's config.json)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(pair / "policy")
    vocab = len(tokenizer)
    prompts = [
        " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(args.prompt))
        for _ in range(args.steps * args.batch // args.generations)
    ]
    dataset = Dataset.from_dict({"prompt": prompts})
    policy = AutoModelForCausalLM.from_pretrained(pair / "policy", dtype=DTYPE)
    common = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.batch,
        num_generations=args.generations,
        max_completion_length=args.new,
        max_steps=args.steps,
        learning_rate=1e-6,
        bf16=DTYPE == torch.bfloat16,
        use_cpu=args.smoke,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        shuffle_dataset=False,
    )
    random.seed(0)
    if name == "vanilla":
        trainer = GRPOTrainer(
            policy,
            reward_funcs=random_reward,
            args=GRPOConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    else:
        config = OptimalSamplingGRPOConfig(
            **common,
            teacher_model_name_or_path=str(pair / "teacher"),
            alpha_method="kl_symmetry",
            sampler_fast={
                "loop": "off",
                "fast": "eager" if args.smoke else "cuda_graph",
                "compiled": "eager" if args.smoke else "compile_mixture",
            }[name],
        )
        trainer = OptimalSamplingGRPOTrainer(
            policy,
            reward_funcs=random_reward,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            teacher_processing_class=tokenizer,
        )
    timer = StepTimer()
    trainer.add_callback(timer)
    sampling = time_sampling(trainer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    later = slice(1, None)  # the first step builds caches / captures graphs
    step = statistics.median(timer.steps[later])
    sample = statistics.median(sampling["seconds"][later])
    tokens = statistics.median(sampling["tokens"][later])
    result = dict(
        name=name,
        step=step,
        sample=sample,
        rest=step - sample,
        tokens=tokens,
        tok_s=tokens / sample,
        first_step=timer.steps[0],
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan"),
    )
    print(
        f"[trainer_step] {name}: step {step:.2f} s (first {timer.steps[0]:.1f} s), sampling {sample:.2f} s "
        f"({result['tok_s']:.0f} tok/s), rest {step - sample:.2f} s, peak {result['peak_gib']:.1f} GiB",
        flush=True,
    )
    del trainer, policy
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def check_against_eager_loop(fast_mode: str) -> list[str]:
    """The toy pair in float32: at every step of a fast-path training run, the same batch is also
    drawn by the eager loop from the same random state, and the two are compared.

    (Across steps the two samplers' random streams part: a captured step looks at the finished
    mask every 8 steps, so it may draw past the last row's end, which the eager loop does not.)
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimal_sampling.toy import TOY_PAIR_DIR, make_problems
    from optimal_sampling.trainers import OptimalSamplingGRPOConfig, OptimalSamplingGRPOTrainer

    rows = make_problems(32, seed=0)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "teacher_prompt": r["teacher_prompt"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(TOY_PAIR_DIR / "base")
    policy = AutoModelForCausalLM.from_pretrained(TOY_PAIR_DIR / "base", dtype=torch.float32)
    config = OptimalSamplingGRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=12,
        max_steps=3,
        learning_rate=1e-2,
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=3,
        teacher_model_name_or_path=str(TOY_PAIR_DIR / "teacher"),
        teacher_prompt_template="{teacher_prompt}",
        alpha_method="kl_symmetry",
        sampler_fast=fast_mode,
    )
    trainer = OptimalSamplingGRPOTrainer(
        policy,
        reward_funcs=lambda completions, **kw: [float(len(c) % 3) for c in completions],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    original, pairs = trainer._sample_optimal, []

    def both(prompt_ids):
        state = torch.random.get_rng_state(), (torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
        fast = original(prompt_ids)
        after = torch.random.get_rng_state(), (torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
        for restore, (cpu, cuda) in ((True, state), (False, after)):
            torch.random.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda)
            if restore:
                trainer.args.sampler_fast = "off"
                try:
                    loop = original(prompt_ids)
                finally:
                    trainer.args.sampler_fast = fast_mode
                trainer._pending_rollouts.pop()  # the batch trains on the fast rollouts
        pairs.append((loop, fast))
        return fast

    trainer._sample_optimal = both
    trainer.train()
    decoder = trainer._fast_decoders[fast_mode]
    lines = [
        f"fast-path mode used: {decoder.stats['mode']} (fallbacks {decoder.stats['fallbacks']}, "
        f"{decoder.stats['calls']} calls)"
    ]
    for step, (a, b) in enumerate(pairs):
        same = sum(x == y for x, y in zip(a.completion_ids, b.completion_ids))
        gap = max((abs(u - v) for ra, rb in zip(a.logq, b.logq) for u, v in zip(ra, rb)), default=0.0)
        lines.append(
            f"step {step}: {same}/{len(a.completion_ids)} rows with identical tokens (eager loop vs fast path "
            f"from one random state), max |log q diff| {gap:.2e} on the common prefix"
        )
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--configs", nargs="+", default=["vanilla", "loop", "fast"], choices=["vanilla", "loop", "fast", "compiled"]
    )
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny float32 models on CPU (the fast config runs eager)")
    args = parser.parse_args(argv)
    global DTYPE
    if args.smoke:
        DTYPE = torch.float32
        args.no_append = True
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/trainer_step.py needs a CUDA GPU (or --smoke).")
    import transformers
    import trl

    check = check_against_eager_loop("eager" if args.smoke else "cuda_graph") if args.check else []
    for line in check:
        print("[trainer_step] check:", line, flush=True)
    pair = Path(tempfile.mkdtemp(prefix="trainer-step-pair-"))
    build_pair(pair, (SMOKE_SHAPE, SMOKE_SHAPE) if args.smoke else (QWEN25_05B, QWEN25_15B))
    results = [run_config(name, pair, args) for name in args.configs]
    base = next((r for r in results if r["name"] == "vanilla"), None)

    def ratio(value, ref):
        return f" ({value / ref:.2f}x)" if ref else ""

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke)"
    header = (
        f"### Trainer step, q* vs vanilla GRPO ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{device}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, Python {platform.python_version()}; Qwen2.5-0.5B-shaped policy, 1.5B-shaped "
        f"teacher, random bf16, vocabulary 151,936; {args.batch} rows ({args.generations} per prompt), prompt "
        f"{args.prompt}, {args.new} new tokens; medians of steps 2-{args.steps})"
    )
    lines = [
        header,
        "",
        f"- command: `python benchmarks/trainer_step.py {' '.join(argv or sys.argv[1:])}`".rstrip(),
        "",
    ]
    lines += [f"- check: {line}" for line in check]
    lines += [
        "",
        "| configuration | step s | sampling s | rest of step s | sampling tok/s | first step s | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['step']:.2f}{ratio(r['step'], base and base['step'])} | {r['sample']:.2f} | "
            f"{r['rest']:.2f} | {r['tok_s']:.0f}{ratio(r['tok_s'], base and base['tok_s'])} | "
            f"{r['first_step']:.1f} | {r['peak_gib']:.1f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_append:
        append_results(table)


if __name__ == "__main__":
    main()
