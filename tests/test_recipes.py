"""The experiment driver `recipes/grpo_toy.py`: its statistics, and one real two-step grid run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import grpo_toy  # noqa: E402


def test_holm_adjusts_step_down_and_keeps_the_order_monotone():
    adjusted = grpo_toy.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    # sorted 0.01, 0.03, 0.04 → ×3, ×2, ×1 = 0.03, 0.06, 0.04 → monotone: 0.03, 0.06, 0.06
    assert adjusted == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert grpo_toy.holm({"a": 0.6, "b": 0.7}) == pytest.approx({"a": 1.0, "b": 1.0})


def test_area_under_curve_is_the_mean_accuracy_over_training():
    assert grpo_toy.area_under_curve([0, 10, 20], [0.0, 0.5, 0.5]) == pytest.approx((2.5 + 5.0) / 20)
    assert grpo_toy.steps_to_reach([0, 10, 20], [0.1, 0.3, 0.4], 0.3) == 10
    assert grpo_toy.steps_to_reach([0, 10], [0.1, 0.2], 0.3) == float("inf")


def test_paired_tests_report_the_mean_difference_and_its_interval():
    result = grpo_toy.paired_tests([0.01, 0.02, 0.03, 0.02])
    assert result["mean"] == pytest.approx(0.02)
    assert result["low"] < 0.02 < result["high"]
    assert result["t_p"] < 0.05


def test_seed_ranges_parse():
    assert grpo_toy.parse_seeds("0-2,5") == [0, 1, 2, 5]


#: A run that holds a slot in SLOTS for half a second and fails like a CUDA out-of-memory error when more than
#: two runs hold one then: a stand-in for the GPU's memory, which the scheduler below must share out.
CROWDED_RUN = """
import json, os, sys, time
slots, result = sys.argv[1], sys.argv[2]
mine = os.path.join(slots, os.path.basename(result))
open(mine, "w").close()
time.sleep(0.5)
crowd = len(os.listdir(slots))
time.sleep(0.3)
os.remove(mine)
if crowd > 2:
    sys.exit(f"torch.OutOfMemoryError: CUDA out of memory ({crowd} runs at once)")
if "broken" in result:
    sys.exit("ValueError: a run that fails for another reason")
json.dump({"crowd": crowd}, open(result, "w"))
"""


def test_runs_short_of_a_shared_resource_run_again_with_fewer_beside_them(tmp_path, capsys):
    slots = tmp_path / "slots"
    slots.mkdir()
    jobs = [("arm", seed) for seed in range(5)] + [("broken", 9)]

    def path(job):
        return tmp_path / f"{job[0]}-{job[1]}.json"

    with pytest.raises(SystemExit, match="1 runs failed"):
        grpo_toy.run_jobs(
            jobs,
            command=lambda job: [sys.executable, "-c", CROWDED_RUN, str(slots), str(path(job))],
            result_path=path,
            log_dir=tmp_path / "logs",
            workers=6,
            summarize=lambda result: f"ran beside {result['crowd'] - 1}",
            crowded=lambda log: "CUDA out of memory" in log,
            poll=0.05,
        )
    out = capsys.readouterr().out
    assert all(path(job).exists() for job in jobs[:5])  # every run finished, at most two at a time
    assert all(json.loads(path(job).read_text())["crowd"] <= 2 for job in jobs[:5])
    assert "short of GPU memory beside 5 other run(s); again, with at most 5 at a time" in out
    assert "with at most 2 at a time" in out and "with at most 1 at a time" not in out
    # a failure of another kind is not retried, and is reported once with its log, which keeps the crowded tries
    assert out.count("broken seed 9: FAILED") == 1
    log = (tmp_path / "logs/broken-seed9.log").read_text()
    assert "ValueError: a run that fails for another reason" in log and "CUDA out of memory" in log


def test_a_deadline_starts_only_the_runs_expected_to_finish_by_it(tmp_path, capsys):
    """One worker, two seconds: the long run would not finish and is passed over for the run after it, which
    sleeps 1.5 s (expected 1 s), after which the third (expected 1 s) no longer fits: both are left, not failed."""
    sleeps, expected = {"long": 0.0, "a": 1.5, "b": 0.0}, {"long": 100.0, "a": 1.0, "b": 1.0}
    jobs = [("long", 0), ("a", 1), ("b", 2)]

    def path(job):
        return tmp_path / f"{job[0]}.json"

    sleeper = "import json, sys, time; time.sleep(float(sys.argv[1])); json.dump({}, open(sys.argv[2], 'w'))"
    grpo_toy.run_jobs(
        jobs,
        command=lambda job: [sys.executable, "-c", sleeper, str(sleeps[job[0]]), str(path(job))],
        result_path=path,
        log_dir=tmp_path / "logs",
        workers=1,
        summarize=lambda result: "done",
        deadline=time.time() + 2.0,
        expected_seconds=lambda job: expected[job[0]],
        poll=0.05,
    )
    out = capsys.readouterr().out
    assert [job for job in jobs if path(job).exists()] == [("a", 1)]
    assert "a seed 1: done" in out
    assert (
        "left for a later grid, as they would not finish by the deadline: long seed 0 (~100 s), b seed 2 (~1 s)" in out
    )


def test_the_grid_runs_resumes_and_analyses(tmp_path):
    """One arm pair, one seed, two steps: the grid writes a complete result per run, skips it on a
    rerun, and the analysis reads it."""
    command = [
        sys.executable,
        str(REPO / "recipes/grpo_toy.py"),
        "grid",
        "--regime",
        "hard",
        "--arms",
        "vanilla",
        "mixed_qstar",
        "--seeds",
        "0",
        "--steps",
        "2",
        "--eval_every",
        "1",
        "--workers",
        "2",
        "--output_dir",
        str(tmp_path),
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = json.loads((tmp_path / "hard/mixed_qstar-seed0.json").read_text())
    assert [point["step"] for point in result["eval"]] == [0, 1, 2]
    assert result["hard_eval_problems"] == 193 and result["hard_train_problems"] == 812
    assert 0.0 < result["eval"][0]["hard"] < 0.05  # the base's exact success on hard problems
    assert any("optimal_sampling/on_policy_frac" in h for h in result["log_history"])
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert "2 of 2 runs already done; running 0" in again.stdout
    report = subprocess.run(
        [sys.executable, str(REPO / "recipes/grpo_toy.py"), "analyze", "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "| 4 on-policy + 4 q*, no weights | 1 |" in report.stdout  # (paired tests need two seeds)


# --- every arm names its α rule, and logs the α that rule gives ------------------------------------

import argparse  # noqa: E402

import teacher_payoff  # noqa: E402

TRL_ARMS = {"vanilla", "distill"}  # TRL's own trainers: every row on-policy, no α


def all_arms():
    yield from (("grpo_toy", name, arm) for name, arm in grpo_toy.ARMS.items())
    yield from (("teacher_payoff", name, arm) for name, arm in teacher_payoff.ARMS.items())


def test_every_q_star_arm_names_its_alpha_rule_explicitly():
    for experiment, name, arm in all_arms():
        if name not in TRL_ARMS:
            assert "alpha_method" in arm, f"{experiment}.{name} leaves its α rule to the trainer's default"


def assert_alpha_follows_the_rule(arm: dict, entry: dict, where: str) -> None:
    rule = arm.get("alpha_method")
    if rule is None:
        assert "optimal_sampling/alpha_mean" not in entry, where
    elif rule == "fixed":
        assert entry["optimal_sampling/alpha_min"] == entry["optimal_sampling/alpha_max"] == arm["alpha"], where
    elif rule == "kl_symmetry":
        assert 0.0 < entry["optimal_sampling/alpha_mean"] < 1.0, where
        assert entry["optimal_sampling/kl_theta"] == pytest.approx(entry["optimal_sampling/kl_t"], abs=1e-3), where
    elif rule == "kl_budget":  # the schedule's pull is 1 at the first step
        assert entry["optimal_sampling/kl_theta"] <= arm["kl_budget"] + 1e-4, where
        assert entry["optimal_sampling/alpha_mean"] < 1.0, where
    else:
        raise AssertionError(f"{where}: no check for the α rule {rule!r}")


@pytest.mark.parametrize("experiment, name", [(e, n) for e, n, _ in all_arms()])
def test_each_arms_logged_alpha_matches_its_rule(experiment, name, tmp_path):
    """One optimizer step of the arm as its recipe runs it (the issue-13 bug: arms that relied on the
    trainer default logged α = 1 once that default changed)."""
    module = grpo_toy if experiment == "grpo_toy" else teacher_payoff
    options = dict(regime="hard" if experiment == "grpo_toy" else "beyond", arm=name, seed=0, steps=1, eval_every=1)
    options.update(output_dir=str(tmp_path), learning_rate=3e-4)
    if experiment == "grpo_toy":
        options["prompts_per_step"] = 2
    path = module.run(argparse.Namespace(**options))
    entry = json.loads(path.read_text())["log_history"][0]
    assert_alpha_follows_the_rule(module.ARMS[name], entry, f"{experiment}.{name}")


# --- teacher_payoff: its statistics, the default rule, and one real grid ---------------------------


def test_auc_at_equal_tokens_cuts_the_curve_at_the_budget():
    run = {
        "eval": [
            {"generated_tokens": 0, "m": 0.0},
            {"generated_tokens": 100, "m": 1.0},
            {"generated_tokens": 300, "m": 1.0},
        ]
    }
    assert teacher_payoff.auc_at_tokens(run, "m", 100) == pytest.approx(0.5)
    assert teacher_payoff.auc_at_tokens(run, "m", 200) == pytest.approx((50 + 100) / 200)
    assert teacher_payoff.auc_at_tokens(run, "m", 50) == pytest.approx(0.25)  # cut inside the first segment


def test_the_default_rule_needs_non_inferiority_everywhere_and_a_significant_gain_somewhere():
    def t(mean, low, holm):
        return {"mean": mean, "low": low, "holm": holm}

    key = "{}: mixed_qstar − mixed_teacher"
    regimes = ["a", "b"]
    better = {key.format("a"): t(0.02, 0.01, 0.01), key.format("b"): t(0.0, -0.005, 0.9)}
    assert teacher_payoff.default_decision(better, regimes).endswith("the KL-symmetric blend becomes the default")
    worse_somewhere = {key.format("a"): t(0.02, 0.01, 0.01), key.format("b"): t(-0.02, -0.04, 0.2)}
    assert teacher_payoff.default_decision(worse_somewhere, regimes).endswith("the default stays")
    no_gain = {key.format("a"): t(0.01, -0.001, 0.2), key.format("b"): t(0.0, -0.005, 0.9)}
    assert teacher_payoff.default_decision(no_gain, regimes).endswith("the default stays")
    assert teacher_payoff.default_decision({}, regimes).startswith("undecided")


def test_the_payoff_grid_runs_resumes_and_prints_its_tables_before_the_plot(tmp_path):
    command = [sys.executable, str(REPO / "recipes/teacher_payoff.py"), "grid", "--regime", "beyond"]
    command += ["--arms", "vanilla", "qstar_distill", "--seeds", "0-1", "--steps", "2", "--eval_every", "1"]
    command += ["--workers", "2", "--output_dir", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = json.loads((tmp_path / "beyond/qstar_distill-seed1.json").read_text())
    assert [point["step"] for point in result["eval"]] == [0, 1, 2]
    assert result["eval"][0]["sub"] < 0.01  # subtraction is beyond the base
    assert 0 < result["eval"][1]["generated_tokens"] < result["eval"][2]["generated_tokens"] <= 2 * 64 * 5
    assert result["eval"][2]["teacher_forward_tokens"] > 0 and result["eval"][2]["policy_forward_tokens"] > 0
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert "4 of 4 runs already done; running 0" in again.stdout
    report = subprocess.run(
        [
            sys.executable,
            str(REPO / "recipes/teacher_payoff.py"),
            "analyze",
            "--output_dir",
            str(tmp_path),
            "--plot",
            str(tmp_path / "p.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "| distillation on q* rollouts (KL symmetry) | 2 |" in report.stdout
    assert "| beyond: qstar_distill − vanilla | 2 |" in report.stdout  # Family A, paired over the two seeds
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the tables come first, then one line says how to get the plot
        assert report.stdout.index("Family A") < report.stdout.index("--plot needs matplotlib: pip install")
