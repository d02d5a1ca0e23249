"""KV cache, checkpoint round trips, bad checkpoints, bf16, sharded loading and gradient checkpointing."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import load_reference
from speciarl_jax import parallel
from speciarl_jax.models.qwen2_5_vl import from_pretrained, get_position_ids, save_pretrained
from test_model_parity import random_image


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def image_batch(tiny_processor):
    texts = [tiny_processor.chat_prompt("What is it?", 1), tiny_processor.chat_prompt("Which kind, exactly?", 1)]
    return tiny_processor(texts, images=[random_image(0, 56, 84), random_image(1, 84, 84)])


def logits_of(model, batch):
    return np.asarray(model(**batch).logits)


def test_kv_cache_decoding_matches_full_forward(model, image_batch):
    """Prefill the prompt, then feed 4 more tokens one at a time: logits equal one forward over everything."""
    steps = 4
    prompt_ids, prompt_mask = image_batch["input_ids"], image_batch["attention_mask"]
    b, t = prompt_ids.shape
    extra = np.random.default_rng(0).integers(10, 200, (b, steps)).astype(np.int32)
    full_ids = np.concatenate([prompt_ids, extra], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones((b, steps), np.int32)], axis=1)
    full = dict(image_batch, input_ids=full_ids, attention_mask=full_mask)
    full.pop("mm_token_type_ids")
    reference = logits_of(model, full)

    positions, deltas = get_position_ids(prompt_ids, prompt_mask, image_batch["image_grid_thw"], config=model.config)
    cache = model.init_cache(b, t + steps)
    slots = np.concatenate([prompt_mask, np.zeros((b, steps), np.int32)], axis=1)
    out = model(
        prompt_ids, slots, image_batch["pixel_values"], image_batch["image_grid_thw"], positions,
        cache=cache, cache_pos=0,
    )
    np.testing.assert_allclose(np.asarray(out.logits)[prompt_mask.astype(bool)],
                               reference[:, :t][prompt_mask.astype(bool)], atol=1e-5)
    cache = out.cache
    step = jax.jit(lambda m, ids, mask, pos, cache, i: m(ids, mask, position_ids=pos, cache=cache, cache_pos=i))
    real = prompt_mask.sum(1)
    for k in range(steps):
        slots[:, t + k] = 1
        pos = np.broadcast_to((real + k + deltas)[None, :, None], (3, b, 1)).astype(np.int32)
        out = step(model, extra[:, k : k + 1], slots, pos, cache, t + k)
        cache = out.cache
        diff = np.abs(np.asarray(out.logits)[:, 0] - reference[:, t + k]).max()
        assert diff < 1e-4, f"decode step {k}: max difference {diff:.2e}"

    # Then a chunk of several tokens at a later slot (attention over the cache, several queries), jitted and not.
    chunk = 3
    ids = np.random.default_rng(1).integers(10, 200, (b, chunk)).astype(np.int32)
    cache = model.init_cache(b, t + chunk)
    slots = np.concatenate([prompt_mask, np.zeros((b, chunk), np.int32)], axis=1)
    cache = model(prompt_ids, slots, image_batch["pixel_values"], image_batch["image_grid_thw"], positions,
                  cache=cache, cache_pos=0).cache
    slots[:, t:] = 1
    pos = np.broadcast_to((real[:, None] + np.arange(chunk) + deltas[:, None])[None], (3, b, chunk)).astype(np.int32)
    full_ids = np.concatenate([prompt_ids, ids], axis=1)
    reference = logits_of(model, dict(input_ids=full_ids, attention_mask=slots, pixel_values=image_batch["pixel_values"],
                                      image_grid_thw=image_batch["image_grid_thw"]))
    for out in (model(ids, slots, position_ids=pos, cache=cache, cache_pos=t), step(model, ids, slots, pos, cache, t)):
        diff = np.abs(np.asarray(out.logits) - reference[:, t:]).max()
        assert diff < 1e-4, f"chunk after the prompt: max difference {diff:.2e}"
    assert cache.keys[0].shape == (b, model.config.text.num_key_value_heads, model.config.text.head_dim, t + chunk)
    assert cache.values[0].shape == (b, model.config.text.num_key_value_heads, t + chunk, model.config.text.head_dim)


def test_our_save_loads_in_transformers_and_back(model, image_batch, tmp_path, tiny_checkpoint):
    """Save sharded (tiny shard limit) -> transformers and our loader both read it -> same logits."""
    out = tmp_path / "saved"
    save_pretrained(model, out, max_shard_bytes=200_000, copy_from=tiny_checkpoint)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "expected a sharded save"
    assert (out / "tokenizer.json").exists() and (out / "preprocessor_config.json").exists()
    ours = logits_of(model, image_batch)
    reloaded = logits_of(from_pretrained(out), image_batch)
    np.testing.assert_array_equal(reloaded, ours)
    hf = load_reference(out)
    t = {k: torch.from_numpy(v) for k, v in image_batch.items()}
    pos, _ = hf.model.get_rope_index(t["input_ids"].long(), t["mm_token_type_ids"].int(),
                                     image_grid_thw=t["image_grid_thw"], attention_mask=t["attention_mask"])
    with torch.no_grad():
        ref = hf(input_ids=t["input_ids"].long(), attention_mask=t["attention_mask"], pixel_values=t["pixel_values"],
                 image_grid_thw=t["image_grid_thw"], position_ids=pos).logits.numpy()
    valid = image_batch["attention_mask"].astype(bool)
    assert np.abs(ref - ours)[valid].max() < 1e-4


def test_transformers_save_loads_in_ours(model, image_batch, tmp_path, tiny_checkpoint):
    """transformers' own sharded save, and the nested key layout (model.language_model.*, model.visual.*)
    that transformers also accepts, both load into ours with identical logits."""
    hf = load_reference(tiny_checkpoint)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    valid = image_batch["attention_mask"].astype(bool)
    expected = logits_of(model, image_batch)[valid]
    assert np.abs(logits_of(from_pretrained(tmp_path / "hf"), image_batch)[valid] - expected).max() == 0.0

    nested = _copy(tiny_checkpoint, tmp_path / "nested")
    tensors = load_file(nested / "model.safetensors")
    renamed = {
        ("model.language_model." + k[6:] if k.startswith("model.") else "model." + k if k.startswith("visual.") else k): v
        for k, v in tensors.items()
    }
    assert any(k.startswith("model.visual.") for k in renamed)
    save_file(renamed, nested / "model.safetensors", metadata={"format": "pt"})
    reference_nested = load_reference(nested)  # transformers reads this layout too
    for name, value in reference_nested.state_dict().items():
        if name.startswith("model.visual.blocks.0.attn.qkv.weight"):
            np.testing.assert_array_equal(value.numpy(), tensors["visual.blocks.0.attn.qkv.weight"])
    assert np.abs(logits_of(from_pretrained(nested), image_batch)[valid] - expected).max() == 0.0


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "missing")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(folder)


def test_wrong_shape_is_named(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "shape")
    tensors = load_file(folder / "model.safetensors")
    tensors["visual.blocks.0.attn.qkv.bias"] = tensors["visual.blocks.0.attn.qkv.bias"][:-1].copy()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"wrong shape: visual\.blocks\.0\.attn\.qkv\.bias"):
        from_pretrained(folder)


def test_non_qwen_config_is_refused(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type is 'llama'.*qwen2_5_vl"):
        from_pretrained(folder)


def test_missing_folder_and_weights_are_named(tmp_path, tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nowhere")
    folder = _copy(tiny_checkpoint, tmp_path / "noweights")
    os.remove(folder / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"No model\.safetensors"):
        from_pretrained(folder)


def test_bfloat16_load_stays_close(tiny_checkpoint, model, image_batch):
    half = from_pretrained(tiny_checkpoint, dtype="bfloat16")
    dtypes = {v.dtype for _, v in nnx.to_flat_state(nnx.state(half, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    valid = image_batch["attention_mask"].astype(bool)
    ref = logits_of(model, image_batch)[valid]
    diff = np.abs(logits_of(half, image_batch)[valid] - ref).max()
    assert diff < 0.05 * np.abs(ref).max() + 0.02


def test_sharded_load_on_fake_devices_matches(tiny_checkpoint, model, image_batch):
    assert jax.device_count() == 8, "conftest asks XLA for 8 CPU devices"
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    sharded = from_pretrained(tiny_checkpoint, mesh=mesh)
    q = sharded.language_model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(q.sharding.device_set) == 8
    diff = np.abs(logits_of(sharded, image_batch) - logits_of(model, image_batch)).max()
    assert diff < 1e-5


def test_remat_gives_the_same_gradients(tiny_checkpoint, image_batch):
    batch = {k: v for k, v in image_batch.items() if k != "mm_token_type_ids"}
    positions, _ = get_position_ids(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                                    config=from_pretrained(tiny_checkpoint).config)

    def grads(remat):
        m = from_pretrained(tiny_checkpoint, remat=remat)
        loss = lambda m: jnp.mean(m(**batch, position_ids=positions).logits ** 2)  # noqa: E731
        return nnx.grad(loss)(m)

    plain, checkpointed = grads(False), grads(True)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(checkpointed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
