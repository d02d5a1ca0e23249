"""End to end on CPU: a tiny LoRA policy learns a toy reward with GRPO, Dr.GRPO and DAPO (fixed seeds).

Toy task: reward 1 when the response contains one of a fixed tenth of the vocabulary ("the word"), else 0.
The tiny random checkpoint has an output layer so flat (logits of std ~0.2) that no change of hidden state can
make any token likely; its lm_head is scaled up 10x so the adapters in the decoder can steer the output.
"""

import types

import jax
import numpy as np
import pytest

from speciarl_jax.models import lora
from speciarl_jax.models.qwen2_5_vl import from_pretrained
from speciarl_jax.rl import advantages, dapo, update
from speciarl_jax.rl.batch import make_rollout_batch
from speciarl_jax.sampling import Sampler, generate

PROMPTS, SAMPLES, RESPONSE = 4, 8, 4
STEPS = 15
FAST = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def prompts(tiny_processor):
    questions = ["What is it?", "Name the bird.", "Which kind is this?", "Classify it."]
    batch = tiny_processor([tiny_processor.chat_prompt(q, 0) for q in questions])
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@pytest.fixture(scope="module")
def sampler():
    return Sampler(prompt_bucket=16)  # shared: the three runs reuse its compiled programs


def toy_reward(tokens, mask, vocab_size):
    wanted = np.isin(tokens, np.arange(0, vocab_size, 10)) & (mask > 0)
    return wanted.any(axis=1).astype(np.float32)


def train(algorithm, tiny_checkpoint, prompts, sampler):
    """Returns the mean toy reward on a fixed evaluation sample before and after STEPS updates."""
    model = from_pretrained(tiny_checkpoint)
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 10.0
    lora.apply_lora(model, lora.LoRAConfig(rank=8, alpha=16.0))
    extra = {"overlong_buffer": 2, "max_response_len": RESPONSE} if algorithm == "dapo" else {}
    if algorithm == "drgrpo":
        extra = {"max_response_len": RESPONSE}
    rows = PROMPTS * SAMPLES
    config = update.preset(algorithm, learning_rate=5e-3, mini_batch_size=rows // 2, **extra)
    learner = update.Learner(model, config, compiler_options=FAST)
    vocab = model.config.text.vocab_size
    group_ids = np.repeat(np.arange(PROMPTS), SAMPLES)

    def rollouts(key):
        out = generate(model, prompts["input_ids"], prompts["attention_mask"], max_new_tokens=RESPONSE,
                       num_samples=SAMPLES, temperature=1.0, rng=key, sampler=sampler)
        reward = toy_reward(out.tokens, out.response_mask, vocab)
        shaped = reward
        if config.overlong_buffer:
            shaped = reward + dapo.overlong_penalty(out.lengths, RESPONSE, config.overlong_buffer, 0.5)
        return types.SimpleNamespace(tokens=out.tokens, response_mask=out.response_mask, task_reward=reward,
                                     scores=reward, rewards=shaped, group_ids=group_ids, prompt=group_ids)

    def select(batch, groups):  # the rows of whole groups, renumbered as the trainer's select_groups does
        rows = np.concatenate([np.arange(g * SAMPLES, (g + 1) * SAMPLES) for g in groups])
        return types.SimpleNamespace(tokens=batch.tokens[rows], response_mask=batch.response_mask[rows],
                                     rewards=batch.rewards[rows], prompt=batch.prompt[rows])

    evaluation_key = jax.random.key(1234)
    before = rollouts(evaluation_key).task_reward.mean()
    for step in range(STEPS):
        key = jax.random.fold_in(jax.random.key(0), step)
        if config.dynamic_sampling:
            try:
                pieces, _ = dapo.collect_informative(lambda i: rollouts(jax.random.fold_in(key, i)), PROMPTS,
                                                     num_samples=SAMPLES, select=select,
                                                     max_generation_batches=config.max_generation_batches)
            except dapo.DynamicSamplingError:
                break  # every group solved: nothing left to learn from
            kept = types.SimpleNamespace(**{k: np.concatenate([getattr(p, k) for p in pieces])
                                            for k in ("tokens", "response_mask", "rewards", "prompt")})
        else:
            kept = rollouts(key)
        chosen = kept.prompt[::SAMPLES]  # kept groups are whole and in order
        batch = make_rollout_batch(
            model.config, {k: v[chosen] for k, v in prompts.items()}, kept.tokens, kept.response_mask,
            advantages.group_advantages(kept.rewards, group_ids, config.normalize_std),
            num_samples=SAMPLES,
        )
        metrics = learner.step(batch)
        assert metrics["optimizer_steps"] == 2 and np.isfinite(metrics["loss"])
    after = rollouts(evaluation_key).task_reward.mean()
    return before, after


@pytest.mark.parametrize("algorithm", ["grpo", "drgrpo", "dapo"])
def test_toy_reward_rises(algorithm, tiny_checkpoint, prompts, sampler):
    before, after = train(algorithm, tiny_checkpoint, prompts, sampler)
    assert before <= 0.5  # room to rise: the toy reward starts at most at one half
    assert after >= before + 0.35, f"{algorithm}: mean reward {before:.3f} -> {after:.3f}"
