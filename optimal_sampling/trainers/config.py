"""Configuration of the optimal-sampling trainers: TRL's configs plus the q* sampler's fields."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from trl import DistillationConfig, GRPOConfig, RLOOConfig

from optimal_sampling.options import ALPHA_METHODS, QStarOptions, q_star_field, q_star_from, refuse_unsupported
from optimal_sampling.topk_decoding import UNSUPPORTED_OPTIONS

from .estimators import check_consistent

SAMPLER_BACKENDS = ("transformers", "vllm", "vllm-inprocess")
VLLM_BACKENDS = ("vllm", "vllm-inprocess")
SAMPLER_FAST = ("auto", "off", "eager", "cuda_graph", "compile_mixture", "compile")
RLOO_WEIGHTINGS = ("none", "sequence_truncate", "sequence_mask", "mis")  # RLOO's loss is sequence level
RLOO_BASELINES = ("group", "on_policy", "is")


@dataclass
class QStarSamplingArguments:
    """The fields every optimal-sampling trainer config adds to its TRL config: the teacher, q*, the sampler.

    Teacher:
        teacher_model_name_or_path: path or Hub id of the teacher, used when the trainer gets
            no `teacher_model=`.
        teacher_model_init_kwargs: `from_pretrained` kwargs for the teacher (dict or JSON
            string); `dtype` defaults to the policy's.
        teacher_prompt_template: `str.format` template over the dataset row giving the
            teacher's prompt, e.g. `"<|user|>\\n{prompt}\\n<|assistant|>\\n"` or `"{teacher_prompt}"`.
        teacher_prompt_fn: a callable `row -> prompt` (a string, or chat messages that the
            teacher's chat template formats), or its import path `"package.module:function"`.
            With neither field the teacher sees exactly the base's prompt tokens.

    α (see `optimal_sampling.solve_alpha`):
        alpha_method: `"kl_symmetry"` (the KL-symmetric α*), `"fixed"` (a constant `alpha`: 0 samples
            the policy, 1 the teacher), `"entropy"`, `"ess_balance"` or `"kl_budget"` (the largest α with
            KL(q‖π_θ) ≤ `kl_budget`). Each trainer config states its default.
        alpha: the constant for `alpha_method="fixed"`.
        kl_budget: ε of `alpha_method="kl_budget"`, in nats per token.
        alpha_min, alpha_max: clamp α.
        teacher_top_p: restrict both models to the teacher's top-p nucleus before solving.
        force_teacher_first_tokens: α = 1 for the first n tokens of every q* completion.
        teacher_decay_ratio: the teacher's pull (the α clamp, and `kl_budget`) decays linearly
            to 0 over this fraction of `max_steps`; from then on every row is on-policy.

    Sampler backend:
        sampler_backend: `"transformers"` (in-process decode loop, exact, full vocabulary),
            `"vllm"` (two vLLM servers and `DualVLLMCoordinator`, top-k; the base server gets the
            policy's weights before every rollout after an optimizer step, like TRL's server
            mode) or `"vllm-inprocess"` (two vLLM engines in the trainer's process, driven token
            by token, top-k; the policy engine reloads the weights, like TRL's colocate mode).
        sampler_fast: how the transformers backend's decode engine (`FastDecoder`) runs: `"auto"`
            (its step captured in a CUDA graph when the policy is on one CUDA device and unsharded,
            else eager), `"off"` (eager) or a `FastPathConfig` mode.
        sampler_theta_url, sampler_t_url: the base and teacher server URLs (`"vllm"`).
        sampler_top_k: log-probs each vLLM model contributes per token (both vLLM backends).
        sampler_engine_args: `KEY=VALUE` / `base.KEY=VALUE` / `teacher.KEY=VALUE` engine
            arguments (`optimal_sampling.engines.VLLMEngineSpec` fields or any
            `vllm.AsyncEngineArgs` field) for `"vllm-inprocess"`.
    """

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Path or Hub id of the teacher model, used when the trainer is given no `teacher_model=`."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments (dict or JSON string) for `AutoModelForCausalLM.from_pretrained` when the "
            "teacher is given as a path. `dtype` defaults to the policy's."
        },
    )
    teacher_prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "`str.format` template over the dataset row that gives the teacher's prompt, e.g. "
            "'<|user|>\\n{prompt}\\n<|assistant|>\\n' or '{teacher_prompt}'. Default: the teacher sees the base's prompt."
        },
    )
    teacher_prompt_fn: str | None = field(
        default=None,
        metadata={
            "help": "A callable mapping a dataset row to the teacher's prompt (string or chat messages), or its "
            "import path 'package.module:function'. Exclusive with `teacher_prompt_template`."
        },
    )
    # The q* options (`optimal_sampling.QStarOptions`): the same names, defaults and help texts (a trainer
    # config may state another default for the α rule); `temperature` is TRL's own field, and top-k /
    # top-p after mixing stay off.
    alpha_method: str = q_star_field("alpha_method")
    alpha: float | None = q_star_field("alpha")
    alpha_min: float = q_star_field("alpha_min")
    alpha_max: float = q_star_field("alpha_max")
    teacher_top_p: float | None = q_star_field("teacher_top_p")
    force_teacher_first_tokens: int = q_star_field("force_teacher_first_tokens")
    kl_budget: float | None = q_star_field("kl_budget")
    empty_support: str = q_star_field("empty_support")
    alpha_tol: float = q_star_field("tol")
    alpha_max_iter: int = q_star_field("max_iter")
    teacher_decay_ratio: float | None = field(
        default=None,
        metadata={
            "help": "If set, the teacher's pull decays linearly to 0 over this fraction of `max_steps`: "
            "`alpha_min`/`alpha_max` (and `kl_budget`) are multiplied by max(0, 1 - step / (ratio * max_steps)); "
            "once it reaches 0 every row is sampled on-policy."
        },
    )
    sampler_backend: str = field(
        default="transformers",
        metadata={
            "help": "'transformers': the in-process q* decode loop (exact, full vocabulary). 'vllm': two vLLM servers "
            "(`optimal_sampling.DualVLLMCoordinator`, top-k; the base server receives the policy's weights after "
            "every optimizer step and must run with VLLM_SERVER_DEV_MODE=1). 'vllm-inprocess': two vLLM engines in "
            "this process driven token by token (`optimal_sampling.engines`, top-k; the policy engine reloads the "
            "weights, like TRL's colocate mode)."
        },
    )
    sampler_fast: str = field(
        default="auto",
        metadata={
            "help": "How `sampler_backend='transformers'` runs the package's decode engine (static caches for both "
            "models). 'auto': its step captured in a CUDA graph ('cuda_graph') when the policy is on a CUDA device and "
            "not sharded (one process or DDP), else eager (one step per token from Python; under FSDP / ZeRO-3 the "
            "ranks stop together). 'off': always eager. 'eager', 'cuda_graph', 'compile_mixture', 'compile': that "
            "mode (`optimal_sampling.fast.FastPathConfig`)."
        },
    )
    sampler_theta_url: str | None = field(
        default=None, metadata={"help": "Base (π_θ) vLLM server URL for `sampler_backend='vllm'`."}
    )
    sampler_t_url: str | None = field(
        default=None, metadata={"help": "Teacher (π_t) vLLM server URL for `sampler_backend='vllm'`."}
    )
    sampler_top_k: int = field(
        default=20, metadata={"help": "Log-probs each vLLM model contributes per token (both vLLM backends)."}
    )
    sampler_engine_args: list[str] | None = field(
        default=None,
        metadata={
            "help": "Engine arguments for `sampler_backend='vllm-inprocess'`: 'KEY=VALUE' for both engines, "
            "'base.KEY=VALUE' / 'teacher.KEY=VALUE' for one (VLLMEngineSpec fields such as dtype, "
            "max_model_len, gpu_memory_utilization, kv_cache_memory_bytes, or any vllm.AsyncEngineArgs field)."
        },
    )

    @property
    def q_star(self) -> QStarOptions:
        """The q* options of the rollouts: these fields and TRL's `temperature` (both models, before mixing);
        TRL's `top_k` / `top_p` must stay off (`check_generation_options`)."""
        return q_star_from(self, exclude=("top_k", "top_p"))

    def _check_sampling_fields(self) -> QStarOptions:
        q_star = self.q_star  # QStarOptions validates the q* fields, as for every front
        if self.teacher_decay_ratio is not None and not 0.0 < self.teacher_decay_ratio <= 1.0:
            raise ValueError(
                f"`teacher_decay_ratio` is a fraction of `max_steps` in (0, 1], got {self.teacher_decay_ratio}."
            )
        if self.teacher_prompt_template is not None and self.teacher_prompt_fn is not None:
            raise ValueError("Set `teacher_prompt_template` or `teacher_prompt_fn`, not both.")
        if self.sampler_backend not in SAMPLER_BACKENDS:
            raise ValueError(f"`sampler_backend` must be one of {SAMPLER_BACKENDS}, got {self.sampler_backend!r}.")
        if self.sampler_backend == "vllm" and not (self.sampler_theta_url and self.sampler_t_url):
            raise ValueError("`sampler_backend='vllm'` needs `sampler_theta_url` and `sampler_t_url`.")
        if self.sampler_fast not in SAMPLER_FAST:
            raise ValueError(f"`sampler_fast` must be one of {SAMPLER_FAST}, got {self.sampler_fast!r}.")
        if self.sampler_engine_args and self.sampler_backend != "vllm-inprocess":
            raise ValueError(
                "`sampler_engine_args` configures the engines of `sampler_backend='vllm-inprocess'`; "
                "set that backend or drop them."
            )
        if self.sampler_backend in VLLM_BACKENDS:
            refuse_unsupported(q_star, UNSUPPORTED_OPTIONS, f"sampler_backend={self.sampler_backend!r}")
        return q_star

    def to_dict(self) -> dict[str, Any]:
        # A callable `teacher_prompt_fn` is logged (wandb, TensorBoard hparams) by its name.
        d = super().to_dict()  # type: ignore[misc]  # TRL's config, this mixin's partner, has it
        fn = d.get("teacher_prompt_fn")
        if callable(fn):
            d["teacher_prompt_fn"] = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
        return d


@dataclass
class OptimalSamplingArguments(QStarSamplingArguments):
    """The fields of the RL trainers (GRPO, RLOO): the sampler's, and how q* rows enter the update.

    How q* rows enter the update (see `optimal_sampling.trainers.estimators`):
        num_on_policy_generations: k of each prompt's `num_generations` completions are sampled
            from π_θ itself (α = 0, weight 1) in the same batch, the rest from q*.
        importance_weighting: the weight of q* rows: `"none"`, `"shaping"`, `"token_truncate"`,
            `"token_mask"`, `"sequence_truncate"`, `"sequence_mask"` or `"mis"`.
        importance_weight_cap: C of the truncating and masking modes.
        shaping_gamma: γ of `"shaping"`.
        advantage_baseline: `"group"` (the trainer's own), `"on_policy"`, `"is"` or `"none"`.
        allow_inconsistent_baseline: permit a truncated weighting with the group baseline (biased;
            for ablations).
    """

    # The α rule's default (KL symmetry: the off-policy rows are q* rows) comes from the pre-registered
    # teacher-payoff experiment (recipes/PREREGISTRATION_TEACHER_PAYOFF.md): 4 + 4 q* rows were non-inferior
    # to 4 + 4 teacher rows in all four regimes and far better where the teacher writes in another style.
    # Half the group on-policy, no weights and the group baseline come from the issue-13 experiment
    # (recipes/PREREGISTRATION.md); recipes/RESULTS.md has both.
    alpha_method: str = q_star_field(
        "alpha_method",
        help=f"How α is chosen per token: one of {', '.join(ALPHA_METHODS)}. Default 'kl_symmetry': the "
        "off-policy rows sample the KL-symmetric blend q* (the rule the teacher-payoff experiment in "
        "recipes/RESULTS.md chose); 'fixed' with alpha=1.0 samples plain teacher rows.",
    )
    alpha: float | None = q_star_field(
        "alpha",
        help="The constant α for `alpha_method='fixed'` (0: sample π_θ, i.e. vanilla GRPO; 1: the teacher).",
    )
    num_on_policy_generations: int | None = field(
        default=None,
        metadata={
            "help": "k of the `num_generations` completions of each prompt are sampled from the policy itself "
            "(α = 0, importance weight exactly 1) in the same batch; the other G - k from q*. k = G is vanilla "
            "GRPO, k = 0 samples every row from q*. Default (None): half the group, G // 2."
        },
    )
    importance_weighting: str = field(
        default="none",
        metadata={
            "help": "The weight of the q* rows in the policy gradient (on-policy rows: 1). 'none': as if "
            "on-policy (a deliberate pull toward the teacher). 'shaping': LUFFY's policy shaping of the "
            "per-token ratio r = π_θ/q, weight γr/(r+γ)². 'token_truncate' / 'token_mask' / "
            "'sequence_truncate' / 'sequence_mask': TRL's truncated or masked ratios at "
            "`importance_weight_cap` (need advantage_baseline 'on_policy', 'is' or 'none'). 'mis': "
            "multiple importance sampling, every row weighted π_θ/(λπ_θ + (1-λ)q*) with λ = k/G (unbiased, "
            "bounded by G/k)."
        },
    )
    importance_weight_cap: float = field(
        default=3.0, metadata={"help": "C of the truncating and masking weightings: min(π_θ/q, C), or 0 above C."}
    )
    shaping_gamma: float = field(
        default=0.1, metadata={"help": "γ of `importance_weighting='shaping'`, f(r) = r / (r + γ)."}
    )
    advantage_baseline: str = field(
        default="group",
        metadata={
            "help": "The baseline subtracted from each reward. 'group': the trainer's own (GRPO: group mean; "
            "RLOO: leave-one-out). 'on_policy': the mean reward of the group's on-policy rows. 'is': the "
            "self-normalised importance-sampling estimate of the policy's success over the group. 'none': 0 "
            "(GRPO only). The reward scale (`scale_rewards`) stays the trainer's."
        },
    )
    allow_inconsistent_baseline: bool = field(
        default=False,
        metadata={
            "help": "Permit a truncated or masked importance weighting with `advantage_baseline='group'`, "
            "which biases the update toward the policy's own mistakes. For ablations only."
        },
    )

    def _check_optimal_sampling_fields(self) -> None:
        self._check_sampling_fields()
        if self.importance_weight_cap <= 0 or self.shaping_gamma <= 0:
            raise ValueError(
                f"`importance_weight_cap` (={self.importance_weight_cap}) and `shaping_gamma` (={self.shaping_gamma}) "
                "must be > 0."
            )
        groups = self.num_generations  # type: ignore[attr-defined]  # a field of TRL's config
        if self.num_on_policy_generations is None:
            self.num_on_policy_generations = groups // 2
        check_consistent(
            self.importance_weighting,
            self.advantage_baseline,
            self.num_on_policy_generations,
            groups,
            allow_inconsistent=self.allow_inconsistent_baseline,
        )
        if self.sampler_backend in VLLM_BACKENDS:
            needs_star = [
                name
                for name, value in (
                    ("importance_weighting", self.importance_weighting),
                    ("advantage_baseline", self.advantage_baseline),
                )
                if value in ("mis", "is")
            ]
            if needs_star:
                raise ValueError(
                    f"{needs_star[0]}={getattr(self, needs_star[0])!r} needs log q*(y) of the on-policy rows, which the "
                    "vLLM backends do not record (they sample those rows from the base alone); use "
                    "sampler_backend='transformers', or another weighting / baseline."
                )


#: TRL's own correction fields (`use_vllm` runs): the q* trainers weight rows with
#: `importance_weighting` instead, so a changed value here would silently do nothing.
_TRL_IS_FIELDS = {
    "vllm_importance_sampling_correction": ("importance_weighting", "'none' to switch weights off"),
    "vllm_importance_sampling_mode": ("importance_weighting", "e.g. 'token_truncate'"),
    "vllm_importance_sampling_clip_max": ("importance_weight_cap", "C"),
    "vllm_importance_sampling_clip_min": ("importance_weighting", "a truncating mode"),
}


@dataclass
class OptimalSamplingGRPOConfig(OptimalSamplingArguments, GRPOConfig):
    """`GRPOConfig` for `OptimalSamplingGRPOTrainer`: rollouts from q*, mixed with on-policy rows.

    Adds the fields of `OptimalSamplingArguments`: the teacher and its prompt, the α rule and
    its schedule, and how q* rows enter the update (`num_on_policy_generations`,
    `importance_weighting`, `advantage_baseline`; see `optimal_sampling.trainers.estimators` for what each
    value computes and which combinations are refused). TRL's `vllm_importance_sampling_*`
    fields are not used (a changed value raises and names the field to set instead).

    `temperature` applies to both models before mixing; `top_k` / `top_p` must stay 0 / 1.0
    (the trainer scores untruncated π_θ).

    Example:
        >>> from optimal_sampling.trainers import OptimalSamplingGRPOConfig
        >>> args = OptimalSamplingGRPOConfig(output_dir="/tmp/os-grpo", num_generations=8,
        ...                                  teacher_prompt_template="{teacher_prompt}", report_to="none",
        ...                                  use_cpu=True, bf16=False)
        >>> args.num_on_policy_generations, args.alpha_method, args.importance_weighting  # 4 + 4 q* rows
        (4, 'kl_symmetry', 'none')
        >>> OptimalSamplingGRPOConfig(output_dir="/tmp/os-grpo", alpha_method="fixed", alpha=1.0, num_generations=8,
        ...                           report_to="none", use_cpu=True, bf16=False).q_star.alpha  # plain teacher rows
        1.0
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    def __post_init__(self):
        super().__post_init__()
        for name, (replacement, hint) in _TRL_IS_FIELDS.items():
            if getattr(self, name) != _GRPO_DEFAULTS[name]:
                raise ValueError(
                    f"`{name}` is TRL's correction for vLLM rollouts, which OptimalSamplingGRPOConfig does not use: "
                    f"set `{replacement}` instead ({hint}). See `optimal_sampling.trainers.estimators` for the choices."
                )
        self._check_optimal_sampling_fields()
        if self.advantage_baseline != "group" and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                f"`advantage_baseline={self.advantage_baseline!r}` recomputes advantages from the summed rewards, "
                "which needs `multi_objective_aggregation='sum_then_normalize'` (TRL's default)."
            )


_GRPO_DEFAULTS = {f.name: f.default for f in fields(GRPOConfig) if f.name in _TRL_IS_FIELDS}


@dataclass
class OptimalSamplingRLOOConfig(OptimalSamplingArguments, RLOOConfig):
    """`RLOOConfig` for `OptimalSamplingRLOOTrainer`: rollouts from q*, mixed with on-policy rows.

    RLOO's loss is sequence level, so are its weights: `importance_weighting` is `"none"`,
    `"sequence_truncate"`, `"sequence_mask"` or `"mis"`, and multiplies each completion's
    advantage (stop-gradient). `advantage_baseline` is `"group"` (leave-one-out),
    `"on_policy"` or `"is"`; a truncating weighting with the leave-one-out baseline over q*
    rewards is refused (`optimal_sampling.trainers.estimators.check_consistent`).

    Example:
        >>> from optimal_sampling.trainers import OptimalSamplingRLOOConfig
        >>> args = OptimalSamplingRLOOConfig(output_dir="/tmp/os-rloo", num_generations=4, use_cpu=True, bf16=False,
        ...                                  importance_weighting="sequence_truncate", advantage_baseline="is")
        >>> args.num_on_policy_generations, args.importance_weight_cap
        (2, 3.0)
    """

    _VALID_DICT_FIELDS = RLOOConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    def __post_init__(self):
        super().__post_init__()
        if self.importance_weighting not in RLOO_WEIGHTINGS:
            raise ValueError(
                f"RLOO's loss is sequence level: `importance_weighting` must be one of {RLOO_WEIGHTINGS}, got "
                f"{self.importance_weighting!r}."
            )
        if self.advantage_baseline not in RLOO_BASELINES:
            raise ValueError(
                f"`advantage_baseline` must be one of {RLOO_BASELINES} for RLOO, got {self.advantage_baseline!r}."
            )
        self._check_optimal_sampling_fields()


@dataclass
class OptimalSamplingDistillationConfig(QStarSamplingArguments, DistillationConfig):
    """`DistillationConfig` for `OptimalSamplingDistillationTrainer`: the student's rollouts come from q*.

    TRL's on-policy distillation samples each completion from the student and trains it toward the
    teacher's next-token distribution at every visited prefix (generalized JSD, `beta`; 1 = reverse
    KL). Here the completions can be sampled from q* ∝ π_θ^(1-α)·π_t^α instead: the fields of
    `QStarSamplingArguments` choose α (`alpha_method`), its clamp and its schedule (`teacher_decay_ratio`:
    with `alpha_method="kl_budget"` that is TRB's trust region annealed to on-policy distillation), and
    the backend. **The default is α = 0** (`alpha_method="fixed", alpha=0.0`): exactly TRL's sampling. In
    the pre-registered teacher-payoff experiment (recipes/RESULTS.md) q* rollouts gained +0.004 to +0.008
    AUC over on-policy distillation on addition, nothing on subtraction, and lost 0.008 where the teacher
    writes in another style, so by the rule fixed in advance they did not become the default; set
    `alpha_method="kl_symmetry"` or the TRB schedule to use them. The loss is TRL's, unchanged and unweighted: a
    per-prefix divergence needs no importance weight when another policy chooses the prefixes
    (`theory/derivation.md` §9). With α = 0 (`alpha_method="fixed", alpha=0`, `alpha_max=0`, or a
    decayed schedule) the trainer draws exactly the completions of `DistillationTrainer`.

    With a teacher prompt (`teacher_prompt_template` / `teacher_prompt_fn`), the teacher conditions on it
    both when q* is sampled and, with `teacher_prompt_in_loss` (default), in the loss: the student is
    trained toward π_t(· | teacher prompt, y<t), the distribution q* blends.

    Example:
        >>> from optimal_sampling.trainers import OptimalSamplingDistillationConfig
        >>> args = OptimalSamplingDistillationConfig(output_dir="/tmp/os-distill", use_cpu=True, bf16=False,
        ...                                          report_to="none")
        >>> args.alpha_method, args.alpha, args.beta  # the default: on-policy distillation, as TRL's
        ('fixed', 0.0, 1.0)
        >>> OptimalSamplingDistillationConfig(output_dir="/tmp/os-distill", use_cpu=True, bf16=False, report_to="none",
        ...     alpha_method="kl_budget", kl_budget=0.25, teacher_decay_ratio=0.5).q_star.kl_budget  # TRB
        0.25
    """

    # The default α rule, by the pre-registered rule of recipes/PREREGISTRATION_TEACHER_PAYOFF.md: neither
    # q* (KL symmetry) nor the TRB schedule was non-inferior to on-policy distillation in every regime.
    alpha_method: str = q_star_field(
        "alpha_method",
        default="fixed",
        help=f"How α is chosen per token: one of {', '.join(ALPHA_METHODS)}. Default 'fixed' with alpha=0.0: "
        "the student's own completions, exactly TRL's DistillationTrainer (the teacher-payoff experiment in "
        "recipes/RESULTS.md found no robust gain from q* rollouts in distillation); 'kl_symmetry' samples "
        "q*, 'kl_budget' with `teacher_decay_ratio` is TRB's annealed trust region.",
    )
    alpha: float | None = q_star_field(
        "alpha", default=0.0, help="The constant α for `alpha_method='fixed'` (0: the student, 1: the teacher)."
    )
    teacher_prompt_in_loss: bool = field(
        default=True,
        metadata={
            "help": "With a teacher prompt, score the completion under the teacher's own prompt in the loss (the "
            "teacher distribution q* blends); False: under the student's prompt, as TRL's DistillationTrainer."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_sampling_fields()
