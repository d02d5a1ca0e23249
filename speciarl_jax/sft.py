"""Supervised fine-tuning on (image, answer) pairs: the paper's SFT baseline and the demo's warm start.

The target of each image is `<think>...</think><answer>NAME</answer>` followed by the end token, where NAME is
the label itself or, with probability `sft.levels[k]`, its k-th ancestor in the label hierarchy. The demo uses
this to make a tiny random model answer mostly at the family or generic level, as real LMMs tend to; the
paper's baseline (`levels=(1, 0, 0)`) trains on the labels themselves. The loss is the mean negative
log-likelihood of the target tokens; the vision tower stays frozen, and LoRA or full fine-tuning follows the
run's `lora` settings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm import tqdm

from .data.config import pipeline_from_config
from .models import lora
from .rl.batch import make_rollout_batch
from .rl.logprobs import response_logprobs
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
    def loss_fn(params, frozen, batch):
        model = nnx.merge(graphdef, params, frozen)
        logp, _ = response_logprobs(model, batch, chunk_size)
        mask = batch.response_mask.astype(jnp.float32)
        return -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    @jax.jit
    def step(params, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

    return step


def run_sft(trainer) -> dict[str, float]:
    """Fine-tune `trainer.model` in place for `config.sft.steps` steps; returns the last metrics."""
    from .trainer import synthetic_taxonomy

    config = trainer.config
    cfg = config.sft
    taxonomy = synthetic_taxonomy(config.data.source.to_dict())
    if taxonomy is None and config.verifier.taxonomy_path:
        taxonomy = Taxonomy.from_json(config.verifier.taxonomy_path)
    targets = TargetWriter(cfg.levels, taxonomy, cfg.think, seed=config.seed)
    data_cfg = dict(trainer.train_data_cfg, batch_size=cfg.batch_size, num_epochs=None, seed=config.seed + 1)
    pipeline = pipeline_from_config(data_cfg, trainer.processor)

    model = trainer.model
    graphdef, params, frozen = nnx.split(model, lora.trainable_filter(trainer.lora_config), ...)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(cfg.learning_rate, weight_decay=0.0))
    opt_state = tx.init(params)
    step_fn = make_sft_step(graphdef, tx, trainer.rl_config.logprob_chunk)
    metrics = {}
    bar = tqdm(total=cfg.steps, desc="sft", disable=not trainer.is_main, dynamic_ncols=True)
    for step, batch in zip(range(cfg.steps), pipeline):
        tokens, mask = tokenize_targets(trainer.processor, [targets(label) for label in batch.labels])
        features = trainer.sampler.image_features(model, batch.pixel_values, batch.image_grid_thw)
        rows = make_rollout_batch(model.config, batch.model_inputs(), tokens, mask, np.zeros(len(tokens), np.float32),
                                  num_samples=1, image_features=features, pad_token_id=trainer.processor.pad_token_id)
        params, opt_state, loss, grad_norm = step_fn(params, opt_state, frozen, rows)
        nnx.update(model, params)
        metrics = {"loss": float(loss), "grad_norm": float(grad_norm), "step": step + 1}
        bar.update(1)
        bar.set_postfix_str(f"loss {metrics['loss']:.3f}")
    bar.close()
    # The learner keeps its own copy of the trainable weights; start RL from the fine-tuned ones.
    trainer.learner.state = trainer.learner.state.replace(params=jax.tree.map(jnp.copy, params))
    if trainer.learner.reference is not None:
        trainer.learner.reference = jax.tree.map(jnp.copy, params)
    logging.info("SFT finished: %s", metrics)
    return metrics
