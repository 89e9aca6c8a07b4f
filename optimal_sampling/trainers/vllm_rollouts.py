"""The trainers' vLLM rollout backends (`sampler_backend="vllm"` / `"vllm-inprocess"`).

`VLLMRolloutsMixin` starts the sampler at the first rollout, loads the policy's weights into the
base model before each rollout after an optimizer step (a stale sampler is an error), and turns
the sampler's outputs into `Rollouts`.

Under `accelerate launch` with several processes every rank samples its own rows (the slice of
the batch TRL gives it), with draws seeded by its rank too. With `"vllm-inprocess"` each rank runs
its own engine pair, as TRL's colocate mode does: on the rank's GPU, or on its own CPU cores, and
loads its own (identical) policy weights into it. With `"vllm"` each rank has its own coordinator
on the shared servers; the main process alone loads the weights, between two barriers, so that no
rank samples while the base server changes and every rank then knows the new version.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import torch

from optimal_sampling.records import RECORDED_DIAGNOSTICS
from optimal_sampling.topk_decoding import topk_config_fields

from ._host import TrainerHost
from .rollout import Rollouts

METRIC_PREFIX = "optimal_sampling/"


class VLLMRolloutsMixin(TrainerHost):
    """The vLLM half of `OptimalSamplingMixin` (see `optimal_sampling.trainers._common`)."""

    def _sample_vllm(self, prompt_ids, teacher_prompt_ids, on_policy: torch.Tensor) -> Rollouts:
        """q* rows from the vLLM sampler, after loading the policy's current weights into it."""
        sampler = self._vllm_sampler or self._start_vllm_sampler()
        step = self.state.global_step
        if sampler.weight_version != step:  # an optimizer step since the last rollout (or a fresh server)
            self._load_policy_weights(sampler, step)
        if sampler.weight_version != step:
            raise RuntimeError(
                f"The vLLM sampler holds the policy weights of step {sampler.weight_version}, not of "
                f"step {step}: its rollouts would be stale."
            )
        max_new_tokens, stop_ids = self._completion_limits()
        q_star = self._scheduled_q_star()
        self._vllm_calls += 1
        scheduled = dict(alpha_min=q_star.alpha_min, alpha_max=q_star.alpha_max, kl_budget=q_star.kl_budget)
        outputs = sampler.with_config(**scheduled).generate(
            prompt_ids,
            teacher_prompts=teacher_prompt_ids,
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            seed=self._rollout_seed(),
            on_policy=on_policy.tolist(),
            stop_token_ids=stop_ids,
            return_diagnostics=True,
        )
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][METRIC_PREFIX + "weight_version"].append(float(sampler.weight_version))
        return rollouts_from_outputs(outputs, on_policy)

    def _rollout_seed(self) -> int:
        """Fresh draws for every batch and every rank: a draw depends on (seed, row of the call, step),
        and the ranks' rows of one prompt group must not share their randomness."""
        call = self.args.seed * 1_000_003 + self._vllm_calls
        return (call * 65_537 + self.accelerator.process_index) % 2**63

    def _load_policy_weights(self, sampler, step: int) -> None:
        shared_servers = self.args.sampler_backend == "vllm" and self.accelerator.num_processes > 1
        if shared_servers:
            self.accelerator.wait_for_everyone()  # every rank is done sampling from the old weights
        if not shared_servers or self.accelerator.is_main_process:
            policy = self.accelerator.unwrap_model(self.model)
            sampler.load_base_weights(named_tensors=policy.state_dict().items(), version=step)
        if shared_servers:
            self.accelerator.wait_for_everyone()  # the main process has loaded them into the base server
            sampler.coordinator.weight_version = step

    def _start_vllm_sampler(self):
        args = self.args
        if hasattr(self.accelerator.unwrap_model(self.model), "peft_config"):
            raise NotImplementedError(
                f"sampler_backend={args.sampler_backend!r} with a PEFT (LoRA) policy: the vLLM model would need the "
                "merged weights after every step, which is not built yet. Use sampler_backend='transformers'."
            )
        alpha = dict(topk_config_fields(self._q_star), top_k=args.sampler_top_k, seed=args.seed)
        if args.sampler_backend == "vllm":
            from optimal_sampling.servers import CoordinatorConfig, VLLMSampler

            config = CoordinatorConfig(theta_url=args.sampler_theta_url, t_url=args.sampler_t_url, **alpha)
            sampler = VLLMSampler(config, temperature=self.temperature)
            sampler.coordinator.weight_version = -1  # unknown until the first load
        else:
            from optimal_sampling.engines import InProcessVLLMSampler, VLLMEngineSpec
            from optimal_sampling.engines.sync import engine_arguments

            # The engines start from the models as they are now (the policy's weights of this step).
            locations = {
                "base": self._saved_model(self.accelerator.unwrap_model(self.model), self._tokenizer),
                "teacher": self._teacher_location(),
            }
            rank = self.accelerator.local_process_index  # this machine's rank-th engine pair
            specs = {}
            for role, location in locations.items():
                fields = engine_arguments(args.sampler_engine_args or [], role, default_cpu=True, rank=rank)
                fields["env"] = {**self._engine_device_env(), **fields.get("env", {})}
                specs[role] = VLLMEngineSpec(location, **fields)
            sampler = InProcessVLLMSampler(specs["base"], specs["teacher"], temperature=self.temperature, **alpha)
            sampler.coordinator.weight_version = self.state.global_step
        self._vllm_sampler = sampler
        atexit.register(self.close_sampler)
        return sampler

    def _engine_device_env(self) -> dict[str, str]:
        """The rank's own GPU for its engines (as TRL's colocate mode), where several ranks share a machine:
        an engine sees only `CUDA_VISIBLE_DEVICES`' entry of the rank's device (set `env` in
        `sampler_engine_args` to choose otherwise)."""
        device = self.accelerator.device
        if device.type != "cuda" or self.accelerator.num_processes == 1:
            return {}
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"CUDA_VISIBLE_DEVICES": visible.split(",")[index] if visible else str(index)}

    def _saved_model(self, model, tokenizer) -> str:
        """A temporary directory holding `model` (config and weights) and `tokenizer`, written by every rank:
        `save_pretrained` writes the weights on global rank 0 only, and each rank's engines need a copy."""
        from optimal_sampling.weights import write_safetensors

        directory = tempfile.mkdtemp(prefix="optimal-sampling-engine-")
        self._engine_dirs.append(directory)
        model.config.save_pretrained(directory)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(directory)
        write_safetensors(model.state_dict().items(), os.path.join(directory, "model.safetensors"))
        tokenizer.save_pretrained(directory)
        return directory

    def _teacher_location(self) -> str:
        path = self.args.teacher_model_name_or_path
        if path is not None and os.path.isdir(path):
            return path
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        return self._saved_model(teacher, self.teacher_processing_class)

    def close_sampler(self) -> None:
        """Stop the vLLM sampler (engines, or the connections to the servers) and remove its files."""
        sampler, self._vllm_sampler = self._vllm_sampler, None
        if sampler is not None:
            sampler.close()
        for directory in self._engine_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self._engine_dirs.clear()


def rollouts_from_outputs(outputs, on_policy: torch.Tensor) -> Rollouts:
    """`Rollouts` from a vLLM sampler's `GenerationOutput`s (one per row, in row order).

    Per-token diagnostics hold each row's mean at every token of the row, so their token
    means (all the trainer logs of them) are exact. `logq_star` is NaN on on-policy rows: the
    vLLM backends sample those from the base alone and do not solve q* for them.
    """
    failed = [(i, o.error) for i, o in enumerate(outputs) if o.error is not None]
    if failed:
        i, error = failed[0]
        raise RuntimeError(
            f"{len(failed)} of {len(outputs)} rollouts failed in the vLLM sampler (row {i}: {error}); a GRPO batch needs "
            "every row, so this step cannot be trained on."
        )
    width = max(1, max(len(o.generated_tokens) for o in outputs))
    batch = len(outputs)
    alpha = torch.zeros(batch, width)
    token_mask = torch.zeros(batch, width, dtype=torch.bool)
    diagnostics = {name: torch.zeros(batch, width) for name in (*RECORDED_DIAGNOSTICS, "empty_support")}
    logq_star = []
    for i, o in enumerate(outputs):
        n = len(o.generated_tokens)
        alpha[i, :n] = torch.tensor(o.alpha_history, dtype=torch.float32)
        token_mask[i, :n] = True
        summary = o.diagnostics or {}
        for name in RECORDED_DIAGNOSTICS:
            diagnostics[name][i, :n] = summary.get(f"{name}_mean", float("nan"))
        diagnostics["empty_support"][i, :n] = summary.get("empty_support_tokens", float("nan")) / max(n, 1)
        logq_star.append([float("nan")] * n if bool(on_policy[i]) else list(o.logq))
    return Rollouts(
        completion_ids=[list(o.generated_tokens) for o in outputs],
        logq=[list(o.logq) for o in outputs],
        logq_star=logq_star,
        on_policy=on_policy.clone(),
        alpha=alpha,
        token_mask=token_mask,
        diagnostics=diagnostics,
        logp_theta=[list(o.logp_theta) for o in outputs],
        logp_t=[list(o.logp_t) for o in outputs],
    )
