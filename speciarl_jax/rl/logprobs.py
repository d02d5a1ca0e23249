"""Per-token log-probabilities (and entropies) of the sampled response tokens under the policy.

Only the response positions go through the output layer, in chunks of `chunk_size` positions, and each chunk
is recomputed in the backward pass: with a 152k vocabulary a [B, R, V] float32 logits array would dominate
memory, while a [B, chunk, V] one stays small.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def features_for_rows(input_ids, image_token_id: int, image_features, image_offsets):
    """Image features in the layout the model's `image_features` argument expects for these rows.

    The model fills the k-th image token of the batch (in reading order) with row k of its `image_features`.
    Here each row's image tokens read the shared table from `image_offsets[row]` on, so the result is built by
    a gather of static size [B * T, D] (entries past the last image token are unused).
    """
    is_image = input_ids == image_token_id
    table_row = image_offsets[:, None] + jnp.cumsum(is_image, axis=1) - 1  # [B, T]
    reading_order = jnp.argsort(~is_image.reshape(-1), stable=True)  # image-token positions first
    rows = jnp.clip(table_row.reshape(-1)[reading_order], 0, image_features.shape[0] - 1)
    return image_features[rows]


def chosen_token_logprobs(logits_fn, hidden, targets, chunk_size: int):
    """log p(targets) and the entropy of the predictive distribution, both [B, R] float32.

    hidden: [B, R, D] final hidden states at the positions that predict `targets` [B, R].
    logits_fn: hidden [B, c, D] -> float32 logits [B, c, V].
    """
    b, r, d = hidden.shape
    chunk = max(1, min(chunk_size, r))
    pieces = -(-r // chunk)
    pad = pieces * chunk - r
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, pieces, chunk, d).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, pieces, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(args):
        h, t = args
        logits = logits_fn(h)
        log_norm = jax.nn.logsumexp(logits, axis=-1)
        chosen = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        probs = jax.nn.softmax(logits, axis=-1)
        entropy = log_norm - jnp.sum(probs * logits, axis=-1)
        return chosen - log_norm, entropy

    logp, entropy = jax.lax.map(one_chunk, (hidden, targets))
    unchunk = lambda a: a.swapaxes(0, 1).reshape(b, pieces * chunk)[:, :r]  # noqa: E731
    return unchunk(logp), unchunk(entropy)


def response_logprobs(model, batch, chunk_size: int = 512):
    """Log-probabilities and entropies [B, R] of the last R tokens of each row (see `rl.batch`).

    One forward over prompt + response; the hidden state at column t predicts the token at column t + 1.
    """
    input_ids = batch.input_ids
    t = input_ids.shape[1]
    r = batch.response_len
    features = None
    if batch.image_features is not None:
        features = features_for_rows(input_ids, model.config.image_token_id, batch.image_features, batch.image_offsets)
    out = model(input_ids, batch.attention_mask, position_ids=batch.position_ids, image_features=features,
                compute_logits=False)
    hidden = out.hidden_states[:, t - r - 1 : t - 1]
    return chosen_token_logprobs(model.logits, hidden, input_ids[:, t - r :], chunk_size)
