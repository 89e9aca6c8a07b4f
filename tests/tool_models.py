"""A tiny policy and teacher that really call a tool in Qwen3's chat format (built in seconds, offline).

TRL's tool loop needs a model whose completions its response parser reads as tool calls. This
builds one from nothing: a byte-level BPE tokenizer trained on a handful of conversations rendered
with the Qwen3 chat template that TRL ships (`trl.chat_template_utils.qwen3_chat_template`), and a
2-layer Llama trained for a few hundred steps to answer every user turn with

    <tool_call>\n{"name": "secret_number", "arguments": {}}\n</tool_call><|im_end|>

and, once the tool's result is in the conversation, to answer with it (the policy in one of three
phrasings, the teacher always with the bare number; the teacher also learns prompts that carry a
system message, as a privileged teacher prompt does). The token ids
are laid out exactly as TRL lays them out at rollout time (the prompt rendered with the tool
schema, the completion, then the tool result's tokens as `_get_tool_suffix_ids` computes them),
so the model sees at sampling what it saw in training.

Also the pieces the GRPO and distillation tool-loop tests share: their dataset, the teacher's
privileged prompt, a teacher tokenizer with a chat template of its own, and a spy on the sampler.
"""

from __future__ import annotations

import functools

import torch

SECRET = "7"
USER_TURNS = ["what is the secret number?", "tell me the secret number", "the number please", "secret?"]
TEACHER_SYSTEM = f"The secret number is {SECRET}."  # what a privileged teacher prompt adds
TOOL_CALL = '<tool_call>\n{"name": "secret_number", "arguments": {}}\n</tool_call>'


def secret_number() -> str:
    """Look up the secret number."""
    return SECRET


def conversation_ids(tokenizer, user: str, result: str = SECRET, *, system: str | None = None) -> dict:
    """The ids TRL builds for a rollout up to its second turn: the prompt, the tool call, the tool result."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(
        messages, tools=[secret_number], add_generation_prompt=True, tokenize=True, chat_template=_template(tokenizer)
    )
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    call = tokenizer(TOOL_CALL, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    suffix = tool_suffix(tokenizer, result)
    return {"prompt": list(prompt), "call": call, "suffix": suffix}


def tool_suffix(tokenizer, result: str) -> list[int]:
    """The tokens between the assistant's `<|im_end|>` and its next turn (TRL's tool-result suffix)."""
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "secret_number", "arguments": {}}}],
    }
    head = [{"role": "user", "content": "x"}, call]
    before = tokenizer.apply_chat_template(head, tokenize=True, return_dict=False, chat_template=_template(tokenizer))
    after = tokenizer.apply_chat_template(
        head + [{"role": "tool", "name": "secret_number", "content": result}],
        tokenize=True,
        return_dict=False,
        add_generation_prompt=True,
        chat_template=_template(tokenizer),
    )
    end = max(i for i, t in enumerate(before) if t == tokenizer.eos_token_id) + 1
    assert after[:end] == before[:end]
    return list(after[end:])


def _template(tokenizer) -> str:
    """The template TRL renders multi-turn rollouts with: Qwen3's own template drops earlier turns'
    think blocks, so TRL swaps in its prefix-preserving training template (as its trainer does)."""
    from trl.chat_template_utils import get_training_chat_template, is_chat_template_prefix_preserving

    if is_chat_template_prefix_preserving(tokenizer):
        return tokenizer.chat_template
    return get_training_chat_template(tokenizer)


@functools.lru_cache(maxsize=1)
def tool_tokenizer():
    """A byte-level BPE tokenizer with Qwen3's chat template and its special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from trl.chat_template_utils import qwen3_chat_template

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    added = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    scratch = PreTrainedTokenizerFast(tokenizer_object=core)
    scratch.chat_template = qwen3_chat_template
    texts = []
    for user in USER_TURNS:
        messages = [{"role": "user", "content": user}]
        texts.append(scratch.apply_chat_template(messages, tools=[secret_number], tokenize=False))
    texts += [TOOL_CALL, "<|im_start|>user\n<tool_response>\n7\n</tool_response><|im_end|>\n<|im_start|>assistant\n"]
    texts += ["0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;!?'\"{}[]()<>/\\|-_=+*#@$%&^~`"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials + added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=added
    )
    tokenizer.chat_template = qwen3_chat_template
    return tokenizer


def _train(model, sequences: list[tuple[list[int], list[int]]], steps: int, seed: int) -> None:
    """Training on (ids, mask) pairs, one padded batch: the loss is on the tokens the mask marks."""
    torch.manual_seed(seed)
    width = max(len(ids) for ids, _ in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    attention = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, (row, mask) in enumerate(sequences):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        labels[i, : len(row)] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(row), -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


#: What each model answers once the tool's result is in: the policy is unsure how to say it (so its
#: second turn is a real draw from the random stream), the teacher always answers with the bare result.
ANSWERS = {"policy": (SECRET, f"it is {SECRET}", f"the number is {SECRET}"), "teacher": (SECRET,)}


@functools.lru_cache(maxsize=2)
def _trained_state(role: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tool_tokenizer()
    seed = {"policy": 0, "teacher": 1}[role]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    sequences = []  # (ids, which tokens to predict): the model's two turns, never the prompt or the tool result
    users = USER_TURNS if role == "teacher" else USER_TURNS[:2]
    systems = (None, TEACHER_SYSTEM) if role == "teacher" else (None,)
    for user in users:
        for system in systems:
            for answer in ANSWERS[role]:
                parts = conversation_ids(tokenizer, user, system=system)
                answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                ids = parts["prompt"] + parts["call"] + parts["suffix"] + answer_ids
                mask = [0] * len(parts["prompt"]) + [1] * len(parts["call"]) + [0] * len(parts["suffix"])
                sequences.append((ids, mask + [1] * len(answer_ids)))
    _train(model, sequences, steps=800, seed=seed)
    return {k: v.clone() for k, v in model.state_dict().items()}, config


def tool_calling_lm(role: str = "policy"):
    """A fresh copy of the trained tiny `"policy"` or `"teacher"` (each trained once per process)."""
    from transformers import LlamaForCausalLM

    state, config = _trained_state(role)
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = None
    return model.eval()


# -- what the tool-loop tests share ------------------------------------------------------------


def tool_dataset(rows: int = 8):
    """Conversational prompts, four consecutive rows per user turn (one GRPO group each)."""
    from datasets import Dataset

    users = (USER_TURNS[:2] * rows)[: rows // 4]
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": u}] for u in users for _ in range(4)]})


def privileged_prompt(row):
    """The teacher is told the answer in a system message; the policy is not."""
    return [{"role": "system", "content": TEACHER_SYSTEM}, *row["prompt"]]


def own_template_tokenizer():
    """The same vocabulary with another chat template: tool results get a `result: ` label."""
    import copy

    from trl.chat_template_utils import get_training_chat_template

    tokenizer = copy.deepcopy(tool_tokenizer())
    template = get_training_chat_template(tokenizer)
    assert template.count("'\\n<tool_response>\\n'") == 1
    tokenizer.chat_template = template.replace("'\\n<tool_response>\\n'", "'\\n<tool_response>\\nresult: '")
    return tokenizer


def spy_sampler(monkeypatch) -> list[dict]:
    """Every call of the trainers' sampler: its inputs and its rollouts."""
    import optimal_sampling.trainers._common as common
    from optimal_sampling.trainers.rollout import sample_rollouts

    calls = []

    def spy(base, teacher, prompt_ids, **kwargs):
        out = sample_rollouts(base, teacher, prompt_ids, **kwargs)
        calls.append({"prompt_ids": [list(p) for p in prompt_ids], **kwargs, "out": out})
        return out

    monkeypatch.setattr(common, "sample_rollouts", spy)
    return calls
