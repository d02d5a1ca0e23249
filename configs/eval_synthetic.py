"""Evaluation on held-out images of the synthetic shape world, graded exactly by the rule verifier.

    python -m speciarl_jax.evaluate --config=configs/eval_synthetic.py:runs/demo/tiny_model
    python -m speciarl_jax.evaluate --config=configs/eval_synthetic.py:simulated --config.output_dir=runs/eval/sim

The argument is a Hugging Face model folder, a training checkpoint (`runs/demo/checkpoints/40`: its run config
names the base), or "simulated" for the weight-free answer generator of `evaluate.SimulatedPredictor` (its answer
mix is `config.model.simulated`). No network, no API key.
"""

from speciarl_jax.evaluate import default_config
from speciarl_jax.export import training_step


def get_config(model: str = "simulated"):
    config = default_config()
    if model == "simulated":
        config.model.kind = "simulated"
    elif training_step(model) is not None:
        config.model.adapter = model
    else:
        config.model.path = model
    config.model.dtype = "float32"
    config.output_dir = "runs/eval/synthetic"
    config.datasets = {
        "synthetic": {"kind": "synthetic", "split": "test", "num_images": 240, "image_size": [56, 56]},
        # The same images with family-level ground truth ("circle"), so fine answers can be "more specific".
        "synthetic_family": {"kind": "synthetic", "split": "test", "num_images": 240, "image_size": [56, 56],
                             "label_level": "family"},
    }
    config.image.image_size = (56, 56)
    config.prompt = "specific"
    config.decoding.max_new_tokens = 48
    config.decoding.batch_size = 16
    config.verifier.kind = "rule"  # taxonomy: the synthetic world's own (evaluate.rule_taxonomy)
    config.mesh.enabled = False
    return config
