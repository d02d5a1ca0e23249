"""The paper's experiment in miniature (`benchmarks/paper_in_miniature.py`), in a world where the ideal answer is
known, sized so that the whole comparison fits in an hour on 2 CPU cores.

The world is the demo's (`configs/demo.py`: centred shapes, tiny random model, rule verifier) with look-alike
sets: in every family the patterned textures are drawn as one (`LOOKALIKES`), so half of the 30 fine classes
can be seen and half cannot. The ideal policy names the fine class of a perceivable image and the family of a
look-alike one. The warm start first learns to see (SFT on fine labels), then to answer at mixed levels as
LMMs do (SFT with the demo's answer levels); Best-of-64 on it shows what it can find. The numbers below are the
knobs; the script derives each run's config from `get_config()` (`rl_config`, `sft_config` there).
"""

from speciarl_jax.configs.demo import WORLD
from speciarl_jax.configs.demo import get_config as demo_config

# Circles, squares and triangles: striped, dotted and checkered look alike (three-way); stars, hexagons and
# crosses: dotted and checkered (two-way). Perceivable: plain and hollow everywhere, striped in the last three.
LOOKALIKES = tuple((f"striped {f}", f"dotted {f}", f"checkered {f}") for f in ("circle", "square", "triangle")) + \
    tuple((f"dotted {f}", f"checkered {f}") for f in ("star", "hexagon", "cross"))
MINIATURE_WORLD = dict(WORLD, lookalikes=LOOKALIKES)
WARM_FINE_STEPS = 1500  # warm start, phase 1: SFT on the fine labels, to see
WARM_MIXED_STEPS = 500  # phase 2: SFT at the demo's answer levels (label / family / generic), to answer as LMMs do
WARM_MIXED_LEARNING_RATE = 5e-4
BEST_OF = 64  # the paper's premise analysis: Best-of-64 on the warm start

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
    c.data.source = dict(MINIATURE_WORLD, split="train", num_images=4096)
    c.eval.source = dict(MINIATURE_WORLD, split="test", num_images=EVAL_IMAGES)
    c.eval.batch_size = EVAL_BATCH
    return c
