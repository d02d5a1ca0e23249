"""The Qwen2 decoder of Qwen2.5-VL: grouped-query attention with q/k/v bias, M-RoPE, SwiGLU, RMSNorm."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .config import TextConfig
from .layers import GatedMLP, RMSNorm, attend, attend_cache, linear
from .rope import apply_rotary


class SlotView(NamedTuple):
    """Where the rows of a one-token decoding step live in shared slot buffers (the rollout engine's cache).

    The R rows are the first `active` of each of `shards` equal parts of the S buffer rows (each part stays on
    its own devices); row r writes its new key and value at column `columns[r]` (dropped past the end) and
    attends over the first `window` columns where the step's mask allows.
    """

    shards: int
    active: int
    window: int
    columns: jax.Array

    def slots(self, num_slots: int):
        """Buffer rows of the view's rows [R]."""
        per = num_slots // self.shards
        return (jnp.arange(self.shards)[:, None] * per + jnp.arange(self.active)[None, :]).reshape(-1)

    def read(self, buffer, column_axis: int):
        """The view's rows and first `window` columns of a buffer [S, ...] (static slices)."""
        parts = buffer.reshape(self.shards, buffer.shape[0] // self.shards, *buffer.shape[1:])
        limits = [self.shards, self.active, *buffer.shape[1:]]
        limits[column_axis + 1] = self.window
        part = jax.lax.slice(parts, (0,) * parts.ndim, limits)
        return part.reshape(self.shards * self.active, *part.shape[2:])


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hd = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = linear(cfg.hidden_size, cfg.num_attention_heads * hd, ("embed", "heads"), bias=True, **kw)
        self.k_proj = linear(cfg.hidden_size, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), bias=True, **kw)
        self.v_proj = linear(cfg.hidden_size, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), bias=True, **kw)
        self.o_proj = linear(cfg.num_attention_heads * hd, cfg.hidden_size, ("heads", "embed"), bias=False, **kw)
        self.implementation = "xla"  # of attention without a cache (update, prefill); see layers.attend

    def __call__(self, x, cos, sin, mask, kv=None, cache_pos=None):
        """x [B, T, D]; mask [B, T, S]; kv: this layer's cache (keys [B, K, hd, S], values [B, K, S, hd]) or None.
        cache_pos: the first slot of the new tokens, or a SlotView for one-token steps in shared slot buffers.

        With a cache, the new keys and values are written at slots cache_pos .. cache_pos + T - 1
        and attention runs over the whole cache (over the new slots only when cache_pos is the int 0);
        the mask hides the slots that hold nothing yet.
        """
        b, t, _ = x.shape
        q = apply_rotary(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        scale = self.head_dim**-0.5
        if isinstance(cache_pos, SlotView):
            return self._slot_step(q, k, v, mask, kv, cache_pos, scale)
        if kv is None:
            return self.o_proj(attend(q, k, v, mask, scale=scale, implementation=self.implementation)), None
        keys = jax.lax.dynamic_update_slice(kv[0], jnp.transpose(k, (0, 2, 3, 1)).astype(kv[0].dtype),
                                            (0, 0, 0, cache_pos))
        values = jax.lax.dynamic_update_slice(kv[1], jnp.swapaxes(v, 1, 2).astype(kv[1].dtype), (0, 0, cache_pos, 0))
        kv = (keys, values)
        if isinstance(cache_pos, int) and cache_pos == 0:
            # A prefill into slot 0 onwards: causality hides every slot after the new tokens, so attending over
            # the new keys alone is the same and skips the rest of the cache.
            k, v = (a.astype(c.dtype).astype(q.dtype) for a, c in zip((k, v), kv))  # as the cache holds them
            out = attend(q, k, v, mask[..., :t], scale=scale, implementation=self.implementation)
        else:
            out = attend_cache(q, keys.astype(q.dtype), values.astype(q.dtype), mask, scale=scale)
        return self.o_proj(out), kv

    def _slot_step(self, q, k, v, mask, kv, view: SlotView, scale):
        """One new token per row, its cache in rows of the shared slot buffers (see SlotView); mask [R, 1, window]."""
        slots = view.slots(kv[0].shape[0])
        keys = kv[0].at[slots, :, :, view.columns].set(k[:, 0].astype(kv[0].dtype), mode="drop")
        values = kv[1].at[slots, :, view.columns, :].set(v[:, 0].astype(kv[1].dtype), mode="drop")
        out = attend_cache(q, view.read(keys, 3).astype(q.dtype), view.read(values, 2).astype(q.dtype), mask,
                           scale=scale)
        return self.o_proj(out), (keys, values)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = GatedMLP(
            cfg.hidden_size, cfg.intermediate_size, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x, cos, sin, mask, kv=None, cache_pos=None):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, cache_pos)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


def checkpointed_layer(layer: DecoderLayer, x, cos, sin, mask):
    """`layer(x, ...)[0]`, keeping only the layer's input for the backward pass, which recomputes the rest.

    The recomputation runs inside a conditional on the gradient arriving from the layer above (true unless that
    gradient is already non-finite, which then poisons this layer's gradients with NaN as it would have anyway).
    A compiler cannot run it before that gradient exists, nor merge it with the forward pass: XLA:CPU does both
    with `jax.checkpoint` (it drops the optimization barriers), which holds every layer's activations at once.
    Only the gradients the caller uses survive compilation (unused ones, e.g. of frozen weights, are pruned).
    """
    graphdef, state = nnx.split(layer)

    def apply(state, x, cos, sin):
        return nnx.merge(graphdef, state, copy=True)(x, cos, sin, mask)[0]

    @jax.custom_vjp
    def run(state, x, cos, sin):
        return apply(state, x, cos, sin)

    def forward(state, x, cos, sin):
        return apply(state, x, cos, sin), (state, x, cos, sin)

    def backward(saved, grad):
        def recompute(saved, grad):
            return jax.vjp(apply, *saved)[1](grad)

        def poisoned(saved, grad):
            return jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), saved)

        return jax.lax.cond(jnp.isfinite(grad).all(), recompute, poisoned, saved, grad)

    run.defvjp(forward, backward)
    return run(state, x, cos, sin)


class TextModel(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, remat: bool = False, rngs):
        self.config = cfg
        self.remat = remat
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.with_metadata(nnx.initializers.normal(0.02), logical_axes=("vocab", "embed")),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, x, cos, sin, mask, cache=None, cache_pos=None):
        """x [B, T, D] input embeddings -> final hidden states [B, T, D] and the updated cache (or None)."""
        if cache is None:
            for layer in self.layers:
                x = checkpointed_layer(layer, x, cos, sin, mask) if self.remat else layer(x, cos, sin, mask)[0]
            return self.norm(x), None
        keys, values = [], []
        for layer, k, v in zip(self.layers, cache.keys, cache.values):
            x, (k, v) = layer(x, cos, sin, mask, (k, v), cache_pos)
            keys.append(k)
            values.append(v)
        return self.norm(x), type(cache)(tuple(keys), tuple(values))
