"""q* from sparse top-k candidate sets, as inference servers return them.

Each model reports, per row, the ids and exact (full-vocabulary) log-probs of its top-k
tokens. This module turns the two lists into one dense "candidate" problem that the core
(`compute_mixture`) solves unchanged:

    columns = [base's top-k ids | teacher's top-k ids not in the base's list | rest]

* A token in one list but not the other gets, for the side that did not list it, that
  side's uncovered mass u = 1 − Σ top-k spread evenly over its V − k unseen tokens. The
  estimate never exceeds the side's k-th value, so it respects the one bound we know.
* The rest bucket holds the V − |union| tokens neither side listed, as one column whose
  log-prob is the bucket's total mass on each side and whose `log_multiplicity` is
  log(V − |union|). Under the even-spread estimate that is exact for A(α) and the KLs;
  entropy and ESS use the multiplicity (see theory/derivation.md, top-k section).

With k = V (every token listed by both) the union is the vocabulary, the bucket is empty,
and the result equals the dense computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class SparseCandidates:
    """The dense view of two top-k lists (`M = k_theta + k_t` candidate columns + 1 rest).

    Attributes:
        token_ids: `[B, M]` int64 vocabulary id per candidate column; -1 for padding and for
            teacher entries that duplicate a base entry (those columns carry -inf).
        logp_theta: `[B, M + 1]` base log-probs per column (last column: the rest bucket).
        logp_t: `[B, M + 1]` teacher log-probs per column.
        log_multiplicity: `[B, M + 1]` log of the number of vocabulary tokens per column
            (0 for candidates, log(V − |union|) for the bucket, -inf for empty columns).
        covered_theta: `[B]` mass the base's own top-k list covers, Σ exp(top-k log-probs).
        covered_t: `[B]` mass the teacher's own top-k list covers.
        vocab_size: V.
    """

    token_ids: torch.Tensor
    logp_theta: torch.Tensor
    logp_t: torch.Tensor
    log_multiplicity: torch.Tensor
    covered_theta: torch.Tensor
    covered_t: torch.Tensor
    vocab_size: int

    @property
    def rest_column(self) -> int:
        return self.token_ids.shape[1]


def _check_topk(name: str, ids: torch.Tensor, logp: torch.Tensor, vocab_size: int) -> None:
    if ids.dim() != 2 or logp.shape != ids.shape:
        raise ValueError(f"`{name}` ids {tuple(ids.shape)} and log-probs {tuple(logp.shape)} must both be [batch, k].")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`{name}` ids must be an integer tensor, got {ids.dtype}.")
    if bool(torch.isnan(logp).any()):
        raise ValueError(f"`{name}` log-probs contain NaN; the server response is malformed.")
    if bool(((ids >= vocab_size) | (ids < -1)).any()):
        raise ValueError(
            f"`{name}` has token ids outside [0, {vocab_size}) (use -1 for padding); is `vocab_size` right?"
        )
    if bool(((logp > 1e-4) & (ids >= 0)).any()):
        raise ValueError(f"`{name}` has log-probs > 0; pass log-probabilities, not logits.")


def _lookup(query_ids: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query id, whether it is in `ids` (same row) and its log-prob there. `[B, Q]` each."""
    sorted_ids, order = torch.sort(ids, dim=-1)
    pos = torch.searchsorted(sorted_ids, query_ids.contiguous()).clamp(max=ids.shape[1] - 1)
    found = (sorted_ids.gather(-1, pos) == query_ids) & (query_ids >= 0)
    return found, logp.gather(-1, order.gather(-1, pos))


def _unseen_log_prob(covered: torch.Tensor, listed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log of the uncovered mass spread evenly over the side's unseen tokens, `[B]`."""
    uncovered = (1.0 - covered).clamp_min(0.0)
    unseen = (vocab_size - listed).to(covered.dtype)
    return torch.where(unseen > 0, uncovered.log() - unseen.clamp_min(1).log(), torch.full_like(covered, NEG_INF))


def sparse_candidates(
    ids_theta: torch.Tensor,
    logp_theta: torch.Tensor,
    ids_t: torch.Tensor,
    logp_t: torch.Tensor,
    vocab_size: int,
    *,
    temperature: float = 1.0,
    validate: bool = True,
) -> SparseCandidates:
    """Merge two top-k lists into candidate columns keyed by token id.

    Args:
        ids_theta, logp_theta: `[B, k_theta]` the base's top-k ids and their exact
            temperature-1 log-probs (pad with id -1 / log-prob -inf).
        ids_t, logp_t: `[B, k_t]` the same for the teacher.
        vocab_size: V, the shared vocabulary size.
        temperature: applied to both sides as the dense path does (log p / T, then
            renormalised over the vocabulary, the unseen tokens at their estimated value).
        validate: check shapes, ids and NaN (one host synchronisation).

    Example:
        >>> import torch
        >>> from optimal_sampling.sparse import sparse_candidates
        >>> lp = torch.log(torch.tensor([[0.6, 0.3]]))  # base lists ids 4 and 7
        >>> lr = torch.log(torch.tensor([[0.5, 0.2]]))  # teacher lists ids 7 and 1
        >>> c = sparse_candidates(torch.tensor([[4, 7]]), lp, torch.tensor([[7, 1]]), lr, vocab_size=10)
        >>> c.token_ids.tolist()  # the teacher's 7 duplicates the base's column
        [[4, 7, -1, 1]]
        >>> round(c.covered_theta.item(), 3), round(c.covered_t.item(), 3)
        (0.9, 0.7)
    """
    if validate:
        _check_topk("ids_theta/logp_theta", ids_theta, logp_theta, vocab_size)
        _check_topk("ids_t/logp_t", ids_t, logp_t, vocab_size)
        if ids_theta.shape[0] != ids_t.shape[0]:
            raise ValueError(f"Batch sizes differ: {ids_theta.shape[0]} base rows, {ids_t.shape[0]} teacher rows.")
    if temperature <= 0:
        raise ValueError(f"`temperature` (={temperature}) has to be a strictly positive float.")
    ids_theta, ids_t = ids_theta.long(), ids_t.long()
    dtype = torch.float64 if logp_theta.dtype == torch.float64 else torch.float32
    lp = logp_theta.to(dtype).masked_fill(ids_theta < 0, NEG_INF)
    lr = logp_t.to(dtype).masked_fill(ids_t < 0, NEG_INF)

    covered_theta = lp.exp().sum(-1)
    covered_t = lr.exp().sum(-1)
    listed_theta = (ids_theta >= 0).sum(-1)
    listed_t = (ids_t >= 0).sum(-1)
    unseen_theta = _unseen_log_prob(covered_theta, listed_theta, vocab_size)  # [B]
    unseen_t = _unseen_log_prob(covered_t, listed_t, vocab_size)

    t_has_theta_id, lr_at_theta = _lookup(ids_theta, ids_t, lr)
    theta_has_t_id, _ = _lookup(ids_t, ids_theta, lp)
    new_t = (ids_t >= 0) & ~theta_has_t_id  # teacher ids that open a column of their own

    # Candidate columns: the base's list, then the teacher's new ids.
    token_ids = torch.cat([ids_theta, ids_t.masked_fill(~new_t, -1)], dim=-1)
    cand_theta = torch.cat([lp, torch.where(new_t, unseen_theta.unsqueeze(-1), NEG_INF)], dim=-1)
    cand_t = torch.cat(
        [
            torch.where(t_has_theta_id, lr_at_theta, unseen_t.unsqueeze(-1)).masked_fill(ids_theta < 0, NEG_INF),
            lr.masked_fill(~new_t, NEG_INF),
        ],
        dim=-1,
    )

    # The rest bucket: V − |union| tokens, each at the side's unseen value.
    union = listed_theta + new_t.sum(-1)
    rest_count = (vocab_size - union).to(dtype)
    log_rest_count = torch.where(rest_count > 0, rest_count.clamp_min(1).log(), torch.full_like(rest_count, NEG_INF))
    rest_theta = unseen_theta + log_rest_count
    rest_t = unseen_t + log_rest_count

    logp_theta_cols = torch.cat([cand_theta, rest_theta.unsqueeze(-1)], dim=-1)
    logp_t_cols = torch.cat([cand_t, rest_t.unsqueeze(-1)], dim=-1)
    log_multiplicity = torch.cat(
        [torch.where(token_ids >= 0, 0.0, NEG_INF).to(dtype), log_rest_count.unsqueeze(-1)], dim=-1
    )
    # Tokens listed twice by one server (e.g. the sampled token echoed before the top-k)
    # would be counted twice; callers pass de-duplicated lists, so only renormalise here.
    logp_theta_cols = _apply_temperature(logp_theta_cols, log_multiplicity, temperature)
    logp_t_cols = _apply_temperature(logp_t_cols, log_multiplicity, temperature)
    return SparseCandidates(
        token_ids=token_ids,
        logp_theta=logp_theta_cols,
        logp_t=logp_t_cols,
        log_multiplicity=log_multiplicity,
        covered_theta=covered_theta,
        covered_t=covered_t,
        vocab_size=vocab_size,
    )


def _apply_temperature(logp_cols: torch.Tensor, log_multiplicity: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token log p / T, bucket counts kept, renormalised over the columns."""
    present = torch.isfinite(logp_cols) & torch.isfinite(log_multiplicity)
    per_token = torch.where(present, logp_cols - log_multiplicity.masked_fill(~present, 0.0), NEG_INF)
    scaled = per_token / temperature + log_multiplicity.masked_fill(~present, 0.0)
    scaled = scaled.masked_fill(~present, NEG_INF)
    return scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)


def sample_candidates(
    logq: torch.Tensor,
    candidates: SparseCandidates,
    generator: torch.Generator | None = None,
    *,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from candidate-column log q, `[B, M + 1]`, by inversion.

    A draw of the rest bucket becomes a uniform draw among the vocabulary ids outside the
    union. `uniforms` (`[B, 2]` in [0, 1): the column draw and the rest-bucket draw) makes
    the result a pure function of them, which the server coordinator uses to keep samples
    independent of concurrency and retries; without it they come from `generator`.
    Returns `(token_ids [B], logq [B])`, where `logq` is the log-probability of the sampled
    *token* (the bucket's mass divided by its count for bucket draws).
    """
    if uniforms is None:
        uniforms = torch.rand(logq.shape[0], 2, generator=generator, dtype=torch.float64)
    uniforms = uniforms.to(torch.float64).cpu()
    probs = logq.detach().double().cpu().exp()  # [B, M + 1]
    cdf = probs.cumsum(-1)
    target = uniforms[:, 0] * cdf[:, -1]
    column = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    last_with_mass = (probs > 0).cumsum(-1).argmax(-1)  # round-off guard at the top of the cdf
    column = torch.minimum(column, last_with_mass)

    rest = candidates.rest_column
    token_ids = candidates.token_ids.cpu()
    ids = token_ids.gather(-1, column.clamp(max=rest - 1)[:, None])[:, 0]
    in_rest = (column == rest).nonzero().flatten()  # rare with a good top-k: the bucket holds little mass
    if len(in_rest):
        ids[in_rest] = unlisted_ids(token_ids[in_rest], candidates.vocab_size, uniforms[in_rest, 1])
    column = column.to(logq.device)
    token_logq = (logq.gather(-1, column[:, None]) - candidates.log_multiplicity.gather(-1, column[:, None]))[:, 0]
    return ids.to(candidates.token_ids.device), token_logq


def unlisted_ids(listed: torch.Tensor, vocab_size: int, u: torch.Tensor) -> torch.Tensor:
    """Per row, the id of rank ⌊u · n⌋ among the n vocabulary ids not in the row of `listed`, `[B]`.

    `listed` (`[B, M]`, -1 for padding) holds distinct ids per row. The answer is the least x with
    x = r + #{listed ids ≤ x}; iterating that map from x = r climbs to it (each step adds the listed
    ids it passed), in at most M + 1 rounds, all rows at once.

    Example:
        >>> import torch
        >>> unlisted_ids(torch.tensor([[0, 1, 5, -1], [2, 3, -1, -1]]), 8, torch.tensor([0.0, 0.99]))
        tensor([2, 7])
    """
    listed = listed.long()
    valid = listed >= 0
    unlisted = vocab_size - valid.sum(-1)  # [B]
    if bool((unlisted <= 0).any()):
        raise RuntimeError("Sampled the rest bucket, but the candidate union already covers the whole vocabulary.")
    rank = torch.minimum((u.to(torch.float64) * unlisted).long(), unlisted - 1)
    x = rank
    for _ in range(listed.shape[-1] + 1):
        passed = (valid & (listed <= x[:, None])).sum(-1)
        moved = rank + passed
        if torch.equal(moved, x):
            break
        x = moved
    return x
