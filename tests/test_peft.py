"""LoRA (PEFT) policies through every front that takes a policy.

A LoRA policy is a `PeftModel` whose forward takes `**kwargs` and hands them to the transformers
model it wraps. Each front must find that model's KV-cache argument through the wrapper, sample
what the policy with its adapter computes (the tokens of the merged weights under the same
seed), record log q that a full recomputation gives, and, in the trainers, let the optimizer
update the adapter only. The adapters here start with random A and B (`init_lora_weights=False`),
so the policy differs from its base model from the first token.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model

from optimal_sampling import (
    OptimalSampler,
    OptimalSamplingLogitsProcessor,
    QStarOptions,
    compute_mixture,
    log_probs_from_logits,
    optimal_generate,
)
from optimal_sampling.decode_slot import captured_state
from optimal_sampling.fast import FastDecoder, FastPathConfig
from optimal_sampling.teacher import position_ids_from_mask
from optimal_sampling.testing import tiny_causal_lm, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
V = len(TOKENIZER)
PAD, EOS = TOKENIZER.pad_token_id, TOKENIZER.eos_token_id
PROMPTS = ["the cat sat on the mat", "a dog ran", "what is two plus two"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(**overrides) -> LoraConfig:
    options = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    return LoraConfig(**{**options, **overrides})


def lora_pair(seed: int = 0):
    """A LoRA policy (random adapter), the same policy merged into plain weights, and a teacher."""
    base = tiny_causal_lm(V, seed=1, pad_token_id=PAD, eos_token_id=EOS, logit_scale=3.0)
    torch.manual_seed(seed)
    policy = get_peft_model(base, lora_config()).eval()
    merged = copy.deepcopy(policy).merge_and_unload().eval()
    teacher = tiny_causal_lm(V + 16, seed=2, pad_token_id=PAD, eos_token_id=EOS, logit_scale=3.0)
    with torch.no_grad():
        ids, mask = left_pad(PROMPTS)
        with_adapter = policy(ids, attention_mask=mask).logits
        with policy.disable_adapter():
            without = policy(ids, attention_mask=mask).logits
    assert (with_adapter - without).abs().max() > 0.1  # the adapter really changes the policy
    return policy, merged, teacher


def left_pad(texts):
    enc = TOKENIZER(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def recompute(policy, teacher, ids, mask, generated, q_star: QStarOptions | None = None):
    """log q, log π_θ, log π_t of every generated token, from full forwards without a cache."""
    q_star = q_star or QStarOptions()
    seq = torch.cat([ids, generated], 1)
    seq_mask = torch.cat([mask, torch.ones_like(generated)], 1)
    positions = position_ids_from_mask(seq_mask)
    logits = {
        name: model(seq, attention_mask=seq_mask, position_ids=positions).logits.float()
        for name, model in (("policy", policy), ("teacher", teacher))
    }
    out = []
    for t in range(generated.shape[1]):
        lp = log_probs_from_logits(logits["policy"][:, ids.shape[1] - 1 + t], q_star.temperature, V)
        lr = log_probs_from_logits(logits["teacher"][:, ids.shape[1] - 1 + t], q_star.temperature, V)
        y = generated[:, t : t + 1].clamp(max=V - 1)
        step = compute_mixture(lp, lr, q_star)
        out.append(torch.stack([step.logq.gather(1, y)[:, 0], lp.gather(1, y)[:, 0], lr.gather(1, y)[:, 0]], 1))
    return torch.stack(out, 1).unbind(-1)  # logq, logp_theta, logp_t: [B, T] each


def assert_records_recompute(out, policy, teacher, ids, mask):
    generated = out.sequences[:, ids.shape[1] :]
    logq, logp_theta, logp_t = recompute(policy, teacher, ids, mask, generated)
    m = out.token_mask
    assert m[:, 0].all() and m.sum() >= 2 * len(PROMPTS)
    torch.testing.assert_close(out.logq[m], logq[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logp_theta[m], logp_theta[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logp_t[m], logp_t[m], atol=1e-5, rtol=0)


# --- the transformers front -------------------------------------------------------------


def test_the_processor_samples_a_lora_policy_as_its_merged_weights():
    policy, merged, teacher = lora_pair()
    ids, mask = left_pad(PROMPTS)
    outs = {}
    for name, model in (("lora", policy), ("merged", merged)):
        processor = OptimalSamplingLogitsProcessor(teacher, vocab_size=V, pad_token_id=PAD, eos_token_id=EOS)
        torch.manual_seed(5)
        sequences = model.generate(
            input_ids=ids,
            attention_mask=mask,
            logits_processor=[processor],
            do_sample=True,
            top_k=0,
            max_new_tokens=8,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )
        outs[name] = (sequences, processor.records(sequences))
    (sequences, record), (merged_sequences, _) = outs["lora"], outs["merged"]
    assert torch.equal(sequences, merged_sequences)
    generated = sequences[:, ids.shape[1] :]
    logq, logp_theta, _ = recompute(policy, teacher, ids, mask, generated)
    m = record.token_mask
    torch.testing.assert_close(record.logq[m], logq[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(record.logp_theta[m], logp_theta[m], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fast", [False, "eager"], ids=["generate-loop", "fast-path"])
def test_optimal_generate_on_a_lora_policy_records_log_q_a_recomputation_gives(fast):
    policy, merged, teacher = lora_pair()
    ids, mask = left_pad(PROMPTS)
    outs = {}
    for name, model in (("lora", policy), ("merged", merged)):
        torch.manual_seed(11)
        outs[name] = model.generate(
            input_ids=ids,
            attention_mask=mask,
            custom_generate=optimal_generate,
            teacher_model=teacher,
            vocab_size=V,
            do_sample=True,
            top_k=0,
            max_new_tokens=8,
            pad_token_id=PAD,
            eos_token_id=EOS,
            return_dict_in_generate=True,
            fast=fast,
        )
    assert torch.equal(outs["lora"].sequences, outs["merged"].sequences)
    assert_records_recompute(outs["lora"], policy, teacher, ids, mask)


def test_the_sampler_on_a_lora_policy_draws_the_merged_policys_completions():
    policy, merged, teacher = lora_pair()
    samples = {
        name: OptimalSampler(model, teacher, TOKENIZER).generate(PROMPTS, max_new_tokens=8, seed=3)
        for name, model in (("lora", policy), ("merged", merged))
    }
    for lora, plain in zip(samples["lora"], samples["merged"]):
        assert lora.error is None and lora.generated_tokens == plain.generated_tokens
        assert lora.logq == pytest.approx(plain.logq, abs=1e-5)


def test_the_fast_decoder_on_a_lora_policy_records_log_q_a_recomputation_gives():
    policy, merged, teacher = lora_pair()
    ids, mask = left_pad(PROMPTS)
    outs = {}
    for name, model in (("lora", policy), ("merged", merged)):
        torch.manual_seed(2)
        outs[name] = FastDecoder(model, teacher, FastPathConfig(mode="eager")).generate(
            ids, mask, max_new_tokens=10, vocab_size=V, pad_token_id=PAD, stop_token_ids=[EOS]
        )
    assert torch.equal(outs["lora"].sequences, outs["merged"].sequences)
    assert_records_recompute(outs["lora"], policy, teacher, ids, mask)


def test_what_a_captured_step_froze_changes_with_the_adapter_and_not_with_an_optimizer_step():
    """A CUDA graph replays the branch each LoRA layer took when it was captured; the fast decoder
    recaptures when `captured_state` changes (disabled, merged, another adapter, new scaling), and
    keeps the graph across in-place updates of the adapter's weights, which replays read."""
    policy, _, teacher = lora_pair()
    state = captured_state(policy, teacher)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=0.1)
    policy(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    optimizer.step()
    assert captured_state(policy, teacher) == state
    with policy.disable_adapter():
        assert captured_state(policy, teacher) != state
    assert captured_state(policy, teacher) == state
    policy.merge_adapter()
    assert captured_state(policy, teacher) != state
    policy.unmerge_adapter()
    assert captured_state(policy, teacher) == state
    policy.add_adapter("other", lora_config())  # new parameters: a new state, whichever adapter is active
    state = captured_state(policy, teacher)
    policy.set_adapter("other")
    assert captured_state(policy, teacher) != state
    policy.set_adapter("default")
    assert captured_state(policy, teacher) == state
    policy.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] *= 2
    assert captured_state(policy, teacher) != state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_lora_policy_decodes_in_the_captured_step_as_in_the_eager_one_and_recaptures_when_disabled():
    policy, _, teacher = (m.cuda() for m in lora_pair())
    ids, mask = (x.cuda() for x in left_pad(PROMPTS))
    decoders = {
        mode: FastDecoder(policy, teacher, FastPathConfig(mode=mode, bucket_batch=False, max_iter=8))
        for mode in ("eager", "cuda_graph")
    }

    def both():
        outs = {}
        for mode, decoder in decoders.items():
            torch.manual_seed(3)
            outs[mode] = decoder.generate(
                ids, mask, max_new_tokens=12, vocab_size=V, pad_token_id=PAD, stop_token_ids=[EOS]
            )
        assert torch.equal(outs["cuda_graph"].sequences, outs["eager"].sequences)
        torch.testing.assert_close(outs["cuda_graph"].logq, outs["eager"].logq, atol=1e-4, rtol=0)

    both()
    graph = decoders["cuda_graph"]
    assert graph.stats["mode"] == "cuda_graph", graph.stats["errors"]
    with policy.disable_adapter():
        both()
    assert graph.stats["recaptures"] == 1


# --- the trainers -----------------------------------------------------------------------


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def make_trainer(model, peft_config=None, rloo=False, **overrides):
    from trainer_options import cpu_options

    from optimal_sampling.trainers import (
        OptimalSamplingGRPOConfig,
        OptimalSamplingGRPOTrainer,
        OptimalSamplingRLOOConfig,
        OptimalSamplingRLOOTrainer,
    )

    options = cpu_options(
        "/tmp/optimal-sampling-test-peft", learning_rate=5e-2, num_on_policy_generations=1, alpha_method="kl_symmetry"
    )
    options.update(overrides)
    trainer_cls, config_cls = (
        (OptimalSamplingRLOOTrainer, OptimalSamplingRLOOConfig)
        if rloo
        else (OptimalSamplingGRPOTrainer, OptimalSamplingGRPOConfig)
    )
    return trainer_cls(
        model,
        reward_funcs=length_reward,
        args=config_cls(**options),
        train_dataset=Dataset.from_dict({"prompt": ["the cat", "a dog", "one two", "red blue"] * 2}),
        processing_class=TOKENIZER,
        teacher_model=tiny_causal_lm(V, seed=1, logit_scale=4.0),
        peft_config=peft_config,
    )


def spy_rollouts(trainer) -> list:
    """Each rollout with log q recomputed from full forwards of the policy as it was when it sampled."""
    seen = []
    sample = trainer._sample_optimal

    def spy(prompt_ids):
        rollouts = sample(prompt_ids)
        q_star, policy = trainer._scheduled_q_star(), trainer.accelerator.unwrap_model(trainer.model)
        training = policy.training
        policy.eval()
        for row, prompt in enumerate(prompt_ids):
            completion = torch.tensor([rollouts.completion_ids[row]])
            ids = torch.tensor([prompt])
            logq, logp_theta, _ = recompute(
                policy, trainer.teacher_model, ids, torch.ones_like(ids), completion, q_star
            )
            expected = logp_theta if bool(rollouts.on_policy[row]) else logq
            seen.append((rollouts.logq[row], expected[0].tolist()))
        policy.train(training)
        return rollouts

    trainer._sample_optimal = spy
    return seen


def assert_the_adapter_alone_trains(trainer, base_before: dict[str, torch.Tensor], adapter_before):
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert isinstance(policy, PeftModel)
    named = dict(policy.named_parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    adapter = {name for name in named if "lora_" in name}
    assert adapter and optimized == {id(named[name]) for name in adapter}  # the optimizer holds the adapter only
    for name, before in base_before.items():  # the base weights never change (nothing merged into them)
        assert torch.equal(named[name], before), name
    changed = [name for name in adapter if not torch.equal(named[name], adapter_before[name])]
    assert len(changed) == len(adapter)
    assert not any(getattr(m, "merged", False) for m in policy.modules())


def check_lora_training(trainer):
    policy = trainer.accelerator.unwrap_model(trainer.model)
    named = dict(policy.named_parameters())
    base_before = {n: p.detach().clone() for n, p in named.items() if "lora_" not in n}
    adapter_before = {n: p.detach().clone() for n, p in named.items() if "lora_" in n}
    rollouts = spy_rollouts(trainer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert len(rollouts) == 16  # 8 rows at each of the 2 steps
    for logq, expected in rollouts:
        assert len(logq) == len(expected) >= 1
        assert logq == pytest.approx(expected, abs=1e-5)
    assert_the_adapter_alone_trains(trainer, base_before, adapter_before)


def test_grpo_trains_a_lora_policy_given_as_peft_config():
    trainer = make_trainer(tiny_causal_lm(V, seed=0), peft_config=lora_config(init_lora_weights=True))
    check_lora_training(trainer)


def test_grpo_trains_a_peft_model_policy():
    torch.manual_seed(0)
    trainer = make_trainer(get_peft_model(tiny_causal_lm(V, seed=0), lora_config()))
    check_lora_training(trainer)


def test_grpo_trains_lora_with_gradient_checkpointing():
    trainer = make_trainer(
        tiny_causal_lm(V, seed=0),
        peft_config=lora_config(init_lora_weights=True),
        gradient_checkpointing=True,
    )
    check_lora_training(trainer)


def test_rloo_trains_a_lora_policy_given_as_peft_config():
    trainer = make_trainer(tiny_causal_lm(V, seed=0), peft_config=lora_config(init_lora_weights=True), rloo=True)
    check_lora_training(trainer)
