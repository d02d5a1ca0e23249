"""Shared test set-up: 8 fake CPU devices, absl flags, and the tiny random Qwen2.5-VL checkpoint."""

import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere: sharding tests run on 8 simulated CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent compilation cache for the session, inherited by the subprocesses the tests start: many tests
# build a Trainer of the same tiny config, and every new Trainer would compile the same programs again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="speciarl_test_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain's worker processes read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a tiny random Qwen2.5-VL Hugging Face folder (untied lm_head), built once per session."""
    from speciarl_jax.tiny_model import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen"))


@pytest.fixture(scope="session")
def tiny_processor(tiny_checkpoint):
    from speciarl_jax.processing import Processor

    return Processor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def warm_model(tmp_path_factory):
    """A tiny policy after a short SFT (tests.test_trainer.small_config), as a Hugging Face folder; the RL
    tests start from it."""
    from tests.test_trainer import make_trainer, small_config

    run_dir = tmp_path_factory.mktemp("warm")
    trainer = make_trainer(small_config(run_dir, steps=0, epochs=0))  # SFT only
    trainer.run()
    assert os.path.exists(os.path.join(trainer.folder.sft_model, "config.json"))
    return trainer.folder.sft_model


def load_reference(path):
    """transformers' PyTorch Qwen2.5-VL in float32 with eager attention: the oracle for parity tests."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()
