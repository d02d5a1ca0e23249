"""The Qwen2.5-VL vision tower: patch embedding, windowed ViT blocks with 2-D rotary, 2x2 patch merger.

Images of any sizes are packed into bins: rows of L patches (L a power of two that holds the largest image),
each holding one or more whole images, so one program shape (bins, L) encodes a batch whatever its image
sizes. Each grid gets a plan (window order, attention segments, rotary angles) computed once on the host.
Attention inside a bin is restricted by segment ids: windows of one image for most blocks, a whole frame of one
image for the configured full-attention blocks, so images packed together never see each other.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...buckets import power_of_two
from .config import VisionConfig
from .layers import GatedMLP, RMSNorm, attend, linear
from .rope import apply_rotary, vision_angles, vision_patch_positions


@functools.lru_cache(maxsize=256)
def window_plan(grid: tuple[int, int, int], cfg: VisionConfig):
    """Host-side layout of one patch grid (t, h, w).

    Returns a dict with
      unit_order [N/m^2]: merge units in window order (the permutation the tower applies first);
      window [N], frame [N]: segment ids of each patch in window order;
      angles [N, head_dim]: rotary angles of each patch in window order.
    """
    t, h, w = grid
    merge = cfg.spatial_merge_size
    gh, gw = h // merge, w // merge
    win = cfg.window_size // merge // cfg.patch_size  # window side, in merge units
    nh, nw = -(-gh // win), -(-gw // win)
    padded = np.full((t, nh * win, nw * win), -1, np.int64)
    padded[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
    padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, win * win)
    window_of_slot = np.broadcast_to(np.arange(t * nh * nw)[:, None], padded.shape)
    valid = padded >= 0
    unit_order = padded[valid]
    unit_window = window_of_slot[valid]
    unit = merge * merge
    positions = vision_patch_positions(t, h, w, merge).reshape(-1, unit, 2)[unit_order].reshape(-1, 2)
    return {
        "unit_order": unit_order,
        "window": np.repeat(unit_window, unit),
        "frame": np.repeat(unit_order // (gh * gw), unit),
        "angles": vision_angles(positions, cfg.head_dim, cfg.rope_theta),
    }


@dataclasses.dataclass(frozen=True)
class Packing:
    """Where every patch of a batch of images goes in the bins, computed on the host (see `pack_images`).

    source [G * L]: for each bin slot, the row of pixel_values it takes (in window order), or -1 for padding.
    window, frame [G, L]: attention segment ids (padding slots get ids of their own).
    angles [G, L, head_dim]: rotary angles.
    tokens [T]: for each image token of the batch in image order, its row in the bins' merged output
      [G * L / merge^2]; T is `num_tokens` rounded up to a bucket, the extra entries repeat row 0.
    """

    source: np.ndarray
    window: np.ndarray
    frame: np.ndarray
    angles: np.ndarray
    tokens: np.ndarray
    num_tokens: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.window.shape

    def pixels(self, pixel_values) -> np.ndarray:
        """[G, L, patch_dim]: the processor's patches laid out in the bins (zeros on padding slots)."""
        pixel_values = np.asarray(pixel_values, np.float32)
        padded = np.concatenate([pixel_values, np.zeros((1, pixel_values.shape[1]), np.float32)])
        return padded[self.source].reshape(*self.shape, -1)


def pack_images(image_grid_thw, cfg: VisionConfig, token_bucket=None, min_length: int = 64,
                bins_multiple: int | None = None) -> Packing:
    """Plan the bins for images of these grids: L = the power of two that holds the largest image (at least
    `min_length` patches), images placed first-fit in the order given, bins counted up to a power of two (or
    a multiple of `bins_multiple`). `token_bucket(n)` rounds the number of image tokens up (default: none)."""
    grids = [tuple(int(v) for v in g) for g in np.asarray(image_grid_thw).reshape(-1, 3)]
    if not grids:
        raise ValueError("pack_images needs at least one image grid.")
    sizes = [t * h * w for t, h, w in grids]
    unit = cfg.spatial_merge_size**2
    length = max(min_length, power_of_two(max(sizes)))
    free, where = [], []  # free slots per bin; (bin, first slot) per image
    for size in sizes:
        fit = next((b for b, room in enumerate(free) if room >= size), None)
        if fit is None:
            free.append(length)
            fit = len(free) - 1
        where.append((fit, length - free[fit]))
        free[fit] -= size
    bins = -(-len(free) // bins_multiple) * bins_multiple if bins_multiple else power_of_two(len(free))
    source = np.full((bins, length), -1, np.int64)
    window = -1 - np.arange(bins * length).reshape(bins, length)  # padding slots: a segment of their own each
    frame = window.copy()
    angles = np.zeros((bins, length, cfg.head_dim), np.float32)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    tokens, next_window, next_frame = [], 0, 0
    for i, (grid, size, (b, first)) in enumerate(zip(grids, sizes, where)):
        plan = window_plan(grid, cfg)
        span = slice(first, first + size)
        within = (plan["unit_order"][:, None] * unit + np.arange(unit)[None]).reshape(-1)  # patch rows, window order
        source[b, span] = starts[i] + within
        window[b, span] = next_window + plan["window"]
        frame[b, span] = next_frame + plan["frame"]
        angles[b, span] = plan["angles"]
        next_window += int(plan["window"].max()) + 1
        next_frame += int(plan["frame"].max()) + 1
        # merged unit k of this image (reading order) sits at position argsort(unit_order)[k] of its span
        tokens.append(b * (length // unit) + first // unit + np.argsort(plan["unit_order"]))
    tokens = np.concatenate(tokens)
    total = len(tokens) if token_bucket is None else token_bucket(len(tokens))
    tokens = np.concatenate([tokens, np.zeros(total - len(tokens), tokens.dtype)])
    return Packing(source.reshape(-1), window, frame, angles, tokens.astype(np.int32), int(starts[-1] // unit))


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = cfg.num_heads
        self.qkv = linear(cfg.hidden_size, 3 * cfg.hidden_size, ("vit_embed", "vit_heads"), **kw)
        self.proj = linear(cfg.hidden_size, cfg.hidden_size, ("vit_heads", "vit_embed"), **kw)
        self.implementation = "xla"  # see layers.attend

    def __call__(self, x, cos, sin, mask):
        g, n, d = x.shape
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(g, n, 3, self.num_heads, -1), 2, 0)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.proj(attend(q, k, v, mask[None], scale=q.shape[-1] ** -0.5, implementation=self.implementation))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6, param_dtype=param_dtype, axis="vit_embed")
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6, param_dtype=param_dtype, axis="vit_embed")
        self.attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = GatedMLP(
            cfg.hidden_size, cfg.intermediate_size, bias=True, axes=("vit_embed", "vit_mlp"),
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )

    def __call__(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """Concatenates each 2x2 block of patches and projects it to the language model's width."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6, param_dtype=param_dtype, axis="vit_embed")
        self.fc1 = linear(merged, merged, ("vit_merged", "vit_mlp"), **kw)
        self.fc2 = linear(merged, cfg.out_hidden_size, ("vit_mlp", "embed"), **kw)

    def __call__(self, x):
        g, n, d = x.shape
        x = self.ln_q(x).reshape(g, n // (self.fc1.in_features // d), -1)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, remat: bool = False, rngs):
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        self.patch_embed = linear(
            cfg.patch_dim, cfg.hidden_size, ("vit_patch", "vit_embed"),
            bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.blocks = nnx.List(
            [VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.depth)]
        )
        self.merger = PatchMerger(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_values, image_grid_thw):
        """Image features [num_image_tokens, out_hidden_size], images in the order of `image_grid_thw`.

        pixel_values: [num_patches, patch_dim], the processor's flattened patches of all images.
        image_grid_thw: [num_images, 3], concrete (numpy or a host array): it decides the program's shapes.
        """
        grids = np.asarray(image_grid_thw).reshape(-1, 3)
        if int(np.prod(grids, axis=1).sum()) != pixel_values.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw "
                             f"{grids.tolist()} describes {int(np.prod(grids, axis=1).sum())}.")
        packing = pack_images(grids, self.config)
        pixels = jnp.asarray(pixel_values).reshape(-1, pixel_values.shape[-1])
        pixels = jnp.concatenate([pixels, jnp.zeros((1, pixels.shape[1]), pixels.dtype)])[packing.source]
        return self.encode_packed(pixels.reshape(*packing.shape, -1), packing.window, packing.frame, packing.angles,
                                  packing.tokens)

    def encode_packed(self, pixels, window, frame, angles, tokens, bins_at_once: int | None = None):
        """Image features [len(tokens), out_hidden_size] of images packed into bins by `pack_images`.

        pixels [G, L, patch_dim] (`Packing.pixels`); window, frame, angles, tokens: the Packing's arrays (numpy, or
        arguments of a compiled caller: only their shapes shape the program). `bins_at_once` bounds how many bins
        go through the tower together (memory); None: all.
        """
        angles = jnp.asarray(angles)
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        window, frame = jnp.asarray(window), jnp.asarray(frame)

        # The layers enter the loop over bins as state and are rebuilt inside it, so that transforms applied
        # within (remat, an outer grad) act on modules of the loop's own trace.
        graphdef, state = nnx.split((self.patch_embed, self.blocks, self.merger))

        def one_bin(args):
            x, cos, sin, window, frame = args
            patch_embed, blocks, merger = nnx.merge(graphdef, state, copy=True)
            x = patch_embed(x.astype(self.dtype))[None]
            window_mask = window[:, None] == window[None, :]
            frame_mask = frame[:, None] == frame[None, :]
            step = (lambda block, x, m: block(x, cos, sin, m))
            if self.remat:
                step = nnx.remat(step)
            for i, block in enumerate(blocks):
                x = step(block, x, frame_mask if i in self.config.fullatt_block_indexes else window_mask)
            return merger(x)[0]

        merged = jax.lax.map(one_bin, (pixels, cos, sin, window, frame), batch_size=bins_at_once)
        return merged.reshape(-1, merged.shape[-1])[jnp.asarray(tokens)]
