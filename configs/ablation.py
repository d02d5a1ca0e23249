"""The paper's ablations around the GRPO baseline, chosen by the part after the colon:

    static:reward3 | static:scala1 | static:scala2 | static:scala3    static reward tables instead of SpeciaRL
    noise:0.05 | noise:0.1 | noise:0.25                               label noise on the verdicts
    samples:5 | samples:15                                            rollouts per prompt
    images:128 | images:1024 | images:2048                            CUB training-set size
    train:aircraft | train:flowers | train:food | train:pets          train on another data set
    mixed                                                             500 images from each of the six
    single                                                            SpeciaRL reward, mode 'single'

    python -m speciarl_jax.train --config=configs/ablation.py:static:scala1 ...
"""

from configs.common import base_config
from configs.cub_grpo import get_config as grpo

SIX = ("cub", "aircraft", "flowers", "food", "pets", "cars")


def get_config(choice: str = "static:reward3"):
    c = grpo()
    kind, _, value = choice.partition(":")
    c.name = f"ablation_{kind}_{value}" if value else f"ablation_{kind}"
    if kind == "static":
        c.reward.kind, c.reward.table = "static", value
    elif kind == "noise":
        c.reward.noise = float(value)
    elif kind == "samples":
        n = int(value)
        c.rollout.num_samples = n
        c.rl.mini_batch_size = (c.data.batch_size // 2) * n  # still two optimizer steps per batch
    elif kind == "images":
        c.data.source.num_examples = int(value)
    elif kind == "train":
        if value not in SIX:
            raise ValueError(f"configs/ablation.py: train:{value} is not one of {SIX}")
        c.data.source.name = value
    elif kind == "mixed":
        defaults = base_config().data.source.to_dict()
        c.data.source = dict(kind="mixed", per_source=500, seed=42, parts=[
            dict(kind="benchmark", name=name, split="train", data_dir=defaults["data_dir"]) for name in SIX
        ])
    elif kind == "single":
        c.reward.mode = "single"
    else:
        raise ValueError(f"configs/ablation.py: unknown ablation {choice!r}; see the module docstring")
    return c
