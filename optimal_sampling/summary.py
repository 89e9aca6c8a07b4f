"""The table `optimal-sampling generate` prints at the end of a run: accuracy, α, KL and ESS summaries."""

from __future__ import annotations

import math


def exact_match_accuracy(rows, answers) -> tuple[float, int, int] | None:
    """(accuracy over the rows that were sampled, how many were, how many have an `error`), or None
    when a sampled row has no answer. A row that was never sampled is neither right nor wrong.

    >>> rows = [{"index": i, "generated_text": "46", "error": None} for i in range(3)]
    >>> rows += [{"index": 3, "generated_text": "", "error": "the prompt is empty"}]
    >>> exact_match_accuracy(rows, ["46", "46", "71", None])
    (0.6666666666666666, 3, 1)
    """
    from .toy import exact_match_reward

    sampled = [row for row in rows if not row.get("error")]
    if not sampled or any(answers[row["index"]] is None for row in sampled):
        return None
    rewards = exact_match_reward(
        [row["generated_text"] for row in sampled], [str(answers[row["index"]]) for row in sampled]
    )
    return sum(rewards) / len(rewards), len(sampled), len(rows) - len(sampled)


def _accuracy_line(name: str, rows, answers) -> str | None:
    result = exact_match_accuracy(rows, answers)
    if result is None:
        return None
    accuracy, sampled, errors = result
    return f"| exact-match accuracy, {name} (over {sampled} sampled rows, {errors} with errors) | {accuracy:.3f} |"


def _finite(values) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _mean(values) -> float:
    values = _finite(values)
    return sum(values) / len(values) if values else float("nan")


def _median(values) -> float:
    values = sorted(_finite(values))
    if not values:
        return float("nan")
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def ess_ratio_summary(rows) -> tuple[float, float]:
    """ESS_θ/ESS_t over the samples: (geometric mean over all tokens, median of the samples'
    own geometric means). The per-token ratio is heavy-tailed (one token can reach 100s), so
    its arithmetic mean says little; its log is the natural scale (0 = balanced).

    >>> overall, median = ess_ratio_summary([{"diagnostics": {"ess_ratio_log_mean": 0.0, "num_tokens": 3}},
    ...                                      {"diagnostics": {"ess_ratio_log_mean": math.log(4), "num_tokens": 1}}])
    >>> round(overall, 6), round(median, 6)  # 4 ** (1/4) over the 4 tokens; the median of 1 and 4
    (1.414214, 2.0)
    """
    stats = [r["diagnostics"] for r in rows if r.get("diagnostics")]
    pairs = [(d.get("ess_ratio_log_mean"), d.get("num_tokens", 0)) for d in stats]
    pairs = [(log_mean, n) for log_mean, n in pairs if _finite([log_mean]) and n]
    tokens = sum(n for _, n in pairs)
    overall = math.exp(sum(log_mean * n for log_mean, n in pairs) / tokens) if tokens else float("nan")
    return overall, math.exp(_median([log_mean for log_mean, _ in pairs])) if pairs else float("nan")


def format_summary(all_rows, new_rows, elapsed, answers, comparisons, output) -> str:
    ok = [r for r in all_rows if not r.get("error")]
    tokens = sum(len(r["generated_tokens"]) for r in ok)
    new_tokens = sum(len(r["generated_tokens"]) for r in new_rows if not r.get("error"))
    alphas = [a for r in ok for a in r["alpha_history"]]
    mean_alpha = _mean(alphas)
    std_alpha = math.sqrt(_mean([(a - mean_alpha) ** 2 for a in alphas])) if alphas else float("nan")
    ess_overall, ess_median = ess_ratio_summary(ok)

    def diag(key):
        return _mean([r["diagnostics"].get(key) for r in ok if r.get("diagnostics")])

    lines = [
        "",
        f"| q* samples → {output} | |",
        "|---|---|",
        f"| samples (errors) | {len(all_rows)} ({len(all_rows) - len(ok)}) |",
        f"| generated tokens | {tokens} |",
        f"| tokens/s (this run) | {new_tokens / elapsed:.1f} |"
        if elapsed > 0 and new_rows
        else "| tokens/s (this run) | - |",
        f"| α mean ± std | {mean_alpha:.3f} ± {std_alpha:.3f} |",
        f"| KL(q‖π_θ) mean | {diag('kl_theta_mean'):.4f} |",
        f"| KL(q‖π_t) mean | {diag('kl_t_mean'):.4f} |",
        f"| KL difference mean (≈ 0 under KL symmetry) | {diag('kl_diff_mean'):.2e} |",
        f"| ESS_θ/ESS_t, geometric mean over tokens | {ess_overall:.3f} |",
        f"| ESS_θ/ESS_t, median over samples | {ess_median:.3f} |",
        f"| entropy of q mean | {diag('entropy_q_mean'):.3f} |",
    ]
    if exact_match_accuracy(all_rows, answers) is not None:
        for name, rows in {"q*": all_rows, **comparisons}.items():
            line = _accuracy_line(name, rows, answers)
            if line is not None:
                lines.append(line)
    lines.append(
        "\nESS_θ/ESS_t: how well q* serves as a proposal for π_θ relative to π_t (effective sample "
        "sizes); 1 = balanced, > 1: q* sits nearer π_θ, < 1: nearer π_t."
    )
    return "\n".join(lines)
