"""Turning next-token logits into a sampling distribution: temperature, top-k, top-p, greedy."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sampling_logits(logits, params: SamplingParams):
    """Logits [N, V] of the distribution actually sampled from; filtered tokens get -inf."""
    logits = logits.astype(jnp.float32) / params.temperature
    if params.top_k:
        kth = jax.lax.top_k(logits, params.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, _NEG_INF, logits)
    if params.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token when the mass of the tokens ranked above it is still below top_p (the first always stays).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < params.top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, _NEG_INF)
    return logits


def row_keys(rng, rows, steps):
    """One key per (row, token index): the draw of a row's t-th token depends on nothing else, so the
    rollouts of a call do not depend on how its rows were batched, placed in slots or split over devices."""
    return jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(rng, r), t))(rows, steps)


def choose_tokens(logits, keys, params: SamplingParams):
    """Pick one token per row, row i drawing with keys[i] (see `row_keys`). Returns (tokens [N], log-prob under
    the sampling distribution [N], log-prob under the raw policy [N])."""
    policy_logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if params.greedy:
        tokens = jnp.argmax(logits, axis=-1)
        sample_logp = jnp.zeros(tokens.shape, jnp.float32)  # a deterministic choice has probability 1
    else:
        filtered = sampling_logits(logits, params)
        tokens = jax.vmap(jax.random.categorical)(keys, filtered)
        sample_logp = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), tokens[:, None], axis=-1)[:, 0]
    raw = jnp.take_along_axis(policy_logp, tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), sample_logp, raw
