"""The GRPO trainer with q* rollouts from two vLLM servers (`sampler_backend="vllm"`).

The base server receives the policy's weights before every rollout that follows an optimizer
step (vLLM's dev-mode reload endpoints, which `tests/vllm_servers.py` switches on); the test
checks that the weights it serves afterwards are the policy's of that step, and puts the
original weights back for the other server tests. `tests/test_engines_trainer.py` runs the
same checks on the in-process engines.
"""

from __future__ import annotations

import asyncio
import copy
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_servers import exact_log_probs  # noqa: E402
from trainer_options import cpu_options  # noqa: E402

from optimal_sampling.toy import TOY_PAIR_DIR, make_problems  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
TOY = TOY_PAIR_DIR


def spread_reward(completions, **kwargs):
    """A reward that differs between most distinct completions, so that every step changes the weights."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


class _KeepWeights:
    """A `TrainerCallback` that keeps a copy of the policy's weights after every optimizer step."""

    def __init__(self):
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step[state.global_step] = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})


def train_two_steps(tmp_path, **fields):
    """Two GRPO steps on the toy pair with a large learning rate; returns (trainer, policy, kept weights)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimal_sampling.trainers import OptimalSamplingGRPOConfig, OptimalSamplingGRPOTrainer

    rows = make_problems(8, seed=3)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "teacher_prompt": r["teacher_prompt"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(TOY / "base")
    policy = AutoModelForCausalLM.from_pretrained(TOY / "base", dtype=torch.float32)
    args = OptimalSamplingGRPOConfig(
        **cpu_options(
            str(tmp_path),
            learning_rate=0.02,
            seed=11,
            teacher_prompt_template="{teacher_prompt}",
            teacher_model_name_or_path=str(TOY / "teacher"),
            alpha_method="kl_symmetry",
            importance_weighting="token_truncate",
            advantage_baseline="on_policy",
            **fields,
        )
    )
    keep = _KeepWeights()
    trainer = OptimalSamplingGRPOTrainer(
        policy,
        reward_funcs=spread_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[keep],
    )
    trainer.train()
    return trainer, policy, keep.after_step


def check_log_history(trainer) -> None:
    """Each rollout used the weights of the step it was sampled at, with finite log q and weights."""
    logs = [entry for entry in trainer.state.log_history if "optimal_sampling/weight_version" in entry]
    assert [entry["optimal_sampling/weight_version"] for entry in logs] == [0.0, 1.0]
    for entry in logs:
        for name in (
            "optimal_sampling/is_weight_mean",
            "optimal_sampling/alpha_mean",
            "optimal_sampling/kl_theta",
            "sampling/importance_sampling_ratio/mean",
            "optimal_sampling/on_policy_frac",
        ):
            assert math.isfinite(entry[name]), (name, entry)
        assert entry["optimal_sampling/on_policy_frac"] == 0.5
        assert 0.0 < entry["optimal_sampling/alpha_mean"] < 1.0  # the KL-symmetric blend on the q* rows
        assert entry["grad_norm"] > 0  # the step changed the weights


def served_matches(next_token_distribution, weights, prefixes) -> float:
    """Largest gap between the served base log-probs and those of a policy holding `weights`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(TOY / "base"))
    model = AutoModelForCausalLM.from_pretrained(TOY / "base", dtype=torch.float32).eval()
    model.load_state_dict(weights)
    step = next_token_distribution(prefixes, vocab)
    gap = 0.0
    for i, prefix in enumerate(prefixes):
        expected = exact_log_probs(model, prefix, 1, 1.0, vocab)[0]
        ids, served = step.candidates.token_ids[i], step.candidates.logp_theta[i, :-1]  # the rest bucket dropped
        listed = ids >= 0
        gap = max(gap, float((served[listed].double() - expected[ids[listed]]).abs().max()))
    return gap


PREFIXES = [[5, 9, 12], [7, 3, 8, 21, 4], [30, 2]]


def test_two_step_grpo_through_two_servers_loads_each_steps_weights(servers, tmp_path):
    from optimal_sampling.servers import CoordinatorConfig, DualVLLMCoordinator

    config = CoordinatorConfig(
        theta_url=servers["OPTIMAL_SAMPLING_THETA_URL"],
        t_url=servers["OPTIMAL_SAMPLING_T_URL"],
        top_k=16,
        theta_tokenizer=str(TOY / "base"),
        t_tokenizer=str(TOY / "teacher"),
    )

    def distribution(prefixes, vocab):
        async def run():
            async with DualVLLMCoordinator(config) as coordinator:
                return await coordinator.next_token_distribution(prefixes, top_k=vocab)

        return asyncio.run(run())

    try:
        trainer, _, after_step = train_two_steps(
            tmp_path,
            sampler_backend="vllm",
            sampler_theta_url=servers["OPTIMAL_SAMPLING_THETA_URL"],
            sampler_t_url=servers["OPTIMAL_SAMPLING_T_URL"],
            sampler_top_k=16,
        )
        check_log_history(trainer)
        assert trainer._vllm_sampler.get_statistics()["weight_loads"] == 2  # before each rollout: steps 0 and 1
        # The server now holds the weights of step 1 (loaded before the second rollout), not the original ones.
        assert served_matches(distribution, after_step[1], PREFIXES) < 1e-4
        assert served_matches(distribution, after_step[2], PREFIXES) > 1e-3
        trainer.close_sampler()
    finally:  # the other server tests need the original base weights back

        async def restore():
            async with DualVLLMCoordinator(config) as coordinator:
                await coordinator.load_base_weights(str(TOY / "base"))

        asyncio.run(restore())
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(TOY / "base", dtype=torch.float32).state_dict()
    assert served_matches(distribution, initial, PREFIXES) < 1e-4  # the original weights are back


def distill_two_steps(tmp_path, **fields):
    """Two steps of the distillation trainer on q* rollouts (the toy pair); returns the trainer."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimal_sampling.trainers import OptimalSamplingDistillationConfig, OptimalSamplingDistillationTrainer

    rows = make_problems(8, seed=5)
    args = OptimalSamplingDistillationConfig(
        **cpu_options(
            str(tmp_path),
            groups=False,
            per_device_train_batch_size=8,
            learning_rate=0.02,
            gradient_checkpointing=False,
            seed=11,
            alpha_method="kl_symmetry",
            teacher_prompt_template="{teacher_prompt}",
            sampler_top_k=16,
            **fields,
        )
    )
    trainer = OptimalSamplingDistillationTrainer(
        AutoModelForCausalLM.from_pretrained(TOY / "base", dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(TOY / "teacher", dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": r["prompt"], "teacher_prompt": r["teacher_prompt"]} for r in rows]),
        processing_class=AutoTokenizer.from_pretrained(TOY / "base"),
    )
    trainer.train()
    return trainer


def check_distillation_log_history(trainer) -> None:
    """Each rollout came from the weights of its step, every row from q* (the KL-symmetric blend)."""
    logs = [entry for entry in trainer.state.log_history if "optimal_sampling/weight_version" in entry]
    assert [entry["optimal_sampling/weight_version"] for entry in logs] == [0.0, 1.0]
    for entry in logs:
        assert 0.0 < entry["optimal_sampling/alpha_mean"] < 1.0 and entry["optimal_sampling/on_policy_frac"] == 0.0
        assert math.isfinite(entry["loss"]) and entry["grad_norm"] > 0


def test_distillation_on_q_star_rollouts_through_two_servers_loads_each_steps_weights(servers, tmp_path):
    """The distillation trainer on the same seam: its q* completions come from the two servers, which
    hold the student's weights of the step that samples them."""
    from optimal_sampling.servers import CoordinatorConfig, DualVLLMCoordinator

    urls = dict(theta_url=servers["OPTIMAL_SAMPLING_THETA_URL"], t_url=servers["OPTIMAL_SAMPLING_T_URL"])
    try:
        trainer = distill_two_steps(
            tmp_path, sampler_backend="vllm", sampler_theta_url=urls["theta_url"], sampler_t_url=urls["t_url"]
        )
        check_distillation_log_history(trainer)
        assert trainer._vllm_sampler.get_statistics()["weight_loads"] == 2
        trainer.close_sampler()
    finally:  # the other server tests need the original base weights back
        config = CoordinatorConfig(
            **urls, top_k=16, theta_tokenizer=str(TOY / "base"), t_tokenizer=str(TOY / "teacher")
        )

        async def restore():
            async with DualVLLMCoordinator(config) as coordinator:
                await coordinator.load_base_weights(str(TOY / "base"))

        asyncio.run(restore())


def test_vllm_backends_refuse_what_they_cannot_record(tmp_path):
    from optimal_sampling.trainers import OptimalSamplingGRPOConfig

    common = dict(
        output_dir=str(tmp_path),
        num_generations=4,
        report_to="none",
        use_cpu=True,
        bf16=False,
        sampler_backend="vllm",
        sampler_theta_url="http://127.0.0.1:1",
        sampler_t_url="http://127.0.0.1:2",
    )
    with pytest.raises(ValueError, match="importance_weighting='mis' needs log q\\*\\(y\\) of the on-policy rows"):
        OptimalSamplingGRPOConfig(**common, importance_weighting="mis")
    with pytest.raises(ValueError, match="advantage_baseline='is' needs"):
        OptimalSamplingGRPOConfig(**common, advantage_baseline="is")
    with pytest.raises(ValueError, match="`teacher_top_p` .* is not supported by sampler_backend='vllm'"):
        OptimalSamplingGRPOConfig(**common, teacher_top_p=0.9)
    # The top-k step takes the α rules and the forced teacher tokens (issue 17: every option reaches every front).
    config = OptimalSamplingGRPOConfig(
        **common, alpha_method="kl_budget", kl_budget=0.1, force_teacher_first_tokens=2, empty_support="base"
    )
    assert (config.q_star.kl_budget, config.q_star.force_teacher_first_tokens, config.q_star.empty_support) == (
        0.1,
        2,
        "base",
    )
    with pytest.raises(ValueError, match="sampler_engine_args"):
        OptimalSamplingGRPOConfig(
            **{**common, "sampler_backend": "transformers"}, sampler_engine_args=["dtype=float32"]
        )


# -- several processes -----------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def launch_two_ranks(out: Path, backend: str, *urls: str, python: str = sys.executable, timeout: int = 900) -> list:
    """`tests/vllm_ranks.py` under `accelerate launch` with two CPU processes; each rank's record."""
    import json
    import os
    import subprocess

    command = [
        python,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "recipes/accelerate/multi_cpu.yaml"),
        str(REPO / "tests/vllm_ranks.py"),
        str(out),
        backend,
        *urls,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env.update(TORCHDYNAMO_DISABLE="1", VLLM_HOST_IP="127.0.0.1")  # (the engines' processes inherit them)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-6000:]
    records = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["num_processes"] for r in records] == [2, 2]
    prompts = [{tuple(p) for call in r["sampled"] for p in call["prompts"]} for r in records]
    assert prompts[0] != prompts[1]  # each rank sampled its own slice of the batch
    return records


def test_two_processes_sample_from_shared_servers_and_the_main_one_loads_the_weights(servers, tmp_path):
    urls = servers["OPTIMAL_SAMPLING_THETA_URL"], servers["OPTIMAL_SAMPLING_T_URL"]
    try:
        first, second = launch_two_ranks(tmp_path, "vllm", *urls)
        # One coordinator per rank on the same servers: the main process loads each step's weights, once ...
        assert (first["weight_loads"], second["weight_loads"]) == (2, 0)
        # ... and every rank sampled each rollout from the policy of its step, and knows it.
        for record in (first, second):
            assert record["logged_versions"] == [0.0, 1.0] and record["weight_version"] == 1
            assert record["gap_to_step_1"] < 1e-4 < 1e-3 < record["gap_to_step_2"]
    finally:  # the other server tests need the original base weights back

        async def restore():
            from optimal_sampling.servers import CoordinatorConfig, DualVLLMCoordinator

            config = dict(theta_url=urls[0], t_url=urls[1], top_k=16, theta_tokenizer=str(TOY / "base"))
            async with DualVLLMCoordinator(
                CoordinatorConfig(**config, t_tokenizer=str(TOY / "teacher"))
            ) as coordinator:
                await coordinator.load_base_weights(str(TOY / "base"))

        asyncio.run(restore())


def test_each_rank_draws_its_own_randomness():
    """Rows of one prompt group may sit on two ranks: the same seed there would give them the same draws."""
    from types import SimpleNamespace

    from optimal_sampling.trainers.vllm_rollouts import VLLMRolloutsMixin

    def seed(rank: int, calls: int = 3) -> int:
        trainer = SimpleNamespace(args=SimpleNamespace(seed=11), _vllm_calls=calls)
        trainer.accelerator = SimpleNamespace(process_index=rank)
        return VLLMRolloutsMixin._rollout_seed(trainer)

    assert len({seed(0), seed(1), seed(2), seed(0, calls=4)}) == 4
    assert seed(1) == seed(1)
