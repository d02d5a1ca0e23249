"""Fixed per-category reward tables, the paper's ablations against SpeciaRL."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from speciarl_jax.rewards import categories as cat
from speciarl_jax.rewards.speciarl import PARSE_FAILURE_REWARD, VERIFIER_ERROR_REWARD


def _table(more_specific, specific, less_specific, generic, abstain, wrong) -> dict[str, float]:
    return {
        cat.MORE_SPECIFIC: more_specific,
        cat.SPECIFIC: specific,
        cat.LESS_SPECIFIC: less_specific,
        cat.GENERIC: generic,
        cat.ABSTAIN: abstain,
        cat.WRONG: wrong,
        cat.PARSE_FAILURE: PARSE_FAILURE_REWARD,
        cat.VERIFIER_ERROR: VERIFIER_ERROR_REWARD,
    }


TABLES: dict[str, dict[str, float]] = {
    # Binary: only naming the object at least as finely as the label counts.
    "reward3": _table(1.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    "scala1": _table(1.0, 1.0, 0.75, 0.5, 0.25, 0.0),
    "scala2": _table(1.0, 1.0, 0.75, 0.5, 0.0, 0.0),
    "scala3": _table(1.0, 1.0, 0.75, 0.0, 0.0, 0.0),
}


def static_rewards(categories: Sequence[str], table: str | Mapping[str, float]) -> np.ndarray:
    """Looks each rollout's category up in a reward table; float32 [N].

    `table` is a name from TABLES or a mapping covering all eight categories.
    """
    if isinstance(table, str):
        if table not in TABLES:
            raise ValueError(f"unknown static reward table {table!r}; choose one of {sorted(TABLES)}")
        values = TABLES[table]
    else:
        missing = set(cat.ALL_CATEGORIES) - set(table)
        if missing:
            raise ValueError(f"reward table lacks categories {sorted(missing)}")
        values = dict(table)
    return np.array([values[cat.check_category(c)] for c in categories], dtype=np.float32)
