"""The baseline with DAPO: eps 0.2 / 0.28, dual clip 10, no KL, token-mean, overlong shaping (buffer 512,
factor 1), and dynamic sampling as the original ran it: generation batches of 768 prompts, groups kept on the
raw reward until 256 are gathered (at most 10 generation batches), epochs counted over generation batches (3 per
epoch over 3,000 images, so at most 45 updates in 15 epochs).

`--config=configs/cub_dapo.py:nodynamic` turns dynamic sampling off (256-prompt batches, 165 updates);
`:reward3` and `:nodynamic,reward3` train with the static binary reward (the paper's comparison).
"""

from speciarl_jax.configs.common import static_reward, variants
from speciarl_jax.configs.cub_grpo import get_config as grpo

VARIANTS = ("nodynamic", "reward3")


def get_config(variant: str = ""):
    c = grpo()
    c.name = "cub_dapo"
    c.rl.algorithm = "dapo"
    c.rl.dynamic_sampling = True
    c.rl.max_generation_batches = 10
    c.data.generation_batch_size = 768
    chosen = variants(variant, VARIANTS, "configs/cub_dapo.py")
    if "nodynamic" in chosen:
        c.name += "_nodynamic"
        c.rl.dynamic_sampling = False
        c.data.generation_batch_size = None
    if "reward3" in chosen:
        static_reward(c)
    return c
