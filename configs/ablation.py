"""The paper's ablations around the GRPO baseline, chosen by the part after the colon:

    static:reward3 | static:scala1 | static:scala2 | static:scala3    static reward tables instead of SpeciaRL
    noise:0.05 | noise:0.1 | noise:0.25                               label noise (on the 1,024-image set)
    samples:5 | samples:15                                            rollouts per prompt
    images:128 | images:1024 | images:2048                            CUB training-set size
    train:cub | train:aircraft | train:flowers | train:food | train:pets    the data-set variation runs
    mixed                                                             500 training images from each of the six
    single                                                            SpeciaRL reward, mode 'single'

    python -m speciarl_jax.train --config=configs/ablation.py:static:scala1 ...
    python -m speciarl_jax.train --config=configs/ablation.py:train:flowers:/data ...   # data root, default /data
    python -m speciarl_jax.train --config=configs/ablation.py:mixed:/data ...

Each resolves to the original launch script's values (tests/test_paper_configs.py): `images:128` trains on 128
prompts per step (one optimizer step per batch, 15 steps), `train:cub` is the data-set variation run on CUB
(512 prompts x 5 rollouts at learning rate 3e-6), and the other training sets are read as the original read them
(FGVC-Aircraft's variant train list, CoOp's train splits of Flowers102, Food101 and Pets; see
`speciarl_jax.configs.common.paper_source`).
"""

from speciarl_jax.configs.common import paper_source
from speciarl_jax.configs.cub_grpo import get_config as grpo

SIX = ("cub", "aircraft", "flowers", "food", "pets", "cars")
TRAIN_SETS = ("cub", "aircraft", "flowers", "food", "pets")


def get_config(choice: str = "static:reward3"):
    c = grpo()
    kind, _, value = choice.partition(":")
    if kind in ("mixed", "single"):  # no value: what follows is the data root
        value, root = "", value
    else:
        value, _, root = value.partition(":")
    root = root or "/data"
    c.name = f"ablation_{kind}_{value}" if value else f"ablation_{kind}"
    if kind == "static":
        c.reward.kind, c.reward.table = "static", value
    elif kind == "noise":
        c.reward.noise = float(value)
        c.data.source.num_examples = 1024  # the original noise runs train on the 1,024-image set
    elif kind == "samples":
        n = int(value)
        c.rollout.num_samples = n
        c.rl.mini_batch_size = (c.data.batch_size // 2) * n  # still two optimizer steps per batch
    elif kind == "images":
        images = int(value)
        c.data.source.num_examples = images
        # At most one batch's worth of prompts: 128 images train on 128 prompts per step, one optimizer step.
        c.data.batch_size = min(c.data.batch_size, images)
    elif kind == "train":
        if value not in TRAIN_SETS:
            raise ValueError(f"configs/ablation.py: train:{value} is not one of {TRAIN_SETS}")
        if value == "cub":  # the original's CUB run of this series: 512 prompts x 5 rollouts, lr 3e-6
            c.data.batch_size, c.rollout.num_samples, c.rl.learning_rate = 512, 5, 3e-6
            c.rl.mini_batch_size = 128 * 5  # 128 prompts per optimizer step, as in every run: four per batch
        c.data.source = dict(paper_source(value, "train", root), num_examples=3000, subset_seed=42)
        c.eval.source = paper_source("cub", "test", root)  # the held-out check stays on CUB, under the same root
        if value == "pets":  # CoOp's Pets train split has 2,944 images: the original took them all
            del c.data.source["num_examples"]
    elif kind == "mixed":
        c.data.source = dict(kind="mixed", per_source=500, seed=42,
                             parts=[paper_source(name, "train", root) for name in SIX])
        c.eval.source = paper_source("cub", "test", root)
    elif kind == "single":
        c.reward.mode = "single"
    else:
        raise ValueError(f"configs/ablation.py: unknown ablation {choice!r}; see the module docstring")
    return c
