"""Batched multimodal generation with a KV cache: the static sampler, which decodes every row of a call together
until the last one ends (`rollout.engine=static`). The rollout engine (`engine.RolloutEngine`) builds on it, with
the same arguments and output, and keeps a fixed number of decode slots busy instead.

One call runs three kinds of compiled programs:
  1. the vision tower, once per prompt image (all images of a call packed into bins of patches, one program);
  2. the prefill, once per prompt (not per sample): its KV cache and last logits are then repeated
     for the n samples of that prompt;
  3. the decode loop, a single `lax.while_loop` that samples a token for every row, feeds it back through
     the cache (updated in place) and stops when every row has produced an end token or the length budget is spent.
Shapes are rounded up to buckets (prompt length, cache length, rows, image tokens, vision bins) so a training run
compiles a small, bounded set of programs; each program is traced once and `Sampler.compilations` counts the traces.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import buckets, parallel
from ..models.qwen2_5_vl.rope import prompt_positions
from ..models.qwen2_5_vl.vision import pack_images
from .distributions import SamplingParams, choose_tokens, row_keys


@dataclasses.dataclass
class SampleOutput:
    """Generated responses, rows prompt-major (the samples of prompt 0 first).

    tokens [N, L]: sampled tokens, `pad_token_id` after the end token.
    logprobs [N, L]: log-probability of each token under the distribution sampled from (0 after the end).
    policy_logprobs [N, L]: log-probability under the raw policy (temperature 1, no filtering).
    lengths [N]: number of generated tokens, the end token included.
    response_mask [N, L]: 1 on the generated tokens, the end token included.
    image_features [T, D]: the vision tower's output for the prompts' images, in order, in its first
      num_image_tokens rows; T is that count rounded up to a bucket (so programs that read the table keep their
      shapes), the rest is padding. None without images. The update reuses it instead of running the frozen
      tower again.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    policy_logprobs: np.ndarray
    lengths: np.ndarray
    response_mask: np.ndarray
    image_features: jax.Array | None = None


class Sampler:
    """Compiled-program cache around a model. Reuse one Sampler across steps; pass the current weights each call.

    Args:
      prompt_bucket: prompt lengths are left-padded up to a multiple of this for the prefill (small: padding
        columns cost a full forward each; a new bucket compiles only a new prefill).
      cache_bucket: the KV cache holds round_up(prompt, cache_bucket) + max_new_tokens slots; the decode loop is
        compiled once per cache length (the prompt length inside it is a runtime value).
      image_token_bucket: the smallest image-feature table; larger ones are powers of two. The table, the prompt
        width and the vision tower's bins never shrink below the largest seen (`buckets.HighWater`).
      vision_bins_at_once: how many bins of patches go through the vision tower together (bounds its memory).
      mesh: if given, rows are sharded over its batch axes (`data`, `fsdp`).
    """

    def __init__(self, *, prompt_bucket: int = 8, cache_bucket: int = 32, image_token_bucket: int = 256,
                 vision_bins_at_once: int = 8, mesh=None):
        self.prompt_bucket = prompt_bucket
        self.cache_bucket = cache_bucket
        self.image_token_bucket = image_token_bucket
        self.vision_bins_at_once = vision_bins_at_once
        self.high_water = buckets.HighWater()  # sizes that follow the data never shrink back (see buckets)
        self.mesh = mesh
        self.compilations = 0
        self.last_kv_bytes = 0  # KV cache bytes the last call held at its peak
        self._encode = jax.jit(self._encode_impl, static_argnums=(0,), donate_argnums=(2,))
        self._prefill = jax.jit(self._prefill_impl, static_argnums=(0, 6, 7))
        # The prefill's cache is handed over to the loop, which updates it in place.
        self._decode = jax.jit(self._decode_impl, static_argnums=(0, 9, 10, 11), donate_argnums=(2,))

    # ---- compiled pieces (graphdef and shapes are static; `self.compilations` counts traces) ----

    def _encode_impl(self, graphdef, state, table, pixels, window, frame, angles, rows):
        """Encode one group of bins and write their image tokens into table rows `rows` (the rest is dropped)."""
        self.compilations += 1
        model = nnx.merge(graphdef, state)
        merged_units = jnp.arange(rows.shape[0])
        features = model.visual.encode_packed(pixels, window, frame, angles, merged_units)
        return table.at[rows].set(features.astype(table.dtype), mode="drop")

    def _prefill_impl(self, graphdef, state, input_ids, slots, positions, features, cache_length, num_samples):
        """The prompts' forward into a fresh cache of `cache_length` slots; cache and last logits repeated
        `num_samples` times (rows prompt-major)."""
        self.compilations += 1
        model = nnx.merge(graphdef, state)
        cache = model.init_cache(input_ids.shape[0], cache_length)
        out = model(input_ids, slots, position_ids=positions, image_features=features, cache=cache,
                    cache_pos=0, compute_logits=False)
        cache, logits = out.cache, model.logits(out.hidden_states[:, -1])
        if num_samples > 1:
            cache, logits = jax.tree.map(lambda a: jnp.repeat(a, num_samples, axis=0), (cache, logits))
        return cache, logits

    def _decode_impl(self, graphdef, state, cache, slots, last_logits, next_position, prompt_len, rng, eos_ids,
                     max_new_tokens, params, pad_id):
        self.compilations += 1
        model = nnx.merge(graphdef, state)
        rows = last_logits.shape[0]
        column = lambda a, v, step: jax.lax.dynamic_update_slice(a, v[:, None], (0, step))  # noqa: E731

        def choose(s):
            """Sample column `step` from the current logits and record it (pad and zeros on finished rows)."""
            step = s["step"]
            keys = row_keys(rng, jnp.arange(rows), jnp.full((rows,), step))  # rows are prompt-major
            token, logp, raw = choose_tokens(s["logits"], keys, params)
            live = ~s["done"]
            token = jnp.where(live, token, pad_id)
            return live, token, dict(
                s,
                tokens=column(s["tokens"], token, step),
                logprobs=column(s["logprobs"], jnp.where(live, logp, 0.0), step),
                policy_logprobs=column(s["policy_logprobs"], jnp.where(live, raw, 0.0), step),
                done=s["done"] | (live & jnp.isin(token, eos_ids)),
                lengths=s["lengths"] + live.astype(jnp.int32),
            )

        def keep_going(s):
            # The last column needs no forward pass after it: the loop stops one step early and `choose` runs once more.
            return (s["step"] < max_new_tokens - 1) & ~jnp.all(s["done"])

        def one_token(s):
            live, token, s = choose(s)
            step = s["step"]
            slots_now = jax.lax.dynamic_update_slice(s["slots"], live[:, None].astype(s["slots"].dtype),
                                                     (0, prompt_len + step))
            position = jnp.broadcast_to((next_position + step)[None, :, None], (3, rows, 1))
            out = model(token[:, None], slots_now, position_ids=position, cache=s["cache"],
                        cache_pos=prompt_len + step, compute_logits=False)
            return dict(s, step=step + 1, cache=out.cache, slots=slots_now,
                        logits=model.logits(out.hidden_states[:, 0]))

        init = dict(
            step=jnp.int32(0),
            tokens=jnp.full((rows, max_new_tokens), pad_id, jnp.int32),
            logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32),
            policy_logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32),
            done=jnp.zeros((rows,), bool),
            lengths=jnp.zeros((rows,), jnp.int32),
            cache=cache,
            slots=slots,
            logits=last_logits,
        )
        final = jax.lax.while_loop(keep_going, one_token, init)
        # The loop stopped at the last column or with every row finished (then this records padding only).
        _, _, final = choose(final)
        # The cache is returned (and dropped by the caller) so that the donated input buffer can be the loop's own:
        # without an output to alias it to, XLA would copy the whole cache into the loop first.
        return final["tokens"], final["logprobs"], final["policy_logprobs"], final["lengths"], final["cache"]

    # ---- host-side orchestration ----

    def generate(self, model, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *,
                 max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 num_samples: int = 1, eos_token_ids=None, rng=None, pad_token_id: int | None = None,
                 ) -> SampleOutput:
        input_ids, attention_mask, params, eos, pad_id, rng = check_request(
            model.config, input_ids, attention_mask, max_new_tokens, temperature, top_p, top_k, num_samples,
            eos_token_ids, rng, pad_token_id)
        config = model.config
        graphdef, state = nnx.split(model)
        batch = input_ids.shape[0]
        positions, first = prompt_positions(input_ids, attention_mask, image_grid_thw, config=config)

        # Buckets: pad rows (all-padding prompts) and left-pad columns.
        shards = parallel.batch_shards(self.mesh)
        rows = buckets.round_up(buckets.power_of_two(batch), shards)
        length, cache_length = self.cache_slots(input_ids.shape[1], max_new_tokens)
        pad_rows, pad_cols = rows - batch, length - input_ids.shape[1]
        ids = np.pad(input_ids, ((0, pad_rows), (pad_cols, 0)), constant_values=pad_id)
        mask = np.pad(attention_mask, ((0, pad_rows), (pad_cols, 0)))
        positions = np.pad(positions, ((0, 0), (0, pad_rows), (pad_cols, 0)))
        next_position = np.pad(first, (0, pad_rows))

        image_features = None
        if pixel_values is not None:
            image_features = self._image_features(graphdef, state, config.vision, model.dtype, pixel_values,
                                                  image_grid_thw)
        slots = np.concatenate([mask, np.zeros((rows, cache_length - length), np.int32)], axis=1)
        # Every sample of a prompt starts from that prompt's cache (repeated inside the prefill program).
        cache, last_logits = self._prefill(graphdef, state, *self._shard(ids, slots, positions, axis=(0, 0, 1)),
                                           image_features, cache_length, num_samples)
        per_token = kv_token_bytes(model)
        self.last_kv_bytes = per_token * cache_length * rows * (num_samples + (num_samples > 1))  # + the prefill's
        slots, next_position = np.repeat(slots, num_samples, 0), np.repeat(next_position, num_samples, 0)
        slots, next_position = self._shard(slots, next_position, axis=(0, 0))
        tokens, logprobs, policy_logprobs, lengths, _ = self._decode(
            graphdef, state, cache, slots, last_logits, next_position, jnp.int32(length), rng,
            end_tokens(eos), max_new_tokens, params, pad_id,
        )
        keep = batch * num_samples
        lengths = parallel.to_host(lengths)[:keep]
        return SampleOutput(
            tokens=parallel.to_host(tokens)[:keep],
            logprobs=parallel.to_host(logprobs)[:keep],
            policy_logprobs=parallel.to_host(policy_logprobs)[:keep],
            lengths=lengths,
            response_mask=(np.arange(max_new_tokens)[None, :] < lengths[:, None]).astype(np.int32),
            image_features=image_features,
        )

    def expect_images(self, max_patches: int, largest_bin: int = 4096) -> None:
        """Size the vision tower's bins for the largest image the data can hold (`Processor.max_patches_per_image`)
        from the start, so a large image late in a run compiles nothing new. Bins longer than `largest_bin`
        patches are left to grow when such an image comes (a bin's attention costs L^2)."""
        size = buckets.power_of_two(max_patches)
        if size <= largest_bin:
            self.high_water("vision_bin", size)

    def cache_slots(self, prompt_length: int, max_new_tokens: int) -> tuple[int, int]:
        """(prompt slots, cache slots) for prompts of this length: the prompts are left-padded to the prompt bucket,
        and the cache holds that rounded up to the cache bucket, plus the new tokens."""
        length = self.high_water("prompt", buckets.round_up(prompt_length, self.prompt_bucket))
        return length, buckets.round_up(length, self.cache_bucket) + max_new_tokens

    def image_features(self, model, pixel_values, image_grid_thw):
        """The vision tower's output for these images, with this sampler's compiled programs: [T, D], the first
        num_image_tokens rows in image order, then padding up to the bucket T."""
        graphdef, state = nnx.split(model)
        return self._image_features(graphdef, state, model.config.vision, model.dtype, pixel_values,
                                    image_grid_thw)

    def _image_features(self, graphdef, state, config, dtype, pixel_values, image_grid_thw):
        # Bins of L patches (L only grows), encoded `vision_bins_at_once` at a time by one program that writes each
        # image token into its row of the table: the programs' shapes do not depend on how many images come.
        table_rows = lambda n: self.high_water("image_tokens", buckets.power_of_two(max(n, self.image_token_bucket)))  # noqa: E731
        packing = pack_images(image_grid_thw, config, token_bucket=table_rows,
                              min_length=self.high_water.marks.get("vision_bin", 64),
                              bins_multiple=self.vision_bins_at_once)
        bins, length = packing.shape
        self.high_water("vision_bin", length)
        unit = config.spatial_merge_size**2
        if packing.num_tokens * unit != len(pixel_values):
            raise ValueError(f"pixel_values has {len(pixel_values)} patches but image_grid_thw describes "
                             f"{packing.num_tokens * unit}.")
        table_size = len(packing.tokens)
        rows = np.full(bins * length // unit, table_size, np.int32)  # merged unit -> table row (past the end: none)
        rows[packing.tokens[:packing.num_tokens]] = np.arange(packing.num_tokens)
        pixels = packing.pixels(pixel_values)
        table = jax.device_put(np.zeros((table_size, config.out_hidden_size), dtype))
        group, units = self.vision_bins_at_once, self.vision_bins_at_once * length // unit
        for first in range(0, bins, group):
            part = slice(first, first + group)
            table = self._encode(graphdef, state, table, *(jax.device_put(a) for a in (
                pixels[part], packing.window[part], packing.frame[part], packing.angles[part],
                rows[first * length // unit: first * length // unit + units])))
        return table

    def _shard(self, *arrays, axis):
        if self.mesh is None:
            return tuple(jax.device_put(a) for a in arrays)  # jnp.asarray would compile a program per shape
        out = []
        for a, ax in zip(arrays, axis):
            names = [None] * a.ndim
            names[ax] = "batch"
            out.append(jax.device_put(a, parallel.named_sharding(tuple(names), a.shape, self.mesh)))
        return tuple(out)


def kv_token_bytes(model) -> int:
    """Bytes of keys and values one token takes in the cache, over all layers."""
    t = model.config.text
    return t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * jnp.dtype(model.dtype).itemsize


def end_tokens(eos) -> jax.Array:
    """The end tokens as a device array padded (with its first) to a power of two of at least 8: the number of
    end tokens does not change the programs' shapes."""
    size = buckets.power_of_two(max(len(eos), 8))
    return jax.device_put(np.asarray(list(eos) + [eos[0]] * (size - len(eos)), np.int32))


def check_request(config, input_ids, attention_mask, max_new_tokens, temperature, top_p, top_k, num_samples,
                  eos_token_ids, rng, pad_token_id):
    """The arguments of a generate call, checked and with defaults filled in:
    (input_ids, attention_mask, sampling params, end tokens, pad id, rng)."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    input_ids = np.asarray(input_ids, np.int32)
    attention_mask = np.asarray(attention_mask, np.int32)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be [B, T].")
    if (attention_mask[:, -1] == 0).any() or (np.diff(attention_mask, axis=1) < 0).any():
        raise ValueError("Prompts must be left-padded (some row has padding after or between real tokens).")
    if max_new_tokens < 1 or num_samples < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and num_samples ({num_samples}) must be >= 1.")
    eos = tuple(config.eos_token_ids if eos_token_ids is None else np.atleast_1d(eos_token_ids).tolist())
    if not eos:
        raise ValueError("No end-of-sequence token: pass eos_token_ids or set eos_token_id in the config.")
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else eos[0]
    rng = jax.random.key(0) if rng is None else rng
    return input_ids, attention_mask, params, eos, int(pad_token_id), rng
