"""The verdict categories a verifier can give, and their order of merit.

Six categories are verdicts about a prediction (docs/method.md, answer categories). Two more mark
rollouts that never got a verdict: the answer could not be parsed out of the
policy's text, or the verifier failed on it.
"""
from __future__ import annotations

SPECIFIC = "specific"
MORE_SPECIFIC = "more specific"
LESS_SPECIFIC = "less specific"
GENERIC = "generic"
WRONG = "wrong"
ABSTAIN = "abstain"

PARSE_FAILURE = "parse failure"
VERIFIER_ERROR = "verifier error"

# The six labels a verifier may answer with, in the order prompts list them.
VERDICTS: tuple[str, ...] = (SPECIFIC, MORE_SPECIFIC, LESS_SPECIFIC, GENERIC, WRONG, ABSTAIN)
NO_VERDICT: tuple[str, ...] = (PARSE_FAILURE, VERIFIER_ERROR)
ALL_CATEGORIES: tuple[str, ...] = VERDICTS + NO_VERDICT

# Lower is better. `more specific` and `specific` tie: both name the object correctly.
RANK: dict[str, int] = {
    MORE_SPECIFIC: 1,
    SPECIFIC: 1,
    LESS_SPECIFIC: 2,
    GENERIC: 3,
    ABSTAIN: 4,
    WRONG: 5,
}
WRONG_RANK = RANK[WRONG]

# Verdicts that say the prediction names the object correctly at some level.
CORRECT: frozenset[str] = frozenset({SPECIFIC, MORE_SPECIFIC, LESS_SPECIFIC, GENERIC})


def is_verdict(category: str) -> bool:
    """True for the six verifier labels, False for `parse failure` / `verifier error`."""
    return category in RANK


def check_category(category: str) -> str:
    """Returns `category` unchanged, or raises naming the bad value and the allowed ones."""
    if category not in ALL_CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {list(ALL_CATEGORIES)}")
    return category


def coerce_verdict(reply: str | None) -> str | None:
    """Maps a verifier's raw reply to one of the six labels, or None if it is not one.

    Forgiving about case, surrounding quotes / punctuation / whitespace and `_` or `-`
    in place of the space in two-word labels, but never guesses: "not specific" or a
    sentence that merely mentions a label is not a label.
    """
    if reply is None:
        return None
    text = reply.strip().strip("\"'`.!*").strip().lower()
    text = " ".join(text.replace("_", " ").replace("-", " ").split())
    return text if text in RANK else None
