"""The rollout engine (continuous batching) against the static sampler and transformers' generate.

The engine decodes each row in whatever slot, chunk and device it lands in; every token must still be the one the
static sampler draws for that row with the same key (per-row keys), and greedy rows must equal transformers'.
"""

import jax
import numpy as np
import pytest

from conftest import load_reference
from speciarl_jax import parallel
from speciarl_jax.models.qwen2_5_vl import from_pretrained
from speciarl_jax.sampling import RolloutEngine, Sampler, make_sampler
from test_model_parity import random_image
from test_sampling import assert_same_until_end, hf_greedy


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def prompts(tiny_processor):
    """Four prompts of different lengths: two images, one image (two sizes), text only."""
    texts = [
        tiny_processor.chat_prompt("Which two birds are these?", 2),
        tiny_processor.chat_prompt("Name it.", 1),
        tiny_processor.chat_prompt("Say something about flowers, please, in detail.", 0),
        tiny_processor.chat_prompt("And this one, what is it?", 1),
    ]
    images = [random_image(0, 56, 112), random_image(1, 84, 84), random_image(2, 112, 56), random_image(3, 140, 56)]
    batch = tiny_processor(texts, images=images)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}


# Shared samplers: each keeps its compiled programs, so the tests pay for a shape once.
_STATIC = Sampler()
_ENGINES: dict = {}


def engine_with(slots, chunk_steps, **kw):
    key = (slots, chunk_steps, tuple(sorted(kw.items(), key=lambda i: i[0])))
    if key not in _ENGINES:
        _ENGINES[key] = RolloutEngine(slots=slots, chunk_steps=chunk_steps, **kw)
    return _ENGINES[key]


def spread_end_tokens(model, prompts, max_new_tokens, **kw):
    """End tokens taken from a run without them, so that rows end at different points and some never do."""
    full = _STATIC.generate(model, **prompts, max_new_tokens=max_new_tokens, **kw)
    tokens = full.tokens
    third = max_new_tokens // 3
    return sorted({int(tokens[0, 2]), int(tokens[5, third + 1]), int(tokens[10, 2 * third + 1]), int(tokens[13, 5])})


@pytest.mark.parametrize("slots,chunk_steps", [(4, 3), (8, 5), (2, 1)])
def test_sampled_rows_equal_the_static_sampler_for_the_same_key(model, prompts, slots, chunk_steps):
    kw = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, num_samples=4, rng=jax.random.key(11))
    eos = spread_end_tokens(model, prompts, **kw)
    static = _STATIC.generate(model, **prompts, eos_token_ids=eos, **kw)
    engine = engine_with(slots, chunk_steps)
    out = engine.generate(model, **prompts, eos_token_ids=eos, **kw)

    # The workload really spreads: rows end early, late, and never (at the cap).
    assert static.lengths.min() <= 4 and (static.lengths == 24).any() and len(set(static.lengths)) >= 4
    np.testing.assert_array_equal(out.lengths, static.lengths)
    np.testing.assert_array_equal(out.tokens, static.tokens)
    np.testing.assert_array_equal(out.response_mask, static.response_mask)
    np.testing.assert_allclose(out.logprobs, static.logprobs, atol=1e-5)
    np.testing.assert_allclose(out.policy_logprobs, static.policy_logprobs, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.image_features), np.asarray(static.image_features), atol=1e-6)
    stats = engine.stats
    assert stats.row_steps == static.lengths.sum() - len(static.lengths)  # every token after the first, once
    if slots < 16:  # 16 rows through fewer slots: freed slots were refilled
        assert stats.prefills > 1
        assert engine.last_kv_bytes < _STATIC.last_kv_bytes / 2


def test_greedy_rows_equal_transformers(model, prompts, tiny_checkpoint):
    """(The static sampler's parity is tests/test_sampling.py's.)"""
    sampler = engine_with(2, 3)
    hf = load_reference(tiny_checkpoint)
    first = sampler.generate(model, **prompts, max_new_tokens=12, temperature=0.0)
    stop = int(first.tokens[1, 4])  # a token greedy decoding reaches mid-way: rows end at different points
    out = sampler.generate(model, **prompts, max_new_tokens=12, temperature=0.0, eos_token_ids=[stop])
    reference = hf_greedy(hf, {**prompts, "mm_token_type_ids": (prompts["input_ids"] == model.config.image_token_id)
                               .astype(np.int32)}, 12, [stop])
    assert out.lengths[1] <= 5 and (out.lengths == 12).any()
    assert_same_until_end(out.tokens, reference, out.lengths)


def test_the_tail_runs_on_fewer_slots(model, prompts):
    """Greedy, one sample per prompt: the end token comes early in three rows and never in the last one, which
    then decodes alone on the smallest active slot count (moved to the front if it was not there)."""
    never = model.config.text.vocab_size - 1
    kw = dict(max_new_tokens=20, temperature=0.0)
    full = _STATIC.generate(model, **prompts, eos_token_ids=[never], **kw).tokens
    long_row = 1
    # End tokens: each other row's 3rd token, unless the long row ever draws it.
    ends = [int(full[r, 2]) for r in range(4) if r != long_row and int(full[r, 2]) not in full[long_row]]
    static = _STATIC.generate(model, **prompts, eos_token_ids=ends, **kw)
    assert static.lengths[long_row] == 20 and (np.delete(static.lengths, long_row) <= 3).sum() >= 2, static.lengths
    engine = engine_with(4, 2)
    out = engine.generate(model, **prompts, eos_token_ids=ends, **kw)
    np.testing.assert_array_equal(out.tokens, static.tokens)
    stats = engine.stats
    assert stats.slot_steps < stats.steps * 4  # some chunks ran on fewer than the 4 slots
    assert stats.moves == (long_row != 0)


def test_every_row_ending_at_once(model, prompts):
    engine = engine_with(4, 3)
    greedy = dict(temperature=0.0, num_samples=2)
    # At the first token: every row's first greedy token is an end token; nothing is decoded.
    firsts = sorted(set(_STATIC.generate(model, **prompts, max_new_tokens=1, **greedy).tokens[:, 0].tolist()))
    out = engine.generate(model, **prompts, max_new_tokens=8, eos_token_ids=firsts, **greedy)
    assert (out.lengths == 1).all() and engine.stats.chunks == 0
    assert (out.tokens[:, 1:] == 0).all() and np.isin(out.tokens[:, 0], firsts).all()
    # At the cap, all together (no end token comes): the same tokens as the static sampler.
    never = model.config.text.vocab_size - 1
    out = engine.generate(model, **prompts, max_new_tokens=5, eos_token_ids=[never], **greedy)
    static = _STATIC.generate(model, **prompts, max_new_tokens=5, eos_token_ids=[never], **greedy)
    assert (out.lengths == 5).all()
    np.testing.assert_array_equal(out.tokens, static.tokens)
    # One new token only: the prefill's.
    out = engine.generate(model, **prompts, max_new_tokens=1, eos_token_ids=[never], **greedy)
    assert (out.lengths == 1).all() and out.tokens.shape == (8, 1)


def test_eight_devices_give_the_same_tokens(tiny_checkpoint, model, prompts):
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = from_pretrained(tiny_checkpoint, mesh=mesh)
    kw = dict(max_new_tokens=16, temperature=1.0, num_samples=2, rng=jax.random.key(5))
    eos = spread_end_tokens(model, prompts, **dict(kw, num_samples=4))
    one = engine_with(4, 3).generate(model, **prompts, eos_token_ids=eos, **kw)
    engine = RolloutEngine(slots=8, chunk_steps=3, mesh=mesh)
    eight = engine.generate(sharded, **prompts, eos_token_ids=eos, **kw)
    np.testing.assert_array_equal(eight.tokens, one.tokens)
    np.testing.assert_array_equal(eight.lengths, one.lengths)
    np.testing.assert_allclose(eight.logprobs, one.logprobs, atol=1e-5)
    # The slot buffers are split over the 4 batch shards and the 2 key/value heads over `tensor`.
    static = _STATIC.generate(model, **prompts, eos_token_ids=eos, **kw)
    np.testing.assert_array_equal(eight.tokens, static.tokens)


def test_a_repeated_call_compiles_nothing(model, prompts):
    engine = RolloutEngine(slots=4, chunk_steps=2)
    kw = dict(max_new_tokens=16, temperature=1.0, num_samples=2)
    eos = spread_end_tokens(model, prompts, **dict(kw, num_samples=4, rng=jax.random.key(1)))
    engine.generate(model, **prompts, eos_token_ids=eos, rng=jax.random.key(1), **kw)
    compiled = engine.compilations
    assert compiled <= 12  # vision, prefill, a chunk per (window, active slots), the moves
    engine.generate(model, **prompts, eos_token_ids=eos, rng=jax.random.key(1), **kw)
    assert engine.compilations == compiled


def test_precompiled_programs_cover_every_later_call(model, prompts):
    """With precompile, the first call compiles every program of its shapes: later calls whose rows end
    anywhere (other windows, other tail sizes, other prefill groups) compile nothing."""
    engine = RolloutEngine(slots=8, chunk_steps=3, precompile=True)
    kw = dict(max_new_tokens=24, temperature=1.0, num_samples=2)
    never = model.config.text.vocab_size - 1
    engine.generate(model, **prompts, eos_token_ids=[never], rng=jax.random.key(0), **kw)
    compiled = engine.compilations
    for seed in range(3):
        eos = spread_end_tokens(model, prompts, **dict(kw, num_samples=4, rng=jax.random.key(seed)))
        out = engine.generate(model, **prompts, eos_token_ids=eos, rng=jax.random.key(seed), **kw)
        assert len(set(out.lengths)) > 2
    assert engine.compilations == compiled


def test_the_sampler_a_config_names():
    assert type(make_sampler("continuous", slots=8)) is RolloutEngine
    assert type(make_sampler("static")) is Sampler
    with pytest.raises(ValueError, match="rollout.engine='paged'"):
        make_sampler("paged")
    with pytest.raises(ValueError, match="slots"):
        RolloutEngine(slots=0)
