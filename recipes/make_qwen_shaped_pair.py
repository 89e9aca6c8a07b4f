#!/usr/bin/env python
"""A Qwen2.5-0.5B-shaped policy and a 1.5B-shaped teacher with random bf16 weights, for running
`recipes/grpo.py` on a GPU where no Hub is reachable (speed and plumbing, not learning).

Both models share the shipped toy tokenizer (320 tokens; the models keep Qwen's 151,936-row output
layer, which the trainer slices to the tokenizer), and a prompt file of toy problems with a
`teacher_prompt` column is written beside them:

    python recipes/make_qwen_shaped_pair.py --out /tmp/pair
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/grpo.py \\
        --model_name_or_path /tmp/pair/policy --teacher_model_name_or_path /tmp/pair/teacher \\
        --teacher_prompt_template "{teacher_prompt}" --dataset_name /tmp/pair/problems.jsonl \\
        --reward_funcs optimal_sampling.toy.task:exact_match_reward --output_dir /tmp/run ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from generate_speed import QWEN25_05B, QWEN25_15B  # noqa: E402  (the shapes the GPU benchmarks use)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for policy/, teacher/ and problems.jsonl")
    parser.add_argument("--problems", type=int, default=2048, help="rows of the prompt file (default: %(default)s)")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from optimal_sampling.toy import TOKENIZER_DIR, make_problems

    out = Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    for name, shape, seed in (("policy", QWEN25_05B, 0), ("teacher", QWEN25_15B, 1)):
        torch.manual_seed(seed)
        config = Qwen2Config(**shape, max_position_embeddings=4096, **special)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters -> {out / name}")
    with open(out / "problems.jsonl", "w") as f:
        for row in make_problems(args.problems, seed=0):
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
