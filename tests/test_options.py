"""`QStarOptions`: one validated options object that every front takes whole (issue 17, item 1).

An option set once must reach every front and change what it samples. The two options the
fronts used to drop are exercised through each of them: `empty_support` (on a model pair that
shares no token, so every step falls back) and `kl_budget` (every sampled token's q must stay
within the budget of π_θ). The decode loops must also give identical records for one seed: they
all call the core's one step (`compute_mixture`, forced teacher tokens selected on the device).
"""

from __future__ import annotations

import argparse
import inspect
import math
from dataclasses import fields

import pytest
import torch

from optimal_sampling import OptimalSampler, OptimalSamplingLogitsProcessor, QStarOptions, optimal_generate
from optimal_sampling.cli import build_parser
from optimal_sampling.engines import DrivenDecodeConfig
from optimal_sampling.fast import FastDecoder, FastPathConfig
from optimal_sampling.options import OPTION_NAMES, q_star_field
from optimal_sampling.servers import CoordinatorConfig, DualVLLMCoordinator
from optimal_sampling.testing import tiny_causal_lm, tiny_tokenizer
from optimal_sampling.topk_decoding import UNSUPPORTED_OPTIONS, TopKSequence, TopKStepper, topk_config_fields

TOKENIZER = tiny_tokenizer()
V = len(TOKENIZER)
PAD, EOS = TOKENIZER.pad_token_id, TOKENIZER.eos_token_id
HALF = V // 2  # the base puts its mass on ids below, the teacher on ids at or above
PROMPTS = ["the cat sat on the mat", "a dog ran", "what is two plus two"]
FRONTS = ("processor", "optimal_generate", "sampler", "fast", "rollouts")


def make_pair(disjoint: bool = False, logit_scale: float = 3.0):
    """Tiny base + teacher; with `disjoint`, forward hooks give them no common token (−inf logits)."""
    base = tiny_causal_lm(V, seed=1, pad_token_id=PAD, eos_token_id=EOS, logit_scale=logit_scale)
    teacher = tiny_causal_lm(V, seed=2, pad_token_id=PAD, eos_token_id=EOS, logit_scale=logit_scale)
    if disjoint:

        def keep_below(module, args, output):
            output.logits[..., HALF:] = -math.inf

        def keep_above(module, args, output):
            output.logits[..., :HALF] = -math.inf

        base.register_forward_hook(keep_below)
        teacher.register_forward_hook(keep_above)
    return base, teacher


def left_pad(texts):
    enc = TOKENIZER(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def run_front(front: str, base, teacher, seed: int = 0, max_new_tokens: int = 6, **options) -> dict[str, torch.Tensor]:
    """Tokens and per-token records (`[B, T]`, masked to generated tokens) of one front, given the
    q* options as keywords: alpha, logq, empty_support, kl_theta, tokens."""
    ids, mask = left_pad(PROMPTS)
    torch.manual_seed(seed)
    if front == "processor":
        processor = OptimalSamplingLogitsProcessor(
            teacher, QStarOptions(**options), pad_token_id=PAD, eos_token_id=[EOS]
        )
        sequences = base.generate(
            ids,
            attention_mask=mask,
            logits_processor=[processor],
            do_sample=True,
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )
        record = processor.records(sequences)
        out = dict(
            alpha=record.alpha,
            logq=record.logq,
            mask=record.token_mask,
            **record.diagnostics,
            tokens=sequences[:, ids.shape[1] :],
        )
    elif front in ("optimal_generate", "sampler", "fast"):
        if front == "optimal_generate":  # the q* options as generate keywords (the failing call)
            result = base.generate(
                ids,
                attention_mask=mask,
                custom_generate=optimal_generate,
                teacher_model=teacher,
                do_sample=True,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=PAD,
                eos_token_id=EOS,
                return_dict_in_generate=True,
                **options,
            )
        elif front == "sampler":
            sampler = OptimalSampler(base, teacher, TOKENIZER, QStarOptions(**options))
            result = sampler.generate_token_ids(
                [TOKENIZER(p)["input_ids"] for p in PROMPTS], max_new_tokens=max_new_tokens
            )
        else:
            decoder = FastDecoder(base, teacher, FastPathConfig(mode="eager", diagnostics=True, max_iter=20))
            result = decoder.generate(
                ids, mask, max_new_tokens=max_new_tokens, pad_token_id=PAD, stop_token_ids=[EOS], **options
            )
        out = dict(
            alpha=result.alpha,
            logq=result.logq,
            mask=result.token_mask,
            **result.diagnostics,
            tokens=result.sequences[:, -result.alpha.shape[1] :],
        )
    else:
        from optimal_sampling.trainers.rollout import sample_rollouts

        rollouts = sample_rollouts(
            base,
            teacher,
            [TOKENIZER(p)["input_ids"] for p in PROMPTS],
            teacher_prompt_ids=None,
            max_new_tokens=max_new_tokens,
            pad_token_id=PAD,
            stop_token_ids=[EOS],
            vocab_size=V,
            device="cpu",
            q_star=QStarOptions(**options),
        )
        width = rollouts.alpha.shape[1]
        logq = torch.zeros(len(PROMPTS), width)
        tokens = torch.full((len(PROMPTS), width), PAD)
        for i, (row_ids, row_logq) in enumerate(zip(rollouts.completion_ids, rollouts.logq)):
            logq[i, : len(row_logq)] = torch.tensor(row_logq)
            tokens[i, : len(row_ids)] = torch.tensor(row_ids)
        out = dict(alpha=rollouts.alpha, logq=logq, mask=rollouts.token_mask, **rollouts.diagnostics, tokens=tokens)
    generated = out.pop("mask").bool()
    assert generated.any()
    return {name: value[generated].double() for name, value in out.items() if torch.is_tensor(value)}


@pytest.mark.parametrize("front", FRONTS)
def test_empty_support_reaches_every_transformers_front(front):
    """A pair with no common token: 'base' samples π_θ (α = 0), 'teacher' samples π_t (α = 1)."""
    base, teacher = make_pair(disjoint=True)
    for fallback, alpha, allowed in (("base", 0.0, lambda t: t < HALF), ("teacher", 1.0, lambda t: t >= HALF)):
        out = run_front(front, base, teacher, empty_support=fallback)
        assert out["empty_support"].eq(1).all()
        assert out["alpha"].eq(alpha).all(), (fallback, out["alpha"])
        assert allowed(out["tokens"]).all(), (fallback, out["tokens"])  # drawn from the fallback's support only
        assert torch.isfinite(out["logq"]).all()


@pytest.mark.parametrize("front", FRONTS)
def test_kl_budget_reaches_every_transformers_front(front):
    """Every sampled token's q stays within ε of π_θ; the unconstrained symmetric α would go past it."""
    base, teacher = make_pair()
    budget = 0.01
    out = run_front(front, base, teacher, alpha_method="kl_budget", kl_budget=budget)
    assert out["kl_theta"].max() <= budget + 1e-5
    symmetric = run_front(front, base, teacher)
    assert symmetric["kl_theta"].max() > 2 * budget  # the budget binds on this pair
    assert out["alpha"].mean() < symmetric["alpha"].mean()


def test_every_decode_loop_gives_identical_records_for_one_seed():
    """The processor (transformers' loop), `optimal_generate`, the fast path's step and the trainer's
    loop draw the same tokens with the same records: they run one q* step (forced teacher tokens
    on the device, the clamp after them)."""
    base, teacher = make_pair()
    options = dict(force_teacher_first_tokens=2, alpha_max=0.8, alpha_method="kl_symmetry")
    runs = {front: run_front(front, base, teacher, seed=3, max_new_tokens=8, **options) for front in FRONTS}
    reference = runs.pop("processor")
    clamped = torch.isclose(reference["alpha"], torch.tensor(0.8, dtype=torch.float64), rtol=0, atol=1e-6)
    assert reference["alpha"].max() <= 0.8 + 1e-6 and clamped.sum() >= len(PROMPTS) * 2  # forced, then clamped
    for front, out in runs.items():
        assert torch.equal(out["tokens"], reference["tokens"]), front
        for name in ("alpha", "logq", "kl_theta", "kl_t", "empty_support"):
            torch.testing.assert_close(out[name], reference[name], atol=1e-5, rtol=0, msg=f"{front}: {name}")


# -- the top-k step of both vLLM backends ----------------------------------------------------


def disjoint_top_k_lists(rows: int = 4, k: int = 4):
    """Each model's top-k list holds all of its mass, on ids the other's list does not have."""
    logp = torch.log(torch.full((rows, k), 1.0 / k, dtype=torch.float64))
    ids_theta = torch.arange(k).repeat(rows, 1) + 10
    ids_t = torch.arange(k).repeat(rows, 1) + 30
    return ids_theta, logp, ids_t, logp.clone()


@pytest.mark.parametrize("config_cls", [CoordinatorConfig, DrivenDecodeConfig])
def test_empty_support_and_kl_budget_reach_the_top_k_step(config_cls):
    rows = [TopKSequence(index=i, prompt="p", teacher_prompt="p", base_ids=[5], teacher_ids=[5]) for i in range(4)]
    stepper = TopKStepper(config_cls(empty_support="base").q_star, V)
    stepper.advance(
        rows,
        *disjoint_top_k_lists(),
        seed=0,
        temperature=1.0,
        max_tokens=4,
        stop_token_ids=set(),
        return_diagnostics=True,
    )
    assert all(row.error is None for row in rows)
    assert [row.records["alpha"] for row in rows] == [[0.0]] * 4 and [row.records["empty_support"] for row in rows] == [
        [1.0]
    ] * 4
    assert all(10 <= row.tokens[0] < 14 for row in rows)  # the base's list only

    generator = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(3 * torch.randn(4, 8, generator=generator, dtype=torch.float64), -1)
    lr = torch.log_softmax(3 * torch.randn(4, 8, generator=generator, dtype=torch.float64), -1)
    ids = torch.arange(8).repeat(4, 1)
    budget = TopKStepper(config_cls(alpha_method="kl_budget", kl_budget=0.01).q_star, V).mix(ids, lp, ids, lr)
    assert budget.mixture.diagnostics.kl_theta.max() <= 0.01 + 1e-6
    forced = TopKStepper(config_cls(force_teacher_first_tokens=1).q_star, V).mix(
        ids, lp, ids, lr, forced=torch.tensor([1, 0, 1, 0]).bool()
    )
    assert forced.mixture.alpha[[0, 2]].eq(1).all() and forced.mixture.alpha[[1, 3]].lt(1).all()


def test_the_two_server_coordinator_samples_with_its_configs_options():
    config = CoordinatorConfig(empty_support="base", alpha_method="kl_budget", kl_budget=0.3, alpha_tol=1e-7)
    coordinator = DualVLLMCoordinator(config)  # not started: no server is contacted
    assert coordinator.stepper.q_star == QStarOptions(
        empty_support="base", alpha_method="kl_budget", kl_budget=0.3, tol=1e-7
    )
    assert config.top_k == 100 and coordinator.stepper.q_star.top_k == 0  # the candidate count is not q*'s top-k


# -- an option added once exists everywhere -------------------------------------------------


def test_every_option_is_taken_or_refused_by_name_on_every_front():
    """Adding a field to QStarOptions without deciding what each front does with it fails here."""
    generate_own = {"temperature", "top_k", "top_p"}
    assert set(OPTION_NAMES) - generate_own <= set(inspect.signature(optimal_generate).parameters)
    cli = {action.dest for action in build_parser()._subparsers._group_actions[0].choices["generate"]._actions}
    assert set(OPTION_NAMES) <= cli
    renamed = {"tol": "alpha_tol", "max_iter": "alpha_max_iter"}
    for config_cls in (CoordinatorConfig, DrivenDecodeConfig):
        names = {renamed.get(f.name, f.name) for f in fields(QStarOptions)}
        per_call, refused = {"temperature"}, set(UNSUPPORTED_OPTIONS)
        assert names - {renamed.get(n, n) for n in per_call | refused} <= {f.name for f in fields(config_cls)}
    assert set(topk_config_fields(QStarOptions())) <= {f.name for f in fields(CoordinatorConfig)}


def test_trainer_config_fields_are_the_options_own():
    pytest.importorskip("trl")
    from optimal_sampling.trainers import OptimalSamplingGRPOConfig

    config_fields = {f.name: f for f in fields(OptimalSamplingGRPOConfig)}
    for option in fields(QStarOptions):
        name = {"tol": "alpha_tol", "max_iter": "alpha_max_iter"}.get(option.name, option.name)
        assert name in config_fields, name  # temperature / top_k / top_p are TRL's own fields
    assert config_fields["kl_budget"].metadata["help"] == QStarOptions.field_help()["kl_budget"]
    args = OptimalSamplingGRPOConfig(
        output_dir="/tmp/os-options",
        num_generations=4,
        report_to="none",
        use_cpu=True,
        bf16=False,
        empty_support="base",
        alpha_method="kl_budget",
        kl_budget=0.05,
        temperature=0.7,
    )
    # every default, the α rule's included, is the options' own since the teacher-payoff experiment
    assert args.q_star == QStarOptions(empty_support="base", alpha_method="kl_budget", kl_budget=0.05, temperature=0.7)


def test_cli_takes_every_option_and_reruns_with_another_one_are_not_resumed(tmp_path, capsys):
    from optimal_sampling.cli import main

    out = tmp_path / "samples.jsonl"
    small = ["generate", "--limit", "2", "--max-new-tokens", "2", "--batch-size", "2", "--no-progress"]
    budget = ["--alpha-method", "kl_budget", "--kl-budget", "0.05"]
    assert main([*small, "--empty-support", "base", *budget, "--output", str(out)]) == 0
    assert main([*small, "--empty-support", "teacher", *budget, "--output", str(out)]) == 2
    assert "empty_support" in capsys.readouterr().err  # the changed setting is named, not silently reused
    assert main([*small, "--alpha-method", "kl_budget", "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "needs `kl_budget=`" in capsys.readouterr().err


def test_the_cli_records_only_the_options_its_alpha_rule_uses(tmp_path, capsys):
    import json
    from pathlib import Path

    from optimal_sampling.cli import main

    out = tmp_path / "samples.jsonl"
    small = ["generate", "--limit", "2", "--max-new-tokens", "2", "--batch-size", "2", "--no-progress"]
    assert main([*small, "--alpha-method", "kl_symmetry", "--output", str(out)]) == 0
    settings = json.loads(Path(str(out) + ".settings.json").read_text())["settings"]
    assert settings["alpha_method"] == "kl_symmetry" and "tol" in settings
    assert "alpha" not in settings and "kl_budget" not in settings  # kl_symmetry reads neither
    # so a rerun that changes only an unused option is the same run: it resumes (nothing left to do)
    assert main([*small, "--alpha-method", "kl_symmetry", "--alpha", "0.9", "--output", str(out)]) == 0
    fixed = tmp_path / "fixed.jsonl"
    assert main([*small, "--alpha-method", "fixed", "--alpha", "0.3", "--output", str(fixed)]) == 0
    recorded = json.loads(Path(str(fixed) + ".settings.json").read_text())["settings"]
    assert recorded["alpha"] == 0.3 and "tol" not in recorded and "kl_budget" not in recorded


def test_options_are_validated_once_with_errors_that_name_the_fix():
    with pytest.raises(ValueError, match="alpha_method='fixed' needs `alpha=`"):
        QStarOptions(alpha_method="fixed")
    with pytest.raises(ValueError, match="`empty_support` must be 'teacher' or 'base'"):
        QStarOptions(empty_support="none")
    with pytest.raises(ValueError, match="`temperature` .* strictly positive"):
        QStarOptions(temperature=0)
    with pytest.raises(TypeError, match="Unknown q\\* option 'emtpy_support'"):
        QStarOptions().replace(emtpy_support="base")
    with pytest.raises(ValueError, match="`teacher_top_p` .* is not supported by the vLLM backends"):
        topk_config_fields(QStarOptions(teacher_top_p=0.9))
    with pytest.raises(TypeError, match="Unknown q\\* option 'alpah'"):
        OptimalSamplingLogitsProcessor(tiny_causal_lm(V, seed=0), alpah=0.5)
    options = QStarOptions(alpha_method="fixed", alpha=0.25)
    assert hash(options) == hash(QStarOptions(alpha_method="fixed", alpha=0.25))  # frozen: a graph-cache key
    with pytest.raises(AttributeError):
        options.alpha = 0.5  # type: ignore[misc]


def test_a_config_field_mirrors_its_option():
    from dataclasses import dataclass

    @dataclass
    class Config:
        empty_support: str = q_star_field("empty_support")
        alpha: float | None = q_star_field("alpha", default=1.0, help="mine")

    assert Config().empty_support == "teacher" and Config().alpha == 1.0
    assert fields(Config)[0].metadata["help"] == QStarOptions.field_help()["empty_support"]
    assert fields(Config)[1].metadata["help"] == "mine"
    argparse.ArgumentParser().add_argument("--x", **fields(Config)[0].metadata)  # argparse keywords only (TRL's parser)
    with pytest.raises(TypeError, match="'alpah' is not a q\\* option"):
        q_star_field("alpah")
