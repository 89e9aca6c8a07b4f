#!/usr/bin/env python
"""GRPO with q* rollouts for any Hugging Face model pair, dataset and reward.

Of each prompt's `--num_generations` rollouts, `--num_on_policy_generations` come from the policy
and the rest from q* ∝ π_θ^(1-α) · π_t^α (by default the KL-symmetric blend; `--alpha_method fixed
--alpha 1.0` for plain teacher samples), weighted by `--importance_weighting` with the baseline
`--advantage_baseline` (README, "Training with TRL"). Every `OptimalSamplingGRPOConfig` /
`GRPOConfig` field is a command-line flag (or a key of a `--config` YAML file).

One GPU::

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/grpo.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --teacher_model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
        --dataset_name openai/gsm8k --dataset_config main --prompt_column question \\
        --reward_funcs my_rewards:gsm8k_exact_match --output_dir outputs/qwen-os-grpo

Several GPUs (DDP) or FSDP: swap in `multi_gpu.yaml` or `fsdp.yaml` (set `num_processes`).
On CPU (two processes, gloo): `multi_cpu.yaml` with `--use_cpu --bf16 false`.

Arguments of this script (the rest are the trainer's):

- `--model_name_or_path`: the policy π_θ (path or Hub id).
- `--dataset_name`: a Hub id, a directory saved with `save_to_disk`, or a `.json` / `.jsonl` /
  `.parquet` / `.csv` file; `--dataset_config`, `--dataset_split`, `--max_train_samples`.
- `--prompt_column`: the column holding the prompt (renamed to `prompt`).
- `--reward_funcs`: one or more `package.module:function` import paths (TRL reward signature,
  e.g. `optimal_sampling.toy.task:exact_match_reward` or `trl.rewards:accuracy_reward`), or
  paths / Hub ids of sequence-classification reward models.
- `--teacher_model_name_or_path`, `--teacher_prompt_template` (e.g. `"{teacher_prompt}"`),
  `--alpha_method`, `--alpha`, ...: see `optimal_sampling.trainers.OptimalSamplingGRPOConfig`.

The script writes `log_history.json` (every logged metric, including `optimal_sampling/*`),
`run_info.json` (process count) and the trained model to `--output_dir`.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset, load_dataset, load_from_disk  # noqa: E402
from trl import TrlParser  # noqa: E402

from optimal_sampling.trainers import OptimalSamplingGRPOConfig, OptimalSamplingGRPOTrainer  # noqa: E402


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "The policy π_θ: a local path or Hub id."})
    dataset_name: str = field(
        metadata={"help": "Hub id, `save_to_disk` directory, or a .json/.jsonl/.parquet/.csv file."}
    )
    reward_funcs: list[str] = field(
        metadata={"help": "Reward functions as 'package.module:function', or reward-model paths / Hub ids."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first n rows."})


def load_prompts(script: ScriptArguments) -> Dataset:
    name = script.dataset_name
    suffix = Path(name).suffix.lower()
    if suffix in (".json", ".jsonl", ".parquet", ".csv"):
        builder = {".jsonl": "json", ".json": "json"}.get(suffix, suffix[1:])
        dataset = load_dataset(builder, data_files=name, split="train")
    elif Path(name).is_dir() and (Path(name) / "dataset_info.json").exists():
        dataset = load_from_disk(name)
    elif Path(name).is_dir() and (Path(name) / "dataset_dict.json").exists():
        dataset = load_from_disk(name)[script.dataset_split]
    else:
        dataset = load_dataset(name, script.dataset_config, split=script.dataset_split)
    if script.prompt_column != "prompt":
        if "prompt" in dataset.column_names:
            dataset = dataset.remove_columns("prompt")
        dataset = dataset.rename_column(script.prompt_column, "prompt")
    if "prompt" not in dataset.column_names:
        raise ValueError(
            f"The dataset has no '{script.prompt_column}' column (columns: {dataset.column_names}); set --prompt_column."
        )
    if script.max_train_samples is not None:
        dataset = dataset.select(range(min(script.max_train_samples, len(dataset))))
    return dataset


def load_reward(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep:
        return spec  # a reward model: TRL loads it
    return getattr(importlib.import_module(module_name), attr)


def main(script: ScriptArguments, training_args: OptimalSamplingGRPOConfig) -> None:
    trainer = OptimalSamplingGRPOTrainer(
        model=script.model_name_or_path,
        reward_funcs=[load_reward(spec) for spec in script.reward_funcs],
        args=training_args,
        train_dataset=load_prompts(script),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        path = Path(training_args.output_dir) / "log_history.json"
        path.write_text(json.dumps(trainer.state.log_history, indent=1))
        info = {
            "num_processes": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
        }
        (Path(training_args.output_dir) / "run_info.json").write_text(json.dumps(info))


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, OptimalSamplingGRPOConfig))
    script_args, training_args = parser.parse_args_and_config()
    main(script_args, training_args)
