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
from ..models.qwen2_5_vl.rope import prompt_positions
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
    steps: int = 0  # decoding steps (each reads the weights once)
    slot_steps: int = 0  # decoding steps x the slots they ran over
    row_steps: int = 0  # of those, steps of live rows (tokens decoded)
    columns_read: int = 0  # KV entries attention read: steps x slots x window
    moves: int = 0  # slots moved to the front in the tail


class RolloutEngine(Sampler):
    """`Sampler.generate`'s arguments and output, produced by continuous batching (see the module's text).

    Args:
      slots: decode slots, rows decoded together. A call with fewer rows uses the power of two that holds them
        (at least `num_samples`); the count only grows over a run (one set of programs).
      chunk_steps: decoding steps per compiled chunk; the host refills slots between chunks.
      shrink_levels: how many smaller active-slot counts the tail of a call may use (powers of two below the
        slots per shard; each can add one decode program per window).
      precompile: compile every program a call of this shape can meet at its first call (prefill group sizes,
        windows x active-slot counts, the moves) instead of when the data first needs it: a run compiles all of
        its programs in its first step.
      Others as for `Sampler` (prompt_bucket, image_token_bucket, vision_bins_at_once, mesh).
    """

    def __init__(self, *, slots: int = 256, chunk_steps: int = 16, shrink_levels: int = 3, precompile: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        if slots < 1 or chunk_steps < 1 or shrink_levels < 0:
            raise ValueError(f"slots ({slots}) and chunk_steps ({chunk_steps}) must be >= 1, "
                             f"shrink_levels ({shrink_levels}) >= 0.")
        self.slots = slots
        self.chunk_steps = chunk_steps
        self.shrink_levels = shrink_levels
        self.precompile = precompile
        self._warm: set = set()
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
        return KVCache(tuple(keys), tuple(values)), slot_state, _pack(token, logp, raw, new["live"])

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
        return cache, slot_state, _pack(*out, mine["step"], mine["live"])

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
        graphdef, state = nnx.split(model)
        features = None
        if pixel_values is not None:
            features = self._image_features(graphdef, state, model.config.vision, model.dtype, pixel_values,
                                            image_grid_thw)
        call = _Call(self, model, graphdef, state, input_ids, attention_mask, image_grid_thw, features,
                     max_new_tokens, num_samples, params, end_tokens(eos), pad_id, rng)
        self.stats = call.stats
        self.last_kv_bytes = call.kv_bytes
        if self.precompile:
            call.precompile()
        return call.run()


class _Call:
    """One generate call on the engine: the prompts and rows on the host, the slot buffers on the devices."""

    def __init__(self, engine: RolloutEngine, model, graphdef, state, input_ids, attention_mask, image_grid_thw,
                 features, max_new_tokens, num_samples, params, eos_ids, pad_id, rng):
        config, n = model.config, num_samples
        self.engine, self.graphdef, self.state, self.features = engine, graphdef, state, features
        self.max_new_tokens, self.n, self.params, self.eos_ids, self.pad_id, self.rng = (
            max_new_tokens, n, params, eos_ids, pad_id, rng)
        self.stats = EngineStats()
        # Prompts left-padded to the prompt bucket, kept on the host until admitted.
        positions, self.next_position = prompt_positions(input_ids, attention_mask, image_grid_thw, config=config)
        real = attention_mask.sum(axis=1)
        self.batch = input_ids.shape[0]
        self.width = width = engine.high_water("prompt", buckets.round_up(input_ids.shape[1], engine.prompt_bucket))
        pad = width - input_ids.shape[1]
        self.ids = np.pad(input_ids, ((0, 0), (pad, 0)), constant_values=pad_id)
        self.mask = np.pad(attention_mask, ((0, 0), (pad, 0)))
        self.positions = np.pad(positions, ((0, 0), (0, 0), (pad, 0)))
        self.start = (width - real).astype(np.int32)
        self.feature_offset = np.concatenate([[0], np.cumsum((self.ids == config.image_token_id).sum(axis=1))])
        # Slots, split into equal parts per batch shard; the active ones are the first `active` of each part.
        self.shards = parallel.batch_shards(engine.mesh)
        self.num_slots = engine.high_water("slots", slot_count(self.batch * n, engine.slots, n, self.shards))
        self.per_shard = self.num_slots // self.shards
        smaller = [p for p in (1 << k for k in range(self.per_shard.bit_length())) if p < self.per_shard]
        self.levels = [self.per_shard] + smaller[::-1][:engine.shrink_levels]  # active slots per shard, falling
        self.active = self.per_shard
        self.group_limit = prefill_group(self.num_slots, n)
        self.total_width = width + max_new_tokens
        self.kv_bytes = kv_token_bytes(model) * (self.num_slots * self.total_width + self.group_limit * width)
        self.cache, self.slot_state = _empty_slots(config.text, model.dtype, self.num_slots, self.total_width,
                                                   engine.mesh)()
        # Rows: outputs, and which slot decodes which row.
        rows = self.batch * n
        self.tokens = np.full((rows, max_new_tokens), pad_id, np.int32)
        self.logprobs = np.zeros((rows, max_new_tokens), np.float32)
        self.policy_logprobs = np.zeros((rows, max_new_tokens), np.float32)
        self.lengths = np.zeros(rows, np.int32)
        self.slot_row = np.full(self.num_slots, -1)  # -1: free
        self.slot_step = np.zeros(self.num_slots, np.int64)  # tokens of its row before the one it feeds next
        self.next_prompt = 0

    def active_slots(self, active=None) -> np.ndarray:
        active = self.active if active is None else active
        return (np.arange(self.shards)[:, None] * self.per_shard + np.arange(active)[None, :]).reshape(-1)

    def windows(self) -> list[int]:
        """Every attention window a chunk can use: powers of two from the prompt plus a chunk, capped."""
        first = buckets.power_of_two(self.width + self.engine.chunk_steps)
        out = [min(first << k, self.total_width) for k in range(max(1, self.total_width.bit_length()))]
        return sorted(set(w for w in out if w >= min(first, self.total_width)))

    def run(self) -> SampleOutput:
        while self.next_prompt < self.batch or (self.slot_row >= 0).any():
            self.admit()
            if not (self.slot_row >= 0).any():
                continue
            if self.next_prompt == self.batch:
                self.shrink()
            self.decode_chunk()
        return SampleOutput(
            tokens=self.tokens, logprobs=self.logprobs, policy_logprobs=self.policy_logprobs, lengths=self.lengths,
            response_mask=(np.arange(self.max_new_tokens)[None, :] < self.lengths[:, None]).astype(np.int32),
            image_features=self.features,
        )

    def admit(self) -> None:
        """Prefill waiting prompts while all of a prompt's samples find free slots (spread over the shards)."""
        while self.next_prompt < self.batch:
            free = sorted((s for s in self.active_slots() if self.slot_row[s] < 0),
                          key=lambda s: (s % self.per_shard, s))
            g = min(len(free) // self.n, self.batch - self.next_prompt, self.group_limit)
            if g == 0:
                return
            prompts = np.arange(self.next_prompt, self.next_prompt + g)
            token, logp, raw, live = self._prefill(prompts, np.asarray(free[:g * self.n]).reshape(g, self.n))
            rows = (prompts[:, None] * self.n + np.arange(self.n)[None, :]).reshape(-1)
            self.tokens[rows, 0], self.logprobs[rows, 0], self.policy_logprobs[rows, 0] = token, logp, raw
            self.lengths[rows] = 1
            slots = np.asarray(free[:g * self.n])
            self.slot_row[slots] = np.where(live, rows, -1)
            self.slot_step[slots] = 0
            self.next_prompt += g

    def _prefill(self, prompts, slot_ids):
        """Run the admission program for these prompts into slots slot_ids [g, n]; the first tokens on the host."""
        g, size = len(prompts), min(buckets.power_of_two(len(prompts)), self.group_limit)
        padded_slots = np.full((size, self.n), self.num_slots, np.int32)  # padding prompts write nowhere
        padded_slots[:g] = slot_ids
        rows = np.zeros((size, self.n), np.int32)
        rows[:g] = prompts[:, None] * self.n + np.arange(self.n)[None, :]
        take = np.concatenate([prompts, np.zeros(size - g, int)])
        blank = (np.arange(size) >= g)

        def pick(a, axis=0):
            picked = np.take(a, take, axis=axis)
            return np.where(np.expand_dims(blank, tuple(i for i in range(picked.ndim) if i != axis)), 0, picked)

        packed = self._run_admit(pick(self.ids), pick(self.mask), pick(self.positions, 1),
                                 self.feature_offset[prompts[0]], pick(self.next_position), pick(self.start),
                                 padded_slots, rows.reshape(-1))
        self.stats.prefills += 1
        return tuple(a[:g * self.n] for a in _unpack(parallel.to_host(packed), 0))

    def _run_admit(self, ids, mask, positions, offset, next_position, start, slot_ids, rows):
        e = self.engine
        ids, mask, positions = e._shard(ids, mask, positions, axis=(0, 0, 1))
        self.cache, self.slot_state, packed = e._admit(
            self.graphdef, self.state, self.cache, self.slot_state, ids, mask, positions, self.features,
            jnp.int32(offset), *(jax.device_put(a) for a in (next_position, start, slot_ids, rows)),
            self.rng, self.eos_ids, self.n, self.max_new_tokens, self.params, self.pad_id)
        return packed

    def shrink(self) -> None:
        """With no prompt waiting: run on the fewest active slots that hold the live rows, moving rows outside
        them into free slots inside."""
        live = int((self.slot_row >= 0).sum())
        needed = -(-live // self.shards)
        target = min((level for level in self.levels if level >= needed), default=self.per_shard)
        if target >= self.active:
            return
        keep = set(self.active_slots(target).tolist())
        outside = [s for s in np.flatnonzero(self.slot_row >= 0) if s not in keep]
        room = [s for s in sorted(keep) if self.slot_row[s] < 0][:len(outside)]
        if outside:
            self._run_move(outside, room)
            self.slot_row[room], self.slot_step[room] = self.slot_row[outside], self.slot_step[outside]
            self.slot_row[outside] = -1
            self.stats.moves += len(outside)
        self.active = target

    def _run_move(self, source, target):
        # One program for every call: as many moves as the largest smaller level holds (the most a shrink needs);
        # padding moves copy slot 0 onto itself.
        size = self.levels[1] * self.shards
        src, dst = np.zeros(size, np.int32), np.zeros(size, np.int32)
        src[:len(source)], dst[:len(target)] = source, target
        self.cache, self.slot_state = self.engine._move(self.cache, self.slot_state, jax.device_put(src),
                                                        jax.device_put(dst))

    def decode_chunk(self) -> None:
        """One chunk over the active slots, attending over the columns the live rows can reach in it; collect
        the tokens and free the slots of finished rows."""
        live_slots = np.flatnonzero(self.slot_row >= 0)
        reach = self.width + int(self.slot_step[live_slots].max()) + self.engine.chunk_steps
        window = min(self.total_width, buckets.power_of_two(reach))
        tokens, logp, raw, step, live = _unpack(parallel.to_host(self._run_chunk(self.active, window)),
                                                self.engine.chunk_steps)
        mine = self.active_slots()
        made = np.where(self.slot_row[mine] >= 0, step - self.slot_step[mine], 0)
        steps = int(made.max())  # the steps the chunk ran
        self.stats.chunks += 1
        self.stats.steps += steps
        self.stats.slot_steps += steps * len(mine)
        self.stats.columns_read += steps * len(mine) * window
        self.stats.row_steps += int(made.sum())
        for j in np.flatnonzero(made):
            slot, row, k = mine[j], self.slot_row[mine[j]], made[j]
            done = self.lengths[row]
            self.tokens[row, done:done + k] = tokens[j, :k]
            self.logprobs[row, done:done + k] = logp[j, :k]
            self.policy_logprobs[row, done:done + k] = raw[j, :k]
            self.lengths[row] += k
            self.slot_step[slot] = step[j]
            if not live[j]:
                self.slot_row[slot] = -1

    def _run_chunk(self, active, window):
        e = self.engine
        self.cache, self.slot_state, packed = e._chunk(
            self.graphdef, self.state, self.cache, self.slot_state, self.rng, self.eos_ids, self.shards, active,
            window, e.chunk_steps, self.max_new_tokens, self.params, self.pad_id)
        return packed

    def precompile(self) -> None:
        """Run every program this call's shapes can meet once, with nothing to do: prefills of padding prompts
        only (their writes are dropped), chunks over slots none of which is live (they stop at once), and the
        moves' program with padding moves. Each program compiles the first time only."""
        key = (self.graphdef, self.num_slots, self.width, self.total_width, self.n, self.params, self.pad_id)
        if key in self.engine._warm:
            return
        size = 1
        while size <= self.group_limit:
            blank = np.zeros(size, np.int32)
            self._run_admit(np.zeros((size, self.width), np.int32), np.zeros((size, self.width), np.int32),
                            np.zeros((3, size, self.width), np.int32), 0, blank, blank,
                            np.full((size, self.n), self.num_slots, np.int32), np.zeros(size * self.n, np.int32))
            size *= 2
        for active in self.levels:
            for window in self.windows():
                self._run_chunk(active, window)
        if len(self.levels) > 1:
            self._run_move([], [])
        self.engine._warm.add(key)


def _pack(*arrays):
    """Per-row results as one int32 array [R, columns] (float32 bit patterns kept): the host fetches one array per
    program instead of one per result, which across processes is one gather instead of several."""
    as_int = [jax.lax.bitcast_convert_type(a, jnp.int32) if a.dtype == jnp.float32 else a.astype(jnp.int32)
              for a in arrays]
    return jnp.concatenate([a.reshape(a.shape[0], -1) for a in as_int], axis=1)


def _unpack(packed: np.ndarray, width: int) -> list[np.ndarray]:
    """`_pack`'s arrays back: tokens, log-probs and raw log-probs (float32) of `width` columns each (width 0:
    one column each, as vectors), then one vector per remaining column, the last one boolean."""
    columns = max(width, 1)
    parts = [packed[:, i * columns:(i + 1) * columns] for i in range(3)]
    parts = [p if width else p[:, 0] for p in parts]
    parts[1], parts[2] = parts[1].view(np.float32), parts[2].view(np.float32)
    rest = [packed[:, c] for c in range(3 * columns, packed.shape[1])]
    rest[-1] = rest[-1].astype(bool)
    return parts + rest


ENGINES = ("continuous", "static")


def make_sampler(engine: str = "continuous", *, slots: int = 256, chunk_steps: int = 16, precompile: bool = False,
                 **kwargs) -> Sampler:
    """The sampler a run's `rollout.engine` names: the rollout engine ("continuous") or the static `Sampler`."""
    if engine == "continuous":
        return RolloutEngine(slots=slots, chunk_steps=chunk_steps, precompile=precompile, **kwargs)
    if engine == "static":
        return Sampler(**kwargs)
    raise ValueError(f"rollout.engine={engine!r}: use one of {ENGINES}")


def slot_count(rows: int, slots: int, num_samples: int, shards: int) -> int:
    """Decode slots for a call of `rows` rows: the configured count or the power of two that holds the rows,
    whichever is smaller, at least one prompt's samples, a multiple of the batch shards."""
    return buckets.round_up(max(min(buckets.power_of_two(rows), buckets.power_of_two(slots)), num_samples), shards)


def prefill_group(num_slots: int, num_samples: int) -> int:
    """The most prompts one prefill takes (a power of two): as many as the slots hold."""
    return buckets.power_of_two(num_slots // num_samples + 1) // 2


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


@functools.lru_cache(maxsize=None)
def _default_sampler() -> Sampler:
    return RolloutEngine()


def generate(model, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *, max_new_tokens,
             temperature=1.0, top_p=1.0, top_k=0, num_samples=1, eos_token_ids=None, rng=None,
             sampler: Sampler | None = None, pad_token_id=None) -> SampleOutput:
    """Sample `num_samples` responses for each left-padded prompt (arrays as the processor returns them).

    temperature 0 (or top_k 1) is greedy decoding. Runs on the rollout engine (`RolloutEngine`) unless a
    `sampler` is given; see `Sampler` for bucketing and sharding.
    """
    return (sampler or _default_sampler()).generate(
        model, input_ids, attention_mask, pixel_values, image_grid_thw, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, num_samples=num_samples,
        eos_token_ids=eos_token_ids, rng=rng, pad_token_id=pad_token_id,
    )
