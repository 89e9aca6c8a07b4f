"""Tiny models and tokenizers built locally, for tests, doctests and benchmarks (no Hub)."""

from __future__ import annotations

import torch

_WORDS = (
    "the a cat dog sat on mat ran to home and then it was good bad big small red blue one two three "
    "four five six seven eight nine ten plus minus equals answer question is what why how yes no"
).split()


def tiny_tokenizer(extra_words: tuple[str, ...] = ()):
    """A word-level `PreTrainedTokenizerFast` (≈70 tokens) with pad/bos/eos/unk and a chat template.

    Example:
        >>> tok = tiny_tokenizer()
        >>> tok.decode(tok("the cat sat")["input_ids"], skip_special_tokens=True)
        'the cat sat'
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"]
    vocab = {tok: i for i, tok in enumerate([*specials, *_WORDS, *extra_words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<user> ' if m['role'] == 'user' else '<assistant> ' }}{{ m['content'] }} "
        "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_causal_lm(
    vocab_size: int,
    *,
    arch: str = "llama",
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    logit_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
):
    """A random-weight causal LM (`"llama"`, `"qwen2"` or `"gpt2"`) in eval mode.

    `logit_scale` multiplies the output layer so that random models are more or less peaked.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    special = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=2, n_positions=256, **special)
        model = GPT2LMHeadModel(config)
    elif arch in ("llama", "qwen2"):
        cls_config, cls_model = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
        config = cls_config(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **special,
        )
        model = cls_model(config)
    else:
        raise ValueError(f"Unknown arch {arch!r}; use 'llama', 'qwen2' or 'gpt2'.")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(logit_scale)
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.eos_token_id = eos_token_id
    return model.to(dtype).eval()
