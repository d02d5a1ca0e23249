"""Evaluation on held-out images of the synthetic shape world, graded exactly by the rule verifier.

    python -m speciarl_jax.evaluate --config=configs/eval_synthetic.py:runs/demo
    python -m speciarl_jax.evaluate --config=configs/eval_synthetic.py:simulated --config.output_dir=runs/eval/sim

The argument is a training run (`runs/demo`, `runs/demo/checkpoints/40`, `runs/demo/sft_model`), a Hugging
Face model folder, or "simulated" for the weight-free answer generator of `evaluate.SimulatedPredictor` (its
answer mix is `config.model.simulated`). A training run is asked as it was trained: its prompt, system turn,
image size, decoding length and world (`speciarl_jax.run_settings`); settings given on the command line that
differ are reported as changes. No network, no API key.
"""

from speciarl_jax import run_settings
from speciarl_jax.evaluate import datasets_config, default_config


def get_config(model: str = "simulated"):
    config = default_config()
    config.datasets = datasets_config({
        "synthetic": {"kind": "synthetic", "split": "test", "num_images": 240},
        # The same images with family-level ground truth ("circle"), so fine answers can be "more specific".
        "synthetic_family": {"kind": "synthetic", "split": "test", "num_images": 240, "label_level": "family"},
    })
    if model == "simulated":
        config.model.kind = "simulated"
    elif run_settings.find(model) is not None:
        config.run = model
    else:
        config.model.path = model
    if not config.run:  # without a run to take them from: small images, short answers, float32
        for entry in config.datasets.values():
            entry.image_size = (56, 56)
        config.image.image_size = (56, 56)
        config.decoding.max_new_tokens = 48
        config.model.dtype = "float32"
        config.output_dir = "runs/eval/synthetic"
    config.decoding.batch_size = 16
    config.verifier.kind = "rule"  # taxonomy: the synthetic world's own (evaluate.rule_taxonomy)
    config.mesh.enabled = False
    return config
