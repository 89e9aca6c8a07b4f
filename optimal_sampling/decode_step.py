"""One decode step of the fast path: q* from two logit rows, sampling, records, all on the device.

`decode_tail` is what `FastDecoder` (fast.py) runs after the two forwards, eagerly or captured
in a CUDA graph: the core's `compute_mixture` (no host synchronisation with `validate=False`),
the exponential race that equals `torch.multinomial` draw for draw, and one `token_records`
record per token written into preallocated buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .mixture import NEG_INF, Mixture, compute_mixture, log_probs_from_logits, token_records
from .options import QStarOptions


@dataclass(frozen=True)
class MixingOptions:
    """Everything that fixes a decode step's q* computation (hashable: part of a graph's key)."""

    vocab_size: int
    q_star: QStarOptions = QStarOptions()
    diagnostics: bool = False


# ---------------------------------------------------------------------------------------
# The per-step maths: pure tensor functions, no host synchronisation


@dataclass
class QStarStep:
    """One step of q* for a batch: the core's `Mixture` and the two models' `[B, V]` log-probs."""

    mixture: Mixture
    logp_theta: torch.Tensor
    logp_t: torch.Tensor


def q_star_step(
    base_logits: torch.Tensor, teacher_logits: torch.Tensor, forced: torch.Tensor, options: MixingOptions
) -> QStarStep:
    """The core's `compute_mixture` on raw logits, without host synchronisation.

    Args:
        base_logits: `[B, V_base]` raw last-position logits of the base (any float dtype).
        teacher_logits: `[B, V_teacher]` raw logits of the teacher.
        forced: `[]` bool tensor, True while `force_teacher_first_tokens` applies (α = 1).
        options: the mixing options.

    `compute_mixture` with `validate=False` reads nothing back on a device: the fixed α was
    checked on the host with the options, and the forced-teacher rows are selected on the device.
    """
    q_star = options.q_star
    logp_theta = log_probs_from_logits(base_logits, q_star.temperature, options.vocab_size)  # [B, V] float32
    logp_t = log_probs_from_logits(teacher_logits, q_star.temperature, options.vocab_size)
    mixture = compute_mixture(
        logp_theta,
        logp_t,
        q_star,
        forced=forced if q_star.force_teacher_first_tokens else None,
        return_diagnostics=options.diagnostics,
        validate=False,
    )
    return QStarStep(mixture, logp_theta, logp_t)


def sample_exponential_race(logq: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`[B]` tokens: `argmax(softmax(scores) / noise)` with `noise ~ Exp(1)` of shape `[B, W]`.

    `scores` is `logq` (`[B, V]`) padded with −inf to the base's logit width W. With `noise`
    drawn by `torch.empty(B, W).exponential_()` this is, draw for draw, what
    `torch.multinomial(torch.softmax(scores, -1), 1)` computes — without its host checks.
    """
    width = noise.shape[-1]
    scores = F.pad(logq, (0, width - logq.shape[-1]), value=NEG_INF) if width > logq.shape[-1] else logq
    probs = torch.softmax(scores, dim=-1)
    return (probs / noise).argmax(dim=-1)


@dataclass
class DecodeBuffers:
    """Preallocated device tensors of one (batch, length) bucket; their addresses never change."""

    base_input: torch.Tensor  # [B, 1] token fed to the base at this step
    teacher_input: torch.Tensor  # [B, 1]
    base_positions: torch.Tensor  # [B, 1]
    teacher_positions: torch.Tensor  # [B, 1]
    base_mask: torch.Tensor  # [B, L_base]: the prompt's padding mask, then ones
    teacher_mask: torch.Tensor  # [B, L_teacher]
    finished: torch.Tensor  # [B] bool
    on_policy: torch.Tensor  # [B] bool: rows sampled from the base alone (α = 0, q = π_θ)
    step: torch.Tensor  # [] long, index of the token being generated
    noise: torch.Tensor  # [B, W] float32, Exp(1) draws for this step
    pad: torch.Tensor  # [] long
    stop_ids: torch.Tensor  # [S] long
    records: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, T_max]


def decode_tail(
    base_logits: torch.Tensor, teacher_logits: torch.Tensor, buffers: DecodeBuffers, options: MixingOptions
) -> None:
    """Mix, sample, record and advance one step, writing only into `buffers`.

    Rows flagged `on_policy` sample π_θ itself (α = 0, log q = log π_θ); `logq_star` records the
    sampled token's log-probability under the q* mixture on every row.
    """
    forced = buffers.step < options.q_star.force_teacher_first_tokens
    step = q_star_step(base_logits, teacher_logits, forced, options)
    unfinished = ~buffers.finished
    on_policy = buffers.on_policy
    sampled = torch.where(on_policy.unsqueeze(-1), step.logp_theta, step.mixture.logq)  # [B, V]: what each row samples
    token = sample_exponential_race(sampled, buffers.noise)
    token = torch.where(unfinished, token, buffers.pad)  # finished rows emit padding, as in generate
    index = token.clamp(max=sampled.shape[-1] - 1)  # [B]
    values = {
        "tokens": token,
        "token_mask": unfinished,
        **token_records(step.mixture, index, step.logp_theta, step.logp_t, sampled_logq=sampled),
    }
    values["alpha"] = torch.where(on_policy, torch.zeros_like(values["alpha"]), values["alpha"])
    column = buffers.step.view(1)
    for name, value in values.items():
        record = buffers.records[name]
        record.index_copy_(1, column, value.to(record.dtype).unsqueeze(-1))
    buffers.finished.logical_or_((token.unsqueeze(-1) == buffers.stop_ids).any(dim=-1))
    buffers.base_input.copy_(token.unsqueeze(-1))
    buffers.teacher_input.copy_(token.unsqueeze(-1))
    buffers.base_positions.add_(1)
    buffers.teacher_positions.add_(1)
    buffers.step.add_(1)


class DeviceScalarConstants(TorchFunctionMode):
    """Create `torch.tensor(<number>, device=...)` constants with a device fill (`torch.full`).

    Eager code may build small constants as `torch.tensor(float("inf"), device=x.device)`:
    on a GPU that is a blocking copy from host memory, which a CUDA-graph capture rejects
    ("operation not permitted when stream is capturing"). A fill kernel captures. Active
    only while the eager part of a step is warmed up and captured (replays run no Python).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and args and isinstance(args[0], (bool, int, float)):
            extra = dict(zip(("dtype", "device"), args[1:])) if func is torch.as_tensor else {}
            device, dtype = kwargs.get("device", extra.get("device")), kwargs.get("dtype", extra.get("dtype"))
            if device is not None and not kwargs.get("requires_grad", False):
                dtype = dtype or torch.tensor(args[0]).dtype  # the dtype torch.tensor would infer
                return torch.full((), args[0], dtype=dtype, device=device)
        return func(*args, **kwargs)
