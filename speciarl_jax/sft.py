"""Supervised fine-tuning on (image, answer) pairs: the paper's SFT baseline and the demo's warm start.

The target of each image is `<think>...</think><answer>NAME</answer>` followed by the end token, where NAME is
the label itself or, with probability `sft.levels[k]`, its k-th ancestor in the label hierarchy. The demo uses
this to make a tiny random model answer mostly at the family or generic level, as real LMMs tend to; the
paper's baseline (`levels=(1, 0, 0)`) trains on the labels themselves. The loss is the mean negative
log-likelihood of the target tokens. LoRA or full fine-tuning follows the run's `lora` settings; the vision
tower is trained too when `sft.train_vision` is set (the demo's random tower has to learn to see).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm import tqdm

from .data.config import pipeline_from_config
from . import multihost
from .models import lora
from .rl.batch import make_rollout_batch
from .rl.logprobs import response_logprobs
from .stopping import TrainingInterrupted
from .verifier import Taxonomy

TARGET_BUCKET = 16  # target lengths are padded up to a multiple of this


def answer_text(name: str, think: str = "") -> str:
    return f"<think>{think}</think><answer>{name}</answer>"


class TargetWriter:
    """Turns ground-truth labels into target answers at the configured levels of the hierarchy."""

    def __init__(self, levels, taxonomy: Taxonomy | None, think: str, seed: int):
        self.levels = np.asarray(levels, np.float64)
        if len(self.levels) > 1 and self.levels[1:].sum() > 0 and taxonomy is None:
            raise ValueError("sft.levels asks for ancestors of the labels, which needs a label hierarchy "
                             "(the synthetic world, or verifier.taxonomy_path).")
        self.taxonomy = taxonomy
        self.think = think
        self.rng = np.random.default_rng(seed)

    def __call__(self, label: str) -> str:
        level = int(self.rng.choice(len(self.levels), p=self.levels / self.levels.sum()))
        if level == 0:
            return answer_text(label, self.think)
        lineage = self.taxonomy.lineage(label)
        return answer_text(lineage[min(level, len(lineage) - 1)], self.think)


def tokenize_targets(processor, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded target ids [B, R] ending in <|im_end|>, and their mask."""
    end = processor.eos_token_ids[0]
    ids = [processor.tokenizer(t, add_special_tokens=False)["input_ids"] + [end] for t in texts]
    width = -(-max(len(i) for i in ids) // TARGET_BUCKET) * TARGET_BUCKET
    tokens = np.full((len(ids), width), processor.pad_token_id, np.int32)
    mask = np.zeros((len(ids), width), np.int32)
    for row, seq in enumerate(ids):
        tokens[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return tokens, mask


def make_sft_step(graphdef, tx, chunk_size: int):
    """jitted (params, opt_state, frozen, batch, pixel_values, grids) -> (params, opt_state, loss, grad norm).

    The image features are computed inside the loss, so a trainable vision tower gets gradients; `grids`
    (a tuple of (t, h, w)) is static.
    """

    def loss_fn(params, frozen, batch, pixel_values, grids):
        model = nnx.merge(graphdef, params, frozen)
        batch = batch.replace(image_features=model.encode_images(pixel_values, np.asarray(grids)))
        logp, _ = response_logprobs(model, batch, chunk_size)
        mask = batch.response_mask.astype(jnp.float32)
        return -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    @functools.partial(jax.jit, static_argnums=(5,))
    def step(params, opt_state, frozen, batch, pixel_values, grids):
        loss, grads = jax.value_and_grad(loss_fn)(params, frozen, batch, pixel_values, grids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    return step


def sft_filter(lora_config: lora.LoRAConfig, train_vision: bool):
    """What SFT trains: the run's trainable set, plus the whole vision tower when asked."""
    base = lora.trainable_filter(lora_config)
    if not train_vision:
        return base
    return nnx.Any(base, nnx.All(nnx.Param, lambda path, _: path[0] == "visual"))


def run_sft(model, processor, data: dict, *, steps: int, learning_rate: float, warmup_steps: int, levels, think: str,
            train_vision: bool, taxonomy: Taxonomy | None, lora_config: lora.LoRAConfig, logprob_chunk: int,
            seed: int, should_stop=None, progress: bool = True) -> dict[str, float]:
    """Fine-tune `model` in place for `steps` steps on the images `data` names (a `pipeline_from_config`
    config, this process's share of each batch); returns the last metrics.

    Targets name each label or, at `levels`, its ancestors in `taxonomy`. `should_stop()` is asked at every
    step (by every process together) and returns a `stopping.Decision`; SFT is not checkpointed, so a stop
    there means the resumed run starts SFT again.
    """
    targets = TargetWriter(levels, taxonomy, think, seed=seed)
    pipeline = pipeline_from_config(data, processor)
    graphdef, params, frozen = nnx.split(model, sft_filter(lora_config, train_vision), ...)
    # Warm up, then anneal to zero: the last steps at a small rate settle what the noisy middle learned.
    warmup = max(0, min(warmup_steps, steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = tx.init(params)
    step_fn = make_sft_step(graphdef, tx, logprob_chunk)
    metrics = {}
    bar = tqdm(total=steps, desc="sft", disable=not progress, dynamic_ncols=True)
    for step, local in zip(range(steps), pipeline):
        batch = multihost.gather_batch(local, processor.pad_token_id)
        decision = should_stop() if should_stop is not None else None
        if decision is not None and decision.stop:
            raise TrainingInterrupted(f"Stopped by {decision.cause()} during SFT (step {step}); SFT is not "
                                      "checkpointed, so a resumed run starts it again.")
        tokens, mask = tokenize_targets(processor, [targets(label) for label in batch.labels])
        grids = tuple(tuple(int(v) for v in g) for g in batch.image_grid_thw)
        # The features are computed inside the step; the rollout batch only needs a table of the right length.
        tokens_per_image = np.prod(batch.image_grid_thw, axis=1) // model.config.vision.spatial_merge_size**2
        placeholder = np.zeros((int(tokens_per_image.sum()), 1), np.float32)
        rows = make_rollout_batch(model.config, batch.model_inputs(), tokens, mask, np.zeros(len(tokens), np.float32),
                                  num_samples=1, image_features=placeholder, pad_token_id=processor.pad_token_id)
        params, opt_state, loss, grad_norm = step_fn(params, opt_state, frozen, rows, batch.pixel_values, grids)
        nnx.update(model, params)
        metrics = {"loss": float(loss), "grad_norm": float(grad_norm), "step": step + 1}
        bar.update(1)
        bar.set_postfix_str(f"loss {metrics['loss']:.3f}")
    bar.close()
    logging.info("SFT finished: %s", metrics)
    return metrics
