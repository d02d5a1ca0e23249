"""Per-token policy-gradient losses of the GRPO family, their aggregation, and KL estimators.

Shapes: `logp`, `old_logp`, `ref_logp`, `mask`: [B, T] over the response tokens; advantages [B] (one per
rollout, broadcast over its tokens) or [B, T]. Everything is jnp and jit-able.
"""

from __future__ import annotations

import jax.numpy as jnp

AGGREGATION_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("kl", "abs", "mse", "low_var_kl")
_KL_ALIASES = {"k1": "kl", "k2": "mse", "k3": "low_var_kl"}
LOG_RATIO_BOUND = 20.0  # exp(20) ~ 5e8: keeps one wild token from overflowing the ratio
LOW_VAR_KL_BOUND = 10.0


def _check_mode(mode: str, max_len) -> None:
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"Unknown loss aggregation mode {mode!r}; choose one of {AGGREGATION_MODES}.")
    if mode == "seq-mean-token-sum-norm" and (max_len is None or (isinstance(max_len, (int, float)) and max_len <= 0)):
        raise ValueError("Aggregation 'seq-mean-token-sum-norm' needs max_len (the configured maximum response length)")


def aggregate(values, mask, mode: str, max_len: int | None = None):
    """Reduce per-token values [B, T] over the tokens where mask is 1 to a scalar.

    token-mean:               sum(v m) / sum(m)
    seq-mean-token-sum:       mean over rows of sum_t v m
    seq-mean-token-mean:      mean over rows of (sum_t v m / sum_t m)
    seq-mean-token-sum-norm:  sum(v m) / max_len  (a sum over the batch divided by the maximum response length)

    Rows whose mask is all zero (padding rows) are left out of the row means, and an all-zero mask gives 0
    rather than NaN.
    """
    _check_mode(mode, max_len)
    values = jnp.asarray(values, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    masked = values * mask
    if mode == "token-mean":
        return masked.sum() / jnp.maximum(mask.sum(), 1.0)
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / max_len
    tokens = mask.sum(axis=-1)
    live = (tokens > 0).astype(jnp.float32)
    per_row = masked.sum(axis=-1)
    if mode == "seq-mean-token-mean":
        per_row = per_row / jnp.maximum(tokens, 1.0)
    return (per_row * live).sum() / jnp.maximum(live.sum(), 1.0)


def aggregation_share(mask, total_tokens, total_rows, num_parts, mode: str):
    """Weight of one part (micro-batch) of a larger batch, so that sum_parts share * aggregate(part) equals
    aggregate(whole batch) for the three mean modes.

    total_tokens / total_rows: the whole batch's masked tokens and non-empty rows. For
    `seq-mean-token-sum-norm` the share is 1 / num_parts, whatever the part: the reference implementation sums
    each of its micro-batches over the maximum length and averages over them, so num_parts counts the
    reference's micro-batches (`update.norm_parts`), not ours.
    """
    mask = jnp.asarray(mask, jnp.float32)
    if mode == "token-mean":
        return mask.sum() / jnp.maximum(total_tokens, 1.0)
    if mode == "seq-mean-token-sum-norm":
        return 1.0 / jnp.asarray(num_parts, jnp.float32)
    rows = (mask.sum(axis=-1) > 0).sum().astype(jnp.float32)
    return rows / jnp.maximum(total_rows, 1.0)


def _token_mean(values, mask):
    return aggregate(values, mask, "token-mean")


def policy_loss(logp, old_logp, advantages, mask, eps_low: float, eps_high: float, clip_c: float | None,
                mode: str, max_len: int | None = None):
    """Clipped-ratio policy loss with a separate lower / upper clip and the dual clip for negative advantages.

    ratio = exp(clip(logp - old_logp, -20, 20))
    loss_t = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))
    where A < 0 and clip_c is set: loss_t = min(loss_t, -A clip_c)   (dual clip, clip_c > 1)

    Returns (loss, metrics): the aggregated loss and token-mean diagnostics:
      clip_fraction: tokens where the clipped branch is the larger one (the ratio clip is active);
      dual_clip_fraction: tokens with A < 0 where the dual clip bound is active;
      approx_kl: mean of old_logp - logp (the k1 estimate of KL(old || new));
      ratio_mean: mean ratio.
    """
    if clip_c is not None and clip_c <= 1.0:
        raise ValueError(f"The dual-clip constant clip_c must be > 1 (or None to disable it), got {clip_c}.")
    logp = jnp.asarray(logp, jnp.float32)
    old_logp = jnp.asarray(old_logp, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.ndim == 1:
        adv = adv[:, None]
    log_ratio = jnp.clip(logp - old_logp, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = jnp.maximum(unclipped, clipped)
    metrics = {
        "clip_fraction": _token_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": _token_mean(-log_ratio, mask),
        "ratio_mean": _token_mean(ratio, mask),
    }
    if clip_c is not None:
        bound = -adv * clip_c
        negative = jnp.broadcast_to(adv < 0, per_token.shape)
        metrics["dual_clip_fraction"] = _token_mean((negative & (per_token > bound)).astype(jnp.float32), mask)
        per_token = jnp.where(negative, jnp.minimum(per_token, bound), per_token)
    else:
        metrics["dual_clip_fraction"] = jnp.float32(0.0)
    return aggregate(per_token, mask, mode, max_len), metrics


def canonical_kl_kind(kind: str) -> str:
    """The estimator's name with the k1 / k2 / k3 aliases resolved; raises on an unknown name."""
    name = _KL_ALIASES.get(kind, kind)
    if name not in KL_KINDS:
        raise ValueError(f"Unknown KL estimator {kind!r}; choose one of {KL_KINDS} (or k1 / k2 / k3).")
    return name


def kl_penalty(logp, ref_logp, kind: str):
    """Per-token estimate [B, T] of KL(policy || reference) from sampled-token log-probabilities.

    kl (k1):         logp - ref_logp
    abs:             |logp - ref_logp|
    mse (k2):        (logp - ref_logp)^2 / 2
    low_var_kl (k3): d = clip(ref_logp - logp, -20, 20); clip(exp(d) - d - 1, -10, 10)
    """
    kind = canonical_kl_kind(kind)
    logp = jnp.asarray(logp, jnp.float32)
    ref_logp = jnp.asarray(ref_logp, jnp.float32)
    diff = logp - ref_logp
    if kind == "kl":
        return diff
    if kind == "abs":
        return jnp.abs(diff)
    if kind == "mse":
        return 0.5 * diff * diff
    d = jnp.clip(-diff, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)  # low_var_kl
    return jnp.clip(jnp.exp(d) - d - 1.0, -LOW_VAR_KL_BOUND, LOW_VAR_KL_BOUND)
