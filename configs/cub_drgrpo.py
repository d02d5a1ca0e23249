"""The baseline with Dr.GRPO: no std normalisation, seq-mean-token-sum-norm aggregation (at verl's scale: T_max
= the response length, averaged over micro-batches of 32 rows), no KL.

`--config=configs/cub_drgrpo.py:reward3` trains with the static binary reward instead (the paper's comparison).
"""

from configs.cub_grpo import get_config as grpo


def get_config(variant: str = ""):
    c = grpo()
    c.name = "cub_drgrpo"
    c.rl.algorithm = "drgrpo"
    c.rl.max_response_len = c.rollout.max_new_tokens  # T_max of the aggregation
    c.rl.norm_micro_batch_rows = 32  # the original's ppo_micro_batch_size_per_gpu
    if variant == "reward3":
        c.name += "_reward3"
        c.reward.kind, c.reward.table = "static", "reward3"
    elif variant:
        raise ValueError(f"configs/cub_drgrpo.py: unknown variant {variant!r} (only 'reward3')")
    return c
