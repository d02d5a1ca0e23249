"""Categories, answer parsing and rewards (docs/method.md)."""
from speciarl_jax.rewards.categories import (
    ABSTAIN,
    ALL_CATEGORIES,
    CORRECT,
    GENERIC,
    LESS_SPECIFIC,
    MORE_SPECIFIC,
    NO_VERDICT,
    PARSE_FAILURE,
    RANK,
    SPECIFIC,
    VERDICTS,
    VERIFIER_ERROR,
    WRONG,
    check_category,
    coerce_verdict,
    is_verdict,
)
from speciarl_jax.rewards.noise import LADDER, inject_label_noise
from speciarl_jax.rewards.parsing import (
    REFUSALS,
    has_several_options,
    is_refusal,
    normalize_label,
    parse_answer,
)
from speciarl_jax.rewards.speciarl import (
    PARSE_FAILURE_REWARD,
    VERIFIER_ERROR_REWARD,
    best_prediction_rewards,
)
from speciarl_jax.rewards.static import TABLES, static_rewards

__all__ = [
    "ABSTAIN", "ALL_CATEGORIES", "CORRECT", "GENERIC", "LADDER", "LESS_SPECIFIC", "MORE_SPECIFIC",
    "NO_VERDICT", "PARSE_FAILURE", "PARSE_FAILURE_REWARD", "RANK", "REFUSALS", "SPECIFIC", "TABLES",
    "VERDICTS", "VERIFIER_ERROR", "VERIFIER_ERROR_REWARD", "WRONG", "best_prediction_rewards",
    "check_category", "coerce_verdict", "has_several_options", "inject_label_noise", "is_refusal",
    "is_verdict", "normalize_label", "parse_answer", "static_rewards",
]
