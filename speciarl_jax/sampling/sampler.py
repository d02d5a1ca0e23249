"""Batched multimodal generation with a KV cache.

One call runs three kinds of compiled programs:
  1. the vision tower, once per prompt image (images sharing a patch grid are encoded together);
  2. the prefill, once per prompt (not per sample): its KV cache and last logits are then repeated
     for the n samples of that prompt;
  3. the decode loop, a single `lax.while_loop` that samples a token for every row, feeds it back through
     the cache (updated in place) and stops when every row has produced an end token or the length budget is spent.
Shapes are rounded up to buckets (prompt length, cache length, rows, image tokens) so a training run compiles a
small, bounded set of programs; each program is traced once and `Sampler.compilations` counts the traces.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import parallel
from ..models.qwen2_5_vl.rope import get_position_ids
from ..models.qwen2_5_vl.vision import encode_by_grid
from .distributions import SamplingParams, choose_tokens


@dataclasses.dataclass
class SampleOutput:
    """Generated responses, rows prompt-major (the samples of prompt 0 first).

    tokens [N, L]: sampled tokens, `pad_token_id` after the end token.
    logprobs [N, L]: log-probability of each token under the distribution sampled from (0 after the end).
    policy_logprobs [N, L]: log-probability under the raw policy (temperature 1, no filtering).
    lengths [N]: number of generated tokens, the end token included.
    response_mask [N, L]: 1 on the generated tokens, the end token included.
    image_features [num_image_tokens, D]: the vision tower's output for the prompts' images, in order
      (None without images); the update reuses it instead of running the frozen tower again.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    policy_logprobs: np.ndarray
    lengths: np.ndarray
    response_mask: np.ndarray
    image_features: jax.Array | None = None


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


class Sampler:
    """Compiled-program cache around a model. Reuse one Sampler across steps; pass the current weights each call.

    Args:
      prompt_bucket: prompt lengths are left-padded up to a multiple of this for the prefill (small: padding
        columns cost a full forward each; a new bucket compiles only a new prefill).
      cache_bucket: the KV cache holds round_up(prompt, cache_bucket) + max_new_tokens slots; the decode loop is
        compiled once per cache length (the prompt length inside it is a runtime value).
      image_token_bucket: the image-feature table is padded up to a multiple of this many rows.
      mesh: if given, rows are sharded over its batch axes (`data`, `fsdp`).
    """

    def __init__(self, *, prompt_bucket: int = 8, cache_bucket: int = 32, image_token_bucket: int = 256, mesh=None):
        self.prompt_bucket = prompt_bucket
        self.cache_bucket = cache_bucket
        self.image_token_bucket = image_token_bucket
        self.mesh = mesh
        self.compilations = 0
        self._encode = jax.jit(self._encode_impl, static_argnums=(0, 3))
        self._prefill = jax.jit(self._prefill_impl, static_argnums=(0, 6, 7))
        # The prefill's cache is handed over to the loop, which updates it in place.
        self._decode = jax.jit(self._decode_impl, static_argnums=(0, 9, 10, 11), donate_argnums=(2,))

    # ---- compiled pieces (graphdef and shapes are static; `self.compilations` counts traces) ----

    def _encode_impl(self, graphdef, state, pixels, grid):
        self.compilations += 1
        model = nnx.merge(graphdef, state)
        return model.visual.encode_same_grid(pixels, grid)

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
            token, logp, raw = choose_tokens(s["logits"], jax.random.fold_in(rng, step), params)
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
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
        config = model.config
        input_ids = np.asarray(input_ids, np.int32)
        attention_mask = np.asarray(attention_mask, np.int32)
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be [B, T].")
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("Prompts must be left-padded (the last column is padding in some rows).")
        if max_new_tokens < 1 or num_samples < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) and num_samples ({num_samples}) must be >= 1.")
        eos = tuple(config.eos_token_ids if eos_token_ids is None else np.atleast_1d(eos_token_ids).tolist())
        if not eos:
            raise ValueError("No end-of-sequence token: pass eos_token_ids or set eos_token_id in the config.")
        if pad_token_id is None:
            pad_token_id = config.pad_token_id if config.pad_token_id is not None else eos[0]
        pad_id = int(pad_token_id)
        rng = jax.random.key(0) if rng is None else rng

        graphdef, state = nnx.split(model)
        batch = input_ids.shape[0]
        positions, deltas = get_position_ids(input_ids, attention_mask, image_grid_thw, config=config)
        real = attention_mask.sum(axis=1)

        # Buckets: pad rows (all-padding prompts) and left-pad columns.
        shards = self._batch_shards()
        rows = _round_up(_next_power_of_two(batch), shards)
        length, cache_length = self.cache_slots(input_ids.shape[1], max_new_tokens)
        pad_rows, pad_cols = rows - batch, length - input_ids.shape[1]
        ids = np.pad(input_ids, ((0, pad_rows), (pad_cols, 0)), constant_values=pad_id)
        mask = np.pad(attention_mask, ((0, pad_rows), (pad_cols, 0)))
        positions = np.pad(positions, ((0, 0), (0, pad_rows), (pad_cols, 0)))
        next_position = np.pad(real + deltas, (0, pad_rows)).astype(np.int32)

        features = image_features = None
        if pixel_values is not None:
            image_features = self._image_features(graphdef, state, pixel_values, image_grid_thw)
            features = self._pad_rows(image_features, self.image_token_bucket)
        slots = np.concatenate([mask, np.zeros((rows, cache_length - length), np.int32)], axis=1)
        # Every sample of a prompt starts from that prompt's cache (repeated inside the prefill program).
        cache, last_logits = self._prefill(graphdef, state, *self._shard(ids, slots, positions, axis=(0, 0, 1)),
                                           features, cache_length, num_samples)
        slots, next_position = np.repeat(slots, num_samples, 0), np.repeat(next_position, num_samples, 0)
        slots, next_position = self._shard(slots, next_position, axis=(0, 0))
        tokens, logprobs, policy_logprobs, lengths, _ = self._decode(
            graphdef, state, cache, slots, last_logits, next_position, jnp.int32(length), rng,
            jnp.asarray(eos, jnp.int32), max_new_tokens, params, pad_id,
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

    def cache_slots(self, prompt_length: int, max_new_tokens: int) -> tuple[int, int]:
        """(prompt slots, cache slots) for prompts of this length: the prompts are left-padded to the prompt bucket,
        and the cache holds that rounded up to the cache bucket, plus the new tokens."""
        length = _round_up(prompt_length, self.prompt_bucket)
        return length, _round_up(length, self.cache_bucket) + max_new_tokens

    def image_features(self, model, pixel_values, image_grid_thw):
        """The vision tower's output [num_image_tokens, D] for these images, with this sampler's compiled programs."""
        graphdef, state = nnx.split(model)
        return self._image_features(graphdef, state, pixel_values, image_grid_thw)

    def _image_features(self, graphdef, state, pixel_values, image_grid_thw):
        encode = lambda pixels, grid: self._encode(graphdef, state, pixels, grid)  # noqa: E731
        return encode_by_grid(np.asarray(pixel_values, np.float32), image_grid_thw, encode)

    @staticmethod
    def _pad_rows(features, bucket: int):
        rows = _round_up(features.shape[0], bucket)
        return jnp.pad(features, ((0, rows - features.shape[0]), (0, 0)))

    def _batch_shards(self) -> int:
        if self.mesh is None:
            return 1
        return int(np.prod([self.mesh.shape[a] for a in ("data", "fsdp") if a in self.mesh.shape]))

    def _shard(self, *arrays, axis):
        if self.mesh is None:
            return tuple(jnp.asarray(a) for a in arrays)
        out = []
        for a, ax in zip(arrays, axis):
            names = [None] * a.ndim
            names[ax] = "batch"
            out.append(jax.device_put(a, parallel.named_sharding(tuple(names), a.shape, self.mesh)))
        return tuple(out)


@functools.lru_cache(maxsize=None)
def _default_sampler() -> Sampler:
    return Sampler()


def generate(model, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *, max_new_tokens,
             temperature=1.0, top_p=1.0, top_k=0, num_samples=1, eos_token_ids=None, rng=None,
             sampler: Sampler | None = None, pad_token_id=None) -> SampleOutput:
    """Sample `num_samples` responses for each left-padded prompt (arrays as the processor returns them).

    temperature 0 (or top_k 1) is greedy decoding. See `Sampler` for bucketing and sharding.
    """
    return (sampler or _default_sampler()).generate(
        model, input_ids, attention_mask, pixel_values, image_grid_thw, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, num_samples=num_samples,
        eos_token_ids=eos_token_ids, rng=rng, pad_token_id=pad_token_id,
    )
