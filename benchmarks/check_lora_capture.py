"""A LoRA policy through the fast path's captured step on a GPU: the CUDA graph must draw the eager
step's tokens with the same records, keep doing so after the optimizer updates the adapter in place,
and be recaptured when the adapter itself changes.

    python benchmarks/check_lora_capture.py [--rows 32] [--new 24] [--skip-trainer] [--no-append]

On CPU the tests check a LoRA policy through every front eagerly (tests/test_peft.py); a captured
step can only be checked on a GPU. The shipped toy pair (float32) with a random LoRA adapter on every
linear layer of the policy (`init_lora_weights=False`, so it changes the policy from the first token):

  1. for `cuda_graph` and `compile_mixture`: the captured decoder against the eager one, from one
     random state (no batch padding): the mode that ran, rows with equal tokens, max |Δ log q|;
  2. the captured records against a full recomputation without a cache (policy with its adapter);
  3. an AdamW step on the adapter, in place: the same captured decoder (no recapture) against the
     eager one;
  4. the adapter disabled (`with policy.disable_adapter()`): the decoder recaptures once and matches
     the eager decode without the adapter;
  5. (needs trl and datasets) `OptimalSamplingGRPOTrainer` with `peft_config=LoraConfig(...)` and
     `sampler_fast="auto"`: the trainer's rollouts come from the captured step, and at each of three
     steps the same batch drawn by the eager step from the same random state has the same tokens;
     only the adapter's weights change.

Any failed check exits non-zero. Prints a table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from generate_speed import append_results  # noqa: E402

from optimal_sampling import compute_mixture, log_probs_from_logits  # noqa: E402
from optimal_sampling.fast import FastDecoder, FastPathConfig  # noqa: E402
from optimal_sampling.teacher import position_ids_from_mask  # noqa: E402
from optimal_sampling.toy import load_toy_pair, make_problems  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(**overrides):
    from peft import LoraConfig

    options = dict(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    return LoraConfig(**{**options, **overrides})


def decode(decoder, ids, mask, args, pad, eos, seed=0):
    torch.manual_seed(seed)
    return decoder.generate(ids, mask, max_new_tokens=args.new, pad_token_id=pad, stop_token_ids=[eos])


def compare(captured, eager, prompt_width: int) -> tuple[int, float]:
    """Rows whose tokens agree on the positions both generated, and max |Δ log q| there."""
    width = min(captured.logq.shape[1], eager.logq.shape[1])
    common = captured.token_mask[:, :width] & eager.token_mask[:, :width]
    tokens_c = captured.sequences[:, prompt_width:][:, :width]
    tokens_e = eager.sequences[:, prompt_width:][:, :width]
    equal = int(((tokens_c == tokens_e) | ~common).all(dim=1).sum())
    gap = float((captured.logq[:, :width] - eager.logq[:, :width]).abs()[common].max())
    return equal, gap


@torch.no_grad()
def recompute_gap(out, policy, teacher, ids, mask, vocab: int) -> float:
    """max |recorded log q − log q from full forwards without a cache| over the generated tokens."""
    generated = out.sequences[:, ids.shape[1] :]
    seq = torch.cat([ids, generated], 1)
    seq_mask = torch.cat([mask, torch.ones_like(generated)], 1)
    positions = position_ids_from_mask(seq_mask)
    base_logits = policy(seq, attention_mask=seq_mask, position_ids=positions).logits.float()
    teacher_logits = teacher(seq, attention_mask=seq_mask, position_ids=positions).logits.float()
    gap = 0.0
    for t in range(generated.shape[1]):
        step = compute_mixture(
            log_probs_from_logits(base_logits[:, ids.shape[1] - 1 + t], 1.0, vocab),
            log_probs_from_logits(teacher_logits[:, ids.shape[1] - 1 + t], 1.0, vocab),
        )
        logq = step.logq.gather(1, generated[:, t : t + 1].clamp(max=vocab - 1))[:, 0]
        rows = out.token_mask[:, t]
        if rows.any():
            gap = max(gap, float((logq - out.logq[:, t])[rows].abs().max()))
    return gap


def decoder_checks(args, rows: list[str]) -> int:
    from peft import get_peft_model

    base, teacher, tokenizer = load_toy_pair("cuda")
    torch.manual_seed(0)
    policy = get_peft_model(base, lora_config()).eval()
    prompts = [p["prompt"] for p in make_problems(args.rows, seed=0, split="test")]
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    ids, mask = enc["input_ids"].cuda(), enc["attention_mask"].cuda()
    pad, eos, vocab, width = tokenizer.pad_token_id, tokenizer.eos_token_id, len(tokenizer), ids.shape[1]
    failures = 0

    def report(check: str, mode: str, equal: int | str, gap: float, ok: bool, note: str = "") -> None:
        nonlocal failures
        failures += not ok
        rows.append(f"| {check} | {mode} | {equal} | {gap:.1e} | {'ok' if ok else 'FAILED'} {note} |")
        print(f"[check_lora_capture] {check}: {mode}, {equal}, {gap:.2e} {'ok' if ok else 'FAILED'} {note}", flush=True)

    eager = FastDecoder(policy, teacher, FastPathConfig(mode="eager", bucket_batch=False, max_iter=8))
    reference = decode(eager, ids, mask, args, pad, eos)
    for mode in ("cuda_graph", "compile_mixture"):
        graph = FastDecoder(policy, teacher, FastPathConfig(mode=mode, bucket_batch=False))
        out = decode(graph, ids, mask, args, pad, eos)
        equal, gap = compare(out, reference, width)
        ran, fallbacks = graph.stats["mode"], graph.stats["fallbacks"]
        error = f"({graph.stats['errors'][0][:200]})" if graph.stats["errors"] else ""
        ok = ran == mode and fallbacks == 0 and equal == args.rows and gap < 1e-3
        report(
            f"1. LoRA policy, {mode} vs eager", f"{ran} ({fallbacks} fallbacks)", f"{equal}/{args.rows}", gap, ok, error
        )
        if mode == "cuda_graph":
            gap = recompute_gap(out, policy, teacher, ids, mask, vocab)
            report("2. captured log q vs full recomputation", ran, "-", gap, gap < 1e-3)
            captured = graph

    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    policy.train()
    labels = ids.masked_fill(mask == 0, -100)
    policy(ids, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    policy.eval()
    builds = captured.stats["builds"]
    out, reference = decode(captured, ids, mask, args, pad, eos), decode(eager, ids, mask, args, pad, eos)
    equal, gap = compare(out, reference, width)
    kept = captured.stats["builds"] == builds and captured.stats["recaptures"] == 0
    report(
        "3. after an in-place AdamW step on the adapter",
        f"{captured.stats['mode']} (recaptures {captured.stats['recaptures']})",
        f"{equal}/{args.rows}",
        gap,
        kept and equal == args.rows and gap < 1e-3,
    )

    with policy.disable_adapter():
        out, reference = decode(captured, ids, mask, args, pad, eos), decode(eager, ids, mask, args, pad, eos)
    equal, gap = compare(out, reference, width)
    report(
        "4. adapter disabled: recaptured",
        f"{captured.stats['mode']} (recaptures {captured.stats['recaptures']})",
        f"{equal}/{args.rows}",
        gap,
        captured.stats["recaptures"] == 1 and equal == args.rows and gap < 1e-3,
    )
    return failures


def trainer_check(args, rows: list[str]) -> int:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimal_sampling.toy import TOY_PAIR_DIR
    from optimal_sampling.trainers import OptimalSamplingGRPOConfig, OptimalSamplingGRPOTrainer

    problems = make_problems(32, seed=0)
    rewards = random.Random(0)  # the toy policy's completions often tie on any real reward
    dataset = Dataset.from_list([{"prompt": r["prompt"], "teacher_prompt": r["teacher_prompt"]} for r in problems])
    tokenizer = AutoTokenizer.from_pretrained(TOY_PAIR_DIR / "tokenizer")
    policy = AutoModelForCausalLM.from_pretrained(TOY_PAIR_DIR / "base", dtype=torch.float32)
    config = OptimalSamplingGRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=12,
        max_steps=3,
        learning_rate=1e-2,
        bf16=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=3,
        teacher_model_name_or_path=str(TOY_PAIR_DIR / "teacher"),
        teacher_prompt_template="{teacher_prompt}",
        alpha_method="kl_symmetry",
        sampler_fast="auto",
    )
    trainer = OptimalSamplingGRPOTrainer(
        policy,
        reward_funcs=lambda completions, **kw: [rewards.random() for _ in completions],  # varies within groups
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(init_lora_weights=True),
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    original, pairs = trainer._sample_optimal, []

    def both(prompt_ids):
        state = torch.random.get_rng_state(), torch.cuda.get_rng_state()
        fast = original(prompt_ids)
        after = torch.random.get_rng_state(), torch.cuda.get_rng_state()
        torch.random.set_rng_state(state[0])
        torch.cuda.set_rng_state(state[1])
        trainer.args.sampler_fast = "off"
        try:
            eager = original(prompt_ids)
        finally:
            trainer.args.sampler_fast = "auto"
        trainer._pending_rollouts.pop()  # the batch trains on the captured rollouts
        torch.random.set_rng_state(after[0])
        torch.cuda.set_rng_state(after[1])
        pairs.append((eager, fast))
        return fast

    trainer._sample_optimal = both
    trainer.train()
    decoder = trainer.__dict__.get("_fast_decoders", {}).get("cuda_graph")  # (made at the first captured rollout)
    mode = f"{decoder.stats['mode']} ({decoder.stats['fallbacks']} fallbacks)" if decoder else "none (eager)"
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    adapter_only = bool(changed) and all("lora_" in n for n in changed)
    failures = 0
    for step, (eager, fast) in enumerate(pairs):
        same = sum(a == b for a, b in zip(eager.completion_ids, fast.completion_ids))
        gap = max((abs(u - v) for ra, rb in zip(eager.logq, fast.logq) for u, v in zip(ra, rb)), default=0.0)
        ok = decoder is not None and decoder.stats["mode"] == "cuda_graph" and same == len(fast.completion_ids)
        ok &= gap < 1e-3 and adapter_only
        failures += not ok
        rows.append(
            f"| 5. GRPO + peft_config, step {step}: captured vs eager rollouts | {mode} | "
            f"{same}/{len(fast.completion_ids)} | {gap:.1e} | {'ok' if ok else 'FAILED'} "
            f"(changed: {len(changed)} tensors, adapter only: {adapter_only}) |"
        )
        print(rows[-1], flush=True)
    return failures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--new", type=int, default=24)
    parser.add_argument("--skip-trainer", action="store_true", help="without trl / datasets: checks 1-4 only")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/check_lora_capture.py needs a CUDA GPU.")
    rows = ["| check | mode | rows with equal tokens | max abs diff log q | result |", "|---|---|---|---|---|"]
    failures = decoder_checks(args, rows)
    if not args.skip_trainer:
        failures += trainer_check(args, rows)
    import peft
    import transformers

    now = datetime.datetime.now(datetime.timezone.utc)
    header = (
        f"### A LoRA policy through the captured step ({now:%Y-%m-%d %H:%M} UTC, {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"Python {platform.python_version()}; toy pair float32 + random LoRA r=8 on every linear layer, "
        f"{args.rows} rows, {args.new} new tokens)"
    )
    command = f"- command: `python benchmarks/check_lora_capture.py {' '.join(argv or sys.argv[1:])}`".rstrip()
    table = "\n".join([header, "", command, "", *rows]) + "\n"
    print(table)
    if not args.no_append:
        append_results(table)
    if failures:
        raise SystemExit(f"{failures} LoRA capture check(s) failed")


if __name__ == "__main__":
    main()
