"""LoRA: which layers get adapters, the switch, merging, export, sharding, and gradients checked against the
full model's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import load_reference
from speciarl_jax import parallel
from speciarl_jax.models import lora
from speciarl_jax.models.qwen2_5_vl import from_pretrained, save_pretrained
from speciarl_jax.models.qwen2_5_vl.hf_io import iter_param_names
from speciarl_jax.rl.batch import RolloutBatch, rollout_position_ids
from speciarl_jax.rl.update import RLConfig, micro_batch_loss

CONFIG = lora.LoRAConfig(rank=4, alpha=8.0, seed=1)
FAST = {"xla_backend_optimization_level": 0}  # quicker CPU compiles for the tiny model
TOKENS = np.array([[30, 31, 32, 33, 34, 35, 36, 37], [40, 41, 42, 43, 44, 45, 46, 47]], np.int32)


def perturb_adapters(model, seed=2, scale=0.05):
    """Give every B a random value so the adapters change the output (B starts at zero)."""
    key = jax.random.key(seed)
    for i, (_, layer) in enumerate(lora.lora_layers(model)):
        layer.lora_b[...] = scale * jax.random.normal(jax.random.fold_in(key, i), layer.lora_b.shape)


@pytest.fixture
def adapted(tiny_checkpoint):
    model = from_pretrained(tiny_checkpoint)
    lora.apply_lora(model, CONFIG)
    return model


def logits(model, tokens=TOKENS):
    return np.asarray(model(tokens).logits)


def test_default_targets_are_the_language_model_linears(adapted, tiny_checkpoint):
    paths = [p for p, _ in lora.lora_layers(adapted)]
    assert len(paths) == 2 * 7  # two layers x (q, k, v, o, gate, up, down)
    assert all(p.startswith("language_model.layers.") for p in paths)
    assert "lm_head" not in paths and not any(p.startswith("visual") for p in paths)
    layer = adapted.language_model.layers[0].self_attn.q_proj
    assert isinstance(layer, lora.LoRALinear) and isinstance(layer, nnx.Linear)
    assert layer.lora_a.shape == (64, 4) and layer.lora_b.shape == (4, 64) and layer.scale == 2.0
    assert not np.any(np.asarray(layer.lora_b[...]))
    assert parallel.variable_axes(layer.lora_a) == ("embed", "lora_rank")
    assert parallel.variable_axes(layer.lora_b) == ("lora_rank", "heads")
    count = lora.count_parameters(adapted, CONFIG)
    per_layer = sum(4 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
    assert count.trainable == 2 * per_layer and count.adapted_layers == 14
    base_params = nnx.state(from_pretrained(tiny_checkpoint), nnx.Param)
    base = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(base_params))
    assert count.total == base + count.trainable
    assert "trainable of" in str(count)


def test_patterns_and_their_errors(tiny_checkpoint):
    model = from_pretrained(tiny_checkpoint)
    only_attention = lora.LoRAConfig(rank=2, targets=(r"language_model\.layers\.\d+\.self_attn\.[qv]_proj",))
    assert lora.apply_lora(model, only_attention) == [
        "language_model.layers.0.self_attn.q_proj", "language_model.layers.0.self_attn.v_proj",
        "language_model.layers.1.self_attn.q_proj", "language_model.layers.1.self_attn.v_proj",
    ]
    vision = lora.LoRAConfig(rank=2, targets=(r"visual\.blocks\.0\.attn\..*",), excludes=())
    adapted = lora.apply_lora(from_pretrained(tiny_checkpoint), vision)
    assert adapted == ["visual.blocks.0.attn.proj", "visual.blocks.0.attn.qkv"]
    with pytest.raises(ValueError, match="match no nnx.Linear"):
        lora.apply_lora(from_pretrained(tiny_checkpoint), lora.LoRAConfig(targets=(r"nothing\..*",)))
    with pytest.raises(ValueError, match="lm_head is not supported"):
        lora.apply_lora(from_pretrained(tiny_checkpoint), lora.LoRAConfig(targets=(r".*",), excludes=()))
    with pytest.raises(ValueError, match="invalid regex"):
        lora.LoRAConfig(targets=("(",))
    with pytest.raises(ValueError, match="rank must be >= 0"):
        lora.LoRAConfig(rank=-1)
    assert lora.apply_lora(model, lora.LoRAConfig(rank=0)) == []


def test_adapters_start_at_zero_switch_off_and_merge(adapted, tiny_checkpoint):
    base = logits(from_pretrained(tiny_checkpoint))
    np.testing.assert_array_equal(logits(adapted), base)
    perturb_adapters(adapted)
    with_adapters = logits(adapted)
    assert np.abs(with_adapters - base).max() > 1e-2
    with lora.adapters_disabled(adapted):
        np.testing.assert_array_equal(logits(adapted), base)
    np.testing.assert_array_equal(logits(adapted), with_adapters)  # switched back on
    # Inside jit, on a model merged there: one traced program per setting.
    graphdef, state = nnx.split(adapted)

    @jax.jit
    def both(state, tokens):
        model = nnx.merge(graphdef, state)
        on = model(tokens, position_ids=positions).logits
        with lora.adapters_disabled(model):
            off = model(tokens, position_ids=positions).logits
        return on, off

    positions = np.broadcast_to(np.arange(TOKENS.shape[1]), (3,) + TOKENS.shape)
    on, off = both(state, TOKENS)
    np.testing.assert_allclose(on, with_adapters, atol=1e-5)
    np.testing.assert_allclose(off, base, atol=1e-5)

    assert lora.merge_lora(adapted) == 14
    assert not list(lora.lora_layers(adapted))
    assert type(adapted.language_model.layers[1].mlp.down_proj) is nnx.Linear
    np.testing.assert_allclose(logits(adapted), with_adapters, atol=1e-5)


def test_export_keeps_base_names_and_merged_export_matches_in_pytorch(adapted, tiny_checkpoint, tmp_path):
    plain_names = sorted(iter_param_names(from_pretrained(tiny_checkpoint)))
    assert sorted(iter_param_names(adapted)) == plain_names  # adapters are not nnx.Params
    perturb_adapters(adapted)
    expected = logits(adapted)
    lora.merge_lora(adapted)
    save_pretrained(adapted, tmp_path / "merged", copy_from=tiny_checkpoint)
    reference = load_reference(tmp_path / "merged")
    with torch.no_grad():
        got = reference(input_ids=torch.from_numpy(TOKENS).long()).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_adapters_follow_the_mesh(tiny_checkpoint):
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    model = from_pretrained(tiny_checkpoint, mesh=mesh)
    lora.apply_lora(model, CONFIG)
    up = model.language_model.layers[0].mlp.up_proj
    spec = lambda *names: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*names))  # noqa: E731
    assert up.lora_a[...].sharding.is_equivalent_to(spec("fsdp", None), 2)
    assert up.lora_b[...].sharding.is_equivalent_to(spec(None, "tensor"), 2)
    perturb_adapters(model)
    expected = np.asarray(up.kernel[...]) + up.scale * np.asarray(up.lora_a[...]) @ np.asarray(up.lora_b[...])
    lora.merge_lora(model)
    kernel = model.language_model.layers[0].mlp.up_proj.kernel[...]
    assert kernel.sharding.is_equivalent_to(spec("fsdp", "tensor"), 2)
    np.testing.assert_allclose(np.asarray(kernel), expected, rtol=1e-5, atol=1e-6)


def test_full_finetuning_filter_selects_the_language_model(tiny_checkpoint):
    model = from_pretrained(tiny_checkpoint)
    trained = nnx.state(model, lora.trainable_filter(lora.LoRAConfig(rank=0)))
    names = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(trained)]
    assert "lm_head.kernel" in names and "language_model.embed_tokens.embedding" in names
    assert not any(n.startswith("visual") for n in names)


# ---- gradients: adapters vs the full model ----


def _loss_batch(model):
    """A small rollout batch (4 rows: 8 prompt + 6 response tokens) with fixed old / reference log-probs."""
    rng = np.random.default_rng(3)
    rows, prompt, response = 4, 8, 6
    ids = rng.integers(20, 300, (rows, prompt + response)).astype(np.int32)
    attention = np.ones_like(ids)
    attention[0, :3] = 0
    mask = (np.arange(response)[None] < np.array([6, 4, 2, 5])[:, None]).astype(np.int32)
    attention[:, prompt:] = mask
    positions = rollout_position_ids(model.config, ids[:, :prompt], attention[:, :prompt], None, response)
    return RolloutBatch(
        input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(attention), position_ids=jnp.asarray(positions),
        response_mask=jnp.asarray(mask), advantages=jnp.asarray([1.0, -0.5, 2.0, -1.5]),
        old_logprobs=jnp.asarray(rng.normal(-6.0, 0.3, (rows, response)), jnp.float32),
        ref_logprobs=jnp.asarray(rng.normal(-6.0, 0.3, (rows, response)), jnp.float32),
    )


def test_adapter_gradients_match_the_full_model_and_finite_differences(tiny_checkpoint):
    """With W' = W + s A B, dL/dA = s dL/dW' B^T and dL/dB = s A^T dL/dW'. The full model's kernel gradients
    come from an independent computation on the merged weights (no adapters at all); one adapter entry is
    also checked by central finite differences."""
    config = RLConfig(kl_coef=0.05, entropy_coef=0.01, logprob_chunk=4, clip_c=3.0)
    model = from_pretrained(tiny_checkpoint)
    lora.apply_lora(model, CONFIG)
    perturb_adapters(model, scale=0.3)
    batch = _loss_batch(model)
    mask = batch.response_mask.astype(jnp.float32)
    totals = {"tokens": mask.sum(), "rows": jnp.float32(4)}

    def loss_function(model, wrt):
        graphdef, params, rest = nnx.split(model, wrt, ...)
        loss = lambda p: micro_batch_loss(nnx.merge(graphdef, p, rest), batch, config, totals, 1)[0]  # noqa: E731
        return params, loss

    adapters, lora_loss = loss_function(model, lora.LoRAWeight)
    lora_grads = jax.jit(jax.grad(lora_loss), compiler_options=FAST)(adapters)
    factors = {name: (layer.scale, np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...]))
               for name, layer in lora.lora_layers(model)}

    # Finite differences on the largest gradient entry of one B.
    target = ("language_model", "layers", 1, "mlp", "down_proj", "lora_b")
    analytic = np.asarray(dict(nnx.to_flat_state(lora_grads))[target][...])
    index = np.unravel_index(np.abs(analytic).argmax(), analytic.shape)
    loss_at = jax.jit(lora_loss, compiler_options=FAST)

    def shifted(delta):
        moved = jax.tree.map(lambda x: x, adapters)
        variable = dict(nnx.to_flat_state(moved))[target]
        variable[...] = variable[...].at[index].add(delta)
        return float(loss_at(moved))

    h = 1e-2
    assert (shifted(h) - shifted(-h)) / (2 * h) == pytest.approx(float(analytic[index]), rel=2e-2)

    lora.merge_lora(model)
    kernels, full_loss = loss_function(model, nnx.Param)  # every base parameter; the merged model has no adapters
    kernel_grads = jax.jit(jax.grad(full_loss), compiler_options=FAST)(kernels)
    flat_lora = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(lora_grads)}
    flat_full = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(kernel_grads)}
    assert len(flat_lora) == 2 * len(factors)
    for name, (scale, a, b) in factors.items():
        g_w = flat_full[name + ".kernel"]
        np.testing.assert_allclose(flat_lora[name + ".lora_a"], scale * g_w @ b.T, rtol=2e-3, atol=1e-6)
        np.testing.assert_allclose(flat_lora[name + ".lora_b"], scale * a.T @ g_w, rtol=2e-3, atol=1e-6)
    assert max(np.abs(g).max() for g in flat_lora.values()) > 1e-4  # the check is not vacuous


