"""The rollout batch the update consumes, and host-side helpers that build it from prompts and sampled responses.

Layout: each row is one rollout, its prompt left-padded to P columns followed by its response right-padded to
R columns (T = P + R). The response occupies the last R columns, so per-token arrays of the loss
(`response_mask`, `old_logprobs`, `ref_logprobs`) are [B, R]. Rows of one prompt are contiguous (prompt-major),
as the sampler returns them.

Images: the vision tower is frozen, so its output is computed once per prompt image (`model.encode_images`,
or what the sampler already computed) and kept as one table `image_features` [N_feat, D] for the batch;
`image_offsets` [B] gives, for each row, the table row of its first image token. Rows of the same prompt
share their offset, so image features are never copied per rollout.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import struct

from .. import buckets
from ..models.qwen2_5_vl.rope import prompt_positions, with_response


@struct.dataclass
class RolloutBatch:
    input_ids: Any  # [B, T] int32, prompt + response
    attention_mask: Any  # [B, T] int32, 1 on real prompt tokens and on response tokens
    position_ids: Any  # [3, B, T] int32, M-RoPE positions
    response_mask: Any  # [B, R] loss mask over the last R columns
    advantages: Any  # [B] or [B, R] float32
    old_logprobs: Any = None  # [B, R]; None: recomputed before the update
    ref_logprobs: Any = None  # [B, R]; None: recomputed when the KL term needs it
    image_features: Any = None  # [N_feat, D] shared table, not split by rows
    image_offsets: Any = None  # [B] int32

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    def rows(self, fn) -> "RolloutBatch":
        """Apply fn(array, row_axis) to every per-row field (image_features is shared and left as is)."""
        def each(name, axis):
            value = getattr(self, name)
            return None if value is None else fn(value, axis)

        return self.replace(**{name: each(name, axis) for name, axis in ROW_AXES.items()})


# Which axis of each field indexes rollouts.
ROW_AXES = {
    "input_ids": 0, "attention_mask": 0, "position_ids": 1, "response_mask": 0, "advantages": 0,
    "old_logprobs": 0, "ref_logprobs": 0, "image_offsets": 0,
}


def image_token_counts(prompt_ids, image_token_id: int) -> np.ndarray:
    """[P]: how many image tokens (feature-table rows) each prompt holds."""
    return (np.asarray(prompt_ids) == image_token_id).sum(axis=1)


def prompt_image_offsets(prompt_ids, image_token_id: int, num_samples: int = 1) -> np.ndarray:
    """[P * num_samples] int32: the first feature-table row of each rollout's images, for a table that lists
    the prompts' image features in prompt order (as `model.encode_images` returns them for the prompt batch)."""
    counts = image_token_counts(prompt_ids, image_token_id)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    return np.repeat(starts, num_samples)


def rollout_position_ids(config, prompt_ids, prompt_mask, image_grid_thw, response_len: int,
                         num_samples: int = 1) -> np.ndarray:
    """[3, P * num_samples, P_len + response_len] int32 M-RoPE positions of prompt + response rows, where the
    sampler put them (`rope.prompt_positions`)."""
    positions, first = prompt_positions(prompt_ids, prompt_mask, image_grid_thw, config=config)
    return np.repeat(with_response(positions, first, response_len), num_samples, axis=1)


def make_rollout_batch(config, prompts: dict, responses, response_mask, advantages, *, num_samples: int,
                       image_features=None, pad_token_id: int = 0, old_logprobs=None) -> RolloutBatch:
    """Assemble a RolloutBatch from a left-padded prompt batch and the sampler's responses.

    prompts: `input_ids` [P, P_len], `attention_mask` [P, P_len], optionally `image_grid_thw`.
    responses / response_mask: [P * num_samples, R], prompt-major; advantages [P * num_samples].
    image_features: [N_feat, D] for the prompts' images in prompt order (required when prompts hold images).
    """
    prompt_ids = np.asarray(prompts["input_ids"], np.int32)
    prompt_mask = np.asarray(prompts["attention_mask"], np.int32)
    responses = np.asarray(responses, np.int32)
    response_mask = np.asarray(response_mask, np.int32)
    rows = prompt_ids.shape[0] * num_samples
    if responses.shape[0] != rows or response_mask.shape != responses.shape:
        raise ValueError(
            f"{prompt_ids.shape[0]} prompts x {num_samples} samples need {rows} response rows; got responses "
            f"{responses.shape} and response_mask {response_mask.shape}."
        )
    has_images = bool((prompt_ids == config.image_token_id).any())
    if has_images and image_features is None:
        raise ValueError("The prompts hold image tokens: pass image_features (model.encode_images of their images).")
    grid = prompts.get("image_grid_thw") if has_images else None
    responses = np.where(response_mask > 0, responses, pad_token_id)
    input_ids = np.concatenate([np.repeat(prompt_ids, num_samples, 0), responses], 1)
    attention = np.concatenate([np.repeat(prompt_mask, num_samples, 0), response_mask], 1)
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=rollout_position_ids(config, prompt_ids, prompt_mask, grid, responses.shape[1], num_samples),
        response_mask=response_mask,
        advantages=np.asarray(advantages, np.float32),
        old_logprobs=None if old_logprobs is None else np.asarray(old_logprobs, np.float32),
        image_features=image_features,
        image_offsets=prompt_image_offsets(prompt_ids, config.image_token_id, num_samples) if has_images else None,
    )


def abstract_batch(rows: int, columns: int, response: int) -> RolloutBatch:
    """Shapes only (jax.ShapeDtypeStruct) of a batch with old and reference log-probabilities, no images: for
    compiling the update from shapes (memory analysis) without any data."""
    spec = lambda shape, dtype=np.int32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    return RolloutBatch(input_ids=spec((rows, columns)), attention_mask=spec((rows, columns)),
                        position_ids=spec((3, rows, columns)), response_mask=spec((rows, response)),
                        advantages=spec((rows,), np.float32), old_logprobs=spec((rows, response), np.float32),
                        ref_logprobs=spec((rows, response), np.float32))


def check_batch(batch: RolloutBatch) -> None:
    """Raise a ValueError naming the field whose shape disagrees with the others."""
    b, t = np.shape(batch.input_ids)
    r = batch.response_len
    expected = {
        "attention_mask": (b, t), "position_ids": (3, b, t), "response_mask": (b, r),
        "old_logprobs": (b, r), "ref_logprobs": (b, r), "image_offsets": (b,),
    }
    for name, shape in expected.items():
        value = getattr(batch, name)
        if value is not None and tuple(np.shape(value)) != shape:
            raise ValueError(
                f"RolloutBatch.{name} has shape {tuple(np.shape(value))}, expected {shape} (B={b}, T={t}, R={r}).")
    if np.shape(batch.advantages) not in ((b,), (b, r)):
        raise ValueError(
            f"RolloutBatch.advantages has shape {np.shape(batch.advantages)}, expected ({b},) or ({b}, {r}).")
    if r >= t:
        raise ValueError(f"The response ({r} columns) must be shorter than the rows ({t} columns): prompts come first.")
    if (batch.image_features is None) != (batch.image_offsets is None):
        raise ValueError("image_features and image_offsets go together: pass both or neither.")


def to_device(batch: RolloutBatch, sharding_for=None) -> RolloutBatch:
    """Device arrays; `sharding_for(value, row_axis)` gives a field's sharding (row_axis None for the shared
    image table). Without it, arrays go to the default device."""
    def put(value, axis):
        if sharding_for is None:
            return jax.device_put(value)  # a plain transfer (jnp.asarray compiles a program per shape)
        return jax.device_put(value, sharding_for(value, axis))

    moved = batch.rows(put)
    if batch.image_features is not None:
        moved = moved.replace(image_features=put(batch.image_features, None))
    return moved


@jax.jit
def _gather_rows(tables, index):
    return jax.numpy.concatenate(tables)[index]


def table_rows(tables, rows, minimum: int = 256):
    """Rows `rows` of the tables (image-feature tables, on the devices) stacked in order, as one table padded
    to a power of two of rows (at least `minimum`), so the programs that build and read it keep a few shapes."""
    tables = tuple(tables) if isinstance(tables, (list, tuple)) else (tables,)
    index = np.zeros(buckets.power_of_two(max(len(rows), minimum)), np.int32)
    index[:len(rows)] = rows
    return _gather_rows(tables, jax.device_put(index))
