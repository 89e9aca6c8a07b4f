"""`optimal-sampling generate` end to end on the shipped toy pair."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from optimal_sampling.cli import main

FIELDS = {
    "prompt",
    "teacher_prompt",
    "generated_text",
    "generated_tokens",
    "alpha_history",
    "logq",
    "logp_theta",
    "logp_t",
    "diagnostics",
    "error",
}
SMALL = ["--limit", "6", "--batch-size", "3", "--max-new-tokens", "4", "--no-progress"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "optimal_sampling.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def interrupt_after_rows(argv: list[str], out: Path, rows: int, sig: int) -> subprocess.Popen:
    """Start `optimal-sampling ARGV` in its own process; send it `sig` once `out` holds `rows` rows."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "optimal_sampling.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # A test run started in the background (`cmd &`) ignores SIGINT, and the child would inherit
        # that: give it the default handling, which Python turns into KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(out.read_text().splitlines()) >= rows:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_jsonl_output_has_every_field_and_a_summary(tmp_path, capsys):
    out = tmp_path / "samples.jsonl"
    assert main(["generate", *SMALL, "--output", str(out)]) == 0
    rows = read_jsonl(out)
    assert len(rows) == 6
    for row in rows:
        assert FIELDS <= set(row)
        assert row["error"] is None
        n = len(row["generated_tokens"])
        assert (
            n >= 1
            and len(row["logq"]) == len(row["logp_theta"]) == len(row["logp_t"]) == len(row["alpha_history"]) == n
        )
        assert row["teacher_prompt"] != row["prompt"]  # the toy rows carry the teacher's own format
    summary = capsys.readouterr().out
    assert "exact-match accuracy, q*" in summary and "tokens/s" in summary and "α mean" in summary


@pytest.mark.parametrize("suffix", [".parquet", ""])
def test_parquet_and_dataset_outputs_hold_the_same_rows_as_jsonl(tmp_path, suffix):
    reference = tmp_path / "ref.jsonl"
    assert main(["generate", *SMALL, "--output", str(reference)]) == 0
    out = tmp_path / f"samples{suffix}"
    assert main(["generate", *SMALL, "--output", str(out)]) == 0
    if suffix == ".parquet":
        rows = pq.read_table(out).to_pylist()
    else:
        from datasets import load_from_disk

        rows = [dict(r) for r in load_from_disk(str(out))]
    expected = read_jsonl(reference)
    assert [r["generated_tokens"] for r in rows] == [r["generated_tokens"] for r in expected]
    for row, ref in zip(rows, expected):
        assert row["logq"] == pytest.approx(ref["logq"])
    assert FIELDS <= set(rows[0])
    assert not Path(str(out) + ".partial.jsonl").exists()


def test_compare_reports_base_and_teacher_accuracy(tmp_path, capsys):
    assert main(["generate", *SMALL, "--compare", "--output", str(tmp_path / "c.jsonl")]) == 0
    summary = capsys.readouterr().out
    assert "base only (α=0)" in summary and "teacher only (α=1)" in summary


def test_killed_run_resumes_to_exactly_the_uninterrupted_rows(tmp_path):
    args = ["generate", "--limit", "24", "--batch-size", "4", "--max-new-tokens", "6", "--no-progress", "--seed", "3"]
    uninterrupted = tmp_path / "full.jsonl"
    assert run_cli(*args, "--output", str(uninterrupted)).returncode == 0

    out = tmp_path / "resumed.jsonl"
    interrupt_after_rows([*args, "--output", str(out)], out, 8, signal.SIGKILL).communicate(timeout=120)
    partial = out.read_text().splitlines()
    assert 0 < len(partial) < 24, "the run should have been killed part-way"
    with out.open("a") as f:  # a torn write, as a crash in the middle of a batch leaves
        f.write('{"index": 99, "prompt": "tor')

    rerun = run_cli(*args, "--output", str(out))
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    assert read_jsonl(out) == read_jsonl(uninterrupted)


def test_changed_settings_are_refused_unless_overwrite(tmp_path):
    out = tmp_path / "s.jsonl"
    assert main(["generate", *SMALL, "--output", str(out)]) == 0
    result = run_cli("generate", *SMALL, "--temperature", "0.5", "--output", str(out))
    assert result.returncode == 2
    assert "different settings" in result.stderr and "temperature" in result.stderr
    assert main(["generate", *SMALL, "--temperature", "0.5", "--overwrite", "--output", str(out)]) == 0
    assert len(read_jsonl(out)) == 6


def test_prompts_from_text_jsonl_and_teacher_template(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("12+34=\n50+21=\n")
    out = tmp_path / "t.jsonl"
    assert (
        main(["generate", "--prompts", str(text), "--max-new-tokens", "3", "--no-progress", "--output", str(out)]) == 0
    )
    rows = read_jsonl(out)
    assert [r["prompt"] for r in rows] == ["12+34=", "50+21="]
    assert all(r["teacher_prompt"] == r["prompt"] for r in rows)

    data = tmp_path / "p.jsonl"
    data.write_text(
        "\n".join(json.dumps({"question": q, "answer": a}) for q, a in [("12+34=", "46"), ("50+21=", "71")])
    )
    out2 = tmp_path / "u.jsonl"
    assert (
        main(
            [
                "generate",
                "--prompts",
                str(data),
                "--prompt-column",
                "question",
                "--teacher-prompt-template",
                "<|user|>\n{question}\n<|assistant|>\n",
                "--max-new-tokens",
                "4",
                "--no-progress",
                "--output",
                str(out2),
            ]
        )
        == 0
    )
    rows = read_jsonl(out2)
    assert rows[0]["teacher_prompt"] == "<|user|>\n12+34=\n<|assistant|>\n"


def test_missing_prompt_file_is_a_clear_error(tmp_path):
    result = run_cli("generate", "--prompts", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_unknown_column_is_a_clear_error(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"question": "1+1="}) + "\n")
    assert main(["generate", "--prompts", str(data), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--prompt-column 'prompt'" in err and "question" in err


def test_mismatched_tokenizers_are_a_clear_error(tmp_path, capsys):
    from optimal_sampling.testing import tiny_causal_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    assert main(["generate", *SMALL, "--teacher", str(tmp_path / "other"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "different vocabularies" in capsys.readouterr().err


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["generate", *SMALL, "--output", str(blocker / "sub" / "o.jsonl")]) == 2
    assert "cannot be created" in capsys.readouterr().err


def test_unloadable_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", *SMALL, "--base", str(tmp_path / "no_model"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "--base" in capsys.readouterr().err


def test_console_script_help_works():
    result = subprocess.run(
        [sys.executable, "-m", "optimal_sampling.cli", "generate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--teacher-prompt-template" in result.stdout


# -- a rerun never reuses stale rows -------------------------------------------------------


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_edited_prompts_under_the_same_path_are_refused_not_resumed(tmp_path):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    args = ["generate", "--prompts", str(prompts), "--max-new-tokens", "3", "--no-progress", "--output", str(out)]
    write_jsonl(prompts, [{"prompt": "12+34=", "answer": "46"}, {"prompt": "50+21=", "answer": "71"}])
    assert main(args) == 0
    write_jsonl(prompts, [{"prompt": "11+11=", "answer": "22"}, {"prompt": "50+21=", "answer": "71"}])  # same count
    result = run_cli(*args)
    assert result.returncode == 2 and "the prompts' content" in result.stderr and "--overwrite" in result.stderr
    assert read_jsonl(out)[0]["prompt"] == "12+34="  # left alone
    assert main([*args, "--overwrite"]) == 0
    assert [r["prompt"] for r in read_jsonl(out)] == ["11+11=", "50+21="]


def test_changed_weights_under_the_same_model_path_are_refused(tmp_path):
    import shutil

    from optimal_sampling.toy import BASE_DIR

    base, out = tmp_path / "base", tmp_path / "o.jsonl"
    shutil.copytree(BASE_DIR, base)
    args = ["generate", *SMALL, "--base", str(base), "--output", str(out)]
    assert main(args) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    model.save_pretrained(base)
    result = run_cli(*args)
    assert result.returncode == 2 and "the base model's files" in result.stderr


# -- prompt files: every format, bad rows, carried columns ---------------------------------


def test_bad_prompts_get_their_own_error_and_every_good_row_is_written(tmp_path, capsys):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    write_jsonl(
        prompts,
        [
            {"prompt": "12+34="},
            {"prompt": ""},
            {"prompt": None},
            {"prompt": "50+21="},
            {"question": "no prompt column"},
            {"prompt": 7},
        ],
    )
    assert (
        main(
            [
                "generate",
                "--prompts",
                str(prompts),
                "--batch-size",
                "2",
                "--max-new-tokens",
                "3",
                "--no-progress",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    rows = read_jsonl(out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4, 5]
    errors = [r["error"] for r in rows]
    assert errors[0] is None and errors[3] is None
    assert len(rows[0]["generated_tokens"]) >= 1 and len(rows[3]["generated_tokens"]) >= 1
    assert (
        "empty" in errors[1]
        and "null" in errors[2]
        and "no 'prompt' column" in errors[4]
        and "not a string" in errors[5]
    )
    assert all(rows[i]["generated_tokens"] == [] for i in (1, 2, 4, 5))
    err = capsys.readouterr().err
    assert "4 of 6 rows cannot be sampled" in err and "row 1: the prompt is empty" in err


def test_a_file_without_any_usable_prompt_is_refused_before_models_load(tmp_path):
    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, [{"prompt": ""}, {"prompt": None}])
    result = in_fresh_python(["generate", "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl")])
    assert result.returncode == 2 and "no row of" in result.stderr and "row 0: the prompt is empty" in result.stderr
    assert result.stdout.strip() == "torch imported: False"


def test_json_csv_parquet_and_jsonl_files_give_the_same_rows_and_carry_their_columns(tmp_path):
    import pyarrow as pa

    table = [
        {"question": "12+34=", "answer": "46", "source": "a"},
        {"question": "50+21=", "answer": "71", "source": "b"},
    ]
    files = {
        "jsonl": tmp_path / "p.jsonl",
        "json": tmp_path / "p.json",
        "csv": tmp_path / "p.csv",
        "parquet": tmp_path / "p.parquet",
    }
    write_jsonl(files["jsonl"], table)
    files["json"].write_text(json.dumps(table, indent=1))
    files["csv"].write_text("question,answer,source\n12+34=,46,a\n50+21=,71,b\n")
    pq.write_table(pa.Table.from_pylist(table), files["parquet"])
    outputs = {}
    for kind, path in files.items():
        out = tmp_path / f"out-{kind}.jsonl"
        assert (
            main(
                [
                    "generate",
                    "--prompts",
                    str(path),
                    "--prompt-column",
                    "question",
                    "--max-new-tokens",
                    "3",
                    "--no-progress",
                    "--output",
                    str(out),
                ]
            )
            == 0
        )
        outputs[kind] = read_jsonl(out)
    for kind, rows in outputs.items():
        assert [(r["prompt"], r["question"], r["answer"], r["source"]) for r in rows] == [
            (t["question"], t["question"], t["answer"], t["source"]) for t in table
        ], kind
        assert [r["generated_tokens"] for r in rows] == [r["generated_tokens"] for r in outputs["jsonl"]], kind


def test_a_text_file_keeps_blank_lines_as_rows_so_index_is_the_line_number(tmp_path):
    text, out = tmp_path / "p.txt", tmp_path / "o.jsonl"
    text.write_text("12+34=\n\n50+21=\n")
    assert (
        main(["generate", "--prompts", str(text), "--max-new-tokens", "3", "--no-progress", "--output", str(out)]) == 0
    )
    rows = read_jsonl(out)
    assert [(r["index"], r["prompt"]) for r in rows] == [(0, "12+34="), (1, ""), (2, "50+21=")]
    assert rows[1]["error"] == "the prompt is empty" and rows[0]["error"] is None and rows[2]["error"] is None


def test_an_input_column_named_like_an_output_field_is_kept_under_input_(tmp_path):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    write_jsonl(prompts, [{"question": "12+34=", "prompt": "a stale prompt", "error": "upstream note"}])
    assert (
        main(
            [
                "generate",
                "--prompts",
                str(prompts),
                "--prompt-column",
                "question",
                "--max-new-tokens",
                "3",
                "--no-progress",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    [row] = read_jsonl(out)
    assert row["prompt"] == "12+34=" and row["input_prompt"] == "a stale prompt"
    assert row["error"] is None and row["input_error"] == "upstream note"


def test_a_teacher_template_field_missing_in_one_row_marks_only_that_row(tmp_path):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    write_jsonl(prompts, [{"prompt": "12+34=", "hint": "46"}, {"prompt": "50+21=", "hint": None}])
    assert (
        main(
            [
                "generate",
                "--prompts",
                str(prompts),
                "--teacher-prompt-template",
                "{prompt} ({hint})",
                "--max-new-tokens",
                "3",
                "--no-progress",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    rows = read_jsonl(out)
    assert rows[0]["error"] is None and rows[0]["teacher_prompt"] == "12+34= (46)"
    assert "'hint' is missing or null" in rows[1]["error"]
    result = run_cli(
        "generate",
        "--prompts",
        str(prompts),
        "--teacher-prompt-template",
        "{prompt} ({answer})",
        "--output",
        str(tmp_path / "x.jsonl"),
    )
    assert result.returncode == 2 and "'answer', which no row has" in result.stderr


def test_parquet_output_holds_columns_that_mix_types(tmp_path):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.parquet"
    write_jsonl(
        prompts, [{"prompt": "12+34=", "meta": 3}, {"prompt": [{"role": "user", "content": "50+21="}], "meta": "x"}]
    )
    assert (
        main(["generate", "--prompts", str(prompts), "--max-new-tokens", "3", "--no-progress", "--output", str(out)])
        == 0
    )
    rows = pq.read_table(out).to_pylist()
    assert [json.loads(r["meta"]) for r in rows] == [3, "x"]
    assert json.loads(rows[1]["prompt"]) == [{"role": "user", "content": "50+21="}]


# -- checks before anything is loaded ------------------------------------------------------


def in_fresh_python(
    argv: list[str], *, hide: str | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`main(argv)` in a new interpreter (optionally with module `hide` made unimportable); stdout
    ends with whether torch was imported, i.e. whether any model could have been loaded."""
    code = (
        "import sys\n"
        + (f"sys.modules[{hide!r}] = None\n" if hide else "")
        + "from optimal_sampling.cli import main\n"
        + f"try:\n    code = main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
        + "print('torch imported:', 'torch' in sys.modules)\nsys.exit(code)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


@pytest.mark.parametrize("suffix, package", [(".parquet", "pyarrow.parquet"), ("", "datasets")])
def test_an_output_format_whose_package_is_missing_is_refused_before_sampling(tmp_path, suffix, package):
    out = tmp_path / f"samples{suffix}"
    result = in_fresh_python(["generate", *SMALL, "--output", str(out)], hide=package)
    assert result.returncode == 2, result.stderr
    assert f"pip install {package.split('.')[0]}" in result.stderr and "optimal-sampling[datasets]" in result.stderr
    assert result.stdout.strip().endswith("torch imported: False")
    assert not Path(str(out) + ".partial.jsonl").exists()


def test_a_missing_model_directory_is_named_before_anything_loads(tmp_path):
    result = in_fresh_python(
        ["generate", *SMALL, "--teacher", str(tmp_path / "no_model"), "--output", str(tmp_path / "o.jsonl")]
    )
    assert result.returncode == 2 and "no such directory" in result.stderr and "Repo id" not in result.stderr
    assert result.stdout.strip() == "torch imported: False"


def test_a_hub_id_fails_at_once_offline_and_without_a_reachable_hub(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    argv = ["generate", *SMALL, "--base", "some-org/some-model", "--output", str(tmp_path / "o.jsonl")]
    offline = in_fresh_python(argv, env=env)
    assert offline.returncode == 2 and "not in the local cache while HF_HUB_OFFLINE is set" in offline.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    unreachable = in_fresh_python(argv, env={**env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{closed}"})
    assert (
        unreachable.returncode == 2
        and "cannot be reached" in unreachable.stderr
        and "HF_HUB_OFFLINE=1" in unreachable.stderr
    )
    assert unreachable.stdout.strip() == "torch imported: False"


# -- the command line itself ---------------------------------------------------------------


def generate_parser():
    from optimal_sampling.cli import build_parser

    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["generate"]


def test_help_explains_every_option_and_shows_each_default_once():
    parser = generate_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert all(a.help for a in options), [a.dest for a in options if not a.help]
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    blocks = {}  # option -> its help text, lines joined
    for line in text[text.index("options:") :].splitlines():
        if line.startswith("  -"):
            current = line.split()[0]
            blocks[current] = line
        elif line.startswith("    ") and blocks:
            blocks[current] += " " + line.strip()
    for action in options:
        block = " ".join(blocks[action.option_strings[0]].split())
        assert block.count("(default:") <= 1, block
        if action.default is not None and action.default is not False:
            assert f"(default: {action.default})" in block, block
    assert "default" not in blocks["--output"]
    # a default of 0 is a value to show, not an absent one (0 == False in Python)
    for option, default in [
        ("--seed", "0"),
        ("--alpha-min", "0.0"),
        ("--top-k", "0"),
        ("--force-teacher-first-tokens", "0"),
    ]:
        assert f"(default: {default})" in " ".join(blocks[option].split()), blocks[option]


def test_help_explains_every_fast_mode():
    from optimal_sampling.cli import FAST_MODES

    [fast] = [a for a in generate_parser()._actions if a.dest == "fast"]
    for mode in FAST_MODES:
        assert f"'{mode}':" in fast.help, mode


def test_no_command_is_an_error_with_the_usage():
    result = run_cli()
    assert result.returncode == 2 and "COMMAND" in result.stderr


def test_help_and_import_do_not_import_torch():
    code = (
        "import sys, contextlib, io\nimport optimal_sampling\nfrom optimal_sampling.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(['generate', '--help'])\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False False", result.stderr


def test_compare_loads_each_model_once(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    loads = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    assert main(["generate", *SMALL, "--compare", "--output", str(tmp_path / "c.jsonl")]) == 0
    assert len(loads) == 2
    assert "teacher only (α=1)" in capsys.readouterr().out


def test_ctrl_c_prints_one_line_with_the_safe_rows_and_the_resume_command(tmp_path):
    args = ["generate", "--limit", "24", "--batch-size", "4", "--max-new-tokens", "6", "--no-progress", "--seed", "5"]
    out = tmp_path / "run.jsonl"
    proc = interrupt_after_rows([*args, "--output", str(out), "--overwrite"], out, 8, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    saved = len(out.read_text().splitlines())
    assert 0 < saved < 24 and saved % 4 == 0
    assert f"interrupted: {saved} of 24 rows are saved in {out}; rerun to resume: optimal-sampling generate" in last
    command = shlex.split(last.split("rerun to resume: ", 1)[1])
    assert "--overwrite" not in command
    rerun = run_cli(*command[1:])
    assert rerun.returncode == 0 and f"resuming {out}: {saved} of 24" in rerun.stderr
    uninterrupted = tmp_path / "full.jsonl"
    assert run_cli(*args, "--output", str(uninterrupted)).returncode == 0
    assert read_jsonl(out) == read_jsonl(uninterrupted)


def test_the_summary_names_the_ess_ratio_and_uses_a_robust_average():
    from optimal_sampling.cli import format_summary

    rows = [
        {
            "index": i,
            "generated_tokens": [1],
            "alpha_history": [0.5],
            "error": None,
            "generated_text": "",
            "diagnostics": {"ess_ratio_mean": ratio, "ess_ratio_log_mean": math.log(ratio), "num_tokens": 1},
        }
        for i, ratio in enumerate([1.0, 1.0, 1.0, 285.0])
    ]
    summary = format_summary(rows, rows, 1.0, [None] * 4, {}, "o.jsonl")
    assert "ESS_θ/ESS_t, geometric mean over tokens | 4.109 |" in summary  # 285 ** 0.25; the plain mean is 72
    assert "ESS_θ/ESS_t, median over samples | 1.000 |" in summary
    assert "1 = balanced" in summary


def test_a_prompt_the_sampler_refuses_marks_only_its_own_row(tmp_path):
    """Checks before sampling cannot know every model's limits: here a chat prompt for a tokenizer
    without a chat template, which the sampler refuses when it tokenizes the batch."""
    from optimal_sampling.testing import tiny_causal_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    model = tiny_causal_lm(len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    write_jsonl(
        prompts, [{"prompt": "the cat"}, {"prompt": [{"role": "user", "content": "the dog"}]}, {"prompt": "a dog"}]
    )
    assert (
        main(
            [
                "generate",
                "--base",
                str(tmp_path / "tiny"),
                "--teacher",
                str(tmp_path / "tiny"),
                "--prompts",
                str(prompts),
                "--max-new-tokens",
                "3",
                "--no-progress",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    rows = read_jsonl(out)
    assert "no chat template" in rows[1]["error"] and rows[1]["generated_tokens"] == []
    assert rows[0]["error"] is None and rows[2]["error"] is None and rows[0]["generated_tokens"]


# -- what a new user reads -------------------------------------------------------------------


def test_accuracy_is_over_the_sampled_rows_and_names_the_errors_beside_it():
    """3 right answers and 2 rows that could not be sampled: 1.000 over 3 rows, not 3/5."""
    from optimal_sampling.cli import format_summary

    rows = [
        {"index": i, "generated_tokens": [1], "alpha_history": [0.5], "error": None, "generated_text": "46"}
        for i in range(3)
    ] + [
        {"index": i, "generated_tokens": [], "alpha_history": [], "error": "the prompt is empty", "generated_text": ""}
        for i in (3, 4)
    ]
    summary = format_summary(rows, rows, 1.0, ["46"] * 5, {}, "o.jsonl")
    assert "| exact-match accuracy, q* (over 3 sampled rows, 2 with errors) | 1.000 |" in summary
    assert "| samples (errors) | 5 (2) |" in summary


def test_an_output_in_a_new_directory_is_said_in_one_line(tmp_path, capsys):
    out = tmp_path / "no" / "such" / "dir" / "out.jsonl"
    assert main(["generate", *SMALL, "--output", str(out)]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "created" in line]
    assert said == [f"optimal-sampling generate: created the directory {str(out.parent)!r} for --output"]
    assert len(read_jsonl(out)) == 6
    assert main(["generate", *SMALL, "--output", str(out)]) == 0  # it exists now: nothing more to say
    assert "created" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "prompts_name, output_name",
    [("p.jsonl", "p.jsonl"), ("p.jsonl", "./p.jsonl"), ("out.parquet.partial.jsonl", "out.parquet")],
    ids=["same-path", "same-file-other-spelling", "the-parquet-journal"],
)
def test_an_output_that_writes_over_the_prompts_is_refused_even_with_overwrite(tmp_path, prompts_name, output_name):
    prompts = tmp_path / prompts_name
    write_jsonl(prompts, [{"prompt": "12+34="}, {"prompt": "50+21="}])
    before = prompts.read_text()
    argv = ["generate", "--prompts", str(prompts), "--overwrite", "--output", f"{tmp_path}/{output_name}"]
    result = in_fresh_python(argv)
    assert result.returncode == 2, result.stderr
    assert "the --prompts file" in result.stderr and "choose another --output" in result.stderr
    assert result.stdout.strip() == "torch imported: False"
    assert prompts.read_text() == before


def test_a_temperature_of_zero_is_refused_without_suggesting_an_argmax(tmp_path, capsys):
    assert main(["generate", *SMALL, "--temperature", "0", "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--temperature must be a positive number, got 0.0" in err and "0.1" in err
    assert "argmax" not in err and "greedy decoding" not in err


def test_ctrl_c_while_the_models_load_says_nothing_was_written(tmp_path, monkeypatch, capsys):
    import optimal_sampling.cli as cli

    def interrupted_load(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load_transformers_models", interrupted_load)
    out = tmp_path / "run.jsonl"
    assert main(["generate", *SMALL, "--output", str(out)]) == 130
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("optimal-sampling generate: interrupted before any row was written (nothing to resume)")
    assert "saved" not in line and not out.exists()


def test_a_server_that_is_down_points_at_the_servers_script(tmp_path, monkeypatch, capsys):
    import functools

    import optimal_sampling.servers as servers

    monkeypatch.setattr(servers, "CoordinatorConfig", functools.partial(servers.CoordinatorConfig, max_retries=0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    argv = ["generate", *SMALL, "--backend", "vllm", "--theta-url", closed, "--t-url", closed]
    assert main([*argv, "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and "`python tests/vllm_servers.py up`" in err
    assert "vllm.entrypoints" not in err


def test_no_progress_hides_the_model_loading_bars_too(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    quiet = run_cli("generate", *SMALL, "--output", str(tmp_path / "o.jsonl"))
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading weights" not in quiet.stderr and "it/s]" not in quiet.stderr and "\r" not in quiet.stderr
    loud = run_cli("generate", *[a for a in SMALL if a != "--no-progress"], "--output", str(tmp_path / "p.jsonl"))
    assert "Loading weights" in loud.stderr and "q* sampling" in loud.stderr  # what the flag hides
