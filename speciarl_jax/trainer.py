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

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from . import buckets, compilation, multihost, parallel, plan
from .answering import ask
from .checkpoint import Checkpointer, RunFolder
from .data.config import pipeline_from_config
from .metric_writers import MetricWriter, summary_line
from .metrics import batch_report, best_of_n
from .models import lora
from .models.qwen2_5_vl import Qwen25VLConfig, from_pretrained, save_pretrained, set_attention_implementation
from .processing import Processor
from .rl import dapo
from .rl.advantages import group_advantages
from .rl.batch import make_rollout_batch
from .rl.rollouts import RolloutMaker, Rollouts, merge_rollouts, select_groups
from .rl.update import Learner
from .sampling import make_sampler
from .sft import run_sft
from .stopping import StopFlags, TrainingInterrupted
from .training_config import (build_verifier, check_examples, data_settings, eval_decoding, generation_batch_size,
                              lora_settings, prepare_model, processor_settings, reward_function, rl_settings,
                              rollout_decoding, taxonomy, validate)
from .verifier import VerifierError


class DataUsedUp(Exception):
    """The configured epochs of training data have all been drawn."""


class Trainer:
    """Args: config: the run config (configs/common.py); devices: the devices of the mesh (default: all)."""

    def __init__(self, config, devices=None):
        validate(config, jax.process_count())
        self.config = config
        compilation.enable_persistent_cache(config.get("compilation_cache_dir", ""))
        self.compiles = compilation.CompileCounter()
        self.high_water = buckets.HighWater()
        self.folder = RunFolder.of(config)
        self.run_dir = self.folder.path
        os.makedirs(self.run_dir, exist_ok=True)
        multihost.check_shared_folder(self.run_dir)
        self.is_main = jax.process_index() == 0
        if not config.resume:  # starting over: an earlier attempt's checkpoints and logs are kept, set aside
            moved = self.folder.set_aside() if self.is_main else None
            if moved:
                logging.warning("config.resume='' starts over; the earlier attempt's checkpoints and logs are in %s",
                                moved)
            multihost.sync("set_aside")
        self.mesh = parallel.make_mesh(**config.mesh.to_dict(), devices=devices)

        self.model_dir = prepare_model(config, self.folder)
        # Refuse, before any weights load, a config whose rollout or update cannot fit the devices' memory.
        self.memory_plan = plan.check_fits(config, Qwen25VLConfig.from_json(self.model_dir),
                                           len(self.mesh.devices.flat), plan.device_memory_bytes(config))
        self.processor = Processor.from_pretrained(self.model_dir, **processor_settings(config))
        # Each process reads its share of every batch; multihost.gather_batch puts the batch back together.
        self.pipeline = pipeline_from_config(data_settings(config, "rl"), self.processor)
        check_examples(config, self.processor, self.pipeline.source)
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

        self.lora_config = lora_settings(config)
        self.rl_config = rl_settings(config, self.total_steps)
        self.sft_done = not config.sft.enabled or self.folder.has_sft_model()
        self.build_policy(self.folder.sft_model if config.sft.enabled and self.sft_done else self.model_dir)
        r = config.rollout
        self.sampler = make_sampler(r.get("engine", "continuous"), slots=r.get("slots", 256),
                                    chunk_steps=r.get("chunk_steps", 16), precompile=r.get("precompile", True),
                                    prompt_bucket=r.prompt_bucket, mesh=self.mesh)
        self.sampler.expect_images(self.processor.max_patches_per_image)
        self.verifier = build_verifier(config)
        self.noise_rng = np.random.default_rng(config.reward.noise_seed)
        rl = self.rl_config
        self.make_rollouts = RolloutMaker(
            self.sampler, self.processor, rollout_decoding(config), grade=self.grade,
            reward=reward_function(config, self.noise_rng),
            overlong=(rl.overlong_buffer, rl.overlong_factor) if rl.overlong_buffer else None)
        self.checkpointer = Checkpointer(self.folder.checkpoints, keep=config.keep_checkpoints,
                                         async_save=config.async_checkpoints)
        self.stop_flags = StopFlags(config.checkpoint_every_seconds)
        self.writer = MetricWriter(self.run_dir, enabled=self.is_main)
        self.rng = jax.random.key(config.seed)
        self.step = 0
        self.data_iter = None
        if self.is_main:
            self.folder.write_config(config)

    def build_policy(self, folder: str) -> None:
        """Load the policy from a Hugging Face folder, add adapters, and make a learner for it."""
        self.model = from_pretrained(folder, dtype=self.config.model.dtype, mesh=self.mesh)
        set_attention_implementation(self.model, self.config.model.get("attention", "xla"))
        if self.lora_config.enabled:
            lora.apply_lora(self.model, self.lora_config)
        logging.info("policy from %s: %s", folder, lora.count_parameters(self.model, self.lora_config))
        self.learner = Learner(self.model, self.rl_config, trainable=lora.trainable_filter(self.lora_config),
                               mesh=self.mesh)

    def grade(self, pairs, group_ids) -> list[str]:
        """Verdicts for (label, answer) pairs; with several processes each asks the verifier about its share."""
        return multihost.classify_split(self.verifier, pairs, group_ids)

    def warm_start(self) -> dict:
        """SFT, then save the result as a Hugging Face folder and start RL from it: the reference policy of the
        KL term is then the fine-tuned model, and a resumed run reloads it instead of repeating SFT."""
        s = self.config.sft
        metrics = run_sft(
            self.model, self.processor, data_settings(self.config, "sft"), steps=s.steps,
            learning_rate=s.learning_rate, warmup_steps=s.warmup_steps, levels=s.levels, think=s.think,
            train_vision=s.train_vision, taxonomy=taxonomy(self.config), lora_config=self.lora_config,
            logprob_chunk=self.rl_config.logprob_chunk, seed=self.config.seed, should_stop=self.stop_flags.agree,
            progress=self.is_main)
        lora.merge_lora(self.model)
        tmp = self.folder.sft_model + ".tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(self.model, tmp, copy_from=self.model_dir)  # every process gathers, process 0 writes
        if self.is_main:
            os.replace(tmp, self.folder.sft_model)  # a folder with config.json means a finished SFT
        multihost.sync("sft_model")
        self.sft_done = True
        self.build_policy(self.folder.sft_model)
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
        return self.make_rollouts(self.model, prompts, rng, timings)

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
        samples, image_token = self.config.rollout.num_samples, self.model.config.image_token_id
        return dapo.collect_informative(
            lambda call: self.generate_and_grade(self.next_prompts(), jax.random.fold_in(rng, call), timings),
            self.config.data.batch_size, num_samples=samples,
            max_generation_batches=self.rl_config.max_generation_batches,
            select=lambda batch, groups: select_groups(batch, groups, samples, image_token))

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

    def evaluate(self, prefix: str = "eval/", *, subsets=None, best_of: int = 1) -> dict:
        """Answers to the held-out set, graded: category shares and C / S / HM under `prefix`.

        Greedy answers by default; with `best_of` n > 1, n sampled answers per image (the rollouts' sampling)
        and the best of them (`metrics.best_of_n`), the paper's Best-of-N. `subsets` (label -> a subset name)
        adds the same report for each subset of images under `<prefix><name>/`, with its image count.
        """
        if not self.config.eval.enabled:
            return {}
        if best_of > 1:
            decoding = dataclasses.replace(rollout_decoding(self.config), num_samples=best_of)
        else:
            decoding = eval_decoding(self.config)
        rng = jax.random.key(self.config.seed) if best_of > 1 else None
        labels, categories = [], []
        for index, batch in enumerate(pipeline_from_config(data_settings(self.config, "eval"), self.processor)):
            batch = multihost.gather_batch(batch, self.processor.pad_token_id)
            answers = ask(self.sampler, self.model, self.processor, batch.model_inputs(), decoding,
                          None if rng is None else jax.random.fold_in(rng, index))
            verdicts = self.grade(answers.pairs(batch.labels), answers.group_ids)
            for row, (label, ok) in enumerate(zip(batch.labels, batch.valid)):
                if ok:
                    labels.append(label)
                    mine = verdicts[row * best_of:(row + 1) * best_of]
                    categories.append(best_of_n(mine)[0] if best_of > 1 else mine[0])
        report = batch_report(categories, prefix)
        if subsets is not None:
            names = [subsets(label) for label in labels]
            for name in sorted(set(names)):
                chosen = [c for c, n in zip(categories, names) if n == name]
                report.update(batch_report(chosen, f"{prefix}{name}/"))
                report[f"{prefix}{name}/images"] = len(chosen)
        return report

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
