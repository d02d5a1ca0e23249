"""DAPO's two additions to GRPO: a soft penalty for over-long responses, and dynamic sampling.

Dynamic sampling drops the groups whose rollouts all earned the same reward (they give zero advantage, hence no
gradient) and draws further generation batches until enough informative groups are collected. The trainer
trains through `collect_informative`; the batches it draws are `rollouts.Rollouts`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def overlong_penalty(lengths, max_len: int = 2048, buffer: int = 512, factor: float = 1.0) -> np.ndarray:
    """Reward shaping for long responses, to be added to the rewards: [N] float32, each <= 0.

    penalty = min(-(length - (max_len - buffer)) / buffer * factor, 0): zero up to max_len - buffer tokens,
    then falling linearly to -factor at max_len.
    """
    if buffer <= 0 or buffer > max_len:
        raise ValueError(f"The overlong buffer must be in (0, max_len={max_len}], got {buffer}.")
    lengths = np.asarray(lengths, np.float64)
    excess = lengths - (max_len - buffer)
    return np.minimum(-excess / buffer * factor, 0.0).astype(np.float32)


def informative_groups(rewards, group_ids) -> np.ndarray:
    """[N] bool: True for the rollouts of groups whose rewards are not all equal (population std > 0)."""
    rewards = np.asarray(rewards, np.float64)
    group_ids = np.asarray(group_ids)
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {rewards.shape} and group_ids {group_ids.shape} must both be [N].")
    if rewards.size == 0:
        return np.zeros((0,), bool)
    _, group = np.unique(group_ids, return_inverse=True)
    lowest = np.full(group.max() + 1, np.inf)
    highest = np.full(group.max() + 1, -np.inf)
    np.minimum.at(lowest, group, rewards)
    np.maximum.at(highest, group, rewards)
    return (highest > lowest)[group]


class DynamicSamplingError(RuntimeError):
    """Dynamic sampling could not fill the train batch within the allowed number of generation batches."""


def collect_informative(draw: Callable[[int], Any], groups_wanted: int, *, num_samples: int,
                        max_generation_batches: int, select: Callable[[Any, list[int]], Any]) -> tuple[list, dict]:
    """Draw generation batches (`draw(0)`, `draw(1)`, ...) until `groups_wanted` informative groups are kept.

    A batch has `scores` [N] (the raw reward, before any overlong shaping: as verl filters) and its rows are
    grouped prompt-major, `num_samples` per group. `select(batch, groups)` returns the batch restricted to those
    groups. Surplus groups of the last batch are dropped, so the pieces hold exactly `groups_wanted` groups, in
    the order they were drawn. Returns (pieces, metrics); raises DynamicSamplingError after
    `max_generation_batches` batches.
    """
    if groups_wanted < 1 or max_generation_batches < 1:
        raise ValueError(f"groups_wanted ({groups_wanted}) and max_generation_batches ({max_generation_batches}) "
                         "must be >= 1.")
    kept, have, generated, dropped = [], 0, 0, 0
    for call in range(max_generation_batches):
        batch = draw(call)
        scores = np.asarray(batch.scores)
        groups = len(scores) // num_samples
        informative = informative_groups(scores, np.arange(len(scores)) // num_samples)[::num_samples]
        chosen = [g for g in range(groups) if informative[g]]
        generated += groups
        dropped += groups - len(chosen)
        chosen = chosen[: groups_wanted - have]
        if chosen:
            kept.append(select(batch, chosen))
            have += len(chosen)
        if have == groups_wanted:
            return kept, {"dapo/generation_batches": call + 1, "dapo/dropped_groups": dropped,
                          "dapo/generated_groups": generated}
    raise DynamicSamplingError(
        f"Dynamic sampling gathered {have} of {groups_wanted} groups with differing rewards in "
        f"{max_generation_batches} generation batches ({dropped} of {generated} groups had identical rewards). "
        "Raise rl.max_generation_batches, lower data.batch_size, or check that the reward can tell rollouts apart.")
