"""Group-relative advantages (GRPO, Dr.GRPO): each rollout's reward is compared with its prompt's other rollouts."""

from __future__ import annotations

import numpy as np

STD_EPSILON = 1e-6


def group_advantages(rewards, group_ids, normalize_std: bool, epsilon: float = STD_EPSILON) -> np.ndarray:
    """One advantage per rollout, from the rewards of the rollouts that share its group id.

    normalize_std=True (GRPO): A_i = (r_i - mean_g) / (std_g + epsilon), std the unbiased (n - 1) estimate.
    normalize_std=False (Dr.GRPO): A_i = r_i - mean_g.
    A group of one has no peers to compare with: its mean is taken as 0 and its std as 1, so A = r.

    Args:
      rewards: [N] scalar rewards.
      group_ids: [N] any hashable, sortable ids (ints or strings); rows need not be contiguous per group.

    Returns:
      [N] float32 (computed in float64 on the host).
    """
    rewards = np.asarray(rewards, np.float64)
    group_ids = np.asarray(group_ids)
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards {rewards.shape} and group_ids {group_ids.shape} must both be [N].")
    if rewards.size == 0:
        return np.zeros((0,), np.float32)
    if not np.all(np.isfinite(rewards)):
        raise ValueError(f"rewards hold non-finite values at rows {np.flatnonzero(~np.isfinite(rewards)).tolist()}.")
    _, group = np.unique(group_ids, return_inverse=True)
    count = np.bincount(group).astype(np.float64)
    mean = np.bincount(group, weights=rewards) / count
    spread = np.bincount(group, weights=(rewards - mean[group]) ** 2)
    std = np.sqrt(spread / np.maximum(count - 1, 1))
    singleton = count == 1
    mean = np.where(singleton, 0.0, mean)
    std = np.where(singleton, 1.0, std)
    centred = rewards - mean[group]
    if normalize_std:
        centred = centred / (std[group] + epsilon)
    return centred.astype(np.float32)
