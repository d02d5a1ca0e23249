"""The baseline with Dr.GRPO: no std normalisation, seq-mean-token-sum-norm aggregation (at verl's scale: T_max
= the response length, averaged over micro-batches of 32 rows), no KL.

`--config=configs/cub_drgrpo.py:reward3` trains with the static binary reward instead (the paper's comparison).
"""

from speciarl_jax.configs.common import static_reward, variants
from speciarl_jax.configs.cub_grpo import get_config as grpo


def get_config(variant: str = ""):
    c = grpo()
    c.name = "cub_drgrpo"
    c.rl.algorithm = "drgrpo"
    c.rl.max_response_len = c.rollout.max_new_tokens  # T_max of the aggregation
    c.rl.norm_micro_batch_rows = 32  # the original's ppo_micro_batch_size_per_gpu
    if "reward3" in variants(variant, ("reward3",), "configs/cub_drgrpo.py"):
        static_reward(c)
    return c
