"""Export: the merged Hugging Face folder and the PEFT adapter, each checked against transformers (and PEFT) on
the tiny model in float32; adapter checkpoints; the errors that name what is wrong."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from conftest import load_reference
from speciarl_jax import checkpoint, export
from speciarl_jax.models import lora
from speciarl_jax.models.qwen2_5_vl import from_pretrained

TOKENS = np.array([[30, 31, 32, 33, 34, 35, 36, 37], [40, 41, 42, 43, 44, 45, 46, 47]], np.int32)


def adapted_model(checkpoint, config=lora.LoRAConfig(rank=4, alpha=8.0, seed=3), seed=5):
    """The tiny model with adapters whose B is random, so they change the output."""
    model = from_pretrained(checkpoint)
    lora.apply_lora(model, config)
    key = jax.random.key(seed)
    for i, (_, layer) in enumerate(lora.lora_layers(model)):
        layer.lora_b[...] = 0.05 * jax.random.normal(jax.random.fold_in(key, i), layer.lora_b.shape)
    return model


def our_logits(model):
    return np.asarray(model(TOKENS).logits)


def torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(TOKENS).long()).logits.float().numpy()


@pytest.fixture(scope="module")
def peft_folder(tiny_checkpoint, tmp_path_factory):
    """A PEFT adapter written from the adapted tiny model, and that model's logits."""
    model = adapted_model(tiny_checkpoint)
    folder = tmp_path_factory.mktemp("adapter") / "peft"
    export.save_peft_adapter(model, folder, base_model_name_or_path=str(tiny_checkpoint))
    return folder, our_logits(model)


def test_peft_adapter_loads_with_peft_and_gives_the_same_logits(tiny_checkpoint, peft_folder):
    from peft import PeftModel

    folder, expected = peft_folder
    base_logits = our_logits(from_pretrained(tiny_checkpoint))
    assert np.abs(expected - base_logits).max() > 1e-2  # the adapter matters
    reference = PeftModel.from_pretrained(load_reference(tiny_checkpoint), folder).eval()
    adapted = [name for name, _ in reference.named_modules() if name.endswith(".lora_A")]
    assert len(adapted) == 14 and not any("visual" in name for name in adapted)
    np.testing.assert_allclose(torch_logits(reference), expected, atol=1e-4)


def test_peft_folder_contents(tiny_checkpoint, peft_folder):
    from safetensors import safe_open

    folder, _ = peft_folder
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert isinstance(config["lora_alpha"], int)  # vLLM's PEFT helper types it as int
    assert config["bias"] == "none" and not config["modules_to_save"] and not config["use_dora"]
    with safe_open(folder / "adapter_model.safetensors", "np") as f:
        keys = sorted(f.keys())
        a = f.get_tensor("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.language_model.layers.1.mlp.down_proj.lora_B.weight")
    assert len(keys) == 28 and all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    assert a.shape == (4, 64) and b.shape == (64, 4) and a.dtype == np.float32
    # The target regex selects exactly the adapted decoder projections, in both module-name layouts, never vision.
    pattern = config["target_modules"]
    reference = load_reference(tiny_checkpoint)
    names = [n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = [n for n in names if re.fullmatch(pattern, n)]
    assert len(chosen) == 14 and all(n.startswith("model.language_model.layers.") for n in chosen)
    assert re.fullmatch(pattern, "model.layers.3.self_attn.q_proj")
    assert not re.fullmatch(pattern, "model.visual.blocks.0.mlp.gate_proj")


@pytest.mark.parametrize("layout", ["transformers", "legacy"])
def test_peft_round_trip_into_our_model(tiny_checkpoint, tmp_path, layout):
    model = adapted_model(tiny_checkpoint, seed=11)
    expected = our_logits(model)
    export.save_peft_adapter(model, tmp_path / "a", layout=layout, dtype="float32")
    fresh = from_pretrained(tiny_checkpoint)
    paths = export.load_adapter(fresh, tmp_path / "a")
    assert len(paths) == 14 and all(p.startswith("language_model.layers.") for p in paths)
    np.testing.assert_array_equal(our_logits(fresh), expected)
    assert lora.lora_layers(fresh).__next__()[1].scale == 2.0
    # bfloat16 storage: the same adapter, rounded.
    export.save_peft_adapter(model, tmp_path / "bf16", dtype="bfloat16")
    rounded = from_pretrained(tiny_checkpoint)
    export.load_adapter(rounded, tmp_path / "bf16")
    np.testing.assert_allclose(our_logits(rounded), expected, atol=2e-3)


def test_merged_export_matches_transformers(tiny_checkpoint, peft_folder, tmp_path):
    folder, expected = peft_folder
    out = tmp_path / "merged"
    summary = export.export(str(tiny_checkpoint), str(out), adapter=str(folder), fmt="merged", dtype="float32",
                            max_shard_bytes=200_000)
    assert summary["merged_layers"] == 14
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "preprocessor_config.json"} <= files
    assert sum(f.startswith("model-") for f in files) > 1
    np.testing.assert_allclose(torch_logits(load_reference(out)), expected, atol=1e-4)
    np.testing.assert_allclose(our_logits(from_pretrained(out)), expected, atol=1e-5)
    # bfloat16: the config says so and the logits stay close.
    export.export(str(tiny_checkpoint), str(tmp_path / "bf16"), adapter=str(folder), dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # Rounding to bfloat16 moves the logits by ~0.002; the adapter itself moves them by ~0.5 (test_peft_*).
    np.testing.assert_allclose(our_logits(from_pretrained(tmp_path / "bf16")), expected, atol=0.01)


def test_adapter_checkpoint_round_trip(tiny_checkpoint, tmp_path):
    config = lora.LoRAConfig(rank=2, alpha=4.0, targets=(r"language_model\.layers\.\d+\.self_attn\.[qv]_proj",))
    model = adapted_model(tiny_checkpoint, config=config, seed=7)
    expected = our_logits(model)
    export.save_adapter_checkpoint(model, config, tmp_path / "step_10")
    assert (tmp_path / "step_10" / "lora_config.json").exists() and (tmp_path / "step_10" / "adapter").is_dir()
    fresh = from_pretrained(tiny_checkpoint)
    assert len(export.load_adapter(fresh, tmp_path / "step_10")) == 4
    np.testing.assert_array_equal(our_logits(fresh), expected)
    # And on to PEFT: only q and v of each layer, listed by a regex over those two projections.
    written = export.save_peft_adapter(fresh, tmp_path / "peft")
    assert written["r"] == 2 and "q_proj" in written["target_modules"] and "o_proj" not in written["target_modules"]


def test_errors_name_the_problem(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export.save_peft_adapter(from_pretrained(tiny_checkpoint), tmp_path / "x")
    vision = from_pretrained(tiny_checkpoint)
    lora.apply_lora(vision, lora.LoRAConfig(rank=2, targets=(r"visual\.blocks\.0\.attn\.qkv",), excludes=()))
    with pytest.raises(ValueError, match="outside the language model.*--format=merged"):
        export.save_peft_adapter(vision, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="neither adapter_config.json"):
        export.load_adapter(from_pretrained(tiny_checkpoint), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter folder not found"):
        export.load_adapter(from_pretrained(tiny_checkpoint), tmp_path / "missing")
    with pytest.raises(ValueError, match="over its base model"):
        export.export(str(tiny_checkpoint), str(tiny_checkpoint))
    with pytest.raises(ValueError, match="needs --adapter"):
        export.export(str(tiny_checkpoint), str(tmp_path / "p"), fmt="peft")
    with pytest.raises(ValueError, match="format must be"):
        export.export(str(tiny_checkpoint), str(tmp_path / "p"), fmt="gguf")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        export.load_adapter(from_pretrained(tiny_checkpoint), bad)
    assert export.our_path("base_model.model.model.layers.2.mlp.up_proj") == "language_model.layers.2.mlp.up_proj"
    with pytest.raises(ValueError, match="not a layer of the Qwen2.5-VL language model"):
        export.our_path("model.visual.blocks.0.attn.qkv")


def test_command_line(tiny_checkpoint, peft_folder, tmp_path):
    folder, _ = peft_folder
    cmd = [sys.executable, "-m", "speciarl_jax.export", f"--base={tiny_checkpoint}", f"--adapter={folder}",
           f"--out={tmp_path / 'served'}", "--format=peft", "--dtype=bfloat16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["layers"] == 14
    assert (tmp_path / "served" / "adapter_model.safetensors").exists()


def save_training_checkpoint(model, run_dir, step, base, lora_settings):
    """A checkpoint as the trainer writes it (speciarl_jax.checkpoint.Checkpointer)."""
    from flax import nnx

    from speciarl_jax.checkpoint import Checkpointer

    _, params, _ = nnx.split(model, lora.LoRAWeight, ...)
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"))
    checkpointer.save(step, params=params, opt_state={"count": np.zeros(())},
                      meta={"step": step, "config": {"model": {"path": str(base), "tiny": False}, "lora": lora_settings}})
    checkpointer.close()


def test_training_checkpoint_loads_and_exports(tiny_checkpoint, tmp_path):
    model = adapted_model(tiny_checkpoint, config=lora.LoRAConfig(rank=4, alpha=8.0), seed=13)
    expected = our_logits(model)
    run = tmp_path / "run"
    save_training_checkpoint(model, run, 3, tiny_checkpoint, {"rank": 4, "alpha": 8.0})
    perturbed = adapted_model(tiny_checkpoint, config=lora.LoRAConfig(rank=4, alpha=8.0), seed=14)
    save_training_checkpoint(perturbed, run, 7, tiny_checkpoint, {"rank": 4, "alpha": 8.0})
    assert checkpoint.locate_step(run / "checkpoints") == (str(run / "checkpoints"), 7)  # the latest step
    assert checkpoint.locate_step(run / "checkpoints" / "3") == (str(run / "checkpoints"), 3)
    assert checkpoint.locate_step(tmp_path) is None
    assert export.training_base_model(run / "checkpoints" / "3") == str(tiny_checkpoint)
    fresh = from_pretrained(tiny_checkpoint)
    assert len(export.load_adapter(fresh, run / "checkpoints" / "3")) == 14
    np.testing.assert_array_equal(our_logits(fresh), expected)
    # --base may be left out: the checkpoint's run config names it.
    summary = export.export(None, str(tmp_path / "peft"), adapter=str(run / "checkpoints" / "3"), fmt="peft",
                            dtype="float32")
    assert summary["layers"] == 14
    again = from_pretrained(tiny_checkpoint)
    export.load_adapter(again, tmp_path / "peft")
    np.testing.assert_array_equal(our_logits(again), expected)
    with pytest.raises(ValueError, match="no base model"):
        export.export(None, str(tmp_path / "x"), adapter=str(tmp_path / "peft"))


def test_a_run_with_sft_applies_its_adapters_to_the_sft_model(tiny_checkpoint, tmp_path):
    from flax import nnx

    from speciarl_jax.checkpoint import Checkpointer

    run = tmp_path / "run"
    model = adapted_model(tiny_checkpoint, config=lora.LoRAConfig(rank=2, alpha=2.0))
    _, params, _ = nnx.split(model, lora.LoRAWeight, ...)
    checkpointer = Checkpointer(run / "checkpoints")
    checkpointer.save(1, params=params, opt_state={"count": np.zeros(())}, meta={"config": {
        "model": {"tiny": True}, "sft": {"enabled": True}, "lora": {"rank": 2, "alpha": 2.0}}})
    checkpointer.close()
    with pytest.raises(FileNotFoundError, match="trained after SFT, but the SFT model"):
        export.training_base_model(run / "checkpoints")
    (run / "sft_model").mkdir()
    (run / "sft_model" / "config.json").write_text("{}")
    assert export.training_base_model(run / "checkpoints") == str(run / "sft_model")
