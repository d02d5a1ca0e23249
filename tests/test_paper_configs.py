"""Every paper config resolves to the values of the original SpeciaRL launch script it reproduces.

The expected values are the original scripts' settings (verl's defaults where a script leaves one out), written
out here by hand, one row per run; `updates` is the number of RL steps the original makes: epochs x generation
batches per epoch (floor(images / generation batch), verl drops the last partial batch).
"""

import importlib

import pytest

from speciarl_jax.training_config import generation_batch_size, rl_settings, validate

# The baseline script (main_cub/..._grpo_bestpred.sh).
BASE = dict(lr=3e-5, prompts=256, n=10, rows_per_optimizer_step=1280, epochs=15, response=2048, images=3000,
            normalize_std=True, loss="token-mean", kl=0.01, eps=(0.2, 0.2), dual_clip=3.0, reward=("speciarl", "all"),
            noise=0.0, overlong=None, dynamic=False, generation=256, max_generation_batches=10, updates=165)
DAPO = dict(kl=0.0, eps=(0.2, 0.28), dual_clip=10.0, overlong=(512, 1.0))
RUNS = {
    "cub_grpo": {},
    "cub_drgrpo": dict(normalize_std=False, loss="seq-mean-token-sum-norm", kl=0.0),
    "cub_drgrpo:reward3": dict(normalize_std=False, loss="seq-mean-token-sum-norm", kl=0.0,
                               reward=("static", "reward3")),
    "cub_dapo": dict(DAPO, dynamic=True, generation=768, updates=45),
    "cub_dapo:nodynamic": dict(DAPO),
    "cub_dapo:reward3": dict(DAPO, dynamic=True, generation=768, updates=45, reward=("static", "reward3")),
    "cub_dapo:nodynamic,reward3": dict(DAPO, reward=("static", "reward3")),
    "ablation:static:reward3": dict(reward=("static", "reward3")),
    "ablation:static:scala1": dict(reward=("static", "scala1")),
    "ablation:static:scala2": dict(reward=("static", "scala2")),
    "ablation:static:scala3": dict(reward=("static", "scala3")),
    "ablation:samples:5": dict(n=5, rows_per_optimizer_step=640),
    "ablation:samples:15": dict(n=15, rows_per_optimizer_step=1920),
    "ablation:images:128": dict(images=128, prompts=128, generation=128, updates=15),
    "ablation:images:1024": dict(images=1024, updates=60),
    "ablation:images:2048": dict(images=2048, updates=120),
    "ablation:noise:0.05": dict(noise=0.05, images=1024, updates=60),
    "ablation:noise:0.1": dict(noise=0.1, images=1024, updates=60),
    "ablation:noise:0.25": dict(noise=0.25, images=1024, updates=60),
    "ablation:train:cub": dict(prompts=512, n=5, lr=3e-6, rows_per_optimizer_step=640, generation=512, updates=75),
    "ablation:train:aircraft": {},
    "ablation:train:flowers": {},
    "ablation:train:food": {},
    "ablation:train:pets": dict(images=2944, updates=165),  # CoOp's Pets train split, whole
    "ablation:mixed": {},
    "ablation:single": dict(reward=("speciarl", "single")),
}
# The original's training split of each data set of the variation runs (source kind, split).
TRAIN_SPLITS = {"aircraft": ("aircraft", "train"), "flowers": ("coop", "train"), "food": ("coop", "train"),
                "pets": ("coop", "train"), "cub": ("benchmark", "train")}


def load(spec: str):
    module, _, argument = spec.partition(":")
    get_config = importlib.import_module(f"speciarl_jax.configs.{module}").get_config
    return get_config(argument) if argument else get_config()


@pytest.mark.parametrize("spec", sorted(RUNS))
def test_config_matches_the_original_script(spec):
    want = {**BASE, **RUNS[spec]}
    c = load(spec)
    validate(c)
    rl = rl_settings(c, total_steps=want["updates"])
    source = c.data.source.to_dict() if hasattr(c.data.source, "to_dict") else dict(c.data.source)
    images = source.get("num_examples") or (500 * len(source["parts"]) if source["kind"] == "mixed" else None)
    generation = generation_batch_size(c)
    got = dict(
        lr=rl.learning_rate, prompts=c.data.batch_size, n=c.rollout.num_samples,
        rows_per_optimizer_step=rl.mini_batch_size, epochs=c.epochs, response=c.rollout.max_new_tokens,
        images=images or want["images"], normalize_std=rl.normalize_std, loss=rl.loss_agg_mode, kl=rl.kl_coef,
        eps=(rl.eps_low, rl.eps_high), dual_clip=rl.clip_c,
        reward=(c.reward.kind, c.reward.mode if c.reward.kind == "speciarl" else c.reward.table),
        noise=c.reward.noise, overlong=(rl.overlong_buffer, rl.overlong_factor) if rl.overlong_buffer else None,
        dynamic=rl.dynamic_sampling, generation=generation, max_generation_batches=rl.max_generation_batches,
        updates=c.epochs * ((images or want["images"]) // generation),
    )
    assert got == want
    # The constants every run shares: the optimizer and LoRA as the scripts leave them, Dr.GRPO's scale.
    assert (rl.weight_decay, rl.max_grad_norm, rl.lr_schedule, rl.warmup_steps, rl.ppo_epochs) == (0.01, 1.0,
                                                                                                      "constant", 0, 1)
    assert (c.lora.rank, c.lora.alpha, c.rollout.temperature, c.rollout.top_p) == (64, 32.0, 1.0, 1.0)
    assert rl.norm_micro_batch_rows == 32 and (rl.max_response_len or 2048) == 2048
    assert c.data.prompt == "general" and source.get("subset_seed", 42) == 42
    if spec.startswith("ablation:train:"):
        name = spec.split(":")[2]
        assert (source["kind"], source["split"]) == TRAIN_SPLITS[name]
    if spec == "ablation:mixed":
        assert [(p["kind"], p["split"]) for p in source["parts"]] == [
            TRAIN_SPLITS["cub"], TRAIN_SPLITS["aircraft"], TRAIN_SPLITS["flowers"], TRAIN_SPLITS["food"],
            TRAIN_SPLITS["pets"], ("benchmark", "train")]


def test_the_data_root_reaches_every_source():
    for spec in ("ablation:mixed:/mnt/d", "ablation:train:flowers:/mnt/d"):
        c = load(spec)
        source = c.data.source.to_dict() if hasattr(c.data.source, "to_dict") else dict(c.data.source)
        paths = [v for part in source.get("parts", [source]) for k, v in part.items()
                 if k in ("data_dir", "root", "split_file", "image_root")]
        paths.append(c.eval.source.data_dir)
        assert paths and all(p.startswith("/mnt/d/") for p in paths), paths
        assert "/" not in c.name

