#!/usr/bin/env python
"""How good is one batch's policy gradient under each way of using q* rollouts?

On the toy task the success probability of a prompt is exact and differentiable,
J_x = π_θ(answer + EOS | x), so the true gradient of the batch's mean success costs one
backward pass. For each estimator (sampler + `importance_weighting` + `advantage_baseline`, the
trainer's own functions from `optimal_sampling.trainers.estimators`) this script draws a batch of rollouts (32
prompts × 8 completions), forms the GRPO/DAPO surrogate loss exactly as the trainer weights it,
and reports the cosine between its ascent direction and ∇J, over several independent batches.
A cosine near 1 means the step points uphill; bias (8.7 in theory/derivation.md) shows up as a
low or negative mean, variance as a wide spread.

It also measures what truncation at C touches, exactly: at every sampled q* position, the
policy mass Σ_y (π_θ(y) − C q*(y))₊ dropped by truncation, next to the fraction of sampled
tokens that were truncated; and the same at sequence level (estimated, E_q[(W − C)₊]).

    python recipes/gradient_check.py --batches 8 --regime hard ordinary

Prints Markdown tables (kept in recipes/RESULTS.md).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_toy import problem_sets  # noqa: E402

from optimal_sampling.mixture import compute_mixture, log_probs_from_logits  # noqa: E402
from optimal_sampling.options import QStarOptions  # noqa: E402
from optimal_sampling.toy import exact_match_reward, load_toy_pair  # noqa: E402
from optimal_sampling.trainers.estimators import grpo_advantages, importance_weights, mixture_log_weights  # noqa: E402
from optimal_sampling.trainers.rollout import left_pad, sample_rollouts  # noqa: E402

G = 8
CAP = 3.0
ESTIMATORS = {  # name: (k on-policy rows per group, sampler mixing, weighting, baseline)
    "vanilla (all on-policy)": (G, {}, "none", "group"),
    "all q*, token-truncated, group mean (old default)": (0, {}, "token_truncate", "group"),
    "all q*, token-truncated, no baseline": (0, {}, "token_truncate", "none"),
    "all q*, token-truncated, IS baseline": (0, {}, "token_truncate", "is"),
    "all q*, sequence-truncated, group mean": (0, {}, "sequence_truncate", "group"),
    "all q*, no weights, group mean": (0, {}, "none", "group"),
    "4 + 4 q*, no weights, group mean": (G // 2, {}, "none", "group"),
    "4 + 4 q*, token-truncated, on-policy baseline": (G // 2, {}, "token_truncate", "on_policy"),
    "4 + 4 q*, token-truncated, IS baseline": (G // 2, {}, "token_truncate", "is"),
    "4 + 4 q*, MIS weights, group mean": (G // 2, {}, "mis", "group"),
    "4 + 4 q*, shaping, group mean": (G // 2, {}, "shaping", "group"),
    "4 + 4 teacher, no weights, group mean": (G // 2, {"alpha_method": "fixed", "alpha": 1.0}, "none", "group"),
    "7 + 1 q*, shaping, group mean": (G - 1, {}, "shaping", "group"),
}


def token_log_probs(model, prompt_ids, completions, pad_id, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`[N, T]` log π(y_t | ...) of each completion token (right-padded) and its mask."""
    ids, mask = left_pad(prompt_ids, pad_id, "cpu")
    width = max(len(c) for c in completions)
    comp = torch.full((len(completions), width), pad_id, dtype=torch.long)
    comp_mask = torch.zeros_like(comp, dtype=torch.bool)
    for i, c in enumerate(completions):
        comp[i, : len(c)] = torch.tensor(c)
        comp_mask[i, : len(c)] = True
    full = torch.cat([ids, comp], 1)
    attention = torch.cat([mask, comp_mask.long()], 1)
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=full, attention_mask=attention, position_ids=positions).logits
        logits = logits[:, ids.shape[1] - 1 : -1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, comp[..., None]).squeeze(-1)
    return logp, comp_mask, logits


def exact_gradient(model, tokenizer, problems) -> torch.Tensor:
    model.zero_grad()
    answer_log_probs_grad(model, tokenizer, problems).exp().mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()


def answer_log_probs_grad(model, tokenizer, problems):
    with torch.enable_grad():
        return _answer_log_probs(model, tokenizer, problems)


def _answer_log_probs(model, tokenizer, problems):
    eos = tokenizer.eos_token_id
    rows = [
        (
            tokenizer(p["prompt"], add_special_tokens=False)["input_ids"],
            tokenizer(p["answer"], add_special_tokens=False)["input_ids"] + [eos],
        )
        for p in problems
    ]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        attention[i, : len(p) + len(a)] = 1
        target[i, len(p) : len(p) + len(a)] = True
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * target[:, 1:]).sum(-1)


def estimator_gradient(model, teacher, tokenizer, problems, spec, seed) -> tuple[torch.Tensor, dict]:
    k, mixing, weighting, baseline = spec
    prompts = [tokenizer(p["prompt"], add_special_tokens=False)["input_ids"] for p in problems for _ in range(G)]
    teacher_prompts = [
        tokenizer(p["teacher_prompt"], add_special_tokens=False)["input_ids"] for p in problems for _ in range(G)
    ]
    on_policy = (torch.arange(len(prompts)) % G) < k
    torch.manual_seed(seed)
    rollouts = sample_rollouts(
        model,
        teacher,
        prompts,
        teacher_prompt_ids=teacher_prompts,
        max_new_tokens=5,
        pad_token_id=tokenizer.pad_token_id,
        stop_token_ids=[tokenizer.eos_token_id],
        vocab_size=len(tokenizer),
        device="cpu",
        q_star=QStarOptions(**mixing),
        on_policy=on_policy,
    )
    texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=False)
    rewards = torch.tensor(exact_match_reward(texts, [p["answer"] for p in problems for _ in range(G)]))
    model.zero_grad()
    logp, mask, _ = token_log_probs(model, prompts, rollouts.completion_ids, tokenizer.pad_token_id, grad=True)
    width = mask.shape[1]
    logq = torch.zeros_like(logp)
    logq_star = torch.zeros_like(logp)
    for i, (a, b) in enumerate(zip(rollouts.logq, rollouts.logq_star)):
        logq[i, : len(a)] = torch.tensor(a)
        logq_star[i, : len(b)] = torch.tensor(b)
    log_ratio = (logp.detach() - logq) * mask
    log_ratio_star = ((logp.detach() - logq_star) * mask).sum(-1)
    fraction = k / G
    weights = importance_weights(
        log_ratio,
        mask,
        on_policy,
        weighting=weighting,
        cap=CAP,
        gamma=0.1,
        log_ratio_star=log_ratio_star,
        on_policy_fraction=fraction,
    )
    advantages = grpo_advantages(
        rewards,
        on_policy,
        mixture_log_weights(log_ratio_star, fraction),
        num_generations=G,
        baseline=baseline,
        scale_rewards="group",
    )
    loss = -(weights.detach() * advantages[:, None] * logp * mask).sum() / mask.sum()  # DAPO token normalisation
    loss.backward()
    gradient = -torch.cat([p.grad.flatten() for p in model.parameters()]).clone()
    q_rows = ~on_policy
    stats = {
        "reward_q": float(rewards[q_rows].mean()) if q_rows.any() else float("nan"),
        "reward_on": float(rewards[on_policy].mean()) if on_policy.any() else float("nan"),
        "width": width,
    }
    return gradient, stats


def truncation_mass(model, teacher, tokenizer, problems, seed) -> dict[str, float]:
    """At every sampled position of all-q* rollouts: the fraction of tokens with w > C, the exact
    policy mass Σ_y (π − C q*)₊ there, and at sequence level P(W > C) and E_q[(W − C)₊]."""
    prompts = [tokenizer(p["prompt"], add_special_tokens=False)["input_ids"] for p in problems for _ in range(G)]
    teacher_prompts = [
        tokenizer(p["teacher_prompt"], add_special_tokens=False)["input_ids"] for p in problems for _ in range(G)
    ]
    torch.manual_seed(seed)
    rollouts = sample_rollouts(
        model,
        teacher,
        prompts,
        teacher_prompt_ids=teacher_prompts,
        max_new_tokens=5,
        pad_token_id=tokenizer.pad_token_id,
        stop_token_ids=[tokenizer.eos_token_id],
        vocab_size=len(tokenizer),
        device="cpu",
    )
    _, mask, base_logits = token_log_probs(model, prompts, rollouts.completion_ids, tokenizer.pad_token_id, False)
    _, _, teacher_logits = token_log_probs(
        teacher, teacher_prompts, rollouts.completion_ids, tokenizer.pad_token_id, False
    )
    vocab = len(tokenizer)
    lp = log_probs_from_logits(base_logits[mask], 1.0, vocab)
    lr = log_probs_from_logits(teacher_logits[mask], 1.0, vocab)
    logq = compute_mixture(lp, lr).logq
    chosen = torch.cat([torch.tensor(c) for c in rollouts.completion_ids])
    log_w = (lp - logq).gather(-1, chosen[:, None]).squeeze(-1)
    lost = (lp.exp() - CAP * logq.exp()).clamp_min(0).sum(-1)
    on_truncated = torch.where(lp - logq > math.log(CAP), lp.exp(), 0.0).sum(-1)  # π on tokens with π > Cq
    seq_log_w = torch.zeros(mask.shape[0]).index_add_(0, mask.nonzero()[:, 0], log_w.double().float())
    return {
        "token_truncated_frac": float((log_w.exp() > CAP).float().mean()),
        "token_policy_mass": float(lost.mean()),
        "token_policy_mass_on_truncated": float(on_truncated.mean()),
        "seq_truncated_frac": float((seq_log_w.exp() > CAP).float().mean()),
        "seq_policy_mass": float((seq_log_w.exp() - CAP).clamp_min(0).mean()),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=8, help="independent batches per estimator")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per batch (× 8 completions)")
    parser.add_argument("--regime", nargs="+", default=["hard", "ordinary"], choices=["hard", "ordinary"])
    parser.add_argument("--truncation_only", action="store_true", help="only the truncated-mass measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base, teacher, tokenizer = load_toy_pair()
    sets = problem_sets(base, tokenizer)
    for regime in args.regime:
        pool = sets["train_hard"] if regime == "hard" else sets["train_all"]
        rng = random.Random(f"gradient-check-{regime}")
        batches = [rng.sample(pool, args.prompts) for _ in range(args.batches)]
        if not args.truncation_only:
            gradient_table(base, teacher, tokenizer, regime, batches, args)
        masses = [truncation_mass(base, teacher, tokenizer, b, seed=2000 + i) for i, b in enumerate(batches)]
        mean = {key: sum(m[key] for m in masses) / len(masses) for key in masses[0]}
        print(
            f"\nTruncation at C = {CAP} of all-q* rollouts ({regime}): {mean['token_truncated_frac']:.1%} of tokens "
            f"truncated; the exact policy mass that truncation drops, Σ_y(π−Cq*)₊, is {mean['token_policy_mass']:.1%} "
            f"per position (the policy's mass on the tokens with π > Cq*, Σ_y π·1[π > Cq*], is "
            f"{mean['token_policy_mass_on_truncated']:.1%}); {mean['seq_truncated_frac']:.1%} of sequences truncated, "
            f"E_q[(W−C)₊] = {mean['seq_policy_mass']:.1%} of the policy's sequence mass."
        )


def gradient_table(base, teacher, tokenizer, regime, batches, args) -> None:
    """The cosine table of every estimator for one regime's batches."""
    truth = [exact_gradient(base, tokenizer, b) for b in batches]
    with torch.no_grad():
        success = [float(_answer_log_probs(base, tokenizer, b).exp().mean()) for b in batches]
    print(
        f"\n### {regime} prompts: policy success J = {sum(success) / len(success):.3f} (base model, "
        f"{args.batches} batches of {args.prompts} prompts × {G})\n"
    )
    print("| estimator | cosine with ∇J: mean ± sd (min, max) | q* rows' reward | on-policy rows' reward |")
    print("|---|---|---|---|")
    for name, spec in ESTIMATORS.items():
        cosines, rq, ro = [], [], []
        for i, (b, g_true) in enumerate(zip(batches, truth)):
            g, stats = estimator_gradient(base, teacher, tokenizer, b, spec, seed=1000 + i)
            cosines.append(float(torch.nn.functional.cosine_similarity(g, g_true, dim=0)))
            rq.append(stats["reward_q"])
            ro.append(stats["reward_on"])
        c = torch.tensor(cosines)
        fmt = lambda xs: "–" if all(x != x for x in xs) else f"{sum(xs) / len(xs):.2f}"  # noqa: E731
        print(f"| {name} | {c.mean():.2f} ± {c.std():.2f} ({c.min():.2f}, {c.max():.2f}) | {fmt(rq)} | {fmt(ro)} |")


if __name__ == "__main__":
    main()
