"""Label-noise injection for the robustness ablation (docs/method.md, rewards).

Verdicts sit on a ladder specific -> less specific -> generic -> abstain -> wrong.
With probability p each verified rollout is moved one rung: `specific` (and
`more specific`, which counts as specific) can only move down to `less specific`,
`wrong` only up to `abstain`, and interior rungs go either way with equal chance.
Rollouts without a verdict are left alone.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from speciarl_jax.rewards import categories as cat

LADDER: tuple[str, ...] = (cat.SPECIFIC, cat.LESS_SPECIFIC, cat.GENERIC, cat.ABSTAIN, cat.WRONG)
_RUNG = {name: i for i, name in enumerate(LADDER)}
_RUNG[cat.MORE_SPECIFIC] = 0


def inject_label_noise(
    categories: Sequence[str], p: float, rng: int | np.random.Generator | None = None
) -> list[str]:
    """Returns a noisy copy of `categories`; the input is not modified.

    Args:
        categories: [N] categories.
        p: probability in [0, 1] that a verified rollout is moved one rung.
        rng: a seed or a numpy Generator, so runs can be repeated exactly.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label noise probability must lie in [0, 1], got {p}")
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    n = len(categories)
    # Draw for every rollout, verified or not, so the stream is the same shape each step.
    moves = generator.random(n) < p
    downward = generator.random(n) < 0.5

    noisy = list(categories)
    for i, category in enumerate(categories):
        cat.check_category(category)
        if not moves[i] or category not in _RUNG:
            continue
        rung = _RUNG[category]
        if rung == 0:
            step = 1
        elif rung == len(LADDER) - 1:
            step = -1
        else:
            step = 1 if downward[i] else -1
        noisy[i] = LADDER[rung + step]
    return noisy
