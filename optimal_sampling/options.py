"""`QStarOptions`: every setting of the per-token q* computation, validated once, in one place.

Every front takes one of these whole (`q_star=`): the logits processor, `optimal_generate`,
`OptimalSampler`, the fast path, the vLLM coordinators' configs, the trainers' configs and the
command line. Their own option fields are made from its fields (`q_star_field`), so a setting has
one name, one default and one help text; a front that cannot honour a setting refuses it by name
(`refuse_unsupported`) instead of dropping it.

This module imports neither torch nor transformers: the command line builds its options from
here before anything heavy loads. The solver's fixed numerical constants live here too, so that
the three solver implementations (torch, C, Triton) read them from one low module.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

ALPHA_METHODS = ("kl_symmetry", "fixed", "entropy", "ess_balance", "kl_budget")
EMPTY_SUPPORT_FALLBACKS = ("teacher", "base")

# -- solver constants, shared by alpha.py, cpu_kernel.py (C) and kernels.py (Triton) ------

#: Δ-spreads below this (relative to |Δ|) are float round-off of a constant Δ: such a row
#: gives the same q for every α, and gets the conventional α = 0.5.
DEGENERATE_RTOL = 1e-5
#: A Newton step of the KL-symmetry solve is accepted without a pass to confirm it only while it
#: is this short (solvers.py, `_newton_step_lands`).
QUADRATIC_STEP = 1e-4


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class QStarOptions:
    """How q* is computed at each token; frozen and validated when built.

    Temperature applies to both models before mixing, `top_k` / `top_p` to q* after mixing.
    `force_teacher_first_tokens` and the empty-support fallback are applied by the step
    itself (`optimal_sampling.mixture.compute_mixture`), on the device. Every field's help
    text is in `metadata["help"]` (`QStarOptions.field_help()`).

    Example:
        >>> from optimal_sampling import QStarOptions
        >>> options = QStarOptions(alpha_method="fixed", alpha=0.3, empty_support="base")
        >>> options.replace(alpha=0.7).alpha, options.empty_support
        (0.7, 'base')
        >>> QStarOptions(alpha_method="fixed")
        Traceback (most recent call last):
        ...
        ValueError: alpha_method='fixed' needs `alpha=` (a number in [0, 1]).
        >>> options.replace(temprature=0.7)
        Traceback (most recent call last):
        ...
        TypeError: Unknown q* option 'temprature'; the options are: alpha_method, alpha, kl_budget, alpha_min, alpha_max, teacher_top_p, force_teacher_first_tokens, empty_support, temperature, top_k, top_p, tol, max_iter.
    """

    alpha_method: str = field(
        default="kl_symmetry",
        metadata=_help(
            f"How α is chosen per token: one of {', '.join(ALPHA_METHODS)}. 'kl_symmetry': "
            "KL(q‖π_θ) = KL(q‖π_t); 'fixed': the constant `alpha`; 'entropy': the entropy ratio; "
            "'ess_balance': equal effective sample sizes; 'kl_budget': the largest α with "
            "KL(q‖π_θ) ≤ `kl_budget`.",
            choices=ALPHA_METHODS,
        ),
    )
    alpha: float | None = field(default=None, metadata=_help("The constant α in [0, 1] for alpha_method='fixed'."))
    kl_budget: float | None = field(
        default=None,
        metadata=_help(
            "For alpha_method='kl_budget': the largest KL(q‖π_θ) per token, in nats, that the sampled "
            "q may have (e.g. 0.1)."
        ),
    )
    alpha_min: float = field(default=0.0, metadata=_help("Lower clamp on α."))
    alpha_max: float = field(default=1.0, metadata=_help("Upper clamp on α."))
    teacher_top_p: float | None = field(
        default=None,
        metadata=_help(
            "Restrict both models to the teacher's top-p nucleus before solving for α, so that the "
            "symmetry holds on the tokens that can be sampled."
        ),
    )
    force_teacher_first_tokens: int = field(
        default=0, metadata=_help("α = 1 (teacher samples) for the first n generated tokens of every completion.")
    )
    empty_support: str = field(
        default="teacher",
        metadata=_help(
            "What a token whose two distributions share no token samples: 'teacher' (α = 1, q = π_t) or "
            "'base' (α = 0, q = π_θ). Such tokens are counted in the `empty_support` diagnostic.",
            choices=EMPTY_SUPPORT_FALLBACKS,
        ),
    )
    temperature: float = field(default=1.0, metadata=_help("Applied to both models' logits before mixing."))
    top_k: int = field(default=0, metadata=_help("Keep the k most likely tokens of q* after mixing (0: all)."))
    top_p: float = field(default=1.0, metadata=_help("Keep q*'s top-p nucleus after mixing (1.0: all)."))
    tol: float = field(default=1e-6, metadata=_help("Tolerance on α of the iterative solvers."))
    max_iter: int = field(default=20, metadata=_help("Iteration cap of the iterative α solvers."))

    def __post_init__(self):
        if self.alpha_method not in ALPHA_METHODS:
            raise ValueError(f"Unknown alpha method {self.alpha_method!r}; choose one of {', '.join(ALPHA_METHODS)}.")
        if self.alpha_method == "fixed" and self.alpha is None:
            raise ValueError("alpha_method='fixed' needs `alpha=` (a number in [0, 1]).")
        if self.alpha is not None and not (_is_number(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(
                f"`alpha` must lie in [0, 1] (a number), got {self.alpha!r}. For a per-row α, call "
                "`solve_alpha(..., 'fixed', alpha=<[B] tensor>)` directly."
            )
        if self.alpha_method == "kl_budget" and self.kl_budget is None:
            raise ValueError(
                "alpha_method='kl_budget' needs `kl_budget=`: the largest KL(q‖π_θ) per token, in nats, "
                "that the sampled q may have (e.g. 0.1)."
            )
        if self.kl_budget is not None and not (_is_number(self.kl_budget) and 0.0 <= self.kl_budget < math.inf):
            raise ValueError(f"`kl_budget` must be a finite number >= 0 (nats per token), got {self.kl_budget!r}.")
        if not (0.0 <= self.alpha_min <= self.alpha_max <= 1.0):
            raise ValueError(
                f"Need 0 <= alpha_min <= alpha_max <= 1, got alpha_min={self.alpha_min}, "
                f"alpha_max={self.alpha_max}; swap them or use the defaults 0.0 and 1.0."
            )
        if self.teacher_top_p is not None and not 0.0 < self.teacher_top_p <= 1.0:
            raise ValueError(
                f"`teacher_top_p` (={self.teacher_top_p}) must be in (0, 1]; use None to keep the whole support."
            )
        if not isinstance(self.force_teacher_first_tokens, int) or self.force_teacher_first_tokens < 0:
            raise ValueError(
                f"`force_teacher_first_tokens` (={self.force_teacher_first_tokens!r}) must be an integer >= 0."
            )
        if self.empty_support not in EMPTY_SUPPORT_FALLBACKS:
            raise ValueError(f"`empty_support` must be 'teacher' or 'base', got {self.empty_support!r}.")
        if not (_is_number(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"`temperature` (={self.temperature}) has to be a strictly positive float; for greedy "
                "decoding take the argmax of log q instead."
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"`top_k` (={self.top_k!r}) must be an integer >= 0 (0 disables it).")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p` (={self.top_p}) must be in (0, 1] (1.0 disables it).")
        if not self.tol > 0 or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"Need tol > 0 and max_iter >= 1, got tol={self.tol}, max_iter={self.max_iter}.")

    def replace(self, **changes: Any) -> QStarOptions:
        """A copy with `changes` (validated); an unknown name raises and lists the options."""
        check_option_names(changes)
        return replace(self, **changes)

    @classmethod
    def build(cls, q_star: QStarOptions | None = None, **changes: Any) -> QStarOptions:
        """`q_star` (default: the defaults) with keyword `changes`: how fronts accept both forms."""
        if q_star is not None and not isinstance(q_star, QStarOptions):
            raise TypeError(f"`q_star` must be a QStarOptions, got {type(q_star).__name__}.")
        return (q_star or cls()).replace(**changes) if changes else (q_star or cls())

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Option name → help text."""
        return {f.name: f.metadata["help"] for f in fields(cls)}

    def in_use(self) -> dict[str, Any]:
        """The options that change what is sampled under this α rule, by name: `alpha` only for
        'fixed', `kl_budget` only for 'kl_budget', the solver's `tol` / `max_iter` only for the
        iterative rules. What a run records, and what a resumed run must match.

        Example:
            >>> sorted(set(QStarOptions().__dict__) - set(QStarOptions(alpha=0.5).in_use()))
            ['alpha', 'kl_budget']
            >>> QStarOptions(alpha_method="fixed", alpha=1.0).in_use()["alpha"]
            1.0
        """
        unused = {"alpha"} if self.alpha_method != "fixed" else set()
        if self.alpha_method != "kl_budget":
            unused.add("kl_budget")
        if self.alpha_method in ("fixed", "entropy"):  # closed forms: no iterations
            unused |= {"tol", "max_iter"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in unused}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


OPTION_NAMES = tuple(f.name for f in fields(QStarOptions))
#: The configs' own names for two options: the vLLM configs keep the original tool's
#: `alpha_tol` / `alpha_max_iter` (and the trainer configs follow them).
CONFIG_FIELD_NAMES = {"tol": "alpha_tol", "max_iter": "alpha_max_iter"}


def check_option_names(options: dict[str, Any]) -> None:
    """Raise a `TypeError` naming the first key of `options` that is not a q* option."""
    for name in options:
        if name not in OPTION_NAMES:
            raise TypeError(f"Unknown q* option {name!r}; the options are: {', '.join(OPTION_NAMES)}.")


def q_star_field(name: str, *, default: Any = MISSING, help: str | None = None) -> Any:
    """A dataclass field of another config that mirrors the q* option `name`: the same default
    (unless `default` is given) and help text (unless `help` is given), so that the vLLM
    configs and the trainer configs say what `QStarOptions` says.

    Example:
        >>> from dataclasses import dataclass, fields
        >>> @dataclass
        ... class MyConfig:
        ...     alpha_max: float = q_star_field("alpha_max")
        >>> MyConfig().alpha_max, fields(MyConfig)[0].metadata["help"]
        (1.0, 'Upper clamp on α.')
    """
    source = next((f for f in fields(QStarOptions) if f.name == name), None)
    if source is None:
        raise TypeError(f"{name!r} is not a q* option; the options are: {', '.join(OPTION_NAMES)}.")
    metadata = dict(source.metadata)  # only argparse keywords: TRL's HfArgumentParser passes them on
    if help is not None:
        metadata["help"] = help
    return field(default=source.default if default is MISSING else default, metadata=metadata)


def q_star_from(config: Any, *, exclude: tuple[str, ...] = ()) -> QStarOptions:
    """The `QStarOptions` a config's fields describe (validated here, once): every field named like
    an option (or as `CONFIG_FIELD_NAMES` renames it), but those in `exclude` (a field that means
    something else there)."""
    option_of = {CONFIG_FIELD_NAMES.get(name, name): name for name in OPTION_NAMES if name not in exclude}
    return QStarOptions(**{option_of[f.name]: getattr(config, f.name) for f in fields(config) if f.name in option_of})


def refuse_unsupported(q_star: QStarOptions, unsupported: dict[str, str], front: str) -> None:
    """Raise if `q_star` sets (away from its default) an option `front` cannot honour.

    `unsupported` maps option name → why, and what to do instead.
    """
    defaults = QStarOptions()
    for name, why in unsupported.items():
        if getattr(q_star, name) != getattr(defaults, name):
            raise ValueError(f"`{name}` (={getattr(q_star, name)!r}) is not supported by {front}: {why}")
