"""The SpeciaRL reward: credit the best prediction a prompt's rollouts managed.

For each group (the n rollouts of one prompt) the best verdict is the lowest rank
among rollouts that got a verdict. Rollouts that reach it earn 1, all others 0,
unless even the best is `wrong`, in which case nobody earns anything. So the
reward asks each rollout to be as specific as the group showed was possible,
without punishing a broad answer when nothing finer was found.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from speciarl_jax.rewards import categories as cat

PARSE_FAILURE_REWARD = -1.0
VERIFIER_ERROR_REWARD = 0.0
MODES = ("all", "single")


def _ranks(categories: Sequence[str]) -> np.ndarray:
    """Rank per rollout, 0 where there is no verdict. Raises on unknown strings."""
    ranks = np.zeros(len(categories), dtype=np.int32)
    for i, category in enumerate(categories):
        cat.check_category(category)
        ranks[i] = cat.RANK.get(category, 0)
    return ranks


def best_prediction_rewards(
    categories: Sequence[str], group_ids: Sequence[Hashable], mode: str = "all"
) -> np.ndarray:
    """SpeciaRL rewards for a batch of rollouts, float32 [N].

    Args:
        categories: [N] category per rollout (the six verdicts, `parse failure` or
            `verifier error`).
        group_ids: [N] which prompt each rollout belongs to; any hashable values, and
            a group's rollouts need not be contiguous.
        mode: `all` rewards every rollout that reaches the group's best rank (the
            paper's setting); `single` rewards only the first one in batch order.

    Rules: parse failure -1; verifier error 0; if the group's best verdict is
    `wrong` (or no rollout has a verdict) every verified rollout gets 0.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if len(categories) != len(group_ids):
        raise ValueError(
                f"categories and group_ids differ in length: {len(categories)} vs {len(group_ids)}")

    ranks = _ranks(categories)
    rewards = np.zeros(len(categories), dtype=np.float32)
    rewards[np.array([c == cat.PARSE_FAILURE for c in categories], dtype=bool)] = PARSE_FAILURE_REWARD

    members: dict[Hashable, list[int]] = {}
    for index, group in enumerate(group_ids):
        members.setdefault(group, []).append(index)

    for indices in members.values():
        verified = [i for i in indices if ranks[i] > 0]
        if not verified:
            continue
        best = min(ranks[i] for i in verified)
        if best == cat.WRONG_RANK:
            continue
        winners = [i for i in verified if ranks[i] == best]  # already in batch order
        if mode == "single":
            winners = winners[:1]
        rewards[winners] = 1.0
    return rewards
