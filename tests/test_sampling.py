"""The rollout engine against transformers' greedy generate, a full-forward recompute, and exact distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import load_reference
from speciarl_jax import parallel
from speciarl_jax.models.qwen2_5_vl import from_pretrained, get_position_ids
from speciarl_jax.sampling import Sampler, SamplingParams, choose_tokens, generate, sampling_logits
from test_model_parity import random_image


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def prompts(tiny_processor):
    """Three prompts of different lengths: two images (different sizes), one image, text only."""
    texts = [
        tiny_processor.chat_prompt("Which two birds are these?", 2),
        tiny_processor.chat_prompt("Name it.", 1),
        tiny_processor.chat_prompt("Say something about flowers, please, in detail.", 0),
    ]
    images = [random_image(0, 56, 112), random_image(1, 84, 84), random_image(2, 112, 56)]
    return tiny_processor(texts, images=images)


def hf_greedy(hf, batch, max_new_tokens, eos):
    t = {k: torch.from_numpy(v) for k, v in batch.items()}
    inputs = {k: (v if k == "pixel_values" else v.long()) for k, v in t.items()}
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(eos),
                          pad_token_id=0)
    return out[:, batch["input_ids"].shape[1]:].numpy()


def assert_same_until_end(ours, reference, lengths):
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(ours[row, :n], reference[row, :n], err_msg=f"row {row}")


def test_greedy_matches_transformers(model, prompts, tiny_checkpoint):
    hf = load_reference(tiny_checkpoint)
    eos = model.config.eos_token_ids
    out = generate(model, prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"],
                   prompts["image_grid_thw"], max_new_tokens=16, temperature=0.0)
    reference = hf_greedy(hf, prompts, 16, eos)
    assert_same_until_end(out.tokens, reference, out.lengths)

    # Make a token that greedy decoding reaches mid-way the end token: both must stop right there.
    stop = int(out.tokens[0, 5])
    stopped = generate(model, prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"],
                       prompts["image_grid_thw"], max_new_tokens=16, temperature=0.0, eos_token_ids=[stop])
    reference = hf_greedy(hf, prompts, 16, [stop])
    assert stopped.lengths[0] <= 6
    assert_same_until_end(stopped.tokens, reference, stopped.lengths)
    for row, n in enumerate(stopped.lengths):
        assert (n == 16) or stopped.tokens[row, n - 1] == stop
        assert (stopped.tokens[row, n:] == 0).all() or n == 16  # pad id of the tiny config
        assert stopped.response_mask[row].sum() == n


def test_top_k_one_and_tiny_temperature_equal_greedy(model, prompts):
    args = (model, prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"], prompts["image_grid_thw"])
    greedy = generate(*args, max_new_tokens=8, temperature=0.0)
    top1 = generate(*args, max_new_tokens=8, temperature=1.0, top_k=1, rng=jax.random.key(3))
    cold = generate(*args, max_new_tokens=8, temperature=1e-5, rng=jax.random.key(4))
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    np.testing.assert_array_equal(cold.tokens, greedy.tokens)


def test_logprobs_equal_a_full_forward(model, prompts):
    n, new, temperature = 3, 10, 0.7
    out = generate(model, prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"],
                   prompts["image_grid_thw"], max_new_tokens=new, temperature=temperature, num_samples=n,
                   rng=jax.random.key(7))
    assert out.tokens.shape == (3 * n, new)
    ids = np.concatenate([np.repeat(prompts["input_ids"], n, 0), out.tokens], axis=1)
    mask = np.concatenate([np.repeat(prompts["attention_mask"], n, 0), out.response_mask], axis=1)
    # Images repeat with their prompts: prompt 0 owns images 0-1, prompt 1 image 2.
    grids = prompts["image_grid_thw"]
    sizes = grids.prod(1)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    owner = [[0, 1], [2], []]
    pixels, rep_grids = [], []
    for p in range(3):
        for _ in range(n):
            for i in owner[p]:
                pixels.append(prompts["pixel_values"][starts[i]:starts[i + 1]])
                rep_grids.append(grids[i])
    positions, _ = get_position_ids(ids, mask, np.stack(rep_grids), config=model.config)
    logits = np.asarray(model(ids, mask, np.concatenate(pixels), np.stack(rep_grids), positions).logits)
    t = prompts["input_ids"].shape[1]
    step_logits = logits[:, t - 1 : t - 1 + new]  # logits that produced each response token
    chosen = out.tokens[..., None]
    raw = np.take_along_axis(jax.nn.log_softmax(step_logits, -1), chosen, -1)[..., 0]
    tempered = np.take_along_axis(jax.nn.log_softmax(step_logits / temperature, -1), chosen, -1)[..., 0]
    m = out.response_mask.astype(bool)
    assert np.abs(raw - out.policy_logprobs)[m].max() <= 1e-4
    assert np.abs(tempered - out.logprobs)[m].max() <= 1e-4
    assert (out.logprobs[~m] == 0).all()
    # Prompt-major rows: the samples of one prompt differ from each other but share the prompt.
    assert len({tuple(r) for r in out.tokens[:n]}) > 1


def test_reproducible_from_the_key(model, prompts):
    args = (model, prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"], prompts["image_grid_thw"])
    a = generate(*args, max_new_tokens=6, num_samples=2, rng=jax.random.key(1))
    b = generate(*args, max_new_tokens=6, num_samples=2, rng=jax.random.key(1))
    c = generate(*args, max_new_tokens=6, num_samples=2, rng=jax.random.key(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.7),
    SamplingParams(temperature=2.0, top_k=4, top_p=0.9),
])
def test_sampling_frequencies_match_the_distribution(params):
    logits = jnp.log(jnp.array([0.35, 0.25, 0.15, 0.1, 0.08, 0.05, 0.02]))
    draws = 40_000
    tokens, logp, _ = choose_tokens(jnp.tile(logits, (draws, 1)), jax.random.split(jax.random.key(0), draws), params)
    # Expected distribution, derived by hand from the definitions.
    p = np.exp(np.asarray(logits) / params.temperature)
    p /= p.sum()
    keep = np.ones_like(p, bool)
    if params.top_k:
        keep &= p >= np.sort(p)[::-1][params.top_k - 1]
    if params.top_p < 1:
        q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
        order = np.argsort(-q)
        before = np.cumsum(q[order]) - q[order]
        kept = np.zeros_like(keep)
        kept[order] = before < params.top_p
        keep &= kept
    expected = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    freq = np.bincount(np.asarray(tokens), minlength=len(p)) / draws
    sigma = np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-12), (freq, expected)
    np.testing.assert_allclose(np.exp(np.asarray(logp)), expected[np.asarray(tokens)], rtol=1e-5)
    filtered = np.asarray(sampling_logits(logits[None], params))[0]
    assert np.array_equal(np.isfinite(filtered), keep)


def test_eight_devices_give_identical_results(tiny_checkpoint, model, prompts):
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = from_pretrained(tiny_checkpoint, mesh=mesh)
    args = (prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"], prompts["image_grid_thw"])
    kw = dict(max_new_tokens=8, num_samples=2, rng=jax.random.key(5), temperature=1.0)
    one = Sampler().generate(model, *args, **kw)
    eight = Sampler(mesh=mesh).generate(sharded, *args, **kw)
    np.testing.assert_array_equal(eight.tokens, one.tokens)
    np.testing.assert_allclose(eight.logprobs, one.logprobs, atol=1e-5)


def test_programs_are_reused_within_buckets(model, tiny_processor):
    sampler = Sampler(prompt_bucket=64)
    image = [random_image(0, 56, 56)]
    short = tiny_processor([tiny_processor.chat_prompt("A?", 1)], images=image)
    longer = tiny_processor([tiny_processor.chat_prompt("A longer question here?", 1)], images=image)
    assert short["input_ids"].shape[1] != longer["input_ids"].shape[1]
    sampler.generate(model, **_args(short), max_new_tokens=4, temperature=0.0)
    first = sampler.compilations
    assert first == 3  # vision, prefill, decode
    sampler.generate(model, **_args(longer), max_new_tokens=4, temperature=0.0)
    assert sampler.compilations == first


def test_decode_program_is_shared_across_prompt_buckets(model, tiny_processor):
    """Prompt lengths in different prefill buckets but the same cache bucket compile one more prefill only."""
    sampler = Sampler(prompt_bucket=8, cache_bucket=64)
    image = [random_image(0, 56, 56)]
    short = tiny_processor([tiny_processor.chat_prompt("A?", 1)], images=image)
    longer = tiny_processor([tiny_processor.chat_prompt("A longer question, with more words in it?", 1)], images=image)
    lengths = [x["input_ids"].shape[1] for x in (short, longer)]
    assert -(-lengths[0] // 8) != -(-lengths[1] // 8) and -(-lengths[0] // 64) == -(-lengths[1] // 64), lengths
    first = sampler.generate(model, **_args(short), max_new_tokens=4, temperature=0.0)
    assert sampler.compilations == 3
    second = sampler.generate(model, **_args(longer), max_new_tokens=4, temperature=0.0)
    assert sampler.compilations == 4  # the new prefill
    for batch, out in ((short, first), (longer, second)):
        np.testing.assert_array_equal(out.tokens, Sampler().generate(model, **_args(batch), max_new_tokens=4,
                                                                     temperature=0.0).tokens)


def _args(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}


def test_bad_input_is_refused(model, prompts):
    right_padded = np.array([[5, 6, 7], [5, 6, 0]]), np.array([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, *right_padded, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompts["input_ids"], prompts["attention_mask"], max_new_tokens=2, top_p=0.0)


def test_image_features_are_returned_once_per_prompt_image(model, prompts):
    out = generate(model, prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"],
                   prompts["image_grid_thw"], max_new_tokens=2, num_samples=3, temperature=0.0)
    expected = np.asarray(model.encode_images(prompts["pixel_values"], prompts["image_grid_thw"]))
    # The table's first rows are the images' tokens in order; the rest pads it to a bucket.
    assert out.image_features.shape[0] >= 256 and out.image_features.shape[0] % 64 == 0
    np.testing.assert_allclose(np.asarray(out.image_features)[:len(expected)], expected, atol=1e-6)
