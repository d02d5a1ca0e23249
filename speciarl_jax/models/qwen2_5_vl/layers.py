"""Building blocks shared by the vision tower and the language model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Large negative instead of -inf, so that a fully masked row (a padding query) stays finite.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def linear(in_features, out_features, axes, *, bias, dtype, param_dtype, rngs) -> nnx.Linear:
    """An nnx.Linear whose kernel [in, out] and bias [out] carry logical axis names for sharding."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_metadata(nnx.initializers.normal(0.02), logical_axes=axes),
        bias_init=nnx.with_metadata(nnx.initializers.zeros_init(), logical_axes=(axes[1],)),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in float32, scaled by a learned weight."""

    def __init__(self, dim: int, eps: float, *, param_dtype, axis: str = "norm"):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis,))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


class GatedMLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim, hidden, *, bias, axes=("embed", "mlp"), dtype, param_dtype, rngs):
        kw = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(dim, hidden, axes, **kw)
        self.up_proj = linear(dim, hidden, axes, **kw)
        self.down_proj = linear(hidden, dim, axes[::-1], **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


def attend(q, k, v, mask, scale: float, implementation: str = "xla"):
    """Softmax attention with grouped key/value heads, by `jax.nn.dot_product_attention`.

    q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K; mask: [B or 1, T, S] (True = attend).
    implementation: "xla" (any backend: scores and softmax in float32, a fully masked row stays finite) or
    "cudnn" (NVIDIA GPUs, bf16/fp16: cuDNN's fused kernel, which never holds the [T, S] scores).
    Returns [B, T, H * D].
    """
    b, t, h, d = q.shape
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                       implementation=None if implementation == "xla" else implementation)
    return out.reshape(b, t, h * d)


def attend_cache(q, keys, values, mask, scale: float):
    """`attend` over a KV cache in its own layout: keys [B, K, D, S] (transposed), values [B, K, S, D].

    With these layouts both products are plain matrix products per (row, kv head), q [G, D] @ keys [D, S]
    and probs [G, S] @ values [S, D], reading the cache in place (no transposed copy of it per step).
    """
    b, t, h, d = q.shape
    kv_heads = keys.shape[1]
    if t == 1:  # a decoding step: [G, D] @ [D, S] per (row, kv head), without a query axis in the way
        q = q.reshape(b, kv_heads, h // kv_heads, d)
        scores = jnp.einsum("bkgd,bkds->bkgs", q, keys, preferred_element_type=jnp.float32)
        probs = _masked_softmax(scores, scale, mask[:, :, None], values.dtype)
        return jnp.einsum("bkgs,bksd->bkgd", probs, values).reshape(b, 1, h * d)
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bkds->bkgts", q, keys, preferred_element_type=jnp.float32)
    probs = _masked_softmax(scores, scale, mask[:, None, None], values.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, values)
    return out.reshape(b, t, h * d)


def _masked_softmax(scores, scale: float, mask, dtype):
    """Attention weights from float32 scores: scaled, masked (a fully masked row stays finite), normalised over
    the last axis, cast to the values' dtype."""
    return jax.nn.softmax(jnp.where(mask, scores * scale, _MASKED), axis=-1).astype(dtype)
