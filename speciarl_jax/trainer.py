"""The SpeciaRL training loop: prompts -> rollouts -> verdicts -> rewards -> advantages -> update, every step.

    trainer = Trainer(config)      # builds everything and checks the config before anything compiles
    trainer.run()                  # SFT warm start if configured, then RL; resumes from the run folder

One step, as data flows:
  the data pipeline gives B prompts (image + label); the sampler draws n responses for each; the answers are
  parsed and graded by the verifier; the reward (SpeciaRL best prediction, or a static table, with optional
  label noise) scores each rollout within its prompt's group; advantages are group-relative; the learner runs
  the configured mini-batch optimizer steps. DAPO's dynamic sampling draws further prompt batches until B
  groups with differing rewards are collected.

Nothing is lost on failure: a checkpoint is written every `checkpoint_every` steps (and every
`checkpoint_every_seconds`), in the background, and at the end; a verifier outage or SIGTERM (a preempted VM)
saves the last finished step and exits with the command to resume; a NaN loss exits without saving over the
last good checkpoint. With several processes these decisions are taken by all of them together at one point of
every step (`stopping.StopFlags.agree`), so they all save the same step and stop.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from . import buckets, checkpoint, compilation, multihost, parallel, plan
from .checkpoint import Checkpointer
from .data.config import pipeline_from_config
from .data.synthetic import source_taxonomy
from .metric_writers import MetricWriter, summary_line
from .metrics import HEADLINE, summarize
from .models import lora
from .models.qwen2_5_vl import Qwen25VLConfig, from_pretrained, set_attention_implementation
from .models.qwen2_5_vl.layers import ATTENTION_IMPLEMENTATIONS
from .tiny_model import TinySpec, make_tiny_checkpoint
from .processing import Processor
from .rewards import (best_prediction_rewards, inject_label_noise, parse_answer, static_rewards)
from .rl import dapo
from .rl.advantages import group_advantages
from .rl.batch import image_token_counts, make_rollout_batch, prompt_image_offsets, table_rows
from .rl.update import Learner, RLConfig, preset
from .sampling import ENGINES, make_sampler
from .stopping import StopFlags, TrainingInterrupted
from .verifier import VerifierError, make_verifier

# RLConfig fields where the config's 0 stands for None (ml_collections cannot type a None default).
_ZERO_IS_NONE = ("mini_batch_size", "micro_batch_size", "max_response_len", "overlong_buffer", "total_steps",
                 "micro_batch_tokens")


# ---- building blocks from the config ----

def run_dir_of(config) -> str:
    return config.run_dir or os.path.join("runs", config.name)


def rl_config_of(config, total_steps: int) -> RLConfig:
    overrides = {k: v for k, v in config.rl.to_dict().items() if k != "algorithm"}
    for key in _ZERO_IS_NONE:
        if overrides.get(key) == 0:
            overrides[key] = None
    if overrides.get("lr_schedule", "constant") != "constant" and not overrides.get("total_steps"):
        overrides["total_steps"] = total_steps
    return preset(config.rl.algorithm, **overrides)


def lora_config_of(config) -> lora.LoRAConfig:
    return lora.LoRAConfig(**config.lora.to_dict())


def data_config(section, *, extra: dict | None = None) -> dict:
    """A data section as `pipeline_from_config` wants it: empty / zero image settings dropped."""
    cfg = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    for key in ("min_pixels", "max_pixels"):
        if not cfg.get(key):
            cfg.pop(key, None)
    if "image_size" in cfg and not all(cfg["image_size"]):
        cfg.pop("image_size")
    if not cfg["source"].get("data_dir", True):
        cfg["source"] = {k: v for k, v in cfg["source"].items() if k != "data_dir"}
    cfg.update(extra or {})
    return cfg


def processor_settings(data_cfg: dict) -> dict:
    settings = {k: data_cfg[k] for k in ("min_pixels", "max_pixels") if data_cfg.get(k)}
    if data_cfg.get("image_size"):
        settings["image_size"] = tuple(data_cfg["image_size"])
    return settings


def build_verifier(config):
    taxonomy = None
    if config.verifier.kind == "rule" and not config.verifier.taxonomy_path:
        taxonomy = source_taxonomy(config.data.source.to_dict())
        if taxonomy is None:
            raise ValueError("verifier.kind='rule' needs verifier.taxonomy_path unless the data is the synthetic world.")
    return make_verifier(config.verifier, taxonomy=taxonomy)


def prepare_model_dir(config, run_dir: str) -> str:
    if config.model.tiny:
        folder = os.path.join(run_dir, "tiny_model")
        if jax.process_index() == 0 and not os.path.exists(os.path.join(folder, "config.json")):
            make_tiny_checkpoint(folder, TinySpec(**config.model.tiny_spec.to_dict()), seed=config.seed)
        _sync_processes("tiny_model")
        return folder
    if not config.model.path:
        raise ValueError("config.model.path is empty: give a local Hugging Face Qwen2.5-VL folder (or model.tiny=True).")
    return config.model.path


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def validate(config, process_count: int = 1) -> None:
    """Config errors that would otherwise surface after minutes of compilation."""
    problems = []
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
                        f"{config.data.batch_size} (0: the same)")
    if generation % process_count:
        problems.append(f"data.generation_batch_size {generation} must be a multiple of the {process_count} processes")
    rows = config.data.batch_size * config.rollout.num_samples
    mini = config.rl.get("mini_batch_size", 0) or rows
    if rows % mini:
        problems.append(f"rl.mini_batch_size {mini} does not divide the {rows} rollouts of a step "
                        f"(data.batch_size {config.data.batch_size} x rollout.num_samples {config.rollout.num_samples})")
    micro = config.rl.get("micro_batch_size", 0) or mini
    if mini % micro:
        problems.append(f"rl.micro_batch_size {micro} does not divide rl.mini_batch_size {mini}")
    if config.reward.kind not in ("speciarl", "static"):
        problems.append(f"reward.kind must be 'speciarl' or 'static', got {config.reward.kind!r}")
    if not 0 <= config.reward.noise <= 1:
        problems.append(f"reward.noise must be in [0, 1], got {config.reward.noise}")
    try:
        rl = rl_config_of(config, total_steps=1)
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
        raise ValueError("Invalid config: " + "; ".join(problems))


class DataUsedUp(Exception):
    """The configured epochs of training data have all been drawn."""


def generation_batch_size(config) -> int:
    """Prompts per generation batch: data.generation_batch_size, or (0) data.batch_size."""
    return config.data.get("generation_batch_size", 0) or config.data.batch_size


def score(categories, group_ids, reward_cfg, rng: np.random.Generator) -> np.ndarray:
    """One scalar reward per rollout from the verdicts of whole groups."""
    if reward_cfg.noise > 0:
        categories = inject_label_noise(categories, reward_cfg.noise, rng)
    if reward_cfg.kind == "speciarl":
        return best_prediction_rewards(categories, group_ids, mode=reward_cfg.mode)
    return static_rewards(categories, reward_cfg.table)


def batch_report(categories, prefix: str = "") -> dict[str, float]:
    """Category shares and C / S / HM of a list of verdicts."""
    record = summarize(categories, bootstrap=0).to_dict()
    out = {f"{prefix}{k}": record[k] for k in HEADLINE}
    out.update({f"{prefix}share/{k[6:]}": v for k, v in record.items() if k.startswith("share/")})
    return out


@dataclasses.dataclass
class Rollouts:
    """One generation batch: prompts and their graded responses, rows prompt-major."""

    prompts: Any  # data.pipeline.Batch
    tokens: np.ndarray  # [N, L]
    response_mask: np.ndarray  # [N, L]
    lengths: np.ndarray  # [N]
    image_features: Any
    texts: list[str]
    categories: list[str]
    rewards: np.ndarray  # [N] what the advantages use: the reward, plus DAPO's overlong shaping
    group_ids: np.ndarray  # [N]
    scores: np.ndarray  # [N] the reward before the overlong shaping: what dynamic sampling filters groups on


class Trainer:
    """Args: config: the run config (configs/common.py); devices: the devices of the mesh (default: all)."""

    def __init__(self, config, devices=None):
        validate(config, jax.process_count())
        self.config = config
        compilation.enable_persistent_cache(config.get("compilation_cache_dir", ""))
        self.compiles = compilation.CompileCounter()
        self.high_water = buckets.HighWater()
        self.run_dir = run_dir_of(config)
        os.makedirs(self.run_dir, exist_ok=True)
        multihost.check_shared_folder(self.run_dir)
        self.is_main = jax.process_index() == 0
        if not config.resume:  # starting over: an earlier attempt's checkpoints and logs are kept, set aside
            moved = checkpoint.set_aside(self.run_dir) if self.is_main else None
            if moved:
                logging.warning("config.resume='' starts over; the earlier attempt's checkpoints and logs are in %s",
                                moved)
            _sync_processes("set_aside")
        self.mesh = parallel.make_mesh(**config.mesh.to_dict(), devices=devices)

        self.model_dir = prepare_model_dir(config, self.run_dir)
        # Refuse, before any weights load, a config whose rollout or update cannot fit the devices' memory.
        self.memory_plan = plan.check_fits(config, Qwen25VLConfig.from_json(self.model_dir),
                                           len(self.mesh.devices.flat), plan.device_memory_bytes(config))
        # Each process reads its share of every batch; multihost.gather_batch puts the batch back together.
        self.train_data_cfg = data_config(config.data, extra={
            "num_epochs": None, "batch_size": generation_batch_size(config) // jax.process_count()})
        self.train_data_cfg.pop("generation_batch_size", None)
        self.processor = Processor.from_pretrained(self.model_dir, **processor_settings(self.train_data_cfg))
        for key in ("min_pixels", "max_pixels", "image_size"):
            self.train_data_cfg.pop(key, None)
        self.pipeline = pipeline_from_config(self.train_data_cfg, self.processor)
        # As verl counts them: epochs over generation batches. Each update takes at least one, so without
        # `steps` the run ends when the epochs' generation batches are used up, even if fewer updates were made.
        self.generation_budget = None if config.steps else config.epochs * self.pipeline.batches_per_epoch
        self.total_steps = config.steps or self.generation_budget
        if not self.total_steps and config.epochs:  # (steps = epochs = 0 is a run of SFT only)
            raise ValueError(
                f"Invalid config: training would run 0 steps: {config.epochs} epochs of "
                f"{self.pipeline.batches_per_epoch} batches ({len(self.pipeline.source)} training images, "
                f"{generation_batch_size(config)} prompts per generation batch, the last partial batch dropped). "
                "Lower data.batch_size (and rl.mini_batch_size with it), add images, or set steps.")
        self.generation_batches = 0

        self.lora_config = lora_config_of(config)
        self.rl_config = rl_config_of(config, self.total_steps)
        self.sft_dir = os.path.join(self.run_dir, "sft_model")
        self.sft_done = not config.sft.enabled or os.path.exists(os.path.join(self.sft_dir, "config.json"))
        self.build_policy(self.sft_dir if config.sft.enabled and self.sft_done else self.model_dir)
        r = config.rollout
        self.sampler = make_sampler(r.get("engine", "continuous"), slots=r.get("slots", 256),
                                    chunk_steps=r.get("chunk_steps", 16), precompile=r.get("precompile", True),
                                    prompt_bucket=r.prompt_bucket, mesh=self.mesh)
        self.sampler.expect_images(self.processor.max_patches_per_image)
        self.verifier = build_verifier(config)
        self.checkpointer = Checkpointer(os.path.join(self.run_dir, "checkpoints"), keep=config.keep_checkpoints,
                                         async_save=config.async_checkpoints)
        self.stop_flags = StopFlags(config.checkpoint_every_seconds)
        self.writer = MetricWriter(self.run_dir, enabled=self.is_main)
        self.rng = jax.random.key(config.seed)
        self.noise_rng = np.random.default_rng(config.reward.noise_seed)
        self.step = 0
        self.data_iter = None
        if self.is_main:
            with open(os.path.join(self.run_dir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))

    def build_policy(self, folder: str) -> None:
        """Load the policy from a Hugging Face folder, add adapters, and make a learner for it."""
        self.model = from_pretrained(folder, dtype=self.config.model.dtype, mesh=self.mesh)
        set_attention_implementation(self.model, self.config.model.get("attention", "xla"))
        if self.lora_config.enabled:
            lora.apply_lora(self.model, self.lora_config)
        logging.info("policy from %s: %s", folder, lora.count_parameters(self.model, self.lora_config))
        self.learner = Learner(self.model, self.rl_config, trainable=lora.trainable_filter(self.lora_config),
                               mesh=self.mesh)

    def warm_start(self) -> dict:
        """SFT, then save the result as a Hugging Face folder and start RL from it: the reference policy of the
        KL term is then the fine-tuned model, and a resumed run reloads it instead of repeating SFT."""
        from .models.qwen2_5_vl import save_pretrained
        from .sft import run_sft

        metrics = run_sft(self, should_stop=self.stop_flags.agree)
        lora.merge_lora(self.model)
        tmp = self.sft_dir + ".tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(self.model, tmp, copy_from=self.model_dir)  # every process gathers, process 0 writes
        if self.is_main:
            os.replace(tmp, self.sft_dir)  # a folder with config.json means a finished SFT
        _sync_processes("sft_model")
        self.sft_done = True
        self.build_policy(self.sft_dir)
        return metrics

    # ---- checkpoints ----

    def save(self) -> None:
        meta = {
            "step": self.step,
            "optimizer_steps": int(self.learner.state.step),
            "rng": np.asarray(jax.random.key_data(self.rng)).tolist(),
            "noise_rng": self.noise_rng.bit_generator.state,
            "generation_batches": self.generation_batches,
            # One iterator state per process (each reads its own shard).
            "data": multihost.allgather_json(self.data_iter.get_state() if self.data_iter is not None else None),
            "config": json.loads(self.config.to_json_best_effort()),
        }
        state = self.learner.state
        self.checkpointer.save(self.step, params=state.params, opt_state=state.opt_state, meta=meta)
        self.stop_flags.mark_saved()

    def save_and_stop(self, message: str) -> TrainingInterrupted:
        """Save the current step, wait until it is on disk, and return the error to raise (on every process)."""
        self.save()
        self.checkpointer.wait()
        return TrainingInterrupted(f"{message}; step {self.step} is saved. {self._resume_hint()}")

    def restore(self) -> bool:
        """Load the checkpoint named by `config.resume` (or the run folder's latest). True if one was loaded."""
        resume = self.config.resume
        if not resume:
            return False
        checkpointer = self.checkpointer if resume == "auto" else Checkpointer(resume)
        if checkpointer.latest_step() is None:
            if resume != "auto":
                raise FileNotFoundError(f"config.resume={resume!r} holds no finished checkpoint")
            return False
        state = self.learner.state
        params, opt_state, meta = checkpointer.restore(params_like=state.params, opt_state_like=state.opt_state)
        self.learner.set_state(state.replace(params=params, opt_state=opt_state,
                                             step=jax.numpy.asarray(meta["optimizer_steps"], state.step.dtype)))
        self.step = int(meta["step"])
        self.rng = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
        self.noise_rng.bit_generator.state = meta["noise_rng"]
        self.generation_batches = int(meta.get("generation_batches", self.step))
        if self.generation_budget is not None and self.generation_batches >= self.generation_budget:
            self.total_steps = self.step  # a run that used up its data: finished, not to be continued
        states = meta.get("data")
        if states is not None and len(states) != jax.process_count():
            raise ValueError(f"{checkpointer.directory} step {self.step} was written by a run of {len(states)} "
                             f"processes; resume it with the same number (this run has {jax.process_count()}).")
        self._data_state = states[jax.process_index()] if states is not None else None
        logging.info("resumed from %s at step %d", checkpointer.directory, self.step)
        return True

    # ---- one RL step ----

    def generate_and_grade(self, prompts, rng, timings) -> Rollouts:
        cfg = self.config.rollout
        start = time.perf_counter()
        inputs = prompts.model_inputs()
        out = self.sampler.generate(
            self.model, **inputs, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_p=cfg.top_p, top_k=cfg.top_k, num_samples=cfg.num_samples,
            eos_token_ids=self.processor.eos_token_ids, rng=rng, pad_token_id=self.processor.pad_token_id,
        )
        timings["generate"] += time.perf_counter() - start
        start = time.perf_counter()
        texts = self.processor.decode_responses(out.tokens, out.lengths)
        labels = np.repeat(np.asarray(prompts.labels, object), cfg.num_samples)
        group_ids = np.repeat(np.arange(len(prompts.labels)), cfg.num_samples)
        pairs = [(label, parse_answer(t)) for label, t in zip(labels, texts)]
        categories = multihost.classify_split(self.verifier, pairs, group_ids)
        scores = score(categories, group_ids, self.config.reward, self.noise_rng)
        rewards = scores
        if self.rl_config.overlong_buffer:
            rewards = rewards + dapo.overlong_penalty(out.lengths, max_len=cfg.max_new_tokens,
                                                      buffer=self.rl_config.overlong_buffer,
                                                      factor=self.rl_config.overlong_factor)
        timings["verify"] += time.perf_counter() - start
        return Rollouts(prompts, out.tokens, out.response_mask, out.lengths, out.image_features, texts,
                        list(categories), np.asarray(rewards, np.float32), group_ids, np.asarray(scores, np.float32))

    def next_prompts(self):
        """The next global batch of prompts (gathered from every process's share), left-padded to the widest
        prompt batch so far, so the sampler's and the update's programs keep their shapes (see `buckets`).
        Raises DataUsedUp when the configured epochs' generation batches have all been drawn."""
        if self.generation_budget is not None and self.generation_batches >= self.generation_budget:
            raise DataUsedUp(f"the {self.config.epochs} epochs' {self.generation_budget} generation batches are used")
        self.generation_batches += 1
        batch = multihost.gather_batch(next(self.data_iter), self.processor.pad_token_id)
        extra = self.high_water("prompt", batch.input_ids.shape[1]) - batch.input_ids.shape[1]
        left = ((0, 0), (extra, 0))
        return dataclasses.replace(batch, attention_mask=np.pad(batch.attention_mask, left),
                                   input_ids=np.pad(batch.input_ids, left, constant_values=self.processor.pad_token_id))

    def collect(self, rng, timings) -> tuple[list[Rollouts], dict]:
        """Rollouts for one update: one generation batch, or with dynamic sampling as many as it takes to
        gather data.batch_size groups whose rewards differ."""
        if not self.rl_config.dynamic_sampling:
            return [self.generate_and_grade(self.next_prompts(), rng, timings)], {}
        wanted = self.config.data.batch_size
        kept, generated, dropped = [], 0, 0
        for call in range(self.rl_config.max_generation_batches):
            batch = self.generate_and_grade(self.next_prompts(), jax.random.fold_in(rng, call), timings)
            # On the raw reward, as verl filters: the overlong shaping alone does not make a group informative.
            informative = dapo.informative_groups(batch.scores, batch.group_ids)
            groups = [g for g in range(len(batch.prompts.labels)) if informative[g * self.config.rollout.num_samples]]
            generated += len(batch.prompts.labels)
            dropped += len(batch.prompts.labels) - len(groups)
            room = wanted - sum(len(k.prompts.labels) for k in kept)
            if groups[:room]:
                kept.append(select_groups(batch, groups[:room], self.config.rollout.num_samples,
                                          self.model.config.image_token_id))
            if sum(len(k.prompts.labels) for k in kept) == wanted:
                return kept, {"dapo/generation_batches": call + 1, "dapo/dropped_groups": dropped,
                              "dapo/generated_groups": generated}
        raise dapo.DynamicSamplingError(
            f"Dynamic sampling gathered {sum(len(k.prompts.labels) for k in kept)} of {wanted} groups with differing "
            f"rewards in {self.rl_config.max_generation_batches} generation batches ({dropped} of {generated} groups "
            "had identical rewards). Raise rl.max_generation_batches, lower data.batch_size, or check the reward.")

    def update(self, rollouts: Rollouts, timings) -> dict:
        start = time.perf_counter()
        advantages = group_advantages(rollouts.rewards, rollouts.group_ids, self.rl_config.normalize_std)
        batch = make_rollout_batch(
            self.model.config, rollouts.prompts.model_inputs(), rollouts.tokens, rollouts.response_mask, advantages,
            num_samples=self.config.rollout.num_samples, image_features=rollouts.image_features,
            pad_token_id=self.processor.pad_token_id,
        )
        metrics = self.learner.step(batch)
        timings["update"] += time.perf_counter() - start
        return metrics

    def rl_step(self) -> dict:
        timings = collections.defaultdict(float)
        rng = jax.random.fold_in(self.rng, self.step)
        pieces, extra = self.collect(rng, timings)
        rollouts = merge_rollouts(pieces, self.processor.pad_token_id, self.model.config.image_token_id)
        update_metrics = self.update(rollouts, timings)
        categories, rewards, lengths = rollouts.categories, rollouts.rewards, rollouts.lengths
        metrics = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                   "response_length": float(lengths.mean()), **batch_report(categories), **extra}
        metrics.update({f"update/{k}": v for k, v in update_metrics.items()})
        metrics.update({f"verifier/{k}": v for k, v in self.verifier.last_stats.as_metrics().items()})
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        metrics["tokens_per_s"] = float(lengths.sum()) / max(timings["generate"], 1e-9)
        compiled = self.compiles.take()
        metrics.update({"compile/count": compiled["count"], "compile/seconds": compiled["seconds"]})
        if compiled["count"] and self.step + 1 > self.config.get("compile_warmup_steps", 3):
            logging.warning("step %d compiled %d new program(s) in %.1f s: a shape fell outside the buckets seen so "
                            "far (at 7B each compile takes minutes)", self.step + 1, compiled["count"],
                            compiled["seconds"])
        return metrics

    # ---- evaluation ----

    def evaluate(self, prefix: str = "eval/") -> dict:
        cfg = self.config.eval
        if not cfg.enabled:
            return {}
        eval_cfg = data_config(cfg, extra={"num_epochs": 1, "shuffle": False, "remainder": "pad",
                                           "batch_size": cfg.batch_size // jax.process_count(),
                                           "prompt": self.config.data.prompt,
                                           "system_prompt": self.config.data.system_prompt,
                                           "pad_to_multiple_of": self.config.data.pad_to_multiple_of})
        for key in ("enabled", "num_examples", "max_new_tokens"):
            eval_cfg.pop(key, None)
        if cfg.num_examples:
            eval_cfg["source"]["num_examples"] = cfg.num_examples
        categories = []
        for batch in pipeline_from_config(eval_cfg, self.processor):
            batch = multihost.gather_batch(batch, self.processor.pad_token_id)
            out = self.sampler.generate(
                self.model, **batch.model_inputs(), max_new_tokens=cfg.max_new_tokens or self.config.rollout.max_new_tokens,
                temperature=0.0, eos_token_ids=self.processor.eos_token_ids, pad_token_id=self.processor.pad_token_id,
            )
            texts = self.processor.decode_responses(out.tokens, out.lengths)
            pairs = [(label, parse_answer(t)) for label, t in zip(batch.labels, texts)]
            verdicts = multihost.classify_split(self.verifier, pairs, np.arange(len(pairs)))
            categories += [v for v, ok in zip(verdicts, batch.valid) if ok]
        return batch_report(categories, prefix)

    # ---- the loop ----

    def run(self) -> dict:
        self.stop_flags.install()
        try:
            return self._run()
        except Exception as err:
            # Finish a background save before the error ends the process (a NaN loss must not cut short the
            # save of the last good step), unless the error may mean that other processes are gone: their part
            # of the save would never come. The last finished checkpoint stays the one to resume.
            if isinstance(err, TrainingInterrupted) or jax.process_count() == 1:
                self.checkpointer.wait()
            raise
        finally:
            self.stop_flags.uninstall()
            self.writer.close()

    def _resume_hint(self) -> str:
        return f"resume with: python -m speciarl_jax.train --config=<same config> --config.run_dir={self.run_dir}"

    def _run(self) -> dict:
        self._data_state = None
        self.restore()
        if not self.sft_done:
            self.writer.write(0, self.warm_start(), prefix="sft/")
        self.data_iter = self.pipeline.iterator(self._data_state)
        before = self.evaluate() if self.step == 0 else {}
        if before:
            self.writer.write(self.step, before)
        last = {}
        self.compiles.take()  # the first step's count starts here (loading and evaluation compile their own)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="rl", disable=not self.is_main, dynamic_ncols=True)
        while self.step < self.total_steps:
            try:
                metrics = self.rl_step()
            except VerifierError as err:  # raised on every process at the same point (multihost.classify_split)
                raise self.save_and_stop(f"The verifier failed at step {self.step + 1}: {err}") from err
            except DataUsedUp as done:  # every process counts the same batches, so all stop here
                logging.warning("training ends after %d of %d steps: %s (dynamic sampling took more than one "
                                "generation batch for some updates)", self.step, self.total_steps, done)
                break
            loss = metrics.get("update/loss", 0.0)
            # The one point of every step where the processes agree whether to stop, save or go on.
            decision = self.stop_flags.agree(self.step + 1, nonfinite=not np.isfinite(loss))
            if decision.nonfinite:
                raise TrainingInterrupted(f"The loss became {loss} at step {self.step + 1}; nothing was saved over "
                                          f"the last good checkpoint. Lower rl.learning_rate and {self._resume_hint()}")
            self.step += 1
            last = metrics
            if self.step % self.config.log_every == 0:
                self.writer.write(self.step, metrics)
            bar.update(1)
            bar.set_postfix_str(summary_line(metrics, ["reward_mean", "correctness", "specificity", "hm"]))
            if decision.stop:
                raise self.save_and_stop(f"Stopped by {decision.cause()} after step {self.step}")
            if (self.step % self.config.checkpoint_every == 0 or self.step == self.total_steps
                    or decision.checkpoint_due):
                self.save()
            if self.config.eval_every and self.step % self.config.eval_every == 0 and self.step < self.total_steps:
                self.writer.write(self.step, self.evaluate())
        bar.close()
        after = self.evaluate()
        if after:
            self.writer.write(self.step, after)
        self.checkpointer.wait()
        if self.step and self.checkpointer.latest_step() != self.step:
            self.save()
            self.checkpointer.wait()
        return {"train": last, "eval_before": before, "eval_after": after}


def merge_rollouts(pieces: list[Rollouts], pad_token_id: int, image_token_id: int) -> Rollouts:
    """One batch from several generation batches (dynamic sampling): prompts re-padded on the left to the
    widest, groups renumbered in order, image tables joined (one bucketed table)."""
    if len(pieces) == 1:
        return pieces[0]
    width = max(p.prompts.input_ids.shape[1] for p in pieces)
    left = lambda a, value: np.pad(a, ((0, 0), (width - a.shape[1], 0)), constant_values=value)  # noqa: E731
    first = pieces[0].prompts
    prompts = dataclasses.replace(
        first,
        input_ids=np.concatenate([left(p.prompts.input_ids, pad_token_id) for p in pieces]),
        attention_mask=np.concatenate([left(p.prompts.attention_mask, 0) for p in pieces]),
        pixel_values=np.concatenate([p.prompts.pixel_values for p in pieces]),
        image_grid_thw=np.concatenate([p.prompts.image_grid_thw for p in pieces]),
        labels=[label for p in pieces for label in p.prompts.labels],
        sample_ids=[i for p in pieces for i in p.prompts.sample_ids],
        valid=np.concatenate([p.prompts.valid for p in pieces]),
    )
    features = None
    if pieces[0].image_features is not None:  # each table's image rows, in order, without their padding
        starts = np.cumsum([0] + [len(p.image_features) for p in pieces[:-1]])
        used = [image_token_counts(p.prompts.input_ids, image_token_id).sum() for p in pieces]
        features = table_rows([p.image_features for p in pieces],
                              np.concatenate([s + np.arange(n) for s, n in zip(starts, used)]))
    offsets = np.cumsum([0] + [len(p.prompts.labels) for p in pieces[:-1]])
    return Rollouts(
        prompts,
        np.concatenate([p.tokens for p in pieces]),
        np.concatenate([p.response_mask for p in pieces]),
        np.concatenate([p.lengths for p in pieces]),
        features,
        [t for p in pieces for t in p.texts],
        [c for p in pieces for c in p.categories],
        np.concatenate([p.rewards for p in pieces]),
        np.concatenate([p.group_ids + o for p, o in zip(pieces, offsets)]),
        np.concatenate([p.scores for p in pieces]),
    )


def select_groups(batch: Rollouts, groups: list[int], num_samples: int, image_token_id: int) -> Rollouts:
    """The rollouts of the chosen prompt groups (DAPO's dynamic sampling), renumbered from 0."""
    rows = np.concatenate([np.arange(g * num_samples, (g + 1) * num_samples) for g in groups])
    prompts = batch.prompts.select(groups)
    features = None
    if batch.image_features is not None:
        starts = prompt_image_offsets(batch.prompts.input_ids, image_token_id)
        counts = image_token_counts(batch.prompts.input_ids, image_token_id)
        features = table_rows(batch.image_features, np.concatenate([starts[g] + np.arange(counts[g]) for g in groups]))
    return Rollouts(prompts, batch.tokens[rows], batch.response_mask[rows], batch.lengths[rows], features,
                    [batch.texts[r] for r in rows], [batch.categories[r] for r in rows], batch.rewards[rows],
                    np.repeat(np.arange(len(groups)), num_samples), batch.scores[rows])


def before_after_table(before: dict, after: dict, prefix: str = "eval/") -> str:
    """A Markdown table of the held-out category shares and C / S / HM before and after training."""
    keys = sorted(k[len(prefix):] for k in after if k.startswith(prefix + "share/"))
    keys += list(HEADLINE)
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for key in keys:
        b, a = before.get(prefix + key, float("nan")), after.get(prefix + key, float("nan"))
        lines.append(f"| {key} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    return "\n".join(lines)
