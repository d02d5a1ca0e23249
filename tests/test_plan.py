"""The memory planner: device specs, parameter counts against a real model, its activation estimate against XLA's
buffer assignment, the paper configs' plans, and the trainer refusing a config that cannot fit before it loads
any weights."""

import jax
import numpy as np
import pytest
from flax import nnx

from speciarl_jax.configs.cub_grpo import get_config as cub_grpo
from speciarl_jax import plan
from speciarl_jax.models import lora
from speciarl_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, TextConfig, VisionConfig
from speciarl_jax.rl import update
from speciarl_jax.rl.batch import abstract_batch


def small_model_config(tie=False):
    text = TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 2, 2))
    vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          fullatt_block_indexes=(1,))
    return Qwen25VLConfig(text=text, vision=vision, image_token_id=511, video_token_id=510, vision_start_token_id=509,
                          vision_end_token_id=508, bos_token_id=0, eos_token_id=1, pad_token_id=0,
                          tie_word_embeddings=tie)


def test_device_specs():
    assert plan.parse_devices("v5p-16") == (8, 95)  # TensorCores: two per chip
    assert plan.parse_devices("v6e-32") == (32, 32)
    assert plan.parse_devices("8xH100") == (8, 80)
    assert plan.parse_devices("4x24") == (4, 24)
    with pytest.raises(ValueError, match="--devices"):
        plan.parse_devices("a100s")


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_counts_equal_a_built_model(tie):
    config = small_model_config(tie)
    model = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0)))
    lora.apply_lora(model, lora.LoRAConfig(rank=4))
    sizes = lambda state: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))  # noqa: E731
    counted = plan.parameter_counts(config, lora_rank=4)
    assert counted["text"] + counted["vision"] == sizes(nnx.state(model, nnx.Param))
    assert counted["vision"] == sizes(nnx.state(model.visual, nnx.Param))
    assert counted["adapters"] == sizes(nnx.state(model, lora.LoRAWeight))


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("rows,prompt,response", [(8, 64, 64), (32, 32, 32), (2, 64, 192)])
def test_activation_estimate_is_near_xla_buffer_assignment(rows, prompt, response, remat):
    config = small_model_config()
    model = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0)))
    lora.apply_lora(model, lora.LoRAConfig(rank=4))
    learner = update.Learner(model, update.preset("grpo", remat=remat, micro_batch_tokens=4096))
    columns = prompt + response
    acc = jax.eval_shape(learner._zero_acc, learner.state.params)
    xla = learner._accumulate.lower(acc, learner.state.params, learner.frozen, abstract_batch(rows, columns, response),
                                    update.abstract_totals()).compile()
    xla = xla.memory_analysis().temp_size_in_bytes
    ours = plan.update_activation_bytes(config.text, rows, columns, response, 512, 4, remat=remat, chunk_tokens=2048)
    assert 0.67 < ours / xla < 1.5, (ours, xla)


@pytest.mark.parametrize("devices", ["v5p-16", "v6e-32", "8xH100", "4xH100"])
def test_the_paper_step_fits_with_the_rollout_engine(devices):
    config = cub_grpo()
    count, memory = plan.parse_devices(devices)
    model = plan.model_config("7b")
    result = plan.plan_for_run(config, model, count, memory * plan.GiB, plan.max_patches_of(config, model))
    assert result.fits and result.slots == 256
    # The 7B's KV cache: 28 layers x 2 x 4 heads x 128 x 2 bytes per token; 256 slots of 448 + 2,048 entries.
    assert result.rows["rollout KV cache (256 slots)"] == pytest.approx(256 * (448 + 2048) * 57344 / count)
    assert result.best_slots >= 256


@pytest.mark.parametrize("devices,fits", [("v5p-16", True), ("v6e-32", True), ("8xH100", True), ("4xH100", False)])
def test_the_paper_step_on_the_static_sampler(devices, fits):
    config = cub_grpo()
    config.rollout.engine = "static"
    count, memory = plan.parse_devices(devices)
    model = plan.model_config("7b")
    result = plan.plan_for_run(config, model, count, memory * plan.GiB, plan.max_patches_of(config, model))
    assert result.fits == fits and result.slots is None
    # Every one of the 2,560 rows holds (448 + 2,048) entries.
    assert result.rows["rollout KV cache (every row)"] == pytest.approx(2560 * (448 + 2048) * 57344 / count)
    if not fits:
        assert "rollout.engine='continuous'" in " ".join(plan.advice(result))


def test_too_many_slots_are_refused_with_the_count_that_fits():
    config = cub_grpo()
    config.rollout.slots = 4096
    count, memory = plan.parse_devices("4xH100")
    model = plan.model_config("7b")
    result = plan.plan_for_run(config, model, count, memory * plan.GiB, plan.max_patches_of(config, model))
    assert not result.fits and result.best_slots == 1024
    assert "rollout.slots=1024 (now 4096)" in " ".join(plan.advice(result))
    config.rollout.slots = result.best_slots
    assert plan.plan_for_run(config, model, count, memory * plan.GiB, plan.max_patches_of(config, model)).fits


def test_trainer_refuses_a_config_that_cannot_fit_before_loading_weights(tmp_path, monkeypatch):
    from speciarl_jax import trainer as trainer_module
    from test_trainer import small_config

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the memory check")

    monkeypatch.setattr(trainer_module, "from_pretrained", no_loading)
    config = small_config(tmp_path, **{"device_memory_gb": 0.002, "sft.enabled": False})
    with pytest.raises(plan.DoesNotFit, match=r"rl\.micro_batch_tokens|rollout\.max_new_tokens|config\.mesh"):
        trainer_module.Trainer(config)
    # With the memory a CPU run really has, the same config passes the check.
    config = small_config(tmp_path, **{"device_memory_gb": 8.0, "sft.enabled": False})
    with pytest.raises(AssertionError, match="weights were loaded"):
        trainer_module.Trainer(config)
