"""Getting the label out of a policy's text, and the one normalisation used everywhere.

The policy is asked to answer inside `<answer> </answer>` (docs/method.md, the policy's answer). The same
`normalize_label` is applied to ground truths and predictions before they are
compared, sent to a verifier or used as a cache key, so that "Golden-winged Warbler."
and "golden-winged  warbler" are one and the same label.
"""
from __future__ import annotations

import re
import unicodedata

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def parse_answer(text: str | None) -> str | None:
    """The stripped contents of the first `<answer>...</answer>`, or None.

    None means a parse failure: no tag pair, or only whitespace inside it.
    """
    if not text:
        return None
    match = _ANSWER.search(text)
    if match is None:
        return None
    answer = match.group(1).strip()
    return answer or None


def _keep_or_space(char: str) -> str:
    if char.isalnum() or char.isspace() or char == "-":
        return char
    # Unicode dashes (en dash, minus sign, ...) are the same separator as "-".
    if unicodedata.category(char) == "Pd":
        return "-"
    return " "


def normalize_label(text: str) -> str:
    """Lower-case letters, digits and dashes, separated by single spaces.

    Every other character (punctuation, quotes, brackets, underscores, emoji) becomes
    a space; whitespace runs collapse to one space; the ends are stripped. Text is
    first put in NFKC form so that visually identical strings compare equal.
    """
    text = unicodedata.normalize("NFKC", text)
    kept = "".join(_keep_or_space(c) for c in text)
    return " ".join(kept.lower().split())


# Normalised answers that decline to name anything. The policy prompt asks for the
# word `None` to abstain; the rest are common ways models say the same thing.
REFUSALS: frozenset[str] = frozenset({
    "none", "none of the above", "no answer", "nothing", "unknown", "unsure", "not sure",
    "i am not sure", "i m not sure", "unclear", "no idea", "n a", "na", "cannot tell",
    "can t tell", "cannot determine", "can t determine", "cannot be determined",
    "i don t know", "i dont know", "i do not know", "don t know", "dont know",
    "i cannot tell", "i can t tell", "i cannot identify", "i can t identify",
    "not identifiable", "unidentifiable", "abstain", "pass",
})


def is_refusal(normalized: str) -> bool:
    """True if an already normalised answer is a refusal such as `none` or `i don t know`."""
    return normalized in REFUSALS


_OPTION_SEPARATOR = re.compile(r"[,;|\n]|\s(?:or|and/or|vs\.?|versus)\s", re.IGNORECASE)


def has_several_options(raw_answer: str) -> bool:
    """True if the raw answer hedges between labels: "robin or cardinal", "a, b", "a; b".

    Looks at the raw text because normalisation removes commas. "and" is not a
    separator on purpose: many real labels contain it ("Black-and-white Warbler",
    "fish and chips"), and neither is "/" ("F/A-18").
    """
    parts = [p for p in _OPTION_SEPARATOR.split(raw_answer.strip()) if p and p.strip(" .-")]
    return len(parts) > 1
