"""The training config (configs/common.py), read in one place: its checks, and the settings and parts the
trainer is built from. Everything below the trainer takes plain arguments, never the config itself.

    validate(config, jax.process_count())   # every problem at once, before anything loads or compiles
    rl_settings(config, total_steps)        # rl.update.RLConfig
    data_settings(config, "rl" | "sft" | "eval")   # what data.config.pipeline_from_config takes
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from absl import logging

from . import multihost
from .answering import Decoding
from .checkpoint import RunFolder
from .data import PipelineOptions, Subset, source_from_config
from .data.checking import BadExamplesError, find_bad_examples
from .data.synthetic import source_taxonomy
from .models import lora
from .models.qwen2_5_vl.layers import ATTENTION_IMPLEMENTATIONS
from .rewards import best_prediction_rewards, inject_label_noise, static_rewards
from .rl.update import RLConfig, preset
from .sampling import ENGINES
from .tiny_model import TinySpec, make_tiny_checkpoint
from .verifier import Taxonomy, make_verifier

# The config's convention (configs/common.py): None leaves a setting to be derived; 0 turns a budget off. These
# RLConfig fields spell "off" as None.
_OFF_WHEN_ZERO = ("micro_batch_tokens", "overlong_buffer")


class ConfigError(ValueError):
    """A setting that cannot work, found before anything loads; the message names every such setting."""


def generation_batch_size(config) -> int:
    """Prompts per generation batch: data.generation_batch_size, or (None) data.batch_size."""
    return config.data.get("generation_batch_size", 0) or config.data.batch_size


def rl_settings(config, total_steps: int) -> RLConfig:
    overrides = {k: v for k, v in config.rl.to_dict().items() if k != "algorithm"}
    for key in _OFF_WHEN_ZERO:
        if overrides.get(key) == 0:
            overrides[key] = None
    if overrides.get("lr_schedule", "constant") != "constant" and not overrides.get("total_steps"):
        overrides["total_steps"] = total_steps
    return preset(config.rl.algorithm, **overrides)


def lora_settings(config) -> lora.LoRAConfig:
    return lora.LoRAConfig(**config.lora.to_dict())


def rollout_decoding(config) -> Decoding:
    r = config.rollout
    return Decoding(r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.num_samples)


def eval_decoding(config) -> Decoding:
    """Greedy, to eval.max_new_tokens (None: the rollouts' length)."""
    return Decoding.greedy(config.eval.max_new_tokens or config.rollout.max_new_tokens)


def processor_settings(config) -> dict:
    """The image settings of the data section: bounds on pixels, or one fixed size (None: the model's own)."""
    d = config.data
    settings = {k: d[k] for k in ("min_pixels", "max_pixels") if d.get(k) is not None}
    if d.get("image_size") is not None:
        settings["image_size"] = tuple(d.image_size)
    return settings


def _source(section, num_examples: int | None = None) -> dict:
    """A source entry without its unset keys (a data_dir of None or "": TFDS's own default folder)."""
    source = section.source.to_dict() if hasattr(section.source, "to_dict") else dict(section.source)
    source = {k: v for k, v in source.items() if v is not None and v != ""}
    if num_examples is not None:
        source["num_examples"] = num_examples
    return source


# Pipeline options a data section may also set (read_threads, prefetch, ...); the rest data_settings decides.
_PASSED_THROUGH = tuple(f.name for f in dataclasses.fields(PipelineOptions)
                        if f.name not in ("batch_size", "seed", "shuffle", "num_epochs", "remainder", "prompt",
                                          "system_prompt", "pad_to_multiple_of", "process_index", "process_count"))


def data_settings(config, use: str) -> dict:
    """What `data.config.pipeline_from_config` takes to read `use`'s data on this process: "rl" (generation
    batches, repeated for ever; the trainer counts epochs), "sft" (its own batch size, another shuffle) or
    "eval" (the held-out set, once, in order, the last batch padded; every example read, in this process, so
    that every process runs the same number of batches)."""
    d, processes = config.data, jax.process_count()
    question = dict(prompt=d.prompt, system_prompt=d.system_prompt or None, pad_to_multiple_of=d.pad_to_multiple_of)
    if use == "eval":
        e = config.eval
        return dict(question, source=_source(e, e.num_examples), num_epochs=1, shuffle=False, remainder="pad",
                    batch_size=e.batch_size // processes)
    training = dict(question, **{k: d[k] for k in _PASSED_THROUGH if d.get(k) is not None})
    if use == "rl":
        return dict(training, source=_source(d), seed=d.seed, num_epochs=None,
                    batch_size=generation_batch_size(config) // processes)
    if use == "sft":
        return dict(training, source=_source(d), seed=config.seed + 1, num_epochs=None,
                    batch_size=config.sft.batch_size // processes)
    raise ValueError(f"data_settings: use must be 'rl', 'sft' or 'eval', got {use!r}")


def check_examples(config, processor, train_source) -> None:
    """With data.check_images, read every training and held-out example now, each process its share, and
    raise BadExamplesError naming all the bad ones (with data.on_bad_example "skip": log how many the run will
    leave out). A synthetic world draws its images, so it has nothing to check."""
    if not config.data.get("check_images", False):
        return
    sections = [("data.source", config.data.source.kind, lambda: train_source)]
    if config.eval.enabled:
        sections.append(("eval.source", config.eval.source.kind,
                         lambda: source_from_config(data_settings(config, "eval")["source"])))
    for where, kind, make in sections:
        if kind == "synthetic":
            continue
        source = make()
        share = Subset(source, np.arange(jax.process_index(), len(source), jax.process_count()))
        found = find_bad_examples(share, processor, progress=jax.process_index() == 0)
        bad = sorted(tuple(b) for part in multihost.allgather_json(found) for b in part)
        if bad and config.data.get("on_bad_example", "raise") == "raise":
            raise BadExamplesError(bad, source_name=getattr(source, "name", where),
                                   num_examples=len(source), skip_setting="data.on_bad_example")
        if bad:
            logging.warning("%d of %d examples of %s cannot be used and will be skipped (data.on_bad_example="
                            "'skip'), e.g. %s", len(bad), len(source), where, "; ".join(f"{i}: {r}" for i, r in bad[:3]))


def taxonomy(config) -> Taxonomy | None:
    """The label hierarchy: the synthetic world's own, or verifier.taxonomy_path's; None without either."""
    found = source_taxonomy(config.data.source.to_dict())
    if found is None and config.verifier.taxonomy_path:
        found = Taxonomy.from_json(config.verifier.taxonomy_path)
    return found


def build_verifier(config):
    found = None
    if config.verifier.kind == "rule" and not config.verifier.taxonomy_path:
        found = source_taxonomy(config.data.source.to_dict())
        if found is None:
            raise ConfigError("verifier.kind='rule' needs verifier.taxonomy_path unless the data is the synthetic "
                              "world.")
    return make_verifier(config.verifier, taxonomy=found)


def reward_function(config, noise_rng: np.random.Generator):
    """categories, group ids -> rewards: SpeciaRL's best prediction or a static table, after the configured
    label noise (drawn from `noise_rng`, whose state the trainer saves with every checkpoint)."""
    r = config.reward

    def reward(categories, group_ids):
        if r.noise > 0:
            categories = inject_label_noise(categories, r.noise, noise_rng)
        if r.kind == "speciarl":
            return best_prediction_rewards(categories, group_ids, mode=r.mode)
        return static_rewards(categories, r.table)

    return reward


def prepare_model(config, run: RunFolder) -> str:
    """The Hugging Face folder the run starts from; the tiny random model is written on first use."""
    if config.model.tiny:
        if jax.process_index() == 0 and not os.path.exists(os.path.join(run.tiny_model, "config.json")):
            make_tiny_checkpoint(run.tiny_model, TinySpec(**config.model.tiny_spec.to_dict()), seed=config.seed)
        multihost.sync("tiny_model")
        return run.tiny_model
    if not config.model.path:
        raise ConfigError("config.model.path is empty: give a local Hugging Face Qwen2.5-VL folder (or model.tiny=True).")
    return config.model.path


# Settings left unset to be derived; before the config's one convention, 0 (or (0, 0)) spelled that.
_DERIVED_SIZES = {
    "data.generation_batch_size": "data.batch_size", "data.min_pixels": "the model's own bound",
    "data.max_pixels": "the model's own bound", "data.image_size": "each image's own size",
    "eval.num_examples": "the whole split", "eval.max_new_tokens": "rollout.max_new_tokens",
    "rl.mini_batch_size": "every rollout of a step", "rl.micro_batch_size": "no cap on rows",
    "rl.max_response_len": "the batch's response width", "device_memory_gb": "what the device reports",
}


def _unset_spelled_as_zero(config):
    for key, meaning in _DERIVED_SIZES.items():
        section, _, name = key.rpartition(".")
        value = (config[section] if section else config).get(name)
        if value is not None and not (all(value) if isinstance(value, (tuple, list)) else value):
            yield key, meaning, value


def validate(config, process_count: int = 1) -> None:
    """Raise ConfigError naming every setting that cannot work (they would otherwise surface after minutes of
    loading and compilation)."""
    problems = [f"{key} {value!r}: not a size; leave it unset (None) for {meaning}"
                for key, meaning, value in _unset_spelled_as_zero(config)]
    for name, size in (("data.batch_size", config.data.batch_size), ("eval.batch_size", config.eval.batch_size),
                       ("sft.batch_size", config.sft.batch_size)):
        if size % process_count:
            problems.append(f"{name} {size} must be a multiple of the {process_count} processes (each reads an "
                            "equal share of every batch)")
    if config.rollout.num_samples < 1:
        problems.append(f"rollout.num_samples must be >= 1, got {config.rollout.num_samples}")
    if config.rollout.get("engine", "continuous") not in ENGINES:
        problems.append(f"rollout.engine must be one of {ENGINES}, got {config.rollout.engine!r}")
    for key in ("slots", "chunk_steps"):
        if config.rollout.get(key, 1) < 1:
            problems.append(f"rollout.{key} must be >= 1, got {config.rollout[key]}")
    if config.data.batch_size < 1:
        problems.append(f"data.batch_size must be >= 1, got {config.data.batch_size}")
    generation = generation_batch_size(config)
    if generation < config.data.batch_size:
        problems.append(f"data.generation_batch_size {generation} must be at least data.batch_size "
                        f"{config.data.batch_size} (unset: the same)")
    if generation % process_count:
        problems.append(f"data.generation_batch_size {generation} must be a multiple of the {process_count} processes")
    rows = config.data.batch_size * config.rollout.num_samples
    mini = config.rl.get("mini_batch_size") or rows
    if rows % mini:
        problems.append(f"rl.mini_batch_size {mini} does not divide the {rows} rollouts of a step "
                        f"(data.batch_size {config.data.batch_size} x rollout.num_samples {config.rollout.num_samples})")
    micro = config.rl.get("micro_batch_size") or mini
    if mini % micro:
        problems.append(f"rl.micro_batch_size {micro} does not divide rl.mini_batch_size {mini}")
    if config.data.get("on_bad_example", "raise") not in ("raise", "skip"):
        problems.append(f"data.on_bad_example must be 'raise' or 'skip', got {config.data.on_bad_example!r}")
    if config.reward.kind not in ("speciarl", "static"):
        problems.append(f"reward.kind must be 'speciarl' or 'static', got {config.reward.kind!r}")
    if not 0 <= config.reward.noise <= 1:
        problems.append(f"reward.noise must be in [0, 1], got {config.reward.noise}")
    try:
        rl = rl_settings(config, total_steps=1)
    except ValueError as err:
        problems.append(f"rl: {err}")
    else:
        if generation > config.data.batch_size and not rl.dynamic_sampling:
            problems.append(f"data.generation_batch_size {generation} differs from data.batch_size "
                            f"{config.data.batch_size}; only dynamic sampling (rl.dynamic_sampling) draws larger "
                            "generation batches")
        if rl.overlong_buffer and rl.overlong_buffer >= config.rollout.max_new_tokens:
            problems.append(f"rl.overlong_buffer {rl.overlong_buffer} must be below rollout.max_new_tokens "
                            f"{config.rollout.max_new_tokens} (DAPO shapes rewards over the last buffer tokens)")
    if config.model.get("attention", "xla") not in ATTENTION_IMPLEMENTATIONS:
        problems.append(f"model.attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {config.model.attention!r}")
    if config.checkpoint_every < 1:
        problems.append(f"checkpoint_every must be >= 1 (steps), got {config.checkpoint_every}")
    if config.checkpoint_every_seconds < 0:
        problems.append(f"checkpoint_every_seconds must be >= 0 (0: off), got {config.checkpoint_every_seconds}")
    if config.sft.enabled and abs(sum(config.sft.levels) - 1) > 1e-6:
        problems.append(f"sft.levels must sum to 1, got {list(config.sft.levels)}")
    if problems:
        raise ConfigError("Invalid config: " + "; ".join(problems))
