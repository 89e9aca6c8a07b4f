"""Configuration of the optimal-sampling trainers: TRL's configs plus the q* sampler's fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig, RLOOConfig

from optimal_sampling.alpha import ALPHA_METHODS

SAMPLER_BACKENDS = ("transformers", "vllm")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass
class OptimalSamplingArguments:
    """The fields every optimal-sampling trainer config adds to its TRL config.

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
        alpha_method: `"kl_symmetry"` (the KL-symmetric α*, default), `"fixed"`, `"entropy"`
            or `"ess_balance"`.
        alpha: the constant for `alpha_method="fixed"` (0 = vanilla GRPO, 1 = teacher samples).
        alpha_min, alpha_max: clamp α.
        teacher_top_p: restrict both models to the teacher's top-p nucleus before solving.
        force_teacher_first_tokens: α = 1 for the first n tokens of every completion.

    Sampler backend:
        sampler_backend: `"transformers"` (in-process decode loop, exact) or `"vllm"` (the
            two-server coordinator, top-k approximation).
        sampler_theta_url, sampler_t_url, sampler_top_k: the coordinator's base and teacher
            server URLs and its top-k (only for `sampler_backend="vllm"`).
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
    alpha_method: str = field(
        default="kl_symmetry",
        metadata={"help": f"How α is chosen per token: one of {', '.join(ALPHA_METHODS)}."},
    )
    alpha: float | None = field(
        default=None,
        metadata={"help": "The constant α for `alpha_method='fixed'` (0: sample π_θ, i.e. vanilla GRPO; 1: the teacher)."},
    )
    alpha_min: float = field(default=0.0, metadata={"help": "Lower clamp on α."})
    alpha_max: float = field(default=1.0, metadata={"help": "Upper clamp on α."})
    teacher_top_p: float | None = field(
        default=None,
        metadata={"help": "Restrict both models to the teacher's top-p nucleus before solving for α."},
    )
    force_teacher_first_tokens: int = field(
        default=0, metadata={"help": "Use α = 1 for the first n tokens of every completion."}
    )
    sampler_backend: str = field(
        default="transformers",
        metadata={
            "help": "'transformers': the in-process q* decode loop (exact, full vocabulary). 'vllm': the two-server "
            "coordinator (`optimal_sampling.DualVLLMCoordinator`, top-k approximation)."
        },
    )
    sampler_theta_url: str | None = field(
        default=None, metadata={"help": "Base (π_θ) vLLM server URL for `sampler_backend='vllm'`."}
    )
    sampler_t_url: str | None = field(
        default=None, metadata={"help": "Teacher (π_t) vLLM server URL for `sampler_backend='vllm'`."}
    )
    sampler_top_k: int = field(
        default=20, metadata={"help": "Top-k log-probs each server returns, for `sampler_backend='vllm'`."}
    )

    def _check_optimal_sampling_fields(self) -> None:
        if self.alpha_method not in ALPHA_METHODS:
            raise ValueError(f"`alpha_method` must be one of {', '.join(ALPHA_METHODS)}, got {self.alpha_method!r}.")
        if self.alpha_method == "fixed" and (self.alpha is None or not 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"`alpha_method='fixed'` needs `alpha` in [0, 1], got alpha={self.alpha}.")
        if not 0.0 <= self.alpha_min <= self.alpha_max <= 1.0:
            raise ValueError(f"Need 0 <= alpha_min <= alpha_max <= 1, got {self.alpha_min} and {self.alpha_max}.")
        if self.force_teacher_first_tokens < 0:
            raise ValueError(f"`force_teacher_first_tokens` must be >= 0, got {self.force_teacher_first_tokens}.")
        if self.teacher_prompt_template is not None and self.teacher_prompt_fn is not None:
            raise ValueError("Set `teacher_prompt_template` or `teacher_prompt_fn`, not both.")
        if self.sampler_backend not in SAMPLER_BACKENDS:
            raise ValueError(f"`sampler_backend` must be one of {SAMPLER_BACKENDS}, got {self.sampler_backend!r}.")
        if self.sampler_backend == "vllm" and not (self.sampler_theta_url and self.sampler_t_url):
            raise ValueError("`sampler_backend='vllm'` needs `sampler_theta_url` and `sampler_t_url`.")

    def to_dict(self) -> dict[str, Any]:
        # A callable `teacher_prompt_fn` is logged (wandb, TensorBoard hparams) by its name.
        d = super().to_dict()
        fn = d.get("teacher_prompt_fn")
        if callable(fn):
            d["teacher_prompt_fn"] = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
        return d


_IS_HELP = (
    "How the importance weights π_θ/q of the q* rollouts are applied (TRL's `vllm_importance_sampling_mode`). "
    "'token_truncate' (default here): per-token ratio truncated at `vllm_importance_sampling_clip_max`; "
    "'token_mask', 'sequence_truncate', 'sequence_mask' as in TRL. Sequence modes multiply ratios over a whole "
    "completion and zero nearly every off-policy sequence; prefer token modes."
)


@dataclass
class OptimalSamplingGRPOConfig(OptimalSamplingArguments, GRPOConfig):
    """`GRPOConfig` for `OptimalSamplingGRPOTrainer`: rollouts from q*, corrected by importance weights.

    Adds the fields of `OptimalSamplingArguments` (teacher, teacher prompt, α rule, sampler
    backend). The importance-sampling correction reuses TRL's fields, with token-level
    truncation as the default here:

    - `vllm_importance_sampling_correction` (True): weight the loss by π_θ/q per token. False
      trains on the q* samples as if they were on-policy (the biased baseline).
    - `vllm_importance_sampling_mode` (`"token_truncate"`): see TRL; sequence modes zero
      nearly all off-policy sequences.
    - `vllm_importance_sampling_clip_max` (3.0): the truncation cap C of min(π_θ/q, C).

    `temperature` applies to both models before mixing; `top_k` / `top_p` must stay 0 / 1.0
    (the trainer scores untruncated π_θ).

    Example:
        >>> from trainers import OptimalSamplingGRPOConfig
        >>> args = OptimalSamplingGRPOConfig(output_dir="/tmp/os-grpo", alpha_method="fixed", alpha=0.5,
        ...                                  teacher_prompt_template="{teacher_prompt}", report_to="none",
        ...                                  use_cpu=True, bf16=False)
        >>> args.vllm_importance_sampling_mode, args.vllm_importance_sampling_clip_max
        ('token_truncate', 3.0)
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    vllm_importance_sampling_mode: str = field(default="token_truncate", metadata={"help": _IS_HELP})

    def __post_init__(self):
        super().__post_init__()
        self._check_optimal_sampling_fields()
        if self.vllm_importance_sampling_mode not in IS_MODES:
            raise ValueError(
                f"`vllm_importance_sampling_mode` must be one of {IS_MODES}, got {self.vllm_importance_sampling_mode!r}."
            )


@dataclass
class OptimalSamplingRLOOConfig(OptimalSamplingArguments, RLOOConfig):
    """`RLOOConfig` for `OptimalSamplingRLOOTrainer`: rollouts from q*, sequence-level importance weights.

    RLOO's loss is sequence level, so the correction is too: each completion's advantage is
    multiplied by the truncated sequence weight min(π_θ(y)/q(y), `importance_sampling_clip_max`)
    (stop-gradient), which gives the importance-weighted clipped RLOO objective.

    Example:
        >>> from trainers import OptimalSamplingRLOOConfig
        >>> OptimalSamplingRLOOConfig(output_dir="/tmp/os-rloo", use_cpu=True, bf16=False).importance_sampling_clip_max
        3.0
    """

    _VALID_DICT_FIELDS = RLOOConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    importance_sampling_correction: bool = field(
        default=True,
        metadata={"help": "Multiply each advantage by min(π_θ(y)/q(y), importance_sampling_clip_max). False trains "
                  "on q* samples as if on-policy."},
    )
    importance_sampling_clip_max: float = field(
        default=3.0, metadata={"help": "Truncation cap C of the sequence-level weight min(π_θ(y)/q(y), C)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_optimal_sampling_fields()
        if self.importance_sampling_clip_max <= 0:
            raise ValueError(f"`importance_sampling_clip_max` must be > 0, got {self.importance_sampling_clip_max}.")
