"""Token-by-token q* decoding from two top-k lists: the step both vLLM backends share.

The two-server coordinator (`servers/`) and the in-process engines (`engines/`) differ only
in how they obtain each step's top-k log-probs (HTTP requests, or a logits processor inside
each engine). From there on they run the same code, so that they draw the same tokens under
the same seed:

    canonical_top_k   each side's list: the k largest entries, ids beyond the tokenizer dropped,
                      sorted by id (sampling by inversion must see the same columns)
    mix_top_k         sparse_candidates + compute_mixture (α = 0 for on-policy rows)
    TopKStepper       draw with counter-based uniforms, append, record, stop
    sequence_output   the `GenerationOutput` of a finished sequence
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .mixture import Mixture, compute_mixture, token_records
from .options import CONFIG_FIELD_NAMES, OPTION_NAMES, QStarOptions, refuse_unsupported
from .records import RECORDED_DIAGNOSTICS, GenerationOutput, prompt_token_ids, summarize_tokens
from .sparse import SparseCandidates, sample_candidates, sparse_candidates
from .support import check_sampled_log_probs

#: The q* options both vLLM coordinators take with each call (`generate_batch(temperature=...)`), not in their config.
PER_CALL_OPTIONS = ("temperature",)
#: The q* options the top-k step cannot honour, and why: both vLLM configs refuse them by name.
UNSUPPORTED_OPTIONS = {
    "teacher_top_p": "the teacher's nucleus is not known from a top-k list (its rest bucket stands for many "
    "tokens); drop it, or use the transformers backend.",
    "top_k": "q* is truncated over candidate columns whose rest bucket stands for many tokens; drop it, or use "
    "the transformers backend.",
    "top_p": "q* is truncated over candidate columns whose rest bucket stands for many tokens; drop it, or use "
    "the transformers backend.",
}

# Per-token values kept for the diagnostics (the transformers front records the same names).
PER_TOKEN = (
    "alpha",
    "logq",
    "logp_theta",
    "logp_t",
    *RECORDED_DIAGNOSTICS,
    "iterations",
    "empty_support",
    "covered_theta",
    "covered_t",
)


# -- the top-k lists ---------------------------------------------------------------------


def canonical_top_k(
    ids: torch.Tensor, logp: torch.Tensor, k: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One side's top-k list in the form the step uses: `(ids [B, k] int64, logp [B, k] float64, dropped)`.

    `ids` / `logp` (`[B, m]`, id -1 for padding) may hold more than k entries (a server
    lists the sampled token too) and an id twice (vLLM's flat log-prob lists repeat the
    sampled token): each id counts once, the k largest are kept, ties broken by the
    smaller id. Ids beyond the tokenizer (`>= vocab_size`, a padded output layer) are
    dropped and counted in `dropped`. The kept entries come first, sorted by id, then padding
    (-1 / -inf): sampling by inversion must see the same columns for the same input, whatever
    order the entries arrived in.

    Example:
        >>> import torch
        >>> ids, logp, dropped = canonical_top_k(torch.tensor([[7, 2, 9, 4]]), torch.tensor([[-3.0, -0.5, -1.0, -0.5]]),
        ...                                      k=3, vocab_size=9)
        >>> ids.tolist(), logp.tolist(), dropped   # keeps 2, 4, 9 (the largest); 9 is beyond V
        ([[2, 4, -1]], [[-0.5, -0.5, -inf]], 1)
        >>> canonical_top_k(torch.tensor([[5, 3, 5]]), torch.tensor([[-0.1, -2.0, -0.1]]), k=2, vocab_size=9)[0].tolist()
        [[3, 5]]
    """
    ids, logp = ids.long(), logp.double()
    if ids.shape[1] == k and _already_canonical(ids, vocab_size):  # a driven engine sends them so
        return ids, logp, 0
    unlisted = torch.iinfo(torch.int64).max
    listed = ids >= 0
    by_id = torch.sort(torch.where(listed, ids, unlisted), dim=-1, stable=True).indices
    ids, logp, listed = ids.gather(-1, by_id), logp.gather(-1, by_id), listed.gather(-1, by_id)
    listed[:, 1:] &= ids[:, 1:] != ids[:, :-1]  # a repeated id counts once
    selected = ids.shape[1] > k
    if selected:
        # The k largest by (-logp, id): the entries are in id order, so a stable sort by value.
        by_value = torch.sort(torch.where(listed, -logp, math.inf), dim=-1, stable=True).indices[:, :k]
        ids, logp, listed = ids.gather(-1, by_value), logp.gather(-1, by_value), listed.gather(-1, by_value)
    beyond = listed & (ids >= vocab_size)
    keep = listed & ~beyond
    if selected or bool((keep != listed).any()) or bool((listed[:, 1:] & ~listed[:, :-1]).any()):
        by_id = torch.sort(torch.where(keep, ids, unlisted), dim=-1, stable=True).indices  # kept first, in id order
        ids, logp, keep = ids.gather(-1, by_id), logp.gather(-1, by_id), keep.gather(-1, by_id)
    ids = ids.masked_fill(~keep, -1)
    logp = logp.masked_fill(~keep, -math.inf)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (0, pad), value=-1)
        logp = torch.nn.functional.pad(logp, (0, pad), value=-math.inf)
    return ids, logp, int(beyond.sum())


def _already_canonical(ids: torch.Tensor, vocab_size: int) -> bool:
    """Every row lists k distinct in-vocabulary ids in increasing order (no padding)."""
    if ids.numel() == 0:
        return False
    return bool(ids[:, 0].ge(0).all() and ids[:, -1].lt(vocab_size).all() and ids[:, 1:].gt(ids[:, :-1]).all())


# -- one step ----------------------------------------------------------------------------


@dataclass
class StepDistribution:
    """q* for one decoding step of B sequences, built from the two models' top-k lists.

    Attributes:
        candidates: the merged candidate columns (`[B, M + 1]`, last column = rest bucket).
        mixture: α (`[B]`), log q over the columns (`[B, M + 1]`) and diagnostics.
    """

    candidates: SparseCandidates
    mixture: Mixture

    def columns_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The candidate column of each token (the rest bucket's for unlisted ids), `[B]`."""
        match = self.candidates.token_ids == token_ids[:, None]
        return torch.where(match.any(-1), match.int().argmax(-1), self.candidates.rest_column)


def topk_config_fields(q_star: QStarOptions) -> dict[str, Any]:
    """The `CoordinatorConfig` / `DrivenDecodeConfig` fields of `q_star`, refusing by name what the
    top-k step cannot honour; the temperature stays with each call (`generate_batch(temperature=)`)."""
    refuse_unsupported(q_star, UNSUPPORTED_OPTIONS, "the vLLM backends")
    taken = [name for name in OPTION_NAMES if name not in UNSUPPORTED_OPTIONS and name not in PER_CALL_OPTIONS]
    return {CONFIG_FIELD_NAMES.get(name, name): getattr(q_star, name) for name in taken}


def _solve(
    candidates: SparseCandidates,
    q_star: QStarOptions,
    rows: torch.Tensor | None,
    return_diagnostics: bool,
    forced: torch.Tensor | None = None,
) -> Mixture:
    pick = (lambda x: x) if rows is None else (lambda x: x[rows])  # noqa: E731
    # The KL-symmetric solve in float32, so that CPU rows take the C step (rest bucket included);
    # the fixed α = 0 of on-policy rows stays in the lists' float64 (log q = log π_θ exactly).
    cast = (lambda x: x.float()) if q_star.alpha_method == "kl_symmetry" else (lambda x: x)  # noqa: E731
    return compute_mixture(
        cast(pick(candidates.logp_theta)),
        cast(pick(candidates.logp_t)),
        q_star,
        forced=None if forced is None else pick(forced),
        log_multiplicity=cast(pick(candidates.log_multiplicity)),
        return_diagnostics=return_diagnostics,
        validate=False,
    )


def _merge_rows(mask: torch.Tensor, where_true, where_false):
    """Rows of `where_true` at `mask`, of `where_false` elsewhere (tensors or dataclasses of them)."""
    if where_true is None or where_false is None:
        return None
    if is_dataclass(where_true) and not isinstance(where_true, type):
        return replace(
            where_true,
            **{
                f.name: _merge_rows(mask, getattr(where_true, f.name), getattr(where_false, f.name))
                for f in fields(where_true)
            },
        )
    dtype = torch.promote_types(where_true.dtype, where_false.dtype)
    out = where_false.new_empty((mask.shape[0], *where_false.shape[1:]), dtype=dtype)
    out[mask], out[~mask] = where_true.to(dtype), where_false.to(dtype)
    return out


def mix_top_k(
    ids_theta: torch.Tensor,
    logp_theta: torch.Tensor,
    ids_t: torch.Tensor,
    logp_t: torch.Tensor,
    *,
    vocab_size: int,
    q_star: QStarOptions,
    temperature: float | None = None,
    return_diagnostics: bool = True,
    on_policy: torch.Tensor | None = None,
    forced: torch.Tensor | None = None,
) -> StepDistribution:
    """q* over the candidate columns of two top-k lists (`[B, k]` each): the core's sparse path.

    `q_star` carries the α settings (the options in `UNSUPPORTED_OPTIONS` stay at their defaults);
    `temperature`, when given, overrides its temperature for this step. Rows where `on_policy`
    (`[B]` bool) is set get α = 0: q is the base's own distribution. Rows where `forced` (`[B]`
    bool) is set are at a `force_teacher_first_tokens` position (α = 1).
    """
    temperature = q_star.temperature if temperature is None else temperature
    candidates = sparse_candidates(
        ids_theta, logp_theta, ids_t, logp_t, vocab_size, temperature=temperature, validate=False
    )
    if on_policy is None or not bool(on_policy.any()):
        return StepDistribution(candidates, _solve(candidates, q_star, None, return_diagnostics, forced))
    base_only = q_star.replace(alpha_method="fixed", alpha=0.0, kl_budget=None)
    if bool(on_policy.all()):
        return StepDistribution(candidates, _solve(candidates, base_only, None, return_diagnostics))
    mixture = _merge_rows(
        on_policy,
        _solve(candidates, base_only, on_policy, return_diagnostics),
        _solve(candidates, q_star, ~on_policy, return_diagnostics, forced),
    )
    return StepDistribution(candidates, mixture)


# -- counter-based sampling --------------------------------------------------------------
# A draw depends only on (seed, sequence index, step), so a sample does not change with the
# concurrency, the pipeline grouping, which requests had to be retried, or the backend.

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_uniforms(seed: int, index: Sequence[int], step: Sequence[int], stream: int = 0) -> np.ndarray:
    """Uniforms in [0, 1), one per (index, step) pair, from a splitmix64 hash of the counters."""
    with np.errstate(over="ignore"):
        x = _splitmix64(np.full(len(index), seed & _MASK64, dtype=np.uint64))
        x = _splitmix64(x ^ np.asarray(index, dtype=np.uint64))
        x = _splitmix64(x ^ ((np.asarray(step, dtype=np.uint64) << np.uint64(4)) | np.uint64(stream)))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample_step(step: StepDistribution, u_column: np.ndarray, u_rest: np.ndarray) -> torch.Tensor:
    """Token ids `[B]` drawn from the step's q with the given uniforms (`sample_candidates`)."""
    uniforms = torch.from_numpy(np.stack([u_column, u_rest], axis=-1))
    ids, _ = sample_candidates(step.mixture.logq, step.candidates, uniforms=uniforms)
    return ids


@contextlib.contextmanager
def one_torch_thread():
    """Run the step's maths on one thread and in inference mode: the tensors are tiny (`[B, ~2k]`);
    on a busy machine intra-op threads that wait for each other made a logsumexp 30x slower (7 ms),
    and autograd's bookkeeping was ~30% of the step's many small ops (nothing here is differentiated)."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


# -- sequences ---------------------------------------------------------------------------


@dataclass
class TopKSequence:
    """One sequence being decoded: its prompts as token ids, the tokens drawn so far and their records.

    `index` is the prompt's position in the call (the counter of its draws); `on_policy`
    makes every α of the sequence 0 (q = π_θ).
    """

    index: int
    prompt: Any
    teacher_prompt: Any
    base_ids: list[int]
    teacher_ids: list[int]
    on_policy: bool = False
    tokens: list[int] = field(default_factory=list)
    records: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in PER_TOKEN})
    error: str | None = None
    done: bool = False

    def fail(self, message: str) -> None:
        self.error = f"at generated token {len(self.tokens)}: {message}"
        self.done = True


def declared_eos_ids(model_dir: str | None) -> set[int]:
    """EOS ids a local model directory declares (generation_config.json, config.json)."""
    ids: set[int] = set()
    if not model_dir:
        return ids
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            try:
                eos = json.loads(path.read_text()).get("eos_token_id")
            except (OSError, ValueError):
                continue
            ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    return ids


class TopKStepper:
    """Mix, draw, append and record one step for a list of sequences; count what was done.

    Args:
        q_star: the q* settings (see `mix_top_k`); a coordinator's `with_config` view swaps them.
        vocab_size: the shared tokenizer's vocabulary size.
    """

    def __init__(self, q_star: QStarOptions, vocab_size: int):
        self.q_star, self.vocab_size = q_star, vocab_size
        self.stats = dict(tokens=0, steps=0, covered_theta_sum=0.0, covered_t_sum=0.0)

    def mix(
        self,
        ids_theta,
        logp_theta,
        ids_t,
        logp_t,
        *,
        temperature: float = 1.0,
        return_diagnostics: bool = True,
        on_policy: torch.Tensor | None = None,
        forced: torch.Tensor | None = None,
    ) -> StepDistribution:
        return mix_top_k(
            ids_theta,
            logp_theta,
            ids_t,
            logp_t,
            vocab_size=self.vocab_size,
            q_star=self.q_star,
            temperature=temperature,
            return_diagnostics=return_diagnostics,
            on_policy=on_policy,
            forced=forced,
        )

    def advance(
        self,
        rows: Sequence[TopKSequence],
        ids_theta,
        lp_theta,
        ids_t,
        lp_t,
        *,
        seed: int,
        temperature: float,
        max_tokens: int,
        stop_token_ids: set[int],
        return_diagnostics: bool,
    ) -> None:
        """Append one token to each row (`[B, k]` lists, row order), or set the row's error.

        If the batched maths fails, each row is retried alone, so a bad row marks only itself.
        """
        options = dict(seed=seed, max_tokens=max_tokens, stop_token_ids=stop_token_ids)
        with one_torch_thread():
            try:
                self._mix_and_record(rows, ids_theta, lp_theta, ids_t, lp_t, temperature, return_diagnostics, **options)
            except Exception as error:
                if len(rows) == 1:
                    rows[0].fail(f"{type(error).__name__}: {error}")
                    return
                for j, row in enumerate(rows):
                    one = slice(j, j + 1)
                    try:
                        self._mix_and_record(
                            [row],
                            ids_theta[one],
                            lp_theta[one],
                            ids_t[one],
                            lp_t[one],
                            temperature,
                            return_diagnostics,
                            **options,
                        )
                    except Exception as row_error:
                        row.fail(f"{type(row_error).__name__}: {row_error}")

    def _mix_and_record(self, rows, ids_theta, lp_theta, ids_t, lp_t, temperature, return_diagnostics, **options):
        on_policy = torch.tensor([s.on_policy for s in rows]) if any(s.on_policy for s in rows) else None
        first = self.q_star.force_teacher_first_tokens
        forced = torch.tensor([len(s.tokens) < first for s in rows]) if first else None
        step = self.mix(
            ids_theta,
            lp_theta,
            ids_t,
            lp_t,
            temperature=temperature,
            return_diagnostics=return_diagnostics,
            on_policy=on_policy,
            forced=forced,
        )
        self.record(rows, step, **options)

    def record(
        self,
        rows: Sequence[TopKSequence],
        step: StepDistribution,
        *,
        seed: int,
        max_tokens: int,
        stop_token_ids: set[int],
    ) -> None:
        index = [s.index for s in rows]
        position = [len(s.tokens) for s in rows]
        tokens = sample_step(
            step, counter_uniforms(seed, index, position, 0), counter_uniforms(seed, index, position, 1)
        )
        c = step.candidates
        record = token_records(
            step.mixture, step.columns_of(tokens), c.logp_theta, c.logp_t, log_multiplicity=c.log_multiplicity
        )
        if step.mixture.diagnostics is None:  # the solver's flags are kept with the diagnostics only
            record = {name: record[name] for name in ("alpha", "logq", "logp_theta", "logp_t")}
        values = {name: value for name, value in record.items() if name in PER_TOKEN}
        values.update(covered_theta=c.covered_theta, covered_t=c.covered_t)
        check_sampled_log_probs(values, policy="the base")
        names = list(values)
        table = torch.stack([values[n].to(torch.float64) for n in names]).tolist()  # one conversion per step
        for j, (row, token) in enumerate(zip(rows, tokens.tolist())):
            row.tokens.append(token)
            row.base_ids.append(token)
            row.teacher_ids.append(token)
            for n, column in zip(names, table):
                row.records[n].append(column[j])
            if token in stop_token_ids or len(row.tokens) >= max_tokens:
                row.done = True
        self.stats["tokens"] += len(rows)
        self.stats["covered_theta_sum"] += sum(table[names.index("covered_theta")])
        self.stats["covered_t_sum"] += sum(table[names.index("covered_t")])
        self.stats["steps"] += 1


def check_generate_arguments(prompts, teacher_prompts, on_policy, *, max_tokens: int, temperature: float) -> None:
    """The checks both vLLM coordinators' `generate_batch` make before tokenizing anything."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
        raise TypeError("`prompts` must be a list of prompts; wrap a single prompt in a list.")
    for name, values in (("teacher prompts", teacher_prompts), ("on_policy flags", on_policy)):
        if values is not None and len(values) != len(prompts):
            raise ValueError(f"Got {len(prompts)} prompts but {len(values)} {name}; give one per prompt.")
    if max_tokens < 1:
        raise ValueError(f"`max_tokens` (={max_tokens}) must be >= 1.")
    if not temperature > 0:
        raise ValueError(f"`temperature` (={temperature}) has to be a strictly positive float.")


def make_sequences(
    prompts,
    teacher_prompts,
    on_policy,
    base_tokenizer,
    teacher_tokenizer,
    sequence_type: type[TopKSequence] = TopKSequence,
) -> list[TopKSequence]:
    """One sequence per prompt, its prompts tokenized (teacher prompts default to the base's)."""
    teacher_prompts = list(prompts) if teacher_prompts is None else list(teacher_prompts)
    on_policy = [False] * len(prompts) if on_policy is None else [bool(flag) for flag in on_policy]
    return [
        sequence_type(
            index=i,
            prompt=prompt,
            teacher_prompt=teacher_prompt,
            base_ids=prompt_token_ids(prompt, base_tokenizer, f"prompts[{i}]"),
            teacher_ids=prompt_token_ids(teacher_prompt, teacher_tokenizer, f"teacher_prompts[{i}]"),
            on_policy=flag,
        )
        for i, (prompt, teacher_prompt, flag) in enumerate(zip(prompts, teacher_prompts, on_policy))
    ]


def sequence_output(s: TopKSequence, tokenizer, return_diagnostics: bool) -> GenerationOutput:
    """The `GenerationOutput` of a finished sequence (empty fields and `error` if it failed)."""
    if s.error is not None:
        return GenerationOutput(prompt=s.prompt, teacher_prompt=s.teacher_prompt, error=s.error)
    r = s.records
    diagnostics = None
    if return_diagnostics:
        diagnostics = summarize_tokens(r["alpha"], {n: r[n] for n in PER_TOKEN[4:] if len(r[n]) == len(s.tokens)})
    return GenerationOutput(
        prompt=s.prompt,
        teacher_prompt=s.teacher_prompt,
        generated_text=tokenizer.decode(s.tokens, skip_special_tokens=True),
        generated_tokens=list(s.tokens),
        alpha_history=r["alpha"],
        logq=r["logq"],
        logp_theta=r["logp_theta"],
        logp_t=r["logp_t"],
        diagnostics=diagnostics,
    )
