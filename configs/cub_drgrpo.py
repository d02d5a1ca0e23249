"""The baseline with Dr.GRPO: no std normalisation, seq-mean-token-sum-norm aggregation, no KL."""

from configs.cub_grpo import get_config as grpo


def get_config():
    c = grpo()
    c.name = "cub_drgrpo"
    c.rl.algorithm = "drgrpo"
    c.rl.max_response_len = c.rollout.max_new_tokens  # T_max of the aggregation
    return c
