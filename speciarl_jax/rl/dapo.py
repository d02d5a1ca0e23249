"""DAPO's two additions to GRPO: a soft penalty for over-long responses, and dynamic sampling.

Dynamic sampling drops the groups whose rollouts all earned the same reward (they give zero advantage, hence no
gradient) and asks the caller for further generation batches until enough informative groups are collected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

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


@dataclasses.dataclass
class FilledBatch:
    """The rows of the kept groups, concatenated over generation batches.

    rows: every field the generator returned, with `group_ids` renumbered 0 .. groups - 1 so that ids from
      different generation batches never collide (rows stay in generation order).
    generation_batches: how many times the generator was called.
    groups_generated / groups_dropped: totals over those calls.
    """

    rows: dict[str, np.ndarray]
    generation_batches: int
    groups_generated: int
    groups_dropped: int


def fill_train_batch(
    generate: Callable[[int], Mapping[str, np.ndarray]],
    train_groups: int,
    *,
    max_generation_batches: int = 10,
    reward_key: str = "rewards",
    group_key: str = "group_ids",
) -> FilledBatch:
    """Call `generate(i)` for i = 0, 1, ... and keep the informative groups until `train_groups` are collected.

    `generate(i)` returns a mapping of arrays that share their leading dimension (rows); it must hold
    `reward_key` [N] and `group_key` [N]. Surplus groups of the last generation batch are dropped, so the
    result holds exactly `train_groups` groups. Raises DynamicSamplingError after `max_generation_batches` calls.
    """
    if train_groups < 1 or max_generation_batches < 1:
        raise ValueError(
            f"train_groups ({train_groups}) and max_generation_batches ({max_generation_batches}) must be >= 1.")
    kept: list[dict[str, np.ndarray]] = []
    groups_kept = groups_generated = groups_dropped = 0
    for call in range(max_generation_batches):
        rows = {k: np.asarray(v) for k, v in generate(call).items()}
        for key in (reward_key, group_key):
            if key not in rows:
                raise KeyError(f"Generation batch {call} has no {key!r} field (fields: {sorted(rows)}).")
        n = len(rows[group_key])
        uneven = [k for k, v in rows.items() if v.ndim == 0 or len(v) != n]
        if uneven:
            raise ValueError(f"Generation batch {call}: fields {uneven} do not have {n} rows like {group_key!r}.")
        _, first_row, group = np.unique(rows[group_key], return_index=True, return_inverse=True)
        keep = informative_groups(rows[reward_key], rows[group_key])
        groups_generated += len(first_row)
        groups_dropped += len(first_row) - len({g for g, k in zip(group, keep) if k})
        # Number the kept groups in order of first appearance, continuing from the earlier batches.
        order = np.argsort(first_row)
        kept_in_order = [g for g in order if keep[first_row[g]]]
        room = train_groups - groups_kept
        chosen = kept_in_order[:room]
        renumber = np.full(len(first_row), -1)
        renumber[chosen] = np.arange(groups_kept, groups_kept + len(chosen))
        selected = renumber[group] >= 0
        if selected.any():
            piece = {k: v[selected] for k, v in rows.items()}
            piece[group_key] = renumber[group][selected]
            kept.append(piece)
        groups_kept += len(chosen)
        if groups_kept == train_groups:
            return FilledBatch(_concatenate(kept), call + 1, groups_generated, groups_dropped)
    raise DynamicSamplingError(
        f"Dynamic sampling found {groups_kept} of the {train_groups} groups with differing rewards that the train "
        f"batch needs after {max_generation_batches} generation batches ({groups_generated} groups generated, "
        f"{groups_dropped} dropped because all their rewards were equal). Allow more generation batches, shrink "
        f"the train batch, or check that the reward can tell rollouts apart."
    )


def _concatenate(pieces: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {}
    for key in pieces[0]:
        shapes = {p[key].shape[1:] for p in pieces}
        if len(shapes) > 1:
            raise ValueError(
                f"Field {key!r} has different per-row shapes across generation batches ({sorted(shapes)}); "
                f"pad every generation batch to the same width."
            )
        out[key] = np.concatenate([p[key] for p in pieces], axis=0)
    return out
