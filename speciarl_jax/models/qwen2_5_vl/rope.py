"""Rotary embeddings: the 3-D (temporal, height, width) positions of the language model and the vision tower's 2-D ones.

Position ids are computed on the host with numpy: they depend on where the image tokens sit in each row,
which is data the host already has when it builds a batch, and doing it there keeps the compiled programs
free of data-dependent shapes.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from .config import Qwen25VLConfig


def get_position_ids(
    input_ids,
    attention_mask=None,
    image_grid_thw=None,
    *,
    config: Qwen25VLConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """3-D rotary positions for a batch of image-and-text rows.

    Text tokens advance all three components together. The tokens of one image take
    (start, start + row, start + column) on the merged grid, and the text after it resumes at
    start + max(rows, columns). Padding positions get 0.

    Args:
      input_ids: [B, T] token ids (left or right padded).
      attention_mask: [B, T], 1 for real tokens; None means no padding.
      image_grid_thw: [num_images, 3] patch grids, in the order the images appear in the batch.

    Returns:
      position_ids [3, B, T] int32, and rope_deltas [B] int32 (as transformers defines them): a token that
      follows the prompt, with n real tokens before it, has position n + delta in all three components.
    """
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = iter(np.asarray(image_grid_thw).reshape(-1, 3).tolist() if image_grid_thw is not None else [])
    merge = config.vision.spatial_merge_size
    positions = np.zeros((3, batch, length), np.int32)
    deltas = np.zeros((batch,), np.int32)
    for b in range(batch):
        is_image = input_ids[b][mask[b]] == config.image_token_id
        row, start, i = [], 0, 0
        while i < len(is_image):
            j = i
            while j < len(is_image) and is_image[j] == is_image[i]:
                j += 1
            if not is_image[i]:
                row.append(np.broadcast_to(np.arange(start, start + j - i), (3, j - i)))
                start += j - i
            else:
                try:
                    t, h, w = next(grids)
                except StopIteration:
                    raise ValueError(
                        f"Row {b} has more image blocks than image_grid_thw lists; each run of image tokens needs a grid."
                    ) from None
                gh, gw = h // merge, w // merge
                if t * gh * gw != j - i:
                    raise ValueError(
                        f"Row {b}: an image block of {j - i} tokens does not match its grid {t}x{h}x{w} "
                        f"({t * gh * gw} tokens after the {merge}x{merge} merge)."
                    )
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
                row.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start)
                start += max(gh, gw)
            i = j
        if row:
            row = np.concatenate(row, axis=1)
            positions[:, b, mask[b]] = row
            deltas[b] = row.max() + 1 - row.shape[1]
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw lists more images than the token ids contain.")
    return positions, deltas


def prompt_positions(input_ids, attention_mask, image_grid_thw=None, *, config: Qwen25VLConfig):
    """(positions [3, B, T] of left-padded prompts, first [B] int32): the position the first generated token of
    each row takes in all three components, its real length plus its rope delta. Every generated token after it
    is text and advances by one; the sampler decodes there and the update scores rollouts there
    (`with_response`)."""
    positions, deltas = get_position_ids(input_ids, attention_mask, image_grid_thw, config=config)
    return positions, (np.asarray(attention_mask).sum(axis=1) + deltas).astype(np.int32)


def with_response(positions, first, response_len: int) -> np.ndarray:
    """[3, B, T + response_len] int32: prompt positions followed by those of `response_len` generated tokens."""
    response = np.asarray(first)[:, None] + np.arange(response_len)[None, :]
    response = np.broadcast_to(response[None], (3,) + response.shape)
    return np.concatenate([positions, response], axis=2).astype(np.int32)


def text_inv_freq(config: Qwen25VLConfig) -> np.ndarray:
    dim = config.text.head_dim
    return 1.0 / (config.text.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))


def mrope_cos_sin(position_ids, config: Qwen25VLConfig, dtype=jnp.float32):
    """cos, sin [B, T, head_dim] for 3-D positions [3, B, T].

    The frequency bands of each half of the head are split by `mrope_section` and band k takes its
    angle from position component k mod 3 (temporal, height, width).
    """
    inv_freq = jnp.asarray(text_inv_freq(config))
    angles = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, head_dim / 2]
    component = np.repeat(np.arange(len(config.text.mrope_section)) % 3, config.text.mrope_section)
    angles = jnp.moveaxis(angles[component, :, :, np.arange(len(component))], 0, -1)  # [B, T, head_dim / 2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """x [..., T, heads, head_dim] rotated by cos/sin [..., T, head_dim], computed in float32."""
    xf = x.astype(jnp.float32)
    out = xf * cos[..., None, :] + rotate_half(xf) * sin[..., None, :]
    return out.astype(x.dtype)


def vision_patch_positions(t: int, h: int, w: int, merge: int) -> np.ndarray:
    """(row, column) of each patch [t*h*w, 2], in the processor's order: merge blocks of merge x merge patches."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).ravel()
    cols = cols.reshape(block).transpose(0, 2, 1, 3).ravel()
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1))


def vision_angles(positions: np.ndarray, head_dim: int, theta: float) -> np.ndarray:
    """Rotary angles [N, head_dim] of the vision tower: half the head rotates with the row, half with the column."""
    quarter = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, quarter, 2, dtype=np.float32) / quarter))
    angles = positions[..., None].astype(np.float32) * inv_freq  # [N, 2, head_dim / 4]
    angles = angles.reshape(len(positions), -1)  # rows then columns
    return np.concatenate([angles, angles], axis=-1)
