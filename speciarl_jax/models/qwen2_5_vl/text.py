"""The Qwen2 decoder of Qwen2.5-VL: grouped-query attention with q/k/v bias, M-RoPE, SwiGLU, RMSNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .config import TextConfig
from .layers import GatedMLP, RMSNorm, attend, attend_cache, linear
from .rope import apply_rotary


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hd = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = linear(cfg.hidden_size, cfg.num_attention_heads * hd, ("embed", "heads"), bias=True, **kw)
        self.k_proj = linear(cfg.hidden_size, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), bias=True, **kw)
        self.v_proj = linear(cfg.hidden_size, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), bias=True, **kw)
        self.o_proj = linear(cfg.num_attention_heads * hd, cfg.hidden_size, ("heads", "embed"), bias=False, **kw)

    def __call__(self, x, cos, sin, mask, kv=None, cache_pos=None):
        """x [B, T, D]; mask [B, T, S]; kv: this layer's cache (keys [B, K, hd, S], values [B, K, S, hd]) or None.

        With a cache, the new keys and values are written at slots cache_pos .. cache_pos + T - 1
        and attention runs over the whole cache (over the new slots only when cache_pos is the int 0);
        the mask hides the slots that hold nothing yet.
        """
        b, t, _ = x.shape
        q = apply_rotary(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        scale = self.head_dim**-0.5
        if kv is None:
            return self.o_proj(attend(q, k, v, mask, scale=scale)), None
        keys = jax.lax.dynamic_update_slice(kv[0], jnp.transpose(k, (0, 2, 3, 1)).astype(kv[0].dtype),
                                            (0, 0, 0, cache_pos))
        values = jax.lax.dynamic_update_slice(kv[1], jnp.swapaxes(v, 1, 2).astype(kv[1].dtype), (0, 0, cache_pos, 0))
        kv = (keys, values)
        if isinstance(cache_pos, int) and cache_pos == 0:
            # A prefill into slot 0 onwards: causality hides every slot after the new tokens, so attending over
            # the new keys alone is the same and skips the rest of the cache.
            k, v = (a.astype(c.dtype).astype(q.dtype) for a, c in zip((k, v), kv))  # as the cache holds them
            out = attend(q, k, v, mask[..., :t], scale=scale)
        else:
            out = attend_cache(q, keys.astype(q.dtype), values.astype(q.dtype), mask, scale=scale)
        return self.o_proj(out), kv


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
            step = lambda layer, x: layer(x, cos, sin, mask)[0]  # noqa: E731
            if self.remat:
                step = nnx.remat(step)
            for layer in self.layers:
                x = step(layer, x)
            return self.norm(x), None
        keys, values = [], []
        for layer, k, v in zip(self.layers, cache.keys, cache.values):
            x, (k, v) = layer(x, cos, sin, mask, (k, v), cache_pos)
            keys.append(k)
            values.append(v)
        return self.norm(x), type(cache)(tuple(keys), tuple(values))
