"""Tiny models and tokenizers built locally, for tests, doctests and benchmarks (no Hub)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
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

    special: dict[str, Any] = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    torch.manual_seed(seed)
    model: PreTrainedModel
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=2, n_positions=256, **special
        )
        model = GPT2LMHeadModel(config)
    elif arch in ("llama", "qwen2"):
        shape: dict[str, Any] = dict(
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
        model = LlamaForCausalLM(LlamaConfig(**shape)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**shape))
    else:
        raise ValueError(f"Unknown arch {arch!r}; use 'llama', 'qwen2' or 'gpt2'.")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(logit_scale)
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.eos_token_id = eos_token_id
    # transformers decorates PreTrainedModel.to with @wraps(Module.to), so mypy sees the unbound signature
    return model.to(dtype).eval()  # type: ignore[arg-type]


def bias_output_layer(model, token_id: int, bias: float = 30.0):
    """Swap in an output layer with a bias towards `token_id` (30 makes it all but certain).

    Tests use it to make a model emit a chosen stop token.
    """
    head = model.get_output_embeddings()
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(head.weight)
        new.bias.zero_()
        new.bias[token_id] = bias
    model.set_output_embeddings(new)
    return model


def reference_q_star(lp, lr):
    """q* for one row of full-support float64 log-probs (numpy), by bisection on
    E_q[log r − log p] = 0: an oracle written independently of the package's solver."""
    import numpy as np

    delta = lr - lp

    def slope(a):
        w = lp + a * delta
        w = np.exp(w - w.max())
        return (w * delta).sum() / w.sum()

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    a = 0.5 * (lo + hi)
    w = np.exp(lp + a * delta - (lp + a * delta).max())
    return w / w.sum()


def random_log_prob_pairs(rng, rows: int, vocab: int, scale: float = 2.0, mask_fraction: float = 0.0):
    """`[rows, vocab]` float32 log-prob pairs: logits ~ scale · N(0, 1), with random masks
    (-inf) on either side, each side renormalised on its own support; two random tokens per
    row stay unmasked on both sides, so the common support is never a single token.
    `rng` is a `numpy.random.Generator` or a seed."""
    import numpy as np

    rng = np.random.default_rng(rng)
    logits = scale * rng.standard_normal((2, rows, vocab))
    if mask_fraction > 0:
        masked = rng.random((2, rows, vocab)) < mask_fraction
        keep = np.stack([rng.choice(vocab, 2, replace=False) for _ in range(rows)])
        masked[:, np.arange(rows)[:, None], keep] = False
        logits = np.where(masked, -np.inf, logits)
    logp = torch.log_softmax(torch.from_numpy(logits).float(), dim=-1)
    return logp[0], logp[1]
