"""The transformers front: processor, custom generate strategy and sampler.

Models are tiny random Llama / Qwen2 / GPT-2 models built here; the tokenizer is a
word-level one built with `tokenizers`. References recompute both models on the full
sequence at every step (no cache), so they share nothing with the cached path but the
core mixture function, which tests/test_alpha.py and tests/test_mixture.py check on
their own.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from optimal_sampling import (
    GenerationOutput,
    OptimalSampler,
    OptimalSamplingLogitsProcessor,
    compute_mixture,
    log_probs_from_logits,
    optimal_generate,
)
from optimal_sampling.teacher import position_ids_from_mask
from optimal_sampling.testing import bias_output_layer, reference_q_star, tiny_causal_lm, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
V = len(TOKENIZER)
PAD, EOS = TOKENIZER.pad_token_id, TOKENIZER.eos_token_id
PROMPTS = ["the cat sat on the mat", "a dog ran", "what is two plus two"]
TEACHER_PROMPTS = ["question is what", "the big red dog ran to home and then", "one"]


def make_pair(arch="llama", teacher_vocab_extra=0, logit_scale=3.0):
    base = tiny_causal_lm(V, arch=arch, seed=1, pad_token_id=PAD, eos_token_id=EOS, logit_scale=logit_scale)
    teacher = tiny_causal_lm(
        V + teacher_vocab_extra, arch=arch, seed=2, pad_token_id=PAD, eos_token_id=EOS, logit_scale=logit_scale
    )
    return base, teacher


def left_pad(texts):
    enc = TOKENIZER(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def reference_generate(base, teacher, ids, mask, teacher_ids, teacher_mask, max_new_tokens, seed):
    """No caches: both models recompute the whole sequence at every step."""
    torch.manual_seed(seed)
    width = base.config.vocab_size
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        base_logits = base(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1].float()
        teacher_logits = (
            teacher(teacher_ids, attention_mask=teacher_mask, position_ids=position_ids_from_mask(teacher_mask))
            .logits[:, -1]
            .float()
        )
        step = compute_mixture(
            log_probs_from_logits(base_logits, 1.0, V), log_probs_from_logits(teacher_logits, 1.0, V)
        )
        scores = torch.full((ids.shape[0], width), float("-inf"))
        scores[:, :V] = step.logq
        token = torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)
        token = torch.where(unfinished, token, torch.full_like(token, PAD))
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], 1)
        teacher_ids = torch.cat([teacher_ids, token[:, None]], 1)
        teacher_mask = torch.cat([teacher_mask, torch.ones_like(token)[:, None]], 1)
        unfinished &= token != EOS
        if not unfinished.any():
            break
    return ids


@torch.no_grad()
def recompute_token_logq(base, teacher, prompt_ids, prompt_mask, teacher_ids, teacher_mask, generated):
    """log q*(y_t), log π_θ(y_t), log π_t(y_t) for every generated position, from full forwards."""
    seq = torch.cat([prompt_ids, generated], 1)
    seq_mask = torch.cat([prompt_mask, torch.ones_like(generated)], 1)
    tseq = torch.cat([teacher_ids, generated], 1)
    tmask = torch.cat([teacher_mask, torch.ones_like(generated)], 1)
    base_logits = base(seq, attention_mask=seq_mask, position_ids=position_ids_from_mask(seq_mask)).logits.float()
    teacher_logits = teacher(tseq, attention_mask=tmask, position_ids=position_ids_from_mask(tmask)).logits.float()
    T = generated.shape[1]
    out = []
    for t in range(T):
        lp = log_probs_from_logits(base_logits[:, prompt_ids.shape[1] - 1 + t], 1.0, V)
        lr = log_probs_from_logits(teacher_logits[:, teacher_ids.shape[1] - 1 + t], 1.0, V)
        step = compute_mixture(lp, lr)
        y = generated[:, t : t + 1]
        out.append((step.logq.gather(1, y), lp.gather(1, y), lr.gather(1, y), step.alpha))
    logq, lp, lr = (torch.cat([o[i] for o in out], 1) for i in range(3))
    alpha = torch.stack([o[3] for o in out], 1)
    return logq, lp, lr, alpha


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_cached_teacher_matches_full_recompute_with_teacher_prompts(arch):
    base, teacher = make_pair(arch)
    ids, mask = left_pad(PROMPTS)
    tids, tmask = left_pad(TEACHER_PROMPTS)
    torch.manual_seed(123)
    out = base.generate(
        input_ids=ids,
        attention_mask=mask,
        custom_generate=optimal_generate,
        teacher_model=teacher,
        teacher_input_ids=tids,
        teacher_attention_mask=tmask,
        do_sample=True,
        top_k=0,
        max_new_tokens=8,
        pad_token_id=PAD,
        eos_token_id=EOS,
        return_dict_in_generate=True,
    )
    reference = reference_generate(base, teacher, ids, mask, tids, tmask, 8, seed=123)
    assert torch.equal(out.sequences, reference)

    generated = out.sequences[:, ids.shape[1] :]
    logq, lp, lr, alpha = recompute_token_logq(base, teacher, ids, mask, tids, tmask, generated)
    m = out.token_mask
    assert m[:, 0].all()
    torch.testing.assert_close(out.logq[m], logq[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logp_theta[m], lp[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logp_t[m], lr[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.alpha[m], alpha[m], atol=1e-5, rtol=0)


def test_cached_teacher_matches_recompute_when_teacher_sees_base_prompt():
    base, teacher = make_pair("llama")
    ids, mask = left_pad(PROMPTS)
    torch.manual_seed(7)
    out = base.generate(
        input_ids=ids,
        attention_mask=mask,
        custom_generate=optimal_generate,
        teacher_model=teacher,
        do_sample=True,
        top_k=0,
        max_new_tokens=6,
        pad_token_id=PAD,
        eos_token_id=EOS,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, reference_generate(base, teacher, ids, mask, ids, mask, 6, seed=7))


def test_processor_custom_generate_and_sampler_give_the_same_tokens():
    base, teacher = make_pair("llama")
    ids, mask = left_pad(PROMPTS)
    tids, tmask = left_pad(TEACHER_PROMPTS)

    torch.manual_seed(5)
    proc = OptimalSamplingLogitsProcessor(teacher, teacher_input_ids=tids, teacher_attention_mask=tmask, vocab_size=V)
    via_processor = base.generate(
        input_ids=ids,
        attention_mask=mask,
        logits_processor=[proc],
        do_sample=True,
        top_k=0,
        max_new_tokens=8,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    torch.manual_seed(5)
    via_custom = base.generate(
        input_ids=ids,
        attention_mask=mask,
        custom_generate=optimal_generate,
        teacher_model=teacher,
        teacher_input_ids=tids,
        teacher_attention_mask=tmask,
        vocab_size=V,
        do_sample=True,
        top_k=0,
        max_new_tokens=8,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    sampler = OptimalSampler(base, teacher, TOKENIZER)
    via_sampler = sampler.generate(PROMPTS, teacher_prompts=TEACHER_PROMPTS, max_new_tokens=8, batch_size=3, seed=5)

    assert torch.equal(via_processor, via_custom)
    for row, sample in enumerate(via_sampler):
        generated = via_custom[row, ids.shape[1] :].tolist()
        assert sample.generated_tokens == generated[: len(sample.generated_tokens)]
        rest = generated[len(sample.generated_tokens) :]
        assert all(t == PAD for t in rest)


def test_first_tokens_follow_q_star_chi_square():
    """20,000 first tokens against q* computed independently in float64.

    The test rejects at p < 1e-3, so a correct sampler fails it with probability 0.1%
    (the seed is fixed, so the outcome is reproducible)."""
    base, teacher = make_pair("llama", logit_scale=1.0)
    n = 20_000
    ids, mask = left_pad(["the cat sat"])
    with torch.no_grad():
        lp = torch.log_softmax(base(ids).logits[0, -1, :V].double(), -1).numpy()
        lr = torch.log_softmax(teacher(ids).logits[0, -1, :V].double(), -1).numpy()
    q = reference_q_star(lp, lr)

    torch.manual_seed(2024)
    out = base.generate(
        input_ids=ids.repeat(n, 1),
        attention_mask=mask.repeat(n, 1),
        custom_generate=optimal_generate,
        teacher_model=teacher,
        do_sample=True,
        top_k=0,
        max_new_tokens=1,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    counts = np.bincount(out[:, -1].numpy(), minlength=V)[:V]
    # Pool tokens with small expected counts into one cell (χ² needs expected counts >= 5).
    expected = q * n
    big = expected >= 5
    observed_cells = np.append(counts[big], counts[~big].sum())
    expected_cells = np.append(expected[big], expected[~big].sum())
    if expected_cells[-1] < 5:
        observed_cells, expected_cells = observed_cells[:-1], expected_cells[:-1]
        expected_cells = expected_cells * observed_cells.sum() / expected_cells.sum()
    _, p_value = stats.chisquare(observed_cells, expected_cells)
    assert p_value > 1e-3, f"first tokens do not follow q* (p = {p_value:.2e})"
    # And the test has power: the base distribution alone is rejected.
    p = np.exp(lp)
    _, p_base = stats.chisquare(counts[big], p[big] * n * counts[big].sum() / (p[big] * n).sum())
    assert p_base < 1e-6


@pytest.mark.parametrize("which", ["base", "teacher"])
def test_a_stop_token_of_either_model_ends_the_row(which):
    stop_word = TOKENIZER.convert_tokens_to_ids("yes")
    base = tiny_causal_lm(V, seed=1, pad_token_id=PAD, eos_token_id=EOS)
    teacher = tiny_causal_lm(V, seed=2, pad_token_id=PAD, eos_token_id=EOS)
    model = base if which == "base" else teacher
    model.generation_config.eos_token_id = stop_word
    bias_output_layer(base, stop_word)
    bias_output_layer(teacher, stop_word)
    sampler = OptimalSampler(base, teacher, TOKENIZER)
    assert stop_word in sampler.stop_token_ids
    outs = sampler.generate(PROMPTS, max_new_tokens=10, seed=0)
    for out in outs:
        assert out.generated_tokens == [stop_word], out.generated_tokens
        assert len(out.logq) == len(out.alpha_history) == 1


def test_configured_stop_ids_end_the_row():
    stop_word = TOKENIZER.convert_tokens_to_ids("no")
    base, teacher = make_pair("llama")
    bias_output_layer(base, stop_word)
    bias_output_layer(teacher, stop_word)
    outs = OptimalSampler(base, teacher, TOKENIZER, stop_token_ids=[stop_word]).generate(
        PROMPTS[:1], max_new_tokens=10, seed=0
    )
    assert outs[0].generated_tokens == [stop_word]


def test_same_model_object_with_a_privileged_prompt_changes_the_distribution():
    model = tiny_causal_lm(V, seed=3, pad_token_id=PAD, eos_token_id=EOS, logit_scale=3.0)
    sampler = OptimalSampler(model, model, TOKENIZER)
    [out] = sampler.generate(["the cat"], teacher_prompts=["the dog ran to home and the cat"], max_new_tokens=6, seed=1)
    assert out.error is None
    logq, logp = np.array(out.logq), np.array(out.logp_theta)
    assert np.abs(logq - logp).max() > 1e-3  # q* differs from the base alone
    assert max(out.alpha_history) > 0.05
    # With the same prompt the teacher *is* the base: q = p and every row is degenerate (α = 0.5).
    [same] = sampler.generate(["the cat"], max_new_tokens=6, seed=1)
    np.testing.assert_allclose(same.logq, same.logp_theta, atol=1e-5)
    assert all(a == 0.5 for a in same.alpha_history)


def test_num_return_sequences_repeats_teacher_prompts():
    base, teacher = make_pair("llama")
    ids, mask = left_pad(PROMPTS[:2])
    tids, tmask = left_pad(TEACHER_PROMPTS[:2])
    torch.manual_seed(11)
    out = base.generate(
        input_ids=ids,
        attention_mask=mask,
        custom_generate=optimal_generate,
        teacher_model=teacher,
        teacher_input_ids=tids,
        teacher_attention_mask=tmask,
        do_sample=True,
        top_k=0,
        max_new_tokens=5,
        num_return_sequences=3,
        pad_token_id=PAD,
        eos_token_id=EOS,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape[0] == 6 and out.logq.shape[0] == 6
    rep = lambda x: x.repeat_interleave(3, 0)  # noqa: E731
    generated = out.sequences[:, ids.shape[1] :]
    logq, *_ = recompute_token_logq(base, teacher, rep(ids), rep(mask), rep(tids), rep(tmask), generated)
    torch.testing.assert_close(out.logq[out.token_mask], logq[out.token_mask], atol=1e-5, rtol=0)


def test_processor_resynchronises_when_generate_is_called_again():
    base, teacher = make_pair("llama")
    ids, mask = left_pad(PROMPTS[:1])
    proc = OptimalSamplingLogitsProcessor(teacher, vocab_size=V)
    torch.manual_seed(0)
    first = base.generate(
        input_ids=ids,
        attention_mask=mask,
        logits_processor=[proc],
        do_sample=True,
        top_k=0,
        max_new_tokens=4,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    # Continue the conversation: the teacher cache keeps the shared prefix.
    follow = torch.cat([first, left_pad(["and then"])[0][:, -2:]], 1)
    torch.manual_seed(1)
    second = base.generate(
        input_ids=follow,
        attention_mask=torch.ones_like(follow),
        logits_processor=[proc],
        do_sample=True,
        top_k=0,
        max_new_tokens=3,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    rec = proc.records(second)
    generated = second[:, follow.shape[1] :]
    logq, *_ = recompute_token_logq(
        base, teacher, follow, torch.ones_like(follow), follow, torch.ones_like(follow), generated
    )
    torch.testing.assert_close(rec.logq[rec.token_mask], logq[rec.token_mask], atol=1e-5, rtol=0)


def test_later_processors_may_modify_the_scores_in_place():
    """The processor runs under inference mode; what it hands back must still be an ordinary
    tensor (an in-place update of an inference tensor outside inference mode raises)."""
    from transformers import LogitsProcessor

    banned = 11

    class BanToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, banned] = float("-inf")
            return scores

    base, teacher = make_pair("llama")
    ids, mask = left_pad(PROMPTS)
    proc = OptimalSamplingLogitsProcessor(teacher, vocab_size=V)
    torch.manual_seed(0)
    out = base.generate(
        input_ids=ids,
        attention_mask=mask,
        logits_processor=[proc, BanToken()],
        do_sample=True,
        top_k=0,
        max_new_tokens=6,
        min_new_tokens=6,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    assert not (out[:, ids.shape[1] :] == banned).any()
    assert proc.records(out).logq.shape == (len(PROMPTS), 6)


def test_temperature_and_top_k_apply_before_and_after_mixing():
    base, teacher = make_pair("llama")
    ids, mask = left_pad(PROMPTS[:1])
    torch.manual_seed(3)
    out = base.generate(
        input_ids=ids,
        attention_mask=mask,
        custom_generate=optimal_generate,
        teacher_model=teacher,
        do_sample=True,
        temperature=0.7,
        top_k=5,
        max_new_tokens=1,
        pad_token_id=PAD,
        eos_token_id=EOS,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        lp = log_probs_from_logits(base(ids).logits[:, -1], 0.7, V)
        lr = log_probs_from_logits(teacher(ids).logits[:, -1], 0.7, V)
    step = compute_mixture(lp, lr)
    q = step.logq[0]
    top5 = torch.topk(q, 5).indices
    y = out.sequences[0, -1]
    assert y in top5
    expected = q[y] - torch.logsumexp(q[top5], 0)
    torch.testing.assert_close(out.logq[0, 0], expected, atol=1e-5, rtol=0)


def test_padded_embedding_sizes_may_differ():
    base, teacher = make_pair("llama", teacher_vocab_extra=16)
    assert teacher.config.vocab_size == V + 16
    outs = OptimalSampler(base, teacher, TOKENIZER).generate(PROMPTS, max_new_tokens=4, seed=0)
    assert all(o.error is None for o in outs)
    assert all(t < V for o in outs for t in o.generated_tokens)


def test_different_vocabularies_are_rejected():
    other = tiny_tokenizer(extra_words=("zebra",))
    other_same_size = tiny_tokenizer()
    vocab = other_same_size.get_vocab()
    base, teacher = make_pair("llama", teacher_vocab_extra=1)
    with pytest.raises(ValueError, match="different vocabularies"):
        OptimalSampler(base, teacher, TOKENIZER, teacher_tokenizer=other)
    # Same size, different mapping: still rejected (the vocab is compared, not its length).
    swapped = tiny_tokenizer()
    a, b = "cat", "dog"
    swapped.backend_tokenizer.model = type(swapped.backend_tokenizer.model)(
        vocab={**vocab, a: vocab[b], b: vocab[a]}, unk_token="<unk>"
    )
    assert len(swapped) == len(TOKENIZER)
    with pytest.raises(ValueError, match="different vocabularies"):
        OptimalSampler(base, teacher, TOKENIZER, teacher_tokenizer=swapped)


def test_models_on_different_devices_are_rejected():
    base, teacher = make_pair("llama")
    with pytest.raises(ValueError, match="Put both models on one device"):
        OptimalSampler(base, teacher.to("meta"), TOKENIZER)


def test_nan_logits_mark_only_the_failing_sample():
    base, teacher = make_pair("llama")
    good = OptimalSampler(base, teacher, TOKENIZER)
    # A teacher whose output is NaN for one prompt word only: poison that word's embedding.
    poison = TOKENIZER.convert_tokens_to_ids("mat")
    with torch.no_grad():
        teacher.get_input_embeddings().weight[poison] = float("nan")
    outs = good.generate(PROMPTS, max_new_tokens=3, batch_size=3, seed=0)
    assert "NaN" in outs[0].error  # PROMPTS[0] contains "mat"
    assert outs[1].error is None and outs[2].error is None
    assert len(outs[1].generated_tokens) > 0
    ids, mask = left_pad(PROMPTS[:1])
    with pytest.raises(ValueError, match="NaN"):
        base.generate(
            input_ids=ids,
            attention_mask=mask,
            custom_generate=optimal_generate,
            teacher_model=teacher,
            do_sample=True,
            top_k=0,
            max_new_tokens=2,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )


def test_empty_prompts_are_rejected():
    base, teacher = make_pair("llama")
    sampler = OptimalSampler(base, teacher, TOKENIZER)
    with pytest.raises(ValueError, match=r"prompts\[1\] is an empty string"):
        sampler.generate(["the cat", ""], max_new_tokens=2)
    with pytest.raises(ValueError, match="teacher_input_ids` is empty"):
        OptimalSamplingLogitsProcessor(teacher, teacher_input_ids=torch.zeros(1, 0, dtype=torch.long))


def test_beam_search_is_rejected():
    base, teacher = make_pair("llama")
    ids, mask = left_pad(PROMPTS[:1])
    with pytest.raises(ValueError, match="beam search"):
        base.generate(
            input_ids=ids,
            attention_mask=mask,
            custom_generate=optimal_generate,
            teacher_model=teacher,
            num_beams=2,
            do_sample=True,
            max_new_tokens=2,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )
    # The processor detects rows reordered between steps (what beam search does).
    proc = OptimalSamplingLogitsProcessor(teacher, vocab_size=V)
    two, two_mask = left_pad(PROMPTS[:2])
    scores = torch.zeros(2, V)
    proc(two, scores)
    reordered = torch.cat([two.flip(0), torch.tensor([[5], [6]])], 1)
    with pytest.raises(ValueError, match="beam search"):
        proc(reordered, scores)


def test_unsupported_warpers_are_rejected():
    base, teacher = make_pair("llama")
    ids, mask = left_pad(PROMPTS[:1])
    with pytest.raises(ValueError, match="min_p"):
        base.generate(
            input_ids=ids,
            attention_mask=mask,
            custom_generate=optimal_generate,
            teacher_model=teacher,
            do_sample=True,
            min_p=0.1,
            max_new_tokens=2,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )


def test_chat_prompts_use_each_models_template_and_diagnostics_cover_generated_tokens():
    base, teacher = make_pair("llama")
    sampler = OptimalSampler(base, teacher, TOKENIZER)
    chat = [{"role": "user", "content": "what is two plus two"}]
    [out] = sampler.generate(
        [chat], teacher_prompts=[[{"role": "user", "content": "two plus two is four"}]], max_new_tokens=6, seed=0
    )
    assert isinstance(out, GenerationOutput) and out.error is None
    d = out.diagnostics
    n = len(out.generated_tokens)
    assert d["num_tokens"] == n
    assert math.isclose(d["alpha_mean"], float(np.mean(out.alpha_history)), rel_tol=1e-9)
    assert d["alpha_min"] == min(out.alpha_history) and d["alpha_max"] == max(out.alpha_history)
    for key in ("kl_theta_mean", "kl_t_mean", "kl_diff_mean", "ess_ratio_mean", "entropy_q_mean"):
        assert key in d and math.isfinite(d[key])
    assert abs(d["kl_diff_mean"]) < 1e-4


def test_token_id_prompts_are_used_as_is():
    base, teacher = make_pair("llama")
    sampler = OptimalSampler(base, teacher, TOKENIZER)
    ids = TOKENIZER(PROMPTS[0])["input_ids"]
    [from_ids] = sampler.generate([ids], max_new_tokens=4, seed=3)
    [from_text] = sampler.generate([PROMPTS[0]], max_new_tokens=4, seed=3)
    assert from_ids.generated_tokens == from_text.generated_tokens
    with pytest.raises(TypeError, match="list of token ids"):
        sampler.generate([3.5], max_new_tokens=2)
