"""Build a tiny Llama model pair (base + teacher) with a shared byte-level BPE tokenizer.

For tests only: no Hub access, random weights, a tokenizer trained on a small
built-in text.  Both models share the architecture and the tokenizer but get
DIFFERENT random weights (seed and seed + 1), so their next-token distributions
differ.  The output loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and
serves with vLLM (head_dim 32 >= the 32 that vLLM's CPU attention needs).

    python tests/make_tiny_models.py OUT_DIR [--seed 0] [--vocab-size 1024]

writes ``OUT_DIR/base`` and ``OUT_DIR/teacher`` (config.json,
generation_config.json, model.safetensors in fp32, tokenizer.json,
tokenizer_config.json, special_tokens_map.json).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}

_PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles "
    "begins with a single step. Knowledge is power, and practice makes perfect.",
    "Question: What is the capital of France? Answer: The capital of France is Paris. "
    "Question: How many legs does a spider have? Answer: A spider has eight legs.",
    "Language models assign a probability to every token in the vocabulary. Sampling "
    "draws the next token from that distribution; greedy decoding takes the most "
    "likely one. Temperature sharpens or flattens the distribution before sampling.",
    "The teacher model knows more than the student. The student learns from samples "
    "that stay close to its own distribution while moving toward the teacher where "
    "the teacher is better. Importance weights correct for the change of measure.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i, add(i, i))\n",
    "In mathematics, the Kullback-Leibler divergence measures how one probability "
    "distribution differs from a second, reference distribution. It is not symmetric, "
    "and the Chernoff information is the point where two such divergences meet.",
    "Once upon a time there was a little robot who wanted to learn how to paint. "
    "Every morning it mixed colours, red and blue and yellow, and every evening it "
    "looked at the sky and tried again.",
    "Hello, world! Good morning. Good evening. Thank you very much. You are welcome. "
    "Please, sit down. The weather today is sunny with a chance of rain later.",
]


def training_text() -> list[str]:
    """A small deterministic corpus: fixed paragraphs plus arithmetic lines."""
    lines = list(_PARAGRAPHS)
    for a in range(0, 60, 3):
        for b in range(1, 40, 7):
            lines.append(f"{a} + {b} = {a + b}. {a} * {b} = {a * b}.")
    words = "alpha beta gamma delta sampling teacher student token model vocabulary".split()
    for i, w in enumerate(words):
        for j, v in enumerate(words):
            if (i + j) % 3 == 0:
                lines.append(f"The {w} and the {v} are {'not ' if i % 2 else ''}the same.")
    # Pseudo-words from a fixed syllable set: enough distinct merges for vocabularies
    # of a few thousand tokens (deterministic, no randomness).
    syl = "ka lo mi nu pe ra si to vu we xa yo ze bri cha dro fle gni".split()
    for i in range(len(syl)):
        lines.append(
            " ".join(syl[i] + syl[(i * j + 3) % len(syl)] + syl[(j * 7 + i) % len(syl)] for j in range(len(syl)))
        )
    return lines


def build_tokenizer(vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer; return a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIAL_TOKENS["pad_token"], SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def _patch_tokenizer_config(model_dir: Path) -> None:
    """transformers 5 writes tokenizer_class "TokenizersBackend"; older transformers and
    some vLLM code paths need "PreTrainedTokenizerFast"."""
    path = model_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.update(SPECIAL_TOKENS)
    cfg["model_max_length"] = 512
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    smap = model_dir / "special_tokens_map.json"
    if not smap.exists():
        smap.write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")


def build_model(
    tokenizer,
    seed: int,
    *,
    hidden_size=128,
    num_heads=4,
    num_layers=2,
    intermediate_size=256,
    max_position_embeddings=512,
    lm_head_std=0.25,
):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    # The default init (std 0.02) gives near-uniform next-token distributions; a larger
    # lm_head makes them peaked (logit std ~ lm_head_std * sqrt(hidden)) and therefore
    # clearly different between the two seeds.
    with torch.no_grad():
        g = torch.Generator().manual_seed(10_000 + seed)
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g) * lm_head_std)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_tiny_llama_pair(out_dir, seed: int = 0, vocab_size: int = 1024) -> tuple[str, str]:
    """Write ``out_dir/base`` (seed) and ``out_dir/teacher`` (seed + 1); return both paths."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size)
    paths = []
    for name, s in (("base", seed), ("teacher", seed + 1)):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        model = build_model(tokenizer, s)
        model.save_pretrained(d, safe_serialization=True)
        tokenizer.save_pretrained(d)
        _patch_tokenizer_config(d)
        paths.append(str(d))
    return paths[0], paths[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=1024)
    args = ap.parse_args(argv)
    base, teacher = make_tiny_llama_pair(args.out_dir, seed=args.seed, vocab_size=args.vocab_size)
    print(f"base:    {base}\nteacher: {teacher}")
    print(f"files:   {sorted(os.listdir(base))}")


if __name__ == "__main__":
    main()
