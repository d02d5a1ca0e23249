"""Verifiers: (ground truth, prediction) pairs in, categories out.

    from speciarl_jax.verifier import make_verifier
    verifier = make_verifier(config.verifier)        # VerifierConfig, dict or ConfigDict
    categories = verifier.classify(pairs)           # pairs: (ground_truth, prediction or None)
    metrics = verifier.last_stats.as_metrics()

Kinds: 'rule' grades from a taxonomy file with no LLM; 'openai' asks an
OpenAI-compatible endpoint (vLLM in the paper), with a SQLite cache in front.
"""
from __future__ import annotations

from typing import Any

from speciarl_jax.verifier.base import (
    GUIDED_MODES,
    KINDS,
    ClassifyStats,
    Pair,
    Verifier,
    VerifierConfig,
    VerifierError,
)
from speciarl_jax.verifier.cache import VerdictCache, cache_key
from speciarl_jax.verifier.prompts import PROMPTS, build_messages, read_pair
from speciarl_jax.verifier.rules import RuleVerifier, Taxonomy, UnknownLabelError


def make_verifier(config: Any, taxonomy: Taxonomy | None = None) -> Verifier:
    """Builds the verifier a config describes.

    Args:
      config: a VerifierConfig, or a dict / ml_collections ConfigDict with its fields.
      taxonomy: for kind 'rule', a Taxonomy to use instead of loading `taxonomy_path`.
    """
    config = VerifierConfig.from_mapping(config)
    if config.kind == "rule":
        if taxonomy is None:
            if not config.taxonomy_path:
                raise ValueError("verifier config: kind='rule' needs taxonomy_path (or a Taxonomy argument)")
            taxonomy = Taxonomy.from_json(config.taxonomy_path)
        return RuleVerifier(config, taxonomy)
    from speciarl_jax.verifier.openai_verifier import OpenAIVerifier  # imports openai only when needed

    return OpenAIVerifier(config)


__all__ = [
    "GUIDED_MODES", "KINDS", "PROMPTS", "ClassifyStats", "Pair", "RuleVerifier", "Taxonomy",
    "UnknownLabelError", "VerdictCache", "Verifier", "VerifierConfig", "VerifierError", "build_messages",
    "cache_key", "make_verifier", "read_pair",
]
