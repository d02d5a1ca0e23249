"""Continuous batching: a fixed set of decode slots kept busy until every row of a call is done.

The rows of a call (prompt x sample, prompt-major) wait in a queue. A prompt is admitted when its samples find
free slots: its prefill (the forward over the prompt; the call's images were encoded once, together) runs once,
its keys and values are copied into its samples' slots and their first tokens are drawn. Decoding runs in
compiled chunks of up to `chunk_steps` one-token steps over the slots; between chunks the host collects the new
tokens, frees the slots of finished rows and admits waiting prompts into them. A chunk stops early when none of
its rows is live.

KV memory is the slot buffers, slots x (prompt + max_new_tokens) entries per layer, however many rows a call
has. Work follows what is generated:
  - attention reads only the first `window` columns of the buffers: the widest live row plus a chunk, rounded up
    to a power of two;
  - once the queue is empty and few rows are left, the live rows move to the front of the buffers and chunks run
    over the first half (a quarter, an eighth) of the slots only.
Token t of row r is drawn with the key (rng, r, t) (`row_keys`), so the output equals the static sampler's for the
same key, whatever slots, chunks or devices the rows went through.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import buckets, parallel
from ..models.qwen2_5_vl.model import KVCache
from ..models.qwen2_5_vl.rope import get_position_ids
from ..models.qwen2_5_vl.text import SlotView
from .distributions import choose_tokens, row_keys
from .sampler import SampleOutput, Sampler, check_request, end_tokens, kv_token_bytes

# Per-slot state on the device: the token to feed next, its rotary position and the buffer column it goes to,
# the first column of the slot's prompt (left padding lies before it), the row it belongs to, how many tokens
# of that row precede it, and whether the row is still being generated.
SLOT_FIELDS = ("token", "position", "column", "start", "row", "step", "live")


@dataclasses.dataclass
class EngineStats:
    """What the last call did on the device."""

    chunks: int = 0
    prefills: int = 0
    slot_steps: int = 0  # decoding steps x the slots they ran over
    row_steps: int = 0  # of those, steps of live rows (tokens decoded)
    moves: int = 0  # slots moved to the front in the tail


class RolloutEngine(Sampler):
    """`Sampler.generate`'s arguments and output, produced by continuous batching (see the module's text).

    Args:
      slots: decode slots, rows decoded together. A call with fewer rows uses the power of two that holds them
        (at least `num_samples`); the count only grows over a run (one set of programs).
      chunk_steps: decoding steps per compiled chunk; the host refills slots between chunks.
      shrink_levels: how many times the active slots may halve in the tail of a call (each level can add one
        decode program per window).
      Others as for `Sampler` (prompt_bucket, image_token_bucket, vision_bins_at_once, mesh).
    """

    def __init__(self, *, slots: int = 256, chunk_steps: int = 16, shrink_levels: int = 3, **kwargs):
        super().__init__(**kwargs)
        if slots < 1 or chunk_steps < 1 or shrink_levels < 0:
            raise ValueError(f"slots ({slots}) and chunk_steps ({chunk_steps}) must be >= 1, "
                             f"shrink_levels ({shrink_levels}) >= 0.")
        self.slots = slots
        self.chunk_steps = chunk_steps
        self.shrink_levels = shrink_levels
        self.stats = EngineStats()
        self._admit = jax.jit(self._admit_impl, static_argnums=(0, 15, 16, 17, 18), donate_argnums=(2, 3))
        self._chunk = jax.jit(self._chunk_impl, static_argnums=(0, 6, 7, 8, 9, 10, 11, 12), donate_argnums=(2, 3))
        self._move = jax.jit(self._move_impl, donate_argnums=(0, 1))

    # ---- compiled pieces (graphdef and shapes static; `self.compilations` counts traces) ----

    def _admit_impl(self, graphdef, state, cache, slot_state, input_ids, mask, positions, features, feature_offset,
                    next_position, start, slot_ids, rows, rng, eos_ids, num_samples, max_new_tokens, params, pad_id):
        """Prefill g prompts once, copy their keys and values into their samples' slots (slot_ids [g, n], past
        the end for padding prompts), draw each sample's first token and set the slots' state."""
        self.compilations += 1
        model = nnx.merge(graphdef, state)
        g, width = input_ids.shape
        out = model(input_ids, mask, position_ids=positions, image_features=features, feature_offset=feature_offset,
                    cache=model.init_cache(g, width), cache_pos=0, compute_logits=False)
        keys, values = list(cache.keys), list(cache.values)
        for s in range(num_samples):  # each sample's copy straight from the prompt's cache (no repeated copy)
            at = slot_ids[:, s]
            for layer in range(len(keys)):
                keys[layer] = keys[layer].at[at, :, :, :width].set(out.cache.keys[layer], mode="drop")
                values[layer] = values[layer].at[at, :, :width, :].set(out.cache.values[layer], mode="drop")
        logits = jnp.repeat(model.logits(out.hidden_states[:, -1]), num_samples, axis=0)  # prompt-major
        token, logp, raw = choose_tokens(logits, row_keys(rng, rows, jnp.zeros_like(rows)), params)
        at = slot_ids.reshape(-1)
        new = dict(token=token, position=jnp.repeat(next_position, num_samples), column=jnp.full_like(at, width),
                   start=jnp.repeat(start, num_samples), row=rows, step=jnp.zeros_like(at),
                   live=~jnp.isin(token, eos_ids) & (max_new_tokens > 1))
        slot_state = {k: v.at[at].set(new[k].astype(v.dtype), mode="drop") for k, v in slot_state.items()}
        return KVCache(tuple(keys), tuple(values)), slot_state, token, logp, raw, new["live"]

    def _chunk_impl(self, graphdef, state, cache, slot_state, rng, eos_ids, shards, active, window, steps,
                    max_new_tokens, params, pad_id):
        """Up to `steps` decoding steps over the active slots (the first `active` of each shard's part), stopping
        once none of them is live. Returns the buffers, the slot state, and for the active slots the tokens drawn
        [R, steps] (pad where a row was not live), their two log-probabilities, and their `step` and `live`."""
        self.compilations += 1
        model = nnx.merge(graphdef, state)
        view = SlotView(shards, active, window, None)
        slots = view.slots(slot_state["live"].shape[0])
        columns = jnp.arange(window)

        def one_step(carry):
            i, s, cache, out = carry
            valid = (columns[None, :] >= s["start"][:, None]) & (columns[None, :] <= s["column"][:, None])
            logits, cache = model.decode_slots(s["token"], s["position"], cache, view._replace(columns=s["column"]),
                                               valid)
            token, logp, raw = choose_tokens(logits, row_keys(rng, s["row"], s["step"] + 1), params)
            live = s["live"]
            out = tuple(jax.lax.dynamic_update_slice(a, jnp.where(live, v, fill)[:, None], (0, i))
                        for a, v, fill in zip(out, (token, logp, raw), (pad_id, 0.0, 0.0)))
            ended = jnp.isin(token, eos_ids) | (s["step"] + 2 >= max_new_tokens)
            advance = live.astype(jnp.int32)
            s = dict(s, token=jnp.where(live, token, s["token"]), position=s["position"] + advance,
                     column=s["column"] + advance, step=s["step"] + advance, live=live & ~ended)
            return i + 1, s, cache, out

        rows = slots.shape[0]
        out = (jnp.full((rows, steps), pad_id, jnp.int32), jnp.zeros((rows, steps), jnp.float32),
               jnp.zeros((rows, steps), jnp.float32))
        mine = {k: v[slots] for k, v in slot_state.items()}
        _, mine, cache, out = jax.lax.while_loop(lambda c: (c[0] < steps) & jnp.any(c[1]["live"]), one_step,
                                                 (jnp.int32(0), mine, cache, out))
        slot_state = {k: v.at[slots].set(mine[k]) for k, v in slot_state.items()}
        return cache, slot_state, *out, mine["step"], mine["live"]

    def _move_impl(self, cache, slot_state, source, target):
        """Copy slot source[i] onto slot target[i] (buffers and state), one slot at a time, in place."""
        self.compilations += 1

        def move(i, carry):
            def copy(a):
                row = jax.lax.dynamic_index_in_dim(a, source[i], 0, keepdims=True)
                return jax.lax.dynamic_update_index_in_dim(a, row, target[i], 0)
            return jax.tree.map(copy, carry)

        return jax.lax.fori_loop(0, source.shape[0], move, (cache, slot_state))

    # ---- host side ----

    def generate(self, model, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *,
                 max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 num_samples: int = 1, eos_token_ids=None, rng=None, pad_token_id: int | None = None,
                 ) -> SampleOutput:
        input_ids, attention_mask, params, eos, pad_id, rng = check_request(
            model.config, input_ids, attention_mask, max_new_tokens, temperature, top_p, top_k, num_samples,
            eos_token_ids, rng, pad_token_id)
        config, n = model.config, num_samples
        graphdef, state = nnx.split(model)
        batch = input_ids.shape[0]
        self.stats = EngineStats()

        # Prompts, left-padded to the prompt bucket: ids, mask and positions per prompt, kept on the host.
        positions, deltas = get_position_ids(input_ids, attention_mask, image_grid_thw, config=config)
        real = attention_mask.sum(axis=1)
        width = self.high_water("prompt", buckets.round_up(input_ids.shape[1], self.prompt_bucket))
        pad = width - input_ids.shape[1]
        ids = np.pad(input_ids, ((0, 0), (pad, 0)), constant_values=pad_id)
        mask = np.pad(attention_mask, ((0, 0), (pad, 0)))
        positions = np.pad(positions, ((0, 0), (0, 0), (pad, 0)))
        next_position = (real + deltas).astype(np.int32)
        start = (width - real).astype(np.int32)
        feature_offset = np.concatenate([[0], np.cumsum((ids == config.image_token_id).sum(axis=1))]).astype(np.int32)
        features = None
        if pixel_values is not None:
            features = self._image_features(graphdef, state, config.vision, model.dtype, pixel_values, image_grid_thw)

        shards = parallel.batch_shards(self.mesh)
        num_slots = self.high_water("slots", buckets.round_up(
            max(min(buckets.power_of_two(batch * n), buckets.power_of_two(self.slots)), n), shards))
        per_shard = num_slots // shards
        group_limit = buckets.power_of_two(num_slots // n + 1) // 2  # prompts per prefill, a power of two
        total_width = width + max_new_tokens
        cache, slot_state = _empty_slots(model.config.text, model.dtype, num_slots, total_width, self.mesh)()
        self.last_kv_bytes = kv_token_bytes(model) * (num_slots * total_width + group_limit * width)

        out_tokens = np.full((batch * n, max_new_tokens), pad_id, np.int32)
        out_logp = np.zeros((batch * n, max_new_tokens), np.float32)
        out_raw = np.zeros((batch * n, max_new_tokens), np.float32)
        lengths = np.zeros(batch * n, np.int32)
        slot_row = np.full(num_slots, -1)  # the row each slot decodes (-1: free)
        slot_step = np.zeros(num_slots, np.int64)
        eos_ids = end_tokens(eos)
        active = per_shard
        next_prompt = 0

        def active_slots(active):
            return (np.arange(shards)[:, None] * per_shard + np.arange(active)[None, :]).reshape(-1)

        while next_prompt < batch or (slot_row >= 0).any():
            # Admit waiting prompts while their samples find free slots (spread over the shards).
            while next_prompt < batch:
                free = sorted((s for s in active_slots(active) if slot_row[s] < 0), key=lambda s: (s % per_shard, s))
                g = min(len(free) // n, batch - next_prompt, group_limit)
                if g == 0:
                    break
                cache, slot_state = self._admit_prompts(graphdef, state, cache, slot_state, next_prompt, g, free,
                                                        ids, mask, positions, features, feature_offset, next_position,
                                                        start, rng, eos_ids, n, max_new_tokens, params, pad_id,
                                                        num_slots, group_limit, out_tokens, out_logp, out_raw,
                                                        lengths, slot_row, slot_step)
                next_prompt += g
            if not (slot_row >= 0).any():
                continue
            if next_prompt == batch and self.shrink_levels:
                cache, slot_state, active = self._shrink(cache, slot_state, slot_row, slot_step, shards, per_shard,
                                                         active, active_slots)
            # One chunk over the active slots, attention over the columns the live rows can reach in it.
            live_slots = np.flatnonzero(slot_row >= 0)
            reach = width + int(slot_step[live_slots].max()) + self.chunk_steps
            window = min(total_width, buckets.power_of_two(reach))
            cache, slot_state, tokens, logp, raw, step, live = self._chunk(
                graphdef, state, cache, slot_state, rng, eos_ids, shards, active, window, self.chunk_steps,
                max_new_tokens, params, pad_id)
            tokens, logp, raw, step, live = (parallel.to_host(a) for a in (tokens, logp, raw, step, live))
            mine = active_slots(active)
            made = np.where(slot_row[mine] >= 0, step - slot_step[mine], 0)
            self.stats.chunks += 1
            self.stats.slot_steps += int(made.max()) * len(mine)
            self.stats.row_steps += int(made.sum())
            for j in np.flatnonzero(made):
                slot, row = mine[j], slot_row[mine[j]]
                done = lengths[row]
                k = made[j]
                out_tokens[row, done:done + k] = tokens[j, :k]
                out_logp[row, done:done + k] = logp[j, :k]
                out_raw[row, done:done + k] = raw[j, :k]
                lengths[row] += k
                slot_step[slot] = step[j]
                if not live[j]:
                    slot_row[slot] = -1
        return SampleOutput(
            tokens=out_tokens, logprobs=out_logp, policy_logprobs=out_raw, lengths=lengths,
            response_mask=(np.arange(max_new_tokens)[None, :] < lengths[:, None]).astype(np.int32),
            image_features=features,
        )

    def _admit_prompts(self, graphdef, state, cache, slot_state, first, g, free, ids, mask, positions, features,
                       feature_offset, next_position, start, rng, eos_ids, n, max_new_tokens, params, pad_id,
                       num_slots, group_limit, out_tokens, out_logp, out_raw, lengths, slot_row, slot_step):
        """Prefill prompts first .. first + g - 1 into free slots and record their first tokens."""
        size = min(buckets.power_of_two(g), group_limit)  # prompts per prefill program
        prompts = np.arange(first, first + g)
        slot_ids = np.full((size, n), num_slots, np.int32)  # padding prompts write nowhere
        slot_ids[:g] = np.asarray(free[:g * n]).reshape(g, n)
        rows = np.zeros((size, n), np.int32)
        rows[:g] = prompts[:, None] * n + np.arange(n)[None, :]
        padded = lambda a, axis=0: np.concatenate(  # noqa: E731
            [np.take(a, prompts, axis=axis), np.zeros_like(np.take(a, np.zeros(size - g, int), axis=axis))], axis)
        p_ids, p_mask, p_pos = self._shard(padded(ids), padded(mask), padded(positions, 1), axis=(0, 0, 1))
        cache, slot_state, token, logp, raw, live = self._admit(
            graphdef, state, cache, slot_state, p_ids, p_mask, p_pos, features, jnp.int32(feature_offset[first]),
            *(jax.device_put(a) for a in (padded(next_position), padded(start), slot_ids, rows.reshape(-1))),
            rng, eos_ids, n, max_new_tokens, params, pad_id)
        self.stats.prefills += 1
        token, logp, raw, live = (parallel.to_host(a)[:g * n] for a in (token, logp, raw, live))
        row_ids, slot_flat = rows[:g].reshape(-1), slot_ids[:g].reshape(-1)
        out_tokens[row_ids, 0], out_logp[row_ids, 0], out_raw[row_ids, 0] = token, logp, raw
        lengths[row_ids] = 1
        slot_row[slot_flat] = np.where(live, row_ids, -1)
        slot_step[slot_flat] = 0
        return cache, slot_state

    def _shrink(self, cache, slot_state, slot_row, slot_step, shards, per_shard, active, active_slots):
        """With the queue empty: halve the active slots while the live rows fit in half, moving them to the front."""
        smallest = max(per_shard >> self.shrink_levels, 1)
        live = int((slot_row >= 0).sum())
        target = max(smallest, buckets.power_of_two(-(-live // shards)))
        if target >= active:
            return cache, slot_state, active
        keep = set(active_slots(target).tolist())
        outside = [s for s in np.flatnonzero(slot_row >= 0) if s not in keep]
        room = [s for s in sorted(keep) if slot_row[s] < 0]
        moves = len(outside)
        if moves:
            size = buckets.power_of_two(moves)
            source = np.zeros(size, np.int32)  # padding moves copy slot 0 onto itself
            target_ids = np.zeros(size, np.int32)
            source[:moves], target_ids[:moves] = outside, room[:moves]
            cache, slot_state = self._move(cache, slot_state, jax.device_put(source), jax.device_put(target_ids))
            for s, t in zip(outside, room[:moves]):
                slot_row[t], slot_step[t] = slot_row[s], slot_step[s]
                slot_row[s] = -1
            self.stats.moves += moves
        return cache, slot_state, target


@functools.lru_cache(maxsize=None)
def _empty_slots(text, dtype, num_slots: int, width: int, mesh):
    """A program that makes zeroed slot buffers and slot state, placed over the mesh's batch (and KV-head) axes."""
    heads, dim = text.num_key_value_heads, text.head_dim
    shapes = ((num_slots, heads, dim, width), (num_slots, heads, width, dim))
    shardings = None
    if mesh is not None:
        spec = [parallel.named_sharding(("batch", "kv_heads", None, None), shape, mesh) for shape in shapes]
        layers = text.num_hidden_layers
        shardings = (KVCache((spec[0],) * layers, (spec[1],) * layers),
                     {k: parallel.batch_sharding(mesh, 1) for k in SLOT_FIELDS})

    def build():
        zeros = lambda shape: tuple(jnp.zeros(shape, dtype) for _ in range(text.num_hidden_layers))  # noqa: E731
        state = {k: jnp.zeros((num_slots,), bool if k == "live" else jnp.int32) for k in SLOT_FIELDS}
        return KVCache(zeros(shapes[0]), zeros(shapes[1])), state

    return jax.jit(build, out_shardings=shardings)
