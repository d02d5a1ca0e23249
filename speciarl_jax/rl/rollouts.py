"""One update's rollouts: a prompt batch answered, graded and scored, and the groups of several batches picked
and joined when DAPO's dynamic sampling needs more than one (`dapo.collect_informative`).

The grading and the reward come in as functions, so this module knows nothing of verifiers or processes:

    make = RolloutMaker(sampler, processor, decoding, grade=..., reward=..., overlong=(buffer, factor))
    rollouts = make(model, prompts, rng, timings)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..answering import Decoding, ask
from . import dapo
from .batch import image_token_counts, prompt_image_offsets, table_rows

# (label, answer) pairs and their group ids -> one category per pair.
Grade = Callable[[list[tuple[str, Any]], np.ndarray], list[str]]
# categories and group ids -> one reward per rollout.
Reward = Callable[[Sequence[str], np.ndarray], np.ndarray]


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


@dataclasses.dataclass
class RolloutMaker:
    """Answers a prompt batch `decoding.num_samples` times per prompt, grades and scores every response.

    overlong: DAPO's (buffer, factor) shaping of long responses, or None.
    """

    sampler: Any
    processor: Any
    decoding: Decoding
    grade: Grade
    reward: Reward
    overlong: tuple[int, float] | None = None

    def __call__(self, model, prompts, rng, timings: dict[str, float]) -> Rollouts:
        start = time.perf_counter()
        answers = ask(self.sampler, model, self.processor, prompts.model_inputs(), self.decoding, rng)
        timings["generate"] += answers.generate_seconds
        timings["verify"] += time.perf_counter() - start - answers.generate_seconds  # decoding and parsing
        start = time.perf_counter()
        group_ids = answers.group_ids
        categories = self.grade(answers.pairs(prompts.labels), group_ids)
        scores = np.asarray(self.reward(categories, group_ids), np.float32)
        rewards = scores
        out = answers.output
        if self.overlong:
            buffer, factor = self.overlong
            rewards = rewards + dapo.overlong_penalty(out.lengths, max_len=self.decoding.max_new_tokens, buffer=buffer,
                                                      factor=factor)
        timings["verify"] += time.perf_counter() - start
        return Rollouts(prompts, out.tokens, out.response_mask, out.lengths, out.image_features, answers.texts,
                        list(categories), np.asarray(rewards, np.float32), group_ids, scores)


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


def merge_rollouts(pieces: list[Rollouts], pad_token_id: int, image_token_id: int) -> Rollouts:
    """One batch from several generation batches (dynamic sampling): prompts re-padded on the left to the
    widest, groups renumbered in order, image tables joined (one bucketed table)."""
    if len(pieces) == 1:
        return pieces[0]
    width = max(p.prompts.input_ids.shape[1] for p in pieces)
    left = lambda a, value: np.pad(a, ((0, 0), (width - a.shape[1], 0)), constant_values=value)  # noqa: E731
    prompts = dataclasses.replace(
        pieces[0].prompts,
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
