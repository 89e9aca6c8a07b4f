"""`optimal-sampling generate` end to end on the shipped toy pair."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from optimal_sampling.cli import main

FIELDS = {"prompt", "teacher_prompt", "generated_text", "generated_tokens", "alpha_history", "logq",
          "logp_theta", "logp_t", "diagnostics", "error"}
SMALL = ["--limit", "6", "--batch-size", "3", "--max-new-tokens", "4", "--no-progress"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optimal_sampling.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


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
        assert n >= 1 and len(row["logq"]) == len(row["logp_theta"]) == len(row["logp_t"]) == len(row["alpha_history"]) == n
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
    proc = subprocess.Popen([sys.executable, "-m", "optimal_sampling.cli", *args, "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(out.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
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
    assert main(["generate", "--prompts", str(text), "--max-new-tokens", "3", "--no-progress", "--output", str(out)]) == 0
    rows = read_jsonl(out)
    assert [r["prompt"] for r in rows] == ["12+34=", "50+21="]
    assert all(r["teacher_prompt"] == r["prompt"] for r in rows)

    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in [("12+34=", "46"), ("50+21=", "71")]))
    out2 = tmp_path / "u.jsonl"
    assert main(["generate", "--prompts", str(data), "--prompt-column", "question", "--teacher-prompt-template",
                 "<|user|>\n{question}\n<|assistant|>\n", "--max-new-tokens", "4", "--no-progress",
                 "--output", str(out2)]) == 0
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
    result = subprocess.run([sys.executable, "-m", "optimal_sampling.cli", "generate", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--teacher-prompt-template" in result.stdout
