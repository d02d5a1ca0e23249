"""SFT's targets: answers at the configured levels of the hierarchy, their tokens and mask, and a loss that is
the mean negative log-likelihood of exactly the target tokens."""

import collections

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from speciarl_jax.data.synthetic import SyntheticWorld
from speciarl_jax.models.qwen2_5_vl import from_pretrained
from speciarl_jax.rl.batch import make_rollout_batch
from speciarl_jax.sft import TargetWriter, make_sft_step, tokenize_targets
from speciarl_jax.verifier import Taxonomy
from test_model_parity import random_image


def test_targets_follow_the_levels_of_the_hierarchy():
    world = SyntheticWorld()
    taxonomy = Taxonomy.from_dict(world.taxonomy())
    fine = world.classes[0]  # plain circle < circle < shape
    writer = TargetWriter((0.5, 0.3, 0.2), taxonomy, think="", seed=0)
    counts = collections.Counter(writer(fine.name) for _ in range(4000))
    assert set(counts) == {f"<think></think><answer>{name}</answer>" for name in (fine.name, fine.family, world.generic)}
    shares = [counts[f"<think></think><answer>{name}</answer>"] / 4000 for name in (fine.name, fine.family, world.generic)]
    np.testing.assert_allclose(shares, [0.5, 0.3, 0.2], atol=0.03)
    # The paper's baseline: the label itself, always; a family label's first ancestor is the root.
    assert {TargetWriter((1, 0, 0), None, "", seed=1)(fine.name) for _ in range(50)} == {
        f"<think></think><answer>{fine.name}</answer>"}
    assert TargetWriter((0, 1, 0), taxonomy, "looks round", seed=0)(fine.family) == (
        f"<think>looks round</think><answer>{world.generic}</answer>")
    with pytest.raises(ValueError, match="needs a label hierarchy"):
        TargetWriter((0.5, 0.5, 0), None, "", seed=0)


def test_target_tokens_end_with_the_end_token_and_the_mask_covers_them_alone(tiny_processor):
    texts = ["<think></think><answer>plain circle</answer>", "<think>a long thought " * 4 + "</think><answer>x</answer>"]
    tokens, mask = tokenize_targets(tiny_processor, texts)
    assert tokens.shape == mask.shape and tokens.shape[1] % 16 == 0
    end = tiny_processor.eos_token_ids[0]
    for row, text in enumerate(texts):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()  # one contiguous run from the first column
        assert tokens[row, n - 1] == end and (tokens[row, n:] == tiny_processor.pad_token_id).all()
        assert tiny_processor.decode(tokens[row, :n - 1], skip_special_tokens=False) == text


def test_sft_loss_is_the_mean_nll_of_the_target_tokens(tiny_checkpoint, tiny_processor):
    """The step's loss against a plain forward: -mean log p over the masked target tokens only (prompt and
    padding excluded), with the image features computed inside the step from the pixels."""
    model = from_pretrained(tiny_checkpoint)
    images = [random_image(0, 56, 56), random_image(1, 56, 56)]
    prompts = tiny_processor([tiny_processor.chat_prompt("Name it.", 1)] * 2, images=images)
    tokens, mask = tokenize_targets(tiny_processor, ["<answer>a</answer>", "<think>hm</think><answer>bb cc</answer>"])
    grids = tuple(tuple(int(v) for v in g) for g in prompts["image_grid_thw"])
    table = np.zeros((int((np.prod(prompts["image_grid_thw"], 1) // 4).sum()), 1), np.float32)
    rows = make_rollout_batch(model.config, prompts, tokens, mask, np.zeros(2, np.float32), num_samples=1,
                              image_features=table, pad_token_id=tiny_processor.pad_token_id)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    step = make_sft_step(graphdef, optax.sgd(0.0), chunk_size=8)
    _, _, loss, _ = step(params, optax.sgd(0.0).init(params), frozen, rows, prompts["pixel_values"], grids)

    width = tokens.shape[1]
    logits = model(rows.input_ids, rows.attention_mask, pixel_values=prompts["pixel_values"],
                   image_grid_thw=prompts["image_grid_thw"]).logits
    logp = np.asarray(jax.nn.log_softmax(logits[:, -width - 1:-1]))
    chosen = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    expected = -(chosen * mask).sum() / mask.sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(expected) - (-chosen.mean())) > 1e-3  # padding would change it: the mask matters here
