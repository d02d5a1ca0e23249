"""Our Flax Qwen2.5-VL against transformers' PyTorch implementation on the same random weights."""

import numpy as np
import pytest
import torch

from conftest import load_reference
from speciarl_jax.models.qwen2_5_vl import from_pretrained, get_position_ids
from speciarl_jax.tiny_model import TinySpec, make_tiny_checkpoint

TOL = 1e-4


def random_image(seed, height, width):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    return from_pretrained(tiny_checkpoint), load_reference(tiny_checkpoint)


def reference_forward(hf, batch):
    """Logits and 3-D positions from transformers, its own get_rope_index supplying the positions."""
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    ids, mask = t["input_ids"].long(), t["attention_mask"].long()
    grid = t["image_grid_thw"].long() if "image_grid_thw" in t else None
    positions, deltas = hf.model.get_rope_index(
        ids, t["mm_token_type_ids"].int(), image_grid_thw=grid, attention_mask=mask
    )
    with torch.no_grad():
        logits = hf(
            input_ids=ids, attention_mask=mask, pixel_values=t.get("pixel_values"), image_grid_thw=grid,
            position_ids=positions,
        ).logits
    return logits.numpy(), positions.numpy(), deltas.numpy()[:, 0]


def check_parity(model, hf, batch):
    ref_logits, ref_pos, ref_deltas = reference_forward(hf, batch)
    ours = np.asarray(model(**batch).logits)
    valid = batch["attention_mask"].astype(bool)
    pos, deltas = get_position_ids(
        batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"), config=model.config
    )
    np.testing.assert_array_equal(pos[:, valid], ref_pos[:, valid])
    np.testing.assert_array_equal(deltas, ref_deltas)
    diff = np.abs(ours - ref_logits)[valid].max()
    assert diff <= TOL, f"max |logit difference| {diff:.2e} over valid positions"
    return diff


def test_text_only_left_padded_batch(models, tiny_processor):
    model, hf = models
    texts = [tiny_processor.chat_prompt("Name the animal.", 0), tiny_processor.chat_prompt("Hi", 0)[:-12] + "x"]
    batch = tiny_processor(texts)
    assert batch["attention_mask"][1, 0] == 0, "the second prompt should be left-padded"
    check_parity(model, hf, batch)


def test_one_image(models, tiny_processor):
    model, hf = models
    batch = tiny_processor([tiny_processor.chat_prompt("What is this?", 1)], images=[random_image(0, 84, 112)])
    check_parity(model, hf, batch)


def test_two_images_of_different_sizes_in_one_prompt(models, tiny_processor):
    model, hf = models
    images = [random_image(1, 56, 140), random_image(2, 112, 84)]
    batch = tiny_processor([tiny_processor.chat_prompt("Compare them.", 2)], images=images)
    assert len({tuple(g) for g in batch["image_grid_thw"].tolist()}) == 2
    check_parity(model, hf, batch)


def test_batch_with_left_padding_images_and_text(models, tiny_processor):
    model, hf = models
    texts = [
        tiny_processor.chat_prompt("What bird is this?", 1),
        tiny_processor.chat_prompt("And this one, in a longer question?", 2),
        tiny_processor.chat_prompt("No picture here.", 0),
    ]
    images = [random_image(3, 56, 56), random_image(4, 84, 56), random_image(5, 56, 56)]
    batch = tiny_processor(texts, images=images)
    assert (batch["attention_mask"] == 0).any()
    check_parity(model, hf, batch)


def test_large_image_uses_windows_and_full_attention(tiny_checkpoint, tiny_processor):
    """A 224x224 image spans 16 attention windows; the full-attention block must differ from a window block."""
    model, hf = from_pretrained(tiny_checkpoint), load_reference(tiny_checkpoint)
    batch = tiny_processor([tiny_processor.chat_prompt("Look closely.", 1)], images=[random_image(6, 224, 224)])
    assert batch["image_grid_thw"].tolist() == [[1, 16, 16]]
    check_parity(model, hf, batch)
    with torch.no_grad():
        ref = hf.model.get_image_features(
            torch.from_numpy(batch["pixel_values"]), torch.from_numpy(batch["image_grid_thw"])
        ).pooler_output[0].numpy()
    features = np.asarray(model.encode_images(batch["pixel_values"], batch["image_grid_thw"]))
    parity = np.abs(features - ref).max()
    # The test can only catch a window bug if windows change the result: all-full attention must differ
    # from the reference far more than our implementation does.
    import dataclasses

    full = dataclasses.replace(model.config.vision, fullatt_block_indexes=tuple(range(model.config.vision.depth)))
    model.visual.config = full
    try:
        all_full = np.asarray(model.encode_images(batch["pixel_values"], batch["image_grid_thw"]))
    finally:
        model.visual.config = model.config.vision
    assert np.abs(all_full - ref).max() > 100 * max(parity, 1e-7)


def test_image_features_match_for_mixed_grids(models, tiny_processor):
    model, hf = models
    images = [random_image(7, 56, 84), random_image(8, 112, 112), random_image(9, 56, 84)]
    enc = tiny_processor.encode_images(images)
    with torch.no_grad():
        ref = hf.model.get_image_features(
            torch.from_numpy(enc["pixel_values"]), torch.from_numpy(enc["image_grid_thw"])
        ).pooler_output
    ref = torch.cat(list(ref)).numpy()
    ours = np.asarray(model.encode_images(enc["pixel_values"], enc["image_grid_thw"]))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOL


def test_tied_embeddings(tmp_path, tiny_processor):
    path = make_tiny_checkpoint(tmp_path / "tied", TinySpec(tie_word_embeddings=True), seed=3)
    model, hf = from_pretrained(path), load_reference(path)
    assert not hasattr(model, "lm_head")
    batch = tiny_processor([tiny_processor.chat_prompt("Tied?", 1)], images=[random_image(10, 56, 56)])
    check_parity(model, hf, batch)


def test_attention_implementation_is_set_everywhere_and_checked(tiny_checkpoint):
    from flax import nnx

    from speciarl_jax.models.qwen2_5_vl import set_attention_implementation
    from speciarl_jax.models.qwen2_5_vl.text import Attention
    from speciarl_jax.models.qwen2_5_vl.vision import VisionAttention

    model = from_pretrained(tiny_checkpoint)
    set_attention_implementation(model, "cudnn")
    found = [m.implementation for _, m in nnx.iter_graph(model) if isinstance(m, (Attention, VisionAttention))]
    assert len(found) == model.config.text.num_hidden_layers + model.config.vision.depth
    assert set(found) == {"cudnn"}
    with pytest.raises(ValueError, match="attention implementation 'flash'"):
        set_attention_implementation(model, "flash")
