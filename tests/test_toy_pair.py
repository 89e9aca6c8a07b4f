"""Tests of the toy model pair shipped in ``optimal_sampling/toy/assets``.

Accuracy checks use 300 held-out problems (``make_problems(300, seed=1234,
split="test")``), batched ``model.generate`` with left padding, ``do_sample=True``,
``temperature=1.0``, ``top_k=0``, ``top_p=1.0`` and ``torch.manual_seed(0)``:
the base (plain prompt) must land in [0.15, 0.45] and the teacher (its own chat
prompt) at >= 0.85. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from optimal_sampling.toy import (
    BASE_DIR,
    TEACHER_DIR,
    TEACHER_DIRS,
    TEACHER_PROMPT_TEMPLATE,
    TOKENIZER_DIR,
    TOY_PAIR_DIR,
    all_pairs,
    exact_match_reward,
    extract_answer,
    final_answer,
    final_answer_reward,
    load_toy_pair,
    make_problems,
    split_of,
    worked_solution,
)

N_HELDOUT = 300
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    return load_toy_pair()


def _accuracy(model, tokenizer, rows, key, *, seed=0):
    tokenizer.padding_side = "left"
    enc = tokenizer([r[key] for r in rows], return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=5,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=False)
    rewards = exact_match_reward(texts, [r["answer"] for r in rows])
    return sum(rewards) / len(rewards)


# ------------------------------------------------------------------ assets / loading


def test_assets_are_package_data():
    for d in (BASE_DIR, TEACHER_DIR, TOKENIZER_DIR):
        assert d.parent == TOY_PAIR_DIR and d.is_dir()
    for d in (BASE_DIR, TEACHER_DIR):
        for f in ("config.json", "generation_config.json", "model.safetensors", *TOKENIZER_FILES):
            assert (d / f).is_file(), d / f
        assert (d / "model.safetensors").stat().st_size <= 5 * 2**20
        # the tokenizer next to each model is the shared one
        for f in TOKENIZER_FILES:
            assert (d / f).read_bytes() == (TOKENIZER_DIR / f).read_bytes()
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert "chat_template" in cfg


def test_models_and_tokenizer_agree(pair):
    base, teacher, tok = pair
    assert tok.all_special_tokens  # bos, eos, pad, <|user|>, <|assistant|>
    for model in (base, teacher):
        cfg = model.config
        assert cfg.model_type == "llama"
        assert model.dtype == torch.float32
        assert cfg.vocab_size == len(tok)
        assert cfg.hidden_size // cfg.num_attention_heads >= 32
        assert getattr(cfg, "head_dim", 32) >= 32
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            assert getattr(cfg, name) == getattr(tok, name) is not None
            assert getattr(model.generation_config, name) == getattr(tok, name)
        assert not model.training


def test_fresh_process_loads_offline(tmp_path):
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "for d in sys.argv[1:3]:\n"
        "    AutoModelForCausalLM.from_pretrained(d)\n"
        "    AutoTokenizer.from_pretrained(d)\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[3])\n"
        "print(repr(t.apply_chat_template([{'role': 'user', 'content': '12+34='}],"
        " add_generation_prompt=True, tokenize=False)))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(BASE_DIR), str(TEACHER_DIR), str(TOKENIZER_DIR)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == repr(TEACHER_PROMPT_TEMPLATE.format(prompt="12+34="))


# --------------------------------------------------------------------- accuracy


def test_base_is_weak_and_teacher_is_strong(pair):
    base, teacher, tok = pair
    rows = make_problems(N_HELDOUT, seed=1234, split="test")
    base_acc = _accuracy(base, tok, rows, "prompt")
    teacher_acc = _accuracy(teacher, tok, rows, "teacher_prompt")
    assert 0.15 <= base_acc <= 0.45, base_acc
    assert teacher_acc >= 0.85, teacher_acc


# ------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_prompts(pair):
    _, _, tok = pair
    for row in make_problems(50, seed=3, split="train") + make_problems(50, seed=3, split="test"):
        for text in (row["prompt"], row["teacher_prompt"], row["prompt"] + row["answer"]):
            ids = tok.encode(text)
            assert tok.decode(ids) == text
            assert ids == tok.encode(text, add_special_tokens=False)  # no BOS/EOS added
        # digits are single tokens, so prompt and answer tokenize independently
        assert tok.encode(row["prompt"] + row["answer"]) == tok.encode(row["prompt"]) + tok.encode(row["answer"])
        assert len(tok.encode(row["answer"])) == len(row["answer"])
    assert tok.decode(tok.encode("46") + [tok.eos_token_id], skip_special_tokens=True) == "46"


def test_chat_template_gives_teacher_prompt(pair):
    _, _, tok = pair
    row = make_problems(1, seed=0, split="test")[0]
    text = tok.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False
    )
    assert text == row["teacher_prompt"] == TEACHER_PROMPT_TEMPLATE.format(prompt=row["prompt"])
    full = tok.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["answer"]}],
        tokenize=False,
    )
    assert full.startswith(row["teacher_prompt"] + row["answer"] + tok.eos_token)


# ------------------------------------------------------------------ task / reward


def test_splits_are_disjoint_and_deterministic():
    train, test = set(all_pairs("train")), set(all_pairs("test"))
    assert not train & test
    assert len(train) + len(test) == 90 * 90
    assert 0.15 < len(test) / 8100 < 0.25
    assert all(split_of(a, b) == "test" for a, b in test)
    rows_train = make_problems(2000, seed=7, split="train")
    rows_test = make_problems(500, seed=7, split="heldout")
    assert not {r["prompt"] for r in rows_train} & {r["prompt"] for r in rows_test}
    assert make_problems(20, seed=7, split="test") == rows_test[:20]
    assert make_problems(20, seed=8, split="test") != rows_test[:20]
    assert len({r["prompt"] for r in rows_test}) == 500  # distinct within a split
    for r in rows_test[:20]:
        assert r["answer"] == str(r["a"] + r["b"]) and r["prompt"] == f"{r['a']}+{r['b']}="
    with pytest.raises(ValueError):
        make_problems(1, seed=0, split="dev")


def test_reward_strings_and_chat_messages():
    completions = [
        "46",  # correct
        "46<|eos|>",  # correct, EOS text kept
        " 46 \n",  # whitespace is fine
        "46<|eos|><|pad|><|pad|>",  # pads after EOS
        "47",  # wrong
        "",  # malformed
        "46 and more",  # malformed
        "4<|user|>6",  # special token inside: malformed
        [{"role": "assistant", "content": "46"}],  # chat form, correct
        [{"role": "assistant", "content": "45"}],  # chat form, wrong
        [{"role": "assistant", "content": "the answer"}],  # chat form, malformed
        [],  # empty chat: malformed
    ]
    answers = ["46"] * len(completions)
    assert exact_match_reward(completions, answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    # TRL passes prompts and other columns as keyword arguments
    assert exact_match_reward(["46", "12"], answer=["46", "13"], prompts=["a", "b"], trainer_state=None) == [1.0, 0.0]
    assert extract_answer("169<|eos|>") == "169"
    assert extract_answer("1 69") is None
    assert extract_answer(None) is None
    with pytest.raises(ValueError):
        exact_match_reward(["46"], ["46", "47"])


# ------------------------------------------------- the teachers of the teacher-payoff regimes


def test_subtraction_problems_have_their_own_disjoint_splits():
    train, test = set(all_pairs("train", "-")), set(all_pairs("test", "-"))
    assert not train & test and len(train) + len(test) == 90 * 91 // 2  # every b <= a
    assert all(b <= a for a, b in train | test)
    rows = make_problems(300, seed=7, split="test", op="-")
    assert all(r["prompt"] == f"{r['a']}-{r['b']}=" and r["answer"] == str(r["a"] - r["b"]) for r in rows)
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in make_problems(3000, seed=7, op="-")}
    # the addition draws are what they always were (the issue-13 experiment's prompt orders)
    assert make_problems(3, seed=0)[0]["prompt"] == make_problems(3, seed=0, op="+")[0]["prompt"]
    with pytest.raises(ValueError, match="unknown operator"):
        make_problems(1, seed=0, op="*")


def test_worked_solutions_are_graded_by_their_last_number():
    assert worked_solution(12, 34) == "2+4=06 1+3+0=04 => 46"
    assert worked_solution(95, 87) == "5+7=12 9+8+1=18 => 182"
    for a, b in all_pairs("test")[:200]:
        assert final_answer(worked_solution(a, b)) == str(a + b)
    completions = [
        "2+4=06 1+3+0=04 => 46<|eos|>",  # the worked solution
        "46",  # the base's bare answer scores too
        "2+4=06 1+3+0=04 => 47",  # wrong last number
        "2+4=06 1+3+0=04 =>",  # no final answer: the last number is 04
        "2+4=06 <|user|> 46",  # a special token before EOS
        "",
    ]
    assert final_answer_reward(completions, ["46"] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def _generate(model, tok, rows, key, max_new_tokens, seed=0):
    enc = tok([r[key] for r in rows], return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **enc,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return out[:, enc["input_ids"].shape[1] :]


def test_the_arithmetic_teacher_subtracts_and_the_base_cannot():
    base, teacher, tok = load_toy_pair(teacher="arithmetic")
    rows = make_problems(N_HELDOUT, seed=1234, split="test", op="-")

    def score(model, key):
        texts = tok.batch_decode(_generate(model, tok, rows, key, 5))
        return sum(exact_match_reward(texts, [r["answer"] for r in rows])) / len(rows)

    assert score(teacher, "teacher_prompt") >= 0.85
    assert score(base, "prompt") <= 0.01  # beyond the base's reach


def test_the_scratchpad_teacher_writes_long_worked_solutions():
    _, teacher, tok = load_toy_pair(teacher="scratchpad")
    rows = make_problems(N_HELDOUT, seed=1234, split="test")
    new = _generate(teacher, tok, rows, "teacher_prompt", 32)
    texts = tok.batch_decode(new)
    assert sum(final_answer_reward(texts, [r["answer"] for r in rows])) / len(rows) >= 0.85
    lengths = (new != tok.pad_token_id).sum(-1).float()
    assert float(lengths.mean()) >= 20  # completions of at least 20 tokens (EOS included)
    assert sum(t.split("<|eos|>")[0] == worked_solution(r["a"], r["b"]) for t, r in zip(texts, rows)) >= 0.85 * len(
        rows
    )


def test_every_teacher_ships_with_the_shared_tokenizer():
    for name, directory in TEACHER_DIRS.items():
        for f in ("config.json", "model.safetensors", *TOKENIZER_FILES):
            assert (directory / f).is_file(), directory / f
        for f in TOKENIZER_FILES:
            assert (directory / f).read_bytes() == (TOKENIZER_DIR / f).read_bytes(), name
    with pytest.raises(ValueError, match="unknown toy teacher"):
        load_toy_pair(teacher="calculus")
