"""The demo: a tiny random Qwen2.5-VL, the synthetic fine-grained world, the rule verifier, CPU, ~10 minutes.

SFT first teaches the answer format, mostly at the family or generic level (as real LMMs answer); then
SpeciaRL GRPO pushes the answers to the finest level the model can get right.
"""

from configs.common import base_config

WORLD = dict(kind="synthetic", seed=0, image_size=(56, 56))


def get_config():
    c = base_config()
    c.name = "demo"
    c.steps = 40
    c.checkpoint_every = 20
    c.model.tiny = True
    c.model.tiny_spec.update(dict(hidden_size=128, intermediate_size=256, num_layers=4, vision_hidden=64,
                                  vision_intermediate=128))
    c.model.dtype = "float32"
    c.lora.rank = 0  # a random model needs all its weights trained
    c.data.source = dict(WORLD, split="train", num_images=4096)
    c.data.batch_size = 16
    c.data.prompt = "brief"
    c.data.pad_to_multiple_of = 32
    c.data.image_size = (56, 56)
    c.eval.enabled = True
    c.eval.source = dict(WORLD, split="test", num_images=256)
    c.eval.batch_size = 64
    c.rollout.num_samples = 8
    c.rollout.max_new_tokens = 24
    c.rollout.prompt_bucket = 32
    c.verifier.kind = "rule"
    c.rl.learning_rate = 1e-4
    c.rl.mini_batch_size = 128
    c.rl.remat = False
    c.sft.enabled = True
    c.sft.steps = 300
    c.sft.batch_size = 32
    c.sft.learning_rate = 2e-3
    c.sft.levels = (0.2, 0.5, 0.3)  # label, family, generic
    c.sft.train_vision = True  # the random vision tower must learn to see shapes and textures
    return c
