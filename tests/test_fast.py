"""The fast path (optimal_sampling/fast.py): static caches and a sync-free decode step.

On CPU the step runs eagerly. Without batch padding it draws its random numbers exactly as
transformers' `_sample` does (`torch.multinomial` is an exponential race), so it must give
the same tokens and records as `optimal_generate` under the same seed. With batch padding
the random stream differs; there the distribution is checked with a χ² test and the records
against a full recompute. The graph modes themselves need a GPU (see the CUDA-only test and
benchmarks/fast_path.py); CPU CI checks that the step they capture has no host sync by
tracing it with dynamo's `fullgraph=True`, which fails on any data-dependent branch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch.overrides import TorchFunctionMode

import optimal_sampling.solvers as solvers_module
import optimal_sampling.support as support_module
from optimal_sampling import OptimalSampler, compute_mixture, log_probs_from_logits, optimal_generate
from optimal_sampling.fast import (
    DeviceScalarConstants,
    FastDecoder,
    FastPathConfig,
    MixingOptions,
    decode_tail,
    fast_decoder_for,
)
from optimal_sampling.teacher import position_ids_from_mask
from optimal_sampling.testing import bias_output_layer, reference_q_star, tiny_causal_lm, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
V = len(TOKENIZER)
PAD, EOS = TOKENIZER.pad_token_id, TOKENIZER.eos_token_id
PROMPTS = ["the cat sat on the mat", "a dog ran", "what is two plus two"]
TEACHER_PROMPTS = ["question is what", "the big red dog ran to home and then", "one"]
EAGER = FastPathConfig(mode="eager")


def make_pair(arch="llama", logit_scale=3.0, eos_bias=0.0):
    """Tiny base + teacher; the teacher's output layer is wider (padded ids, as real pairs have)."""
    base = tiny_causal_lm(V, arch=arch, seed=1, pad_token_id=PAD, eos_token_id=EOS, logit_scale=logit_scale)
    teacher = tiny_causal_lm(V + 16, arch=arch, seed=2, pad_token_id=PAD, eos_token_id=EOS, logit_scale=logit_scale)
    if eos_bias:
        for model in (base, teacher):
            bias_output_layer(model, EOS, eos_bias)
    return base, teacher


def left_pad(texts):
    enc = TOKENIZER(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def generate(base, teacher, fast, seed, max_new_tokens=12, teacher_prompts=True, **kwargs):
    ids, mask = left_pad(PROMPTS)
    tids, tmask = left_pad(TEACHER_PROMPTS) if teacher_prompts else (None, None)
    torch.manual_seed(seed)
    return base.generate(
        input_ids=ids,
        attention_mask=mask,
        custom_generate=optimal_generate,
        teacher_model=teacher,
        teacher_input_ids=tids,
        teacher_attention_mask=tmask,
        do_sample=True,
        max_new_tokens=max_new_tokens,
        pad_token_id=PAD,
        eos_token_id=EOS,
        return_dict_in_generate=True,
        fast=fast,
        **{"top_k": 0, **kwargs},
    )


def assert_same_output(exact, fast):
    assert torch.equal(fast.sequences, exact.sequences)
    assert torch.equal(fast.token_mask, exact.token_mask)
    for name in ("logq", "logp_theta", "logp_t", "alpha"):
        torch.testing.assert_close(getattr(fast, name), getattr(exact, name), atol=1e-5, rtol=0, msg=name)
    m = exact.token_mask
    assert torch.equal(fast.diagnostics["empty_support"][m], exact.diagnostics["empty_support"][m])


@torch.no_grad()
def recompute_records(base, teacher, ids, mask, tids, tmask, generated, **mixing):
    """log q*, log π_θ, log π_t of every generated token from full forwards (no cache)."""
    seq, tseq = torch.cat([ids, generated], 1), torch.cat([tids, generated], 1)
    seq_mask = torch.cat([mask, torch.ones_like(generated)], 1)
    tseq_mask = torch.cat([tmask, torch.ones_like(generated)], 1)
    base_logits = base(seq, attention_mask=seq_mask, position_ids=position_ids_from_mask(seq_mask)).logits.float()
    teacher_logits = teacher(
        tseq, attention_mask=tseq_mask, position_ids=position_ids_from_mask(tseq_mask)
    ).logits.float()
    out = []
    for t in range(generated.shape[1]):
        lp = log_probs_from_logits(base_logits[:, ids.shape[1] - 1 + t], 1.0, V)
        lr = log_probs_from_logits(teacher_logits[:, tids.shape[1] - 1 + t], 1.0, V)
        step = compute_mixture(lp, lr, **mixing)
        y = generated[:, t : t + 1]
        out.append(
            torch.stack([step.logq.gather(1, y)[:, 0], lp.gather(1, y)[:, 0], lr.gather(1, y)[:, 0], step.alpha], 1)
        )
    return torch.stack(out, 1).unbind(-1)  # logq, logp_theta, logp_t, alpha: [B, T] each


# ---------------------------------------------------------------------------------------
# Same tokens as the exact path


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_same_tokens_and_records_as_optimal_generate_with_teacher_prompts(arch):
    base, teacher = make_pair(arch)
    exact = generate(base, teacher, False, seed=123)
    fast = generate(base, teacher, EAGER, seed=123)
    assert_same_output(exact, fast)


def test_rows_that_stop_at_different_steps_match_the_exact_path():
    base, teacher = make_pair("llama", eos_bias=2.5)  # EOS likely: rows end at different steps
    exact = generate(base, teacher, False, seed=4, max_new_tokens=20)
    fast = generate(base, teacher, EAGER, seed=4, max_new_tokens=20)
    lengths = exact.token_mask.sum(1)
    assert lengths.min() < lengths.max() < 20  # the test exercises padding after a stop and an early end
    assert_same_output(exact, fast)
    generated = fast.sequences[:, -fast.logq.shape[1] :]
    assert (generated[~fast.token_mask] == PAD).all()


@pytest.mark.parametrize(
    "options",
    [
        dict(alpha_method="fixed", alpha=0.3),
        dict(force_teacher_first_tokens=2, teacher_top_p=0.9),
        dict(temperature=0.7, top_k=5),
        dict(top_p=0.8, alpha_method="entropy", alpha_max=0.6),
    ],
    ids=["fixed", "forced-teacher-nucleus", "temperature-top-k", "top-p-entropy"],
)
def test_mixing_options_match_the_exact_path(options):
    base, teacher = make_pair("llama")
    exact = generate(base, teacher, False, seed=9, max_new_tokens=6, **options)
    fast = generate(base, teacher, EAGER, seed=9, max_new_tokens=6, **options)
    assert_same_output(exact, fast)


def test_sampler_fast_flag_gives_the_same_samples():
    base, teacher = make_pair("llama")
    exact = OptimalSampler(base, teacher, TOKENIZER).generate(
        PROMPTS, teacher_prompts=TEACHER_PROMPTS, max_new_tokens=8, seed=5
    )
    fast = OptimalSampler(base, teacher, TOKENIZER, fast=EAGER).generate(
        PROMPTS, teacher_prompts=TEACHER_PROMPTS, max_new_tokens=8, seed=5
    )
    for e, f in zip(exact, fast):
        assert f.error is None
        assert f.generated_tokens == e.generated_tokens
        np.testing.assert_allclose(f.logq, e.logq, atol=1e-5)
        np.testing.assert_allclose(f.alpha_history, e.alpha_history, atol=1e-5)
        assert f.diagnostics["alpha_mean"] == pytest.approx(e.diagnostics["alpha_mean"], abs=1e-5)


# ---------------------------------------------------------------------------------------
# Batch padding (the graph modes' buckets): other random stream, same distribution


def test_records_match_a_full_recompute_with_batch_padding():
    base, teacher = make_pair("qwen2")
    ids, mask = left_pad(PROMPTS)
    tids, tmask = left_pad(TEACHER_PROMPTS)
    decoder = FastDecoder(base, teacher, FastPathConfig(mode="eager", bucket_batch=True))
    torch.manual_seed(0)
    out = decoder.generate(
        ids,
        mask,
        teacher_input_ids=tids,
        teacher_attention_mask=tmask,
        max_new_tokens=10,
        pad_token_id=PAD,
        stop_token_ids=[EOS],
    )
    [slot] = decoder._slots.values()
    assert slot.batch == 4 and out.sequences.shape[0] == 3  # one dummy row, stripped
    generated = out.sequences[:, ids.shape[1] :]
    logq, lp, lr, alpha = recompute_records(base, teacher, ids, mask, tids, tmask, generated)
    m = out.token_mask
    torch.testing.assert_close(out.logq[m], logq[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logp_theta[m], lp[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logp_t[m], lr[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.alpha[m], alpha[m], atol=1e-5, rtol=0)


def test_buckets_are_reused_across_calls_of_similar_shape():
    base, teacher = make_pair("llama")
    decoder = FastDecoder(base, teacher, FastPathConfig(mode="eager", bucket_batch=True))
    for prompts, new in ((PROMPTS, 8), (PROMPTS[:2] + ["one two"] + ["the cat"], 10), (PROMPTS[:2], 8)):
        ids, mask = left_pad(prompts)
        out = decoder.generate(ids, mask, max_new_tokens=new, pad_token_id=PAD, stop_token_ids=[EOS])
        assert out.sequences.shape[0] == len(prompts)
    # 3 and 4 rows share the batch-4 bucket (lengths round to 64); 2 rows get their own.
    assert sorted(slot.batch for slot in decoder._slots.values()) == [2, 4]
    assert fast_decoder_for(base, teacher, EAGER) is fast_decoder_for(base, teacher, EAGER)


def test_first_tokens_follow_q_star_chi_square_with_batch_padding():
    """20,000 first tokens (a 32,768-row bucket with 12,768 dummy rows) against q* in float64.

    Rejects at p < 1e-3: a correct sampler fails with probability 0.1% (fixed seed, so the
    outcome is reproducible)."""
    base, teacher = make_pair("llama", logit_scale=1.0)
    n = 20_000
    ids, mask = left_pad(["the cat sat"])
    with torch.no_grad():
        lp = torch.log_softmax(base(ids).logits[0, -1, :V].double(), -1).numpy()
        lr = torch.log_softmax(teacher(ids).logits[0, -1, :V].double(), -1).numpy()
    q = reference_q_star(lp, lr)
    decoder = FastDecoder(base, teacher, FastPathConfig(mode="eager", bucket_batch=True))
    torch.manual_seed(2024)
    out = decoder.generate(
        ids.repeat(n, 1), mask.repeat(n, 1), max_new_tokens=1, pad_token_id=PAD, stop_token_ids=[EOS]
    )
    counts = np.bincount(out.sequences[:, -1].numpy(), minlength=V)[:V]
    assert counts.sum() == n
    big = q * n >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(q[big] * n, q[~big].sum() * n)
    if expected[-1] < 5:
        observed, expected = observed[:-1], expected[:-1] * observed[:-1].sum() / expected[:-1].sum()
    _, p_value = stats.chisquare(observed, expected)
    assert p_value > 1e-3, f"first tokens do not follow q* (p = {p_value:.2e})"
    p = np.exp(lp)  # power: the base alone is rejected
    _, p_base = stats.chisquare(counts[big], p[big] * counts[big].sum() / p[big].sum())
    assert p_base < 1e-6


# ---------------------------------------------------------------------------------------
# Stops, errors


@pytest.mark.parametrize("which", ["base", "teacher"])
def test_a_stop_token_of_either_model_ends_the_row_and_the_loop(which):
    stop_word = TOKENIZER.convert_tokens_to_ids("yes")
    base, teacher = make_pair("llama")
    (base if which == "base" else teacher).generation_config.eos_token_id = stop_word
    bias_output_layer(base, stop_word, 30.0)
    bias_output_layer(teacher, stop_word, 30.0)
    config = FastPathConfig(mode="eager", check_every=4)
    outs = OptimalSampler(base, teacher, TOKENIZER, fast=config).generate(PROMPTS, max_new_tokens=50, seed=0)
    assert all(o.generated_tokens == [stop_word] and len(o.logq) == 1 for o in outs)
    [slot] = fast_decoder_for(base, teacher, config)._slots.values()
    assert int(slot.buffers.step) == 4  # the host looked at the finished mask after 4 steps and stopped


@pytest.mark.parametrize("which", ["teacher", "policy"])
def test_nan_logits_of_either_model_raise_an_error_that_names_it(which):
    # One NaN output weight makes every row of that model NaN. q*'s solver then finds no common support and
    # falls back to the other model, so log q stays finite: only the model's own records can show it.
    base, teacher = make_pair("llama")
    with torch.no_grad():
        (teacher if which == "teacher" else base).get_output_embeddings().weight[5, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"NaN log-probabilities from the {which}"):
        generate(base, teacher, EAGER, seed=0, max_new_tokens=2, teacher_prompts=False)


def test_unsupported_options_are_rejected():
    base, teacher = make_pair("llama")
    with pytest.raises(ValueError, match="fast path does not support"):
        generate(base, teacher, EAGER, seed=0, max_new_tokens=2, repetition_penalty=1.3)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        generate(base, teacher, "cuda_graph", seed=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="Unknown fast-path mode"):
        FastPathConfig(mode="turbo")
    ids, mask = left_pad(PROMPTS)
    with pytest.raises(ValueError, match="left-padded"):
        FastDecoder(base, teacher, EAGER).generate(ids.flip(1), mask.flip(1), max_new_tokens=2, pad_token_id=PAD)


# ---------------------------------------------------------------------------------------
# What the graph modes capture


class HostTransferDetector(TorchFunctionMode):
    """Records the calls a CUDA-graph capture rejects: reading a tensor on the host (a sync)
    and building a tensor from host data (a blocking host-to-device copy on a GPU)."""

    READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self):
        super().__init__()
        self.violations = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.READS or (func in (torch.tensor, torch.as_tensor) and not isinstance(args[0], torch.Tensor)):
            self.violations.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "options",
    [dict(), dict(top_p=0.9, teacher_top_p=0.95, force_teacher_first_tokens=1), dict(alpha_method="fixed", alpha=0.4)],
    ids=["default", "nucleus-forced", "fixed"],
)
def test_the_eager_step_that_cuda_graph_mode_captures_never_reads_back_or_copies_from_the_host(monkeypatch, options):
    base, teacher = make_pair("llama")
    decoder = FastDecoder(base, teacher, FastPathConfig(mode="eager", diagnostics=True))
    ids, mask = left_pad(PROMPTS)
    decoder.generate(ids, mask, max_new_tokens=2, pad_token_id=PAD, stop_token_ids=[EOS], **options)
    [slot] = decoder._slots.values()
    # Under a capture the solver skips its convergence check and runs every iteration, and
    # keeps everything on the device (on CPU it checks the support on the host and keeps its
    # per-row state in numpy). The C solve is CPU-only (and reads memory the detector cannot
    # see): the torch ops are what a GPU without Triton captures.
    monkeypatch.setattr(solvers_module, "_iteration_done", lambda active: False)
    monkeypatch.setattr(support_module, "on_host", lambda x: False)
    monkeypatch.setenv("OPTIMAL_SAMPLING_CPU_KERNEL", "0")
    detector = HostTransferDetector()
    with torch.no_grad(), detector, DeviceScalarConstants():
        slot._eager_step()
    assert detector.violations == []
    with torch.no_grad(), detector:  # the detector does see a read-back
        bool(slot.buffers.finished.all())
    assert detector.violations == ["__bool__"]


def test_the_mixing_and_sampling_step_traces_without_host_synchronisation():
    """dynamo's fullgraph=True raises on `.item()`, `bool(tensor)` or any data-dependent branch,
    each of which would be a host sync (and break a CUDA-graph capture)."""
    base, teacher = make_pair("llama")
    decoder = FastDecoder(base, teacher, FastPathConfig(mode="eager", diagnostics=True))
    ids, mask = left_pad(PROMPTS)
    decoder.generate(
        ids,
        mask,
        max_new_tokens=2,
        pad_token_id=PAD,
        stop_token_ids=[EOS],
        top_p=0.9,
        force_teacher_first_tokens=1,
        teacher_top_p=0.95,
    )
    [slot] = decoder._slots.values()
    assert isinstance(slot.options, MixingOptions)
    torch._dynamo.reset()
    traced = torch.compile(decode_tail, fullgraph=True, backend="eager")
    base_logits, teacher_logits = torch.randn(3, V), torch.randn(3, V + 16)
    step_before = int(slot.buffers.step)
    with torch.no_grad():
        traced(base_logits, teacher_logits, slot.buffers, slot.options)
    assert int(slot.buffers.step) == step_before + 1
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["cuda_graph", "compile_mixture"])
def test_graph_modes_sample_like_eager_on_the_gpu(mode):
    base, teacher = (m.cuda() for m in make_pair("llama"))
    ids, mask = (x.cuda() for x in left_pad(PROMPTS))
    outs = {}
    for name, config in (
        ("eager", FastPathConfig(mode="eager")),
        (mode, FastPathConfig(mode=mode, bucket_batch=False)),
    ):
        decoder = FastDecoder(base, teacher, config)
        torch.manual_seed(3)
        outs[name] = decoder.generate(ids, mask, max_new_tokens=16, pad_token_id=PAD, stop_token_ids=[EOS])
        assert decoder.stats["mode"] == name, decoder.stats["errors"]
    assert torch.equal(outs[mode].sequences, outs["eager"].sequences)
    torch.testing.assert_close(outs[mode].logq, outs["eager"].logq, atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_step_that_cannot_be_captured_falls_back_and_still_samples(monkeypatch):
    """A failed capture leaves torch's CUDA generator marked as capturing; without a reset, the eager
    fallback's first random draw raises ("Offset increment outside graph capture")."""
    import optimal_sampling.decode_slot as slot_module

    def syncing_tail(base_logits, teacher_logits, buffers, options):
        if torch.cuda.is_current_stream_capturing():
            int(buffers.step)  # a host read: the capture fails here
        return decode_tail(base_logits, teacher_logits, buffers, options)

    base, teacher = (m.cuda() for m in make_pair("llama"))
    ids, mask = (x.cuda() for x in left_pad(PROMPTS))
    torch.manual_seed(3)
    expected = FastDecoder(base, teacher, FastPathConfig(mode="eager", max_iter=8)).generate(
        ids, mask, max_new_tokens=16, pad_token_id=PAD, stop_token_ids=[EOS]
    )
    monkeypatch.setattr(slot_module, "decode_tail", syncing_tail)
    decoder = FastDecoder(base, teacher, FastPathConfig(mode="cuda_graph", bucket_batch=False))
    torch.manual_seed(3)
    out = decoder.generate(ids, mask, max_new_tokens=16, pad_token_id=PAD, stop_token_ids=[EOS])
    assert decoder.stats["mode"] == "eager" and decoder.stats["fallbacks"] == 1, decoder.stats["errors"]
    assert torch.equal(out.sequences, expected.sequences)
    torch.cuda.manual_seed(0)
    torch.empty(4, device="cuda").exponential_()  # the generator works after the decoder too
