"""Qwen2.5-VL for conditional generation: vision tower + decoder + lm_head, with an optional KV cache."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from .config import Qwen25VLConfig
from .layers import ATTENTION_IMPLEMENTATIONS
from .rope import get_position_ids, mrope_cos_sin
from .text import Attention, SlotView, TextModel
from .vision import VisionAttention, VisionTower


class KVCache(NamedTuple):
    """Per-layer keys [B, num_kv_heads, head_dim, S] and values [B, num_kv_heads, S, head_dim].

    Keys are stored transposed so that a decoding step's two attention products, q @ keys and probs @ values,
    are plain matrix products on the cache as it lies in memory (see layers.attend_cache)."""

    keys: tuple
    values: tuple


@struct.dataclass
class ModelOutput:
    logits: jax.Array | None  # [B, T, vocab], float32
    hidden_states: jax.Array  # [B, T, D], after the final norm
    cache: KVCache | None = None


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class Qwen25VL(nnx.Module):
    """Qwen2_5_VLForConditionalGeneration in Flax NNX.

    Args:
      config: the model configuration.
      dtype: compute dtype; param_dtype: storage dtype of the weights (defaults to dtype).
      remat: recompute each block's activations in the backward pass (gradient checkpointing).
    """

    def __init__(self, config: Qwen25VLConfig, *, dtype=jnp.float32, param_dtype=None, remat=False, rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        self.config = config
        self.dtype = dtype
        self.visual = VisionTower(config.vision, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.language_model = TextModel(config.text, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(
                config.text.hidden_size, config.text.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                kernel_init=nnx.with_metadata(nnx.initializers.normal(0.02), logical_axes=("embed", "vocab")), rngs=rngs,
            )

    # ---- pieces, usable on their own (the sampler reuses image features across samples) ----

    def encode_images(self, pixel_values, image_grid_thw):
        """[num_patches, patch_dim] -> [num_image_tokens, hidden]."""
        return self.visual(jnp.asarray(pixel_values), image_grid_thw)

    def embed(self, input_ids, image_features=None, feature_offset=0):
        """Token embeddings [B, T, D] with image features written into the image-token slots, in reading order,
        starting at row `feature_offset` of image_features (the rows of earlier prompts of a shared table)."""
        embeds = self.language_model.embed_tokens(input_ids)
        if image_features is None:
            return embeds
        is_image = input_ids == self.config.image_token_id
        # More feature rows than image tokens is allowed (padded tables); fewer would reuse the last row.
        if _is_concrete(is_image) and int(is_image.sum()) > image_features.shape[0]:
            raise ValueError(
                f"The prompts hold {int(is_image.sum())} image tokens but the images give only "
                f"{image_features.shape[0]} features; each <|image_pad|> run must match its image grid."
            )
        slot = jnp.clip(jnp.cumsum(is_image.reshape(-1)) - 1 + feature_offset, 0, image_features.shape[0] - 1)
        scattered = image_features[slot].reshape(embeds.shape).astype(embeds.dtype)
        return jnp.where(is_image[..., None], scattered, embeds)

    def logits(self, hidden):
        """float32 logits [..., vocab] from final hidden states."""
        if self.config.tie_word_embeddings:
            table = self.language_model.embed_tokens.embedding[...]
            return jnp.einsum("...d,vd->...v", hidden, table.astype(hidden.dtype), preferred_element_type=jnp.float32)
        kernel = self.lm_head.kernel[...]
        return jnp.einsum("...d,dv->...v", hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)

    def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
        t = self.config.text
        heads, dim, dtype = t.num_key_value_heads, t.head_dim, dtype or self.dtype
        zeros = lambda shape: tuple(jnp.zeros(shape, dtype) for _ in range(t.num_hidden_layers))  # noqa: E731
        return KVCache(zeros((batch, heads, dim, length)), zeros((batch, heads, length, dim)))

    def position_ids(self, input_ids, attention_mask=None, image_grid_thw=None):
        """3-D positions [3, B, T] and rope deltas [B] (host-side; see rope.get_position_ids)."""
        return get_position_ids(input_ids, attention_mask, image_grid_thw, config=self.config)

    # ---- the forward pass ----

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        position_ids=None,
        *,
        image_features=None,
        feature_offset=0,
        cache: KVCache | None = None,
        cache_pos=0,
        compute_logits: bool = True,
        mm_token_type_ids=None,  # returned by transformers' processor; positions come from the token ids instead
    ) -> ModelOutput:
        """Logits for a batch of (left- or right-) padded image-and-text rows.

        input_ids [B, T]; attention_mask [B, T] without a cache, or [B, S] over the cache slots with one;
        pixel_values [num_patches, patch_dim] and image_grid_thw [num_images, 3] as the processor returns them
        (or precomputed `image_features`, read from row `feature_offset` on); position_ids [3, B, T], computed from the token ids when omitted.
        With a cache, the T new tokens occupy slots cache_pos .. cache_pos + T - 1, and positions must be below the
        number of slots (true of the positions `get_position_ids` gives, continued by one per new token).
        """
        del mm_token_type_ids
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            if cache is not None:
                raise ValueError("A cached forward needs attention_mask [B, cache_length] marking the filled slots.")
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if position_ids is None:
            if cache is not None and not (isinstance(cache_pos, int) and cache_pos == 0):
                raise ValueError("Decoding steps need explicit position_ids (prompt positions + rope delta).")
            if not (_is_concrete(input_ids) and _is_concrete(attention_mask)):
                raise ValueError("position_ids must be passed when the model runs under jit (compute them on the host).")
            position_ids, _ = self.position_ids(input_ids, attention_mask, image_grid_thw)
        if pixel_values is not None and image_features is None:
            if image_grid_thw is None:
                raise ValueError("pixel_values were given without image_grid_thw.")
            image_features = self.encode_images(pixel_values, image_grid_thw)
        x = self.embed(input_ids, image_features, feature_offset)
        if cache is None:
            cos, sin = mrope_cos_sin(jnp.asarray(position_ids), self.config, dtype=jnp.float32)
        else:
            # Looked up in a table of the cache's slot positions: XLA fuses cos/sin into every layer's q and k
            # fusions, where they would be evaluated again per element, head and layer (milliseconds per step).
            cos, sin = _rotary_lookup(jnp.asarray(position_ids), self.config, attention_mask.shape[1])
        mask = _attention_mask(jnp.asarray(attention_mask), input_ids.shape[1], cache_pos if cache is not None else 0)
        hidden, cache = self.language_model(x, cos, sin, mask, cache, cache_pos)
        logits = self.logits(hidden) if compute_logits else None
        return ModelOutput(logits=logits, hidden_states=hidden, cache=cache)


    def decode_slots(self, tokens, positions, cache: KVCache, view: SlotView, valid):
        """One decoding step for rows whose caches live in shared slot buffers [S, ...] (the rollout engine).

        tokens [R] (text) at rotary positions [R]; `view` says which buffer rows hold them, where each writes its
        key and value, and how many columns attention reads; valid [R, window] marks the columns a row attends.
        Returns float32 logits [R, vocab] and the updated buffers.
        """
        position_ids = jnp.broadcast_to(positions[None, :, None], (3, *tokens.shape, 1))
        cos, sin = _rotary_lookup(position_ids, self.config, cache.keys[0].shape[-1])
        x = self.embed(tokens[:, None])
        hidden, cache = self.language_model(x, cos, sin, valid[:, None, :], cache, view)
        return self.logits(hidden[:, 0]), cache


def _rotary_lookup(position_ids, config, length: int):
    """mrope_cos_sin(position_ids) for positions below `length`, read from cos/sin tables of positions 0..length-1.

    With a cache every position is below the number of slots (a token's position never exceeds its slot:
    padding and the image grids only lower it), so the cache length bounds the table.
    """
    table = mrope_cos_sin(jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (3, 1, length)), config)
    sections = config.text.mrope_section
    component = np.tile(np.repeat(np.arange(len(sections)) % 3, sections), 2)  # position component per channel
    index = jnp.moveaxis(position_ids[component], 0, -1)  # [B, T, head_dim]
    channel = np.arange(len(component))
    return tuple(t[0][index, channel] for t in table)


def _attention_mask(key_valid, num_queries, first_slot):
    """[B, T, S] boolean: query i (in slot first_slot + i) sees key slot j when j <= its slot and j holds a token."""
    q_slot = first_slot + jnp.arange(num_queries)
    k_slot = jnp.arange(key_valid.shape[1])
    causal = k_slot[None, :] <= q_slot[:, None]
    return causal[None] & key_valid.astype(bool)[:, None, :]


def set_attention_implementation(model: Qwen25VL, implementation: str) -> None:
    """Run every attention without a KV cache (the update, the prefill, the vision tower) with `implementation`:
    "xla" (the default, any backend) or "cudnn" (fused, NVIDIA GPUs in bf16/fp16; see layers.attend)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: use one of {ATTENTION_IMPLEMENTATIONS}")
    for _, module in nnx.iter_graph(model):
        if isinstance(module, (Attention, VisionAttention)):
            module.implementation = implementation
