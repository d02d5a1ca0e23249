"""The paper's baseline (docs/method.md): Qwen2.5-VL-7B-Instruct, LoRA r64, SpeciaRL reward, GRPO, 3000 CUB images.

    python -m speciarl_jax.train --config=configs/cub_grpo.py --config.model.path=/models/Qwen2.5-VL-7B-Instruct \\
        --config.data.source.data_dir=/data/tfds --config.verifier.base_url=http://verifier:8000/v1
"""

from speciarl_jax.configs.common import base_config


def get_config():
    c = base_config()
    c.name = "cub_grpo"
    c.eval.enabled = True
    c.eval.num_examples = 1024  # a fixed held-out sample during training; evaluate.py runs the full test sets
    c.eval.max_new_tokens = 1024
    return c
