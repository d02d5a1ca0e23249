"""The verifier interface, its configuration, and the screening every verifier shares.

A verifier turns (ground truth, prediction) pairs into categories:

    verifier = make_verifier(config)
    categories = verifier.classify([("golden-winged warbler", "warbler"), ("lion", None)])
    # -> ["less specific", "parse failure"]

`Verifier.classify` does the cheap work itself, in this order, before any backend
(a taxonomy or an LLM) is consulted:

1. a prediction of None (the caller could not parse an answer) is `parse failure`;
2. both strings are normalised (`rewards.normalize_label`); a prediction with nothing left (only symbols) is
   `wrong`, as there is nothing to ask about;
3. a prediction equal to the ground truth is `specific` (the exact-match fast path, `exact_match`);
4. only with `screen=True` (off by default: the original sends every parsed answer to the LLM, and these
   rules change verdicts, e.g. "Black-footed Albatross, a large seabird" becomes `wrong` without a call):
   a prediction over the word or character limit, or one listing several options ("robin or cardinal",
   "a, b"), is `wrong`, and a refusal ("none", "i don't know") is `abstain`;
5. the remaining pairs are de-duplicated and each distinct pair goes to the backend once (the LLM verifier
   answers repeats from its cache).

Subclasses implement `_decide` for step 5 only.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from speciarl_jax.rewards import categories as cat
from speciarl_jax.rewards.parsing import has_several_options, is_refusal, normalize_label

KINDS = ("rule", "openai")
# How the LLM's output is held to the six labels:
#   structured_choice: vLLM >= 0.10.2, `structured_outputs={"choice": [...]}` (the only form since 0.12);
#   guided_choice:     older vLLM, `guided_choice=[...]` (what the paper used);
#   json_schema:       OpenAI-style `response_format` with a JSON schema whose one field is an enum;
#   none:              plain text, parsed leniently.
GUIDED_MODES = ("structured_choice", "guided_choice", "json_schema", "none")


class Pair(NamedTuple):
    """One rollout to grade. `prediction` is None when the answer could not be parsed."""

    ground_truth: str
    prediction: str | None


NormalizedPair = tuple[str, str]  # (ground truth, prediction), both normalised


class VerifierError(RuntimeError):
    """The verifier could not grade a batch; the message says where and why."""


@dataclasses.dataclass
class VerifierConfig:
    """Everything `make_verifier` needs. Plain fields, so an ml_collections ConfigDict maps onto it."""

    kind: str = "openai"  # 'rule' (taxonomy, no LLM) or 'openai' (any OpenAI-compatible endpoint)
    # LLM endpoint. The API key itself never appears in a config: only the name of the
    # environment variable holding it. Empty name = the endpoint needs no key.
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "Qwen/Qwen3-30B-A3B-Instruct-2507"
    api_key_env: str = ""
    # A key of verifier.prompts.PROMPTS, or a prompt file: a .json prompt, or the original's registry as
    # <file>.py:<entry> (see verifier.prompts.load_prompt).
    prompt: str = "standard"
    guided: str = "structured_choice"  # one of GUIDED_MODES
    disable_thinking: bool = True  # sends chat_template_kwargs={"enable_thinking": False} (vLLM)
    max_tokens: int = 16
    # Reliability.
    concurrency: int = 64
    timeout_s: float = 30.0
    max_retries: int = 5
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 8.0
    max_retry_after_s: float = 60.0  # longest server-requested wait honoured per retry
    allow_errors: bool = False  # True: pairs that still fail are scored `verifier error`, not raised
    max_invalid_fraction: float = 0.5  # more invalid replies than this share of a batch = misconfigured endpoint
    # Cache and screening.
    cache_path: str = ""  # SQLite file; empty = no persistent cache
    exact_match: bool = True
    # Decide long answers, several options and refusals without the backend (step 4 above); off: the LLM sees them.
    screen: bool = False
    max_answer_words: int = 12
    max_answer_chars: int = 120
    # Rule verifier.
    taxonomy_path: str = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(key: str, why: str):
            raise ValueError(f"verifier config: {key}={getattr(self, key)!r} {why}")

        if self.kind not in KINDS:
            bad("kind", f"must be one of {KINDS}")
        if self.guided not in GUIDED_MODES:
            bad("guided", f"must be one of {GUIDED_MODES}")
        from speciarl_jax.verifier.prompts import load_prompt  # local: prompts imports nothing of ours

        try:
            load_prompt(self.prompt)
        except (OSError, ValueError, SyntaxError) as err:
            bad("prompt", f"is not usable: {err}")
        for key in ("concurrency", "max_tokens", "max_answer_words", "max_answer_chars"):
            if getattr(self, key) < 1:
                bad(key, "must be at least 1")
        if self.max_retries < 0:
            bad("max_retries", "must be >= 0")
        for key in ("timeout_s", "backoff_max_s"):
            if getattr(self, key) <= 0:
                bad(key, "must be > 0")
        for key in ("backoff_initial_s", "max_retry_after_s"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if not 0.0 <= self.max_invalid_fraction <= 1.0:
            bad("max_invalid_fraction", "must lie in [0, 1]")
        if self.kind == "openai" and not self.base_url:
            bad("base_url", "must be set for kind='openai'")

    def to_dict(self) -> dict[str, Any]:
        """Plain fields, e.g. to seed an ml_collections ConfigDict with the defaults."""
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: Any) -> "VerifierConfig":
        """Builds a config from a VerifierConfig, a dict or an ml_collections ConfigDict."""
        if isinstance(values, cls):
            return values
        if hasattr(values, "to_dict"):
            values = values.to_dict()
        if not isinstance(values, Mapping):
            raise TypeError(f"verifier config must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"verifier config: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


@dataclasses.dataclass
class ClassifyStats:
    """Where each pair of a `classify` call was decided, and what it cost."""

    pairs: int = 0
    parse_failures: int = 0
    empty: int = 0
    exact_matches: int = 0
    too_long: int = 0
    several_options: int = 0
    refusals: int = 0
    duplicates: int = 0  # pairs answered by another identical pair of the same batch
    distinct: int = 0  # distinct pairs that needed the backend (taxonomy, cache or LLM)
    cache_hits: int = 0
    llm_requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    invalid_replies: int = 0
    verifier_errors: int = 0  # pairs scored `verifier error`
    seconds: float = 0.0

    def add(self, other: "ClassifyStats") -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def as_metrics(self, prefix: str = "verifier/") -> dict[str, float]:
        return {prefix + f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}


def as_pair(item: Any) -> Pair:
    if isinstance(item, Pair):
        return item
    ground_truth, prediction = item
    if not isinstance(ground_truth, str):
        raise TypeError(f"ground truth must be a string, got {ground_truth!r}")
    if prediction is not None and not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string or None, got {prediction!r}")
    return Pair(ground_truth, prediction)


class Verifier:
    """Base class: `classify(pairs) -> categories`, one per pair, in order."""

    def __init__(self, config: VerifierConfig):
        self.config = config
        self.last_stats = ClassifyStats()
        self.total_stats = ClassifyStats()

    # --- the public interface -------------------------------------------------------------
    def classify(self, pairs: Iterable[Pair | tuple[str, str | None]]) -> list[str]:
        """Categories for `pairs` of (ground truth, prediction or None), in the same order."""
        start = time.perf_counter()
        stats = ClassifyStats()
        pairs = [as_pair(p) for p in pairs]
        stats.pairs = len(pairs)
        results: list[str | None] = [None] * len(pairs)
        waiting: dict[NormalizedPair, list[int]] = {}
        for index, pair in enumerate(pairs):
            decided, key = self._screen(pair, stats)
            if decided is not None:
                results[index] = decided
            else:
                waiting.setdefault(key, []).append(index)

        stats.distinct = len(waiting)
        stats.duplicates = sum(len(v) - 1 for v in waiting.values())
        if waiting:
            verdicts = self._decide(list(waiting), stats)
            for key, indices in waiting.items():
                for index in indices:
                    results[index] = verdicts[key]
        stats.verifier_errors = sum(r == cat.VERIFIER_ERROR for r in results)
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        self.total_stats.add(stats)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Releases connections and files; the verifier is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- for subclasses ---------------------------------------------------------------------
    def _decide(self, pairs: Sequence[NormalizedPair], stats: ClassifyStats) -> dict[NormalizedPair, str]:
        """Categories for distinct, normalised, screened pairs."""
        raise NotImplementedError

    # --- screening ---------------------------------------------------------------------------
    def _screen(self, pair: Pair, stats: ClassifyStats) -> tuple[str | None, NormalizedPair | None]:
        """Decides a pair without the backend when that is safe; else returns its normalised key."""
        if pair.prediction is None:
            stats.parse_failures += 1
            return cat.PARSE_FAILURE, None
        truth = normalize_label(pair.ground_truth)
        if not truth:
            raise ValueError(f"ground truth {pair.ground_truth!r} is empty after normalisation")
        prediction = normalize_label(pair.prediction)
        if not prediction:
            stats.empty += 1
            return cat.WRONG, None
        if self.config.exact_match and prediction == truth:
            stats.exact_matches += 1
            return cat.SPECIFIC, None
        if not self.config.screen:
            return None, (truth, prediction)
        if (len(prediction.split()) > self.config.max_answer_words
                or len(prediction) > self.config.max_answer_chars):
            stats.too_long += 1
            return cat.WRONG, None
        if has_several_options(pair.prediction):
            stats.several_options += 1
            return cat.WRONG, None
        if is_refusal(prediction):
            stats.refusals += 1
            return cat.ABSTAIN, None
        return None, (truth, prediction)
