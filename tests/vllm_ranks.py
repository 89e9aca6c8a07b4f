"""Two GRPO steps with q* rollouts from vLLM on each rank of an `accelerate launch`, for the tests.

    accelerate launch --config_file recipes/accelerate/multi_cpu.yaml tests/vllm_ranks.py OUT vllm THETA_URL T_URL
    accelerate launch --config_file recipes/accelerate/multi_cpu.yaml tests/vllm_ranks.py OUT vllm-inprocess

Every rank writes what it saw to OUT/rank-N.json: the rows it sampled, its sampler's weight loads and
versions, the engine processes it ran (in-process), and how far the base model it sampled from is,
after training, from the policy of step 1 (the weights of the last rollout) and of step 2.
`tests/test_trainers_vllm.py` (servers) and `tests/test_engines_trainer.py` (in-process) run it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main(out: Path, backend: str, urls: list[str]) -> None:
    from test_trainers_vllm import PREFIXES, served_matches, train_two_steps

    from optimal_sampling.trainers.vllm_rollouts import VLLMRolloutsMixin

    sampled: list[dict] = []
    original = VLLMRolloutsMixin._sample_vllm

    def recording(self, prompt_ids, teacher_prompt_ids, on_policy):
        rollouts = original(self, prompt_ids, teacher_prompt_ids, on_policy)
        sampled.append({"prompts": [list(p) for p in prompt_ids], "completions": rollouts.completion_ids})
        return rollouts

    VLLMRolloutsMixin._sample_vllm = recording
    fields: dict = {"sampler_backend": backend, "sampler_top_k": 16}
    if backend == "vllm":
        fields.update(sampler_theta_url=urls[0], sampler_t_url=urls[1])
    else:
        fields.update(sampler_engine_args=["max_model_len=256"])
    trainer, _, after_step = train_two_steps(out / "train", **fields)
    sampler = trainer._vllm_sampler
    rank = trainer.accelerator.process_index

    def distribution(prefixes, vocab):
        return sampler.next_token_distribution(prefixes, top_k=vocab)

    record = {
        "rank": rank,
        "num_processes": trainer.accelerator.num_processes,
        "sampled": sampled,
        "weight_loads": sampler.get_statistics()["weight_loads"],
        "weight_version": sampler.weight_version,
        "logged_versions": [
            e["optimal_sampling/weight_version"]
            for e in trainer.state.log_history
            if "optimal_sampling/weight_version" in e
        ],
        "gap_to_step_1": served_matches(distribution, after_step[1], PREFIXES),
        "gap_to_step_2": served_matches(distribution, after_step[2], PREFIXES),
        "engine_pids": sampler.coordinator.engine_process_ids() if backend == "vllm-inprocess" else {},
    }
    trainer.accelerator.wait_for_everyone()  # no rank leaves (and closes its sampler) while another still samples
    trainer.close_sampler()
    (out / f"rank-{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
