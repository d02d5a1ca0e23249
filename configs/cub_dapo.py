"""The baseline with DAPO: eps 0.2 / 0.28, dual clip 10, overlong shaping, and dynamic sampling.

`--config=configs/cub_dapo.py:nodynamic` turns dynamic sampling off (the paper reports both).
"""

from configs.cub_grpo import get_config as grpo


def get_config(variant: str = ""):
    c = grpo()
    c.name = "cub_dapo"
    c.rl.algorithm = "dapo"
    c.rl.dynamic_sampling = True
    if variant == "nodynamic":
        c.name = "cub_dapo_nodynamic"
        c.rl.dynamic_sampling = False
    elif variant:
        raise ValueError(f"configs/cub_dapo.py: unknown variant {variant!r} (only 'nodynamic')")
    return c
