"""The paper's experiment in miniature (`benchmarks/paper_in_miniature.py`): the demo's warm start, then short
RL runs with each reward and optimizer, sized so that every run of the comparison fits in an hour on 2 CPU cores.

The warm start is exactly the demo's (`configs/demo.py`: tiny random model, centred synthetic world, SFT with
mixed answer levels, rule verifier); only the RL part and the evaluation are shrunk. The numbers below are the
knobs; the script derives each run's config from `get_config()` (`rl_config`, `sft_config` there). Measured on
the shared 2-core CPU: the warm start about 4 minutes, an RL run about 40 s, the whole comparison about 25 minutes.
"""

from speciarl_jax.configs.demo import get_config as demo_config

RL_STEPS = 40  # RL steps per run
BATCH_SIZE = 16  # prompts per RL step (data.batch_size)
NUM_SAMPLES = 8  # rollouts per prompt
MINI_BATCH_SIZE = BATCH_SIZE * NUM_SAMPLES // 2  # rollout rows per optimizer step: two per batch, as in the paper
EVAL_IMAGES = 192  # held-out test images every run is evaluated on (greedy decoding, rule verifier)
EVAL_BATCH = 64
# DAPO: the overlong shaping acts on the last OVERLONG_BUFFER of the demo's 24 new tokens (a well-formed answer
# is shorter); dynamic sampling draws up to MAX_GENERATION_BATCHES prompt batches per step to collect
# BATCH_SIZE groups whose rewards differ.
OVERLONG_BUFFER = 8
MAX_GENERATION_BATCHES = 6
# The SFT baseline continues from the warm start on the fine labels for as many trained rows (prompt-answer
# pairs with a gradient) as an RL run has rollouts: RL_STEPS x BATCH_SIZE x NUM_SAMPLES / SFT_BATCH_SIZE steps.
SFT_BATCH_SIZE = 32
SFT_LEARNING_RATE = 1e-4  # the peak of sft.py's warm-up + cosine decay; the RL runs use 1e-4 constant
SFT_WARMUP_STEPS = 4
SEEDS = (0, 1, 2)


def sft_baseline_steps(rl_steps: int = RL_STEPS, batch_size: int = BATCH_SIZE, num_samples: int = NUM_SAMPLES,
                       sft_batch_size: int = SFT_BATCH_SIZE) -> int:
    return max(1, round(rl_steps * batch_size * num_samples / sft_batch_size))


def get_config():
    c = demo_config()
    c.name = "miniature"
    c.steps = RL_STEPS
    c.epochs = 0
    c.checkpoint_every = RL_STEPS  # one checkpoint at the end (a killed run restarts from scratch)
    c.keep_checkpoints = 1
    c.data.batch_size = BATCH_SIZE
    c.rollout.num_samples = NUM_SAMPLES
    c.rl.mini_batch_size = MINI_BATCH_SIZE
    c.eval.source.num_images = EVAL_IMAGES
    c.eval.batch_size = EVAL_BATCH
    return c
