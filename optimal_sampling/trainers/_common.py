"""What the GRPO and RLOO subclasses share: the teacher, teacher prompts, q* rollouts, metrics."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from optimal_sampling.compat import unwrapped_model
from optimal_sampling.options import QStarOptions
from optimal_sampling.records import check_same_vocabulary, model_eos_ids
from optimal_sampling.support import NaNLogProbsError

from .checks import check_generation_options, resolve_callable
from .config import VLLM_BACKENDS
from .estimators import group_statistics, mixture_log_weights
from .rollout import Rollouts, sample_rollouts
from .turns import RolloutTurns
from .vllm_rollouts import METRIC_PREFIX, VLLMRolloutsMixin

__all__ = ["METRIC_PREFIX", "OptimalSamplingMixin"]


def non_finite_parameters(model: torch.nn.Module, limit: int = 3) -> list[str]:
    """The names of the first `limit` parameters holding NaN or inf (empty when every weight is finite)."""
    broken = []
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter.detach()).all()):
            broken.append(name)
            if len(broken) == limit:
                break
    return broken


def cudnn_attention_hazard(capability: tuple[int, int] | None, cudnn_sdp_enabled: bool, attention: str | None) -> bool:
    """Whether a model runs where torch's cuDNN attention backward is known to return NaN gradients.

    That is a Hopper GPU (`capability` 9.x: H100, H200), the cuDNN backend of `scaled_dot_product_attention`
    enabled (torch's default), and a transformers model on its "sdpa" attention, which passes a mask: torch's
    cuDNN backward then returns a NaN query gradient for some padded lengths (pytorch/pytorch#196678, since
    torch 2.11; huggingface/trl#7181). On SmolLM2 it made one GRPO step's gradient NaN (recipes/RESULTS.md).
    `capability` is None off CUDA.
    """
    return capability is not None and capability[0] == 9 and cudnn_sdp_enabled and attention == "sdpa"


def cudnn_attention_advice(model: torch.nn.Module) -> str:
    """The cuDNN attention bug and its fix, in a sentence, where `model` runs under it (`cudnn_attention_hazard`);
    else empty."""
    device = next(model.parameters()).device
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if not cudnn_attention_hazard(capability, torch.backends.cuda.cudnn_sdp_enabled(), attention):
        return ""
    return (
        "on a Hopper GPU, torch's cuDNN attention backward returns NaN gradients for some padded lengths "
        "(pytorch/pytorch#196678). Call `torch.backends.cuda.enable_cudnn_sdp(False)` before training, or load the "
        'policy with `attn_implementation="eager"`.'
    )


class OptimalSamplingMixin(VLLMRolloutsMixin):
    """Teacher handling, q* rollouts and their metrics; mixed into TRL trainer subclasses.

    Subclasses call `_setup_teacher` after TRL's `__init__`, `_sample_optimal` from their
    `_generate_single_turn`, and wrap `_generate_and_score_completions` with
    `_with_rollout_rows` + `_log_rollout_metrics`.
    """

    # -- teacher ---------------------------------------------------------------------

    def _setup_teacher(self, teacher_model, teacher_processing_class, teacher_prompt_fn, prepared=None) -> None:
        """Check the teacher against the policy and keep it (frozen, in eval mode) with its prompt source.

        `prepared`: the teacher as the TRL trainer already loaded and placed it (its own teacher, as
        `DistillationTrainer` keeps one); else it is loaded from `teacher_model` / the config and placed here.
        """
        args = self.args
        source = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        policy = self.accelerator.unwrap_model(self.model)
        self._teacher_is_policy = source is policy or source is self.model
        if prepared is not None:
            teacher = self.accelerator.unwrap_model(prepared)
        elif isinstance(source, str):
            teacher = self._load_teacher(source)
        else:
            teacher = source
        if not isinstance(teacher, PreTrainedModel) and not hasattr(teacher, "config"):
            raise TypeError(f"The teacher must be a transformers causal LM, got {type(teacher).__name__}.")
        if getattr(teacher.config, "is_encoder_decoder", False) or teacher.get_output_embeddings() is None:
            raise ValueError(
                f"The teacher ({type(teacher).__name__}) is not a decoder-only causal LM with an output layer; load "
                "it with `AutoModelForCausalLM`."
            )

        if teacher_processing_class is None and isinstance(source, str):
            try:
                teacher_processing_class = AutoTokenizer.from_pretrained(
                    source, trust_remote_code=args.trust_remote_code
                )
            except (OSError, ValueError):
                teacher_processing_class = None  # no tokenizer files next to the weights: use the policy's
        self.teacher_processing_class = teacher_processing_class or self._tokenizer
        try:
            check_same_vocabulary(self._tokenizer, self.teacher_processing_class)
        except ValueError as error:
            raise ValueError(f"Incompatible teacher: {error}") from None
        vocab_size = len(self._tokenizer)
        width = teacher.get_output_embeddings().weight.shape[0]
        if width < vocab_size:
            raise ValueError(
                f"Incompatible teacher: its output layer has {width} rows but the policy's tokenizer has {vocab_size} "
                "tokens; the teacher must share the policy's vocabulary (same model family)."
            )
        self._vocab_size = vocab_size

        teacher_eos = set(model_eos_ids(teacher))
        if self.teacher_processing_class.eos_token_id is not None:
            teacher_eos.add(int(self.teacher_processing_class.eos_token_id))
        # TRL ends completions on `eos_token_ids` too (truncation stats, masking): keep them in agreement.
        self.eos_token_ids = sorted(set(self.eos_token_ids) | teacher_eos)

        if self._teacher_is_policy:
            self.teacher_model = None  # the policy itself, unwrapped at generation time
        else:
            teacher.requires_grad_(False)
            self.teacher_model = prepared.eval() if prepared is not None else self._prepare_teacher(teacher.eval())

        self._teacher_prompt_source: Callable[[dict], Any] | None
        if args.teacher_prompt_template is not None:
            template = args.teacher_prompt_template
            self._teacher_prompt_source = lambda row: _format_template(template, row)
        elif (teacher_prompt_fn or args.teacher_prompt_fn) is not None:
            self._teacher_prompt_source = resolve_callable(teacher_prompt_fn or args.teacher_prompt_fn)
        else:
            self._teacher_prompt_source = None
        self._q_star = args.q_star
        if advice := cudnn_attention_advice(policy):
            # Warned before the first step: by the time a NaN gradient shows, AdamW has written it into the weights.
            warnings.warn(f"A known bug may make this run's gradients NaN: {advice}", stacklevel=3)
        self._generation_overrides = check_generation_options(args)  # already checked before TRL's init
        self._rollout_rows: list[dict] | None = None
        self._pending_rollouts: list[Rollouts] = []
        self._turns: RolloutTurns | None = None  # the batch's rows, turn by turn (optimal_sampling.trainers.turns)
        self._rollout_rewards: torch.Tensor | None = None
        self._vllm_sampler = None  # started at the first rollout (sampler_backend "vllm" / "vllm-inprocess")
        self._vllm_calls = 0
        self._engine_dirs: list[str] = []
        if args.sampler_backend in VLLM_BACKENDS and self._teacher_is_policy:
            raise ValueError(
                f"sampler_backend={args.sampler_backend!r} with the policy as its own teacher would need the policy's "
                "weights in both vLLM models; use sampler_backend='transformers' for self-distillation."
            )

    def _load_teacher(self, path: str) -> PreTrainedModel:
        kwargs = dict(self.args.teacher_model_init_kwargs or {})
        kwargs.setdefault("dtype", self.accelerator.unwrap_model(self.model).dtype)
        kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
        if self.args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
            kwargs["device_map"] = None
        # Loading must not consume the training RNG: runs with and without a teacher path stay comparable.
        with torch.random.fork_rng(devices=[]):
            try:
                return AutoModelForCausalLM.from_pretrained(path, **kwargs)
            except (OSError, ValueError, KeyError) as error:
                raise ValueError(
                    f"Could not load the teacher from {path!r} as a causal LM ({type(error).__name__}: {error}). Pass "
                    "`teacher_model=` a loaded model, or a local directory / Hub id of a causal LM."
                ) from error

    def _prepare_teacher(self, teacher: torch.nn.Module) -> torch.nn.Module:
        # As TRL prepares its reference model: sharded with the policy under ZeRO-3 / FSDP, else on the device.
        from trl.models import prepare_deepspeed, prepare_fsdp

        prepared: Any  # a DeepSpeed engine, an FSDP wrapper, or the module on its device
        if self.is_deepspeed_enabled:
            prepared = prepare_deepspeed(teacher, self.accelerator)
        elif self.is_fsdp_enabled:
            prepared = prepare_fsdp(teacher, self.accelerator)
        else:
            prepared = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        return prepared.eval()

    # -- teacher prompts ---------------------------------------------------------------

    def _with_rollout_rows(self, inputs: list[dict], generate: Callable[[], Any]):
        """Run `generate()` with this batch's dataset rows visible to `_teacher_prompt_ids`."""
        self._rollout_rows = inputs
        self._pending_rollouts = []
        self._turns = None
        try:
            return generate()
        finally:
            self._rollout_rows = None

    def _teacher_prompt_ids(self, num_rows: int) -> list[list[int]] | None:
        if self._teacher_prompt_source is None:
            return None
        rows = self._rollout_rows
        if rows is None or len(rows) != num_rows:
            raise RuntimeError(
                f"Teacher prompts need the batch's dataset rows, but {0 if rows is None else len(rows)} rows are "
                f"known for {num_rows} prompts (a multi-turn continuation, or a TRL change in how `_generate` "
                "calls `_generate_single_turn`)."
            )
        ids = []
        for i, row in enumerate(rows):
            prompt = self._teacher_prompt_source(row)
            ids.append(self._tokenize_teacher_prompt(prompt, i))
        return ids

    def _tokenize_teacher_prompt(self, prompt, index: int) -> list[int]:
        tokenizer = self.teacher_processing_class
        if isinstance(prompt, str):
            ids = tokenizer(text=prompt)["input_ids"]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            # With tools, the teacher's prompt shows their schema as the policy's does.
            tools = self._row_tools(index)
            ids = tokenizer.apply_chat_template(
                list(prompt), add_generation_prompt=True, tokenize=True, **({"tools": tools} if tools else {})
            )
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            raise TypeError(
                f"The teacher prompt of row {index} is a {type(prompt).__name__}; it must be a string or a list of "
                "chat messages ({'role': ..., 'content': ...})."
            )
        if len(ids) == 0:
            raise ValueError(f"The teacher prompt of row {index} tokenizes to no tokens: {prompt!r}.")
        return list(ids)

    def _row_tools(self, index: int) -> list | None:
        """The tools row `index` is offered (TRL renders their schema into its prompt), or None."""
        if not getattr(self, "tools", None):
            return None
        if getattr(self, "environment_factories", None) is not None:
            return self._env_tools[self._batch_environments[index]] or None
        return self.tools

    # -- rollouts ----------------------------------------------------------------------

    # -- mixed groups ----------------------------------------------------------------------

    def _group_size(self) -> int:
        return self.num_generations if self.model.training else self.num_generations_eval

    def _no_teacher_pull(self) -> bool:
        """Every row would be π_θ's anyway: α clamped (or decayed) to 0, or a fixed α = 0."""
        no_teacher = self.args.alpha_max * self._teacher_pull() == 0.0
        return no_teacher or (self.args.alpha_method == "fixed" and self.args.alpha == 0.0)

    def _on_policy_per_group(self) -> int:
        """k for the current mode (eval groups of another size keep the fraction k/G)."""
        k, groups = self.args.num_on_policy_generations, self.num_generations
        if self._no_teacher_pull():
            k = groups  # every row would be π_θ's anyway: sample them as on-policy rows, exactly
        size = self._group_size()
        return size if k == groups else min(size, round(k * size / groups))

    def _on_policy_rows(self, num_rows: int) -> torch.Tensor:
        """`[num_rows]` bool: which of this rank's rows are sampled from π_θ.

        TRL lays each prompt's G completions out consecutively over the global batch, and
        rank r holds global rows r·n ... r·n + n − 1 (the slice TRL gives its advantages), so
        a row's position in its group is its global index modulo G; the first k are on-policy.
        """
        start = self.accelerator.process_index * num_rows
        positions = (torch.arange(num_rows) + start) % self._group_size()
        return positions < self._on_policy_per_group()

    def _teacher_pull(self) -> float:
        """1, or the linear decay factor of `teacher_decay_ratio` at this optimizer step."""
        ratio = self.args.teacher_decay_ratio
        if not ratio or not self.model.training:
            return 1.0
        horizon = ratio * max(self.state.max_steps, 1)
        return max(0.0, 1.0 - self.state.global_step / horizon)

    def _scheduled_q_star(self) -> QStarOptions:
        """The q* options of this step: the α clamp (and `kl_budget`) scaled by `_teacher_pull`."""
        pull, q_star = self._teacher_pull(), self._q_star
        kl_budget = None if q_star.kl_budget is None else q_star.kl_budget * pull
        return q_star.replace(alpha_min=q_star.alpha_min * pull, alpha_max=q_star.alpha_max * pull, kl_budget=kl_budget)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL gathers every rank's rewards here (`[N, F]`); the q* baselines and metrics need
        # them per row: the reward-weighted sum, NaN where every function returned None.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        self._rollout_rewards = rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))
        return rewards_per_func

    def _sampled_turns(self) -> RolloutTurns:
        """This batch's rows, turn by turn, as the sampler drew them."""
        if self._turns is None:
            raise RuntimeError(
                "No rows were sampled for this batch: TRL did not call `_generate_single_turn` before scoring "
                "(a TRL seam change). Please report it with your TRL version."
            )
        return self._turns

    def _batch_rewards(self, device) -> torch.Tensor:
        """`[N]` this batch's gathered rewards (kept by `_calculate_rewards`)."""
        if self._rollout_rewards is None:
            raise RuntimeError(
                "TRL scored this batch without `_calculate_rewards` (a TRL seam change). Please report it with your "
                "TRL version."
            )
        return self._rollout_rewards.to(device)

    def _pending_on_policy(self, device) -> torch.Tensor:
        return self._sampled_turns().on_policy.to(device)

    def _pending_padded(self, name: str, width: int, device) -> torch.Tensor:
        """`[B, width]` float32 of a per-token field of this batch's rows at their generated tokens (every
        turn), 0 at tool-result tokens and padding."""
        return self._sampled_turns().padded(name, width, device)

    def _check_rollout_rows(self, batch: int) -> None:
        rows = 0 if self._turns is None else self._turns.num_rows
        if rows != batch:
            raise RuntimeError(
                f"{rows} sampled rows for a batch of {batch}: TRL did not sample this batch's first turn through "
                "`_generate_single_turn` once (a TRL seam change)."
            )

    def _gather_group_inputs(self, on_policy, seq_log_ratio, log_ratio_star):
        """Every rank's `[B]` row quantities gathered into the global `[N]` order of TRL's rewards,
        with the mixture log-weight of each row (λ = k/G of the current mode)."""
        local = torch.stack([on_policy.float(), seq_log_ratio.float(), log_ratio_star.float()], dim=-1)
        gathered = self.accelerator.gather(local)
        on_policy_all = gathered[:, 0] > 0.5
        fraction = self._on_policy_per_group() / self._group_size()
        return on_policy_all, gathered[:, 1], mixture_log_weights(gathered[:, 2], fraction)

    def _log_group_statistics(self, rewards, on_policy_all, seq_log_ratio_all, log_mixture_weight) -> None:
        """Group-level numbers (the same on every rank: computed from gathered tensors)."""
        mode = "train" if self.model.training else "eval"
        stats = group_statistics(
            rewards,
            on_policy_all,
            seq_log_ratio_all,
            log_mixture_weight,
            self._group_size(),
            self.args.importance_weight_cap,
        )
        stats["teacher_pull"] = self._teacher_pull()
        for name, value in stats.items():
            self._metrics[mode][METRIC_PREFIX + name].append(value)

    def _any_rank_running(self, local_running: bool) -> bool:
        flag = torch.tensor([1.0 if local_running else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _sample_optimal(self, prompt_ids: list[list[int]]) -> Rollouts:
        """A batch's first turn: q* completions for already tokenized (repeated) prompts, each row on
        policy or not by its place in its group; kept, turn by turn, for the weights and metrics."""
        teacher_prompt_ids = self._teacher_prompt_ids(len(prompt_ids))
        on_policy = self._on_policy_rows(len(prompt_ids))
        rollouts = self._draw(prompt_ids, teacher_prompt_ids, on_policy)
        self._turns = RolloutTurns.first(teacher_prompt_ids, rollouts)
        return rollouts

    def _draw(self, prompt_ids, teacher_prompt_ids, on_policy: torch.Tensor) -> Rollouts:
        """One sampling call on the configured backend (a first turn or a tool-loop continuation)."""
        try:
            if self.args.sampler_backend in VLLM_BACKENDS:
                rollouts = self._sample_vllm(prompt_ids, teacher_prompt_ids, on_policy)
            else:
                rollouts = self._sample_transformers(prompt_ids, teacher_prompt_ids, on_policy)
        except NaNLogProbsError as error:
            broken = non_finite_parameters(self.model)
            if broken:
                advice = cudnn_attention_advice(unwrapped_model(self.model))
                raise FloatingPointError(
                    f"The policy's weights hold NaN or inf ({', '.join(broken)}) after step {self.state.global_step}: "
                    "an optimizer step applied a non-finite gradient (its `grad_norm` in the logs is nan or inf), "
                    "so the policy's logits are NaN. Keep float32 master weights (load the policy in float32 and "
                    "train with `bf16=True`, which autocasts), lower the learning rate, or clip harder "
                    "(`max_grad_norm`)." + (f" A known cause here: {advice}" if advice else "")
                ) from error
            raise
        self._pending_rollouts.append(rollouts)
        return rollouts

    def _completion_limits(self) -> tuple[int, list[int]]:
        """`max_new_tokens` and the stop ids of every sampler (both models' EOS, `generation_kwargs`)."""
        overrides = self._generation_overrides
        return (
            overrides.get("max_new_tokens", self.max_completion_length),
            sorted(set(self.eos_token_ids) | set(overrides.get("eos_token_id", []))),
        )

    def _sample_transformers(self, prompt_ids, teacher_prompt_ids, on_policy: torch.Tensor) -> Rollouts:
        from trl.models import unwrap_model_for_generation

        from .seam import generation_unwrap_kwargs

        max_new_tokens, stop_ids = self._completion_limits()
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, **generation_unwrap_kwargs(self.args)
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            mode = self._fast_mode(unwrapped_model) or "eager"
            if mode == "eager":  # the teacher as the loop always ran it (FSDP: its wrapped module)
                teacher = unwrapped_model if self._teacher_is_policy else self.teacher_model
            else:
                teacher = self.accelerator.unwrap_model(self.teacher_model)
            return sample_rollouts(
                unwrapped_model,
                teacher,
                prompt_ids,
                teacher_prompt_ids=teacher_prompt_ids,
                max_new_tokens=max_new_tokens,
                pad_token_id=self._tokenizer.pad_token_id,
                stop_token_ids=stop_ids,
                vocab_size=self._vocab_size,
                device=self.accelerator.device,
                q_star=self._scheduled_q_star(),
                on_policy=on_policy,
                # Under FSDP / ZeRO-3 each forward is a collective: every rank decodes until all are done.
                sync_stop=self._any_rank_running if self.accelerator.num_processes > 1 and mode == "eager" else None,
                decoder=self._decoder(unwrapped_model, teacher, mode),
            )

    # -- the decode engine: eager, or its step captured in a CUDA graph ---------------------

    def _fast_mode(self, policy) -> str | None:
        """The decoder mode rollouts use now (`sampler_fast`), None for eager: one step per token run
        from Python, which every setup can use (FSDP / ZeRO-3 ranks stop together)."""
        choice = self.args.sampler_fast
        if choice == "off":
            return None
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        on_cuda = next(policy.parameters()).device.type == "cuda"
        if choice == "auto":  # a PEFT policy too: the decoder recaptures if its adapters change
            usable = on_cuda and not sharded and not self._teacher_is_policy
            return "cuda_graph" if usable else None
        if sharded and choice != "eager":
            raise ValueError(
                f"sampler_fast={choice!r} needs an unsharded policy: under FSDP / ZeRO-3 every forward is "
                "a collective, which the fast path does not keep in step. Use sampler_fast='auto'."
            )
        if self._teacher_is_policy and choice != "eager":
            raise ValueError(
                f"sampler_fast={choice!r} with the policy as its own teacher is not supported; use 'auto'."
            )
        return choice

    def _decoder(self, policy, teacher, mode: str):
        """The `FastDecoder` rollouts are drawn with, kept across steps with its static caches (and, in
        a graph mode, its captured step: the optimizer updates the parameters in place, so the
        captured step reads the new weights)."""
        from optimal_sampling.fast import FastDecoder, FastPathConfig

        decoders = self.__dict__.setdefault("_fast_decoders", {})  # mode -> decoder
        decoder = decoders.get(mode)
        if decoder is None or decoder.base is not policy or decoder.teacher is not teacher:
            # Eager: look at the finished mask every step, so that the random stream is used as `generate`
            # uses it (a graph mode checks every 8 steps, to keep the host out of the GPU's way).
            extra: dict[str, Any] = {"check_every": 1} if mode == "eager" else {}
            config = FastPathConfig(mode=mode, diagnostics=True, **extra)
            decoder = decoders[mode] = FastDecoder(policy, teacher, config)
        return decoder

    # -- metrics -------------------------------------------------------------------------

    def _log_rollout_metrics(self, extra: dict[str, torch.Tensor] | None = None) -> None:
        """Log α, KL (over q* rows) and, via `extra`, per-token or per-row weight statistics.

        Every rank gathers one fixed-size tensor of sufficient statistics (sum, sum of squares,
        count, min, max per quantity), so the statistics are exact over all processes.
        """
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        rollouts, self._pending_rollouts = self._pending_rollouts, []
        per_token: dict[str, list[torch.Tensor]] = {
            "alpha": [],
            "kl_theta": [],
            "kl_t": [],
            "kl_diff": [],
            "chernoff": [],
            "entropy_q": [],
            "empty_support": [],
        }
        for r in rollouts:  # α and KL describe the q* rows (on-policy rows have α = 0, q = π_θ)
            mask = r.token_mask & ~r.on_policy.to(r.token_mask.device).unsqueeze(-1)
            per_token["alpha"].append(r.alpha[mask])
            for name in per_token:
                if name != "alpha":
                    per_token[name].append(r.diagnostics[name][mask])
        values = {
            name: torch.cat(parts).double() if parts else torch.zeros(0, dtype=torch.float64)
            for name, parts in per_token.items()
        }
        for name, tensor in (extra or {}).items():
            values[name] = tensor.detach().double().flatten()
        names = sorted(values)
        stats = torch.stack([_sufficient_stats(values[n].to(device)) for n in names])  # [K, 5]
        gathered = self.accelerator.gather(stats.float().to(device)).view(-1, len(names), 5).double()
        total = gathered[..., 0].sum(0)
        total_sq = gathered[..., 1].sum(0)
        count = gathered[..., 2].sum(0)
        low = gathered[..., 3].min(0).values
        high = gathered[..., 4].max(0).values
        metrics = self._metrics[mode]
        for k, name in enumerate(names):
            n = float(count[k])
            if n == 0:
                continue
            mean = float(total[k]) / n
            if name == "alpha":
                var = max(float(total_sq[k]) / n - mean * mean, 0.0)
                metrics[METRIC_PREFIX + "alpha_mean"].append(mean)
                metrics[METRIC_PREFIX + "alpha_std"].append(var**0.5)
                metrics[METRIC_PREFIX + "alpha_min"].append(float(low[k]))
                metrics[METRIC_PREFIX + "alpha_max"].append(float(high[k]))
            elif name == "is_weight":
                metrics[METRIC_PREFIX + "is_weight_mean"].append(mean)
                metrics[METRIC_PREFIX + "is_weight_min"].append(float(low[k]))
                metrics[METRIC_PREFIX + "is_weight_max"].append(float(high[k]))
                # Kish effective sample size of the raw weights, as a fraction of the sample count.
                metrics[METRIC_PREFIX + "is_weight_ess"].append(float(total[k]) ** 2 / (n * float(total_sq[k])))
            elif name == "empty_support":
                metrics[METRIC_PREFIX + "empty_support_frac"].append(mean)
            else:
                metrics[METRIC_PREFIX + name].append(mean)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # TRL averages each metric over the logging window; a window's min / max should be the extreme.
        mode = "train" if self.model.training else "eval"
        for key, values in self._metrics[mode].items():
            if key.startswith(METRIC_PREFIX) and len(values) > 1:
                if key.endswith("_min"):
                    values[:] = [min(values)]
                elif key.endswith("_max"):
                    values[:] = [max(values)]
        super().log(logs, start_time)


def _sufficient_stats(x: torch.Tensor) -> torch.Tensor:
    """`[5]` float64: sum, sum of squares, count, min, max (±inf when empty) of a 1-D tensor."""
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return torch.tensor([0.0, 0.0, 0.0, float("inf"), float("-inf")], dtype=torch.float64, device=x.device)
    return torch.stack(
        [x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device), x.min(), x.max()]
    )


def _format_template(template: str, row: dict) -> str:
    try:
        return template.format(**row)
    except KeyError as error:
        raise KeyError(
            f"`teacher_prompt_template` uses the field {error} but the dataset rows have only {sorted(row)}."
        ) from None
