"""The defaults every run shares (docs/method.md, the paper's baseline run). Other configs start here and change
only what differs, so a value lives in one place."""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from speciarl_jax.verifier import VerifierConfig


def base_config() -> ml_collections.ConfigDict:
    """One convention: a setting derived from others (or left to the model or the library) is None, an
    ml_collections placeholder that still takes a typed value on the command line; a count, budget or interval
    of 0 turns its feature off."""
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.about = ""  # printed when the run starts, after what the config says it will do (e.g. how long it takes)
    c.run_dir = placeholder(str)  # None: runs/<name>
    c.resume = "auto"  # "auto": the latest checkpoint in run_dir; "": start fresh (the earlier attempt moves to
    # run_dir/earlier/<time>/); or a checkpoint folder
    c.seed = 0
    c.steps = 0  # 0: epochs x batches per epoch
    c.epochs = 15
    c.log_every = 1
    c.eval_every = 0  # 0: evaluate only at the end (if eval data is configured)
    c.checkpoint_every = 10
    c.checkpoint_every_seconds = 0.0  # > 0: also save when this long has passed since the last save (0: off)
    c.async_checkpoints = True  # write checkpoints in the background while training goes on
    c.keep_checkpoints = 3
    # Multi-host: a process that stops answering the coordination service this long makes all the others exit.
    c.heartbeat_timeout_s = 100
    # Compiled programs are kept here and reused by later runs and resumes (a shared disk serves every host of a
    # pod); "": no cache of the trainer's own (a cache the calling program set up stays in use).
    c.compilation_cache_dir = "~/.cache/speciarl_jax/xla"
    c.compile_warmup_steps = 3  # a step after these that compiles a new program logs a warning
    # Memory per device the start-up check plans against (speciarl_jax.plan); None: what the device reports
    # (CPU: no check).
    c.device_memory_gb = placeholder(float)

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

    c.model = ml_collections.ConfigDict(dict(
        path=placeholder(str),  # a local Hugging Face Qwen2.5-VL folder
        tiny=False,  # True: build the tiny random checkpoint in <run_dir>/tiny_model (tests, demo)
        tiny_spec=ml_collections.ConfigDict(dict(hidden_size=64, num_layers=2, intermediate_size=128, vision_hidden=32,
                                                 vision_intermediate=64)),
        dtype="bfloat16",
        # Attention without a KV cache (update, prefill, vision tower): "xla" (any backend) or "cudnn" (NVIDIA GPUs
        # in bf16: a fused kernel that never holds the [T, T] scores; check it with benchmarks/device_check.py).
        attention="xla",
    ))
    c.lora = ml_collections.ConfigDict(dict(rank=64, alpha=32.0))  # rank 0: full fine-tuning

    c.data = ml_collections.ConfigDict(dict(
        source=ml_collections.ConfigDict(dict(kind="benchmark", name="cub", split="train", data_dir=placeholder(str),
                                              num_examples=3000, subset_seed=42)),
        batch_size=256,  # prompts per step (groups per update)
        # Prompts per generation batch, None: batch_size. Larger only with dynamic sampling, which fills an update's
        # batch_size groups from as many generation batches as it takes; epochs count generation batches (verl).
        generation_batch_size=placeholder(int),
        seed=0,
        prompt="general",
        system_prompt=placeholder(str),  # None: the chat template's default system turn
        pad_to_multiple_of=64,
        worker_count=0,
        # Read and decode every training and held-out image before anything loads, and name all the bad ones
        # at once (a synthetic world has no files to check).
        check_images=True,
        on_bad_example="raise",  # a bad example: "raise" stops the run naming it; "skip" leaves it out, counted
        min_pixels=placeholder(int),  # None: the model's image processor settings
        # CUB's images (at most 500 px a side) keep their native size; larger ones are scaled down. The bound sets
        # the widest prompt, so the compiled programs, the KV cache and the memory plan (speciarl_jax.plan).
        max_pixels=512 * 512,
        image_size=placeholder(tuple),  # (H, W): resize every image, so the vision tower compiles once
    ))
    c.eval = ml_collections.ConfigDict(dict(
        enabled=False,
        source=ml_collections.ConfigDict(dict(kind="benchmark", name="cub", split="test", data_dir=placeholder(str))),
        batch_size=64,
        num_examples=placeholder(int),  # None: the whole split
        max_new_tokens=placeholder(int),  # None: rollout.max_new_tokens
    ))
    c.rollout = ml_collections.ConfigDict(dict(
        num_samples=10, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=2048, prompt_bucket=64,
        # "continuous": the rollout engine (decode slots refilled as rows finish; KV memory = slots x (prompt +
        # max_new_tokens), see speciarl_jax.plan); "static": every row of a step decoded together to the end.
        engine="continuous", slots=256, chunk_steps=16,
        precompile=True,  # the engine compiles every program it can meet in the first step, not when data first needs it
    ))
    c.reward = ml_collections.ConfigDict(dict(
        kind="speciarl",  # "speciarl" (best prediction) or "static"
        mode="all",  # speciarl: "all" or "single"
        table="reward3",  # static: reward3 | scala1 | scala2 | scala3
        noise=0.0,  # label-noise probability (docs/method.md, rewards)
        noise_seed=0,
    ))
    c.verifier = ml_collections.ConfigDict(VerifierConfig().to_dict())
    c.rl = ml_collections.ConfigDict(dict(
        algorithm="grpo",  # grpo | drgrpo | dapo: the preset; the keys below override it
        learning_rate=3e-5,
        weight_decay=0.01,
        max_grad_norm=1.0,
        mini_batch_size=1280,  # rollout rows per optimizer step: 128 prompts x 10, two steps per batch
        micro_batch_size=placeholder(int),  # None: no cap on the rows of a micro-batch beyond micro_batch_tokens
        # Tokens per device in one forward/backward: rows are grouped by response length and each micro-batch is
        # cut to its own width, so the update's cost follows the real tokens. 0: the previous path (every
        # micro-batch spans prompt + max_new_tokens columns, micro_batch_size rows or the whole mini-batch).
        micro_batch_tokens=16384,
        max_response_len=placeholder(int),  # None: the batch's response width (T_max of seq-mean-token-sum-norm)
        # seq-mean-token-sum-norm (Dr.GRPO) at verl's scale: the rows of the original's micro-batches (its
        # ppo_micro_batch_size_per_gpu), whatever ours are; see rl.update.RLConfig.
        norm_micro_batch_rows=32,
        remat=True,
    ))
    c.sft = ml_collections.ConfigDict(dict(
        enabled=False,
        steps=0,
        batch_size=32,
        learning_rate=1e-4,  # the peak of a warm-up + cosine-decay schedule
        warmup_steps=20,
        # Share of answers at each level above the label: 0 = the label, 1 = its parent, 2 = grandparent.
        # The paper's SFT baseline trains on the labels themselves.
        levels=(1.0, 0.0, 0.0),
        think="",  # reasoning text written in the target before the answer ("" = an empty <think></think>)
        train_vision=False,  # also train the vision tower (the paper keeps it frozen)
    ))
    return c


def variants(argument: str, known: tuple[str, ...], config_file: str) -> set[str]:
    """The comma-separated variants after a config file's colon (`--config=configs/cub_dapo.py:a,b`), checked."""
    chosen = {v for v in argument.split(",") if v}
    unknown = sorted(chosen - set(known))
    if unknown:
        raise ValueError(f"{config_file}: unknown variant(s) {unknown} (known: {', '.join(known)})")
    return chosen


def static_reward(c: ml_collections.ConfigDict, table: str = "reward3") -> None:
    """Train with a static reward table instead of SpeciaRL's (the paper's comparisons)."""
    c.name += f"_{table}"
    c.reward.kind, c.reward.table = "static", table


# Where the original read each data set, under one data root (the layout docs/data.md describes): CUB and Cars
# from prepared TFDS data, FGVC-Aircraft variants from its archive (its own train / test lists), Flowers102 and
# Food101 from CoOp's split files, Pets from CoOp's split for training (its test split equals TFDS's).
COOP_FILES = {
    "flowers": ("split_zhou_OxfordFlowers.json", "oxford_flowers/jpg"),
    "food": ("split_zhou_Food101.json", "food-101/images"),
    "pets": ("split_zhou_OxfordPets.json", "oxford_pets/images"),
}


def paper_source(name: str, split: str, root: str = "/data") -> dict:
    """The source entry of one of the six data sets, split "train" or "test", as the original used it."""
    if name == "aircraft":
        return dict(kind="aircraft", root=f"{root}/fgvc-aircraft-2013b", split=split, level="variant")
    if name in COOP_FILES and (split == "train" or name != "pets"):
        split_file, images = COOP_FILES[name]
        return dict(kind="coop", split_file=f"{root}/coop/{split_file}", image_root=f"{root}/coop/{images}",
                    split=split, name=name)
    return dict(kind="benchmark", name=name, split=split, data_dir=f"{root}/tfds")

