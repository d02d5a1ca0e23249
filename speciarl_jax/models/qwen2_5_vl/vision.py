"""The Qwen2.5-VL vision tower: patch embedding, windowed ViT blocks with 2-D rotary, 2x2 patch merger.

Images with the same patch grid are encoded together as a batch [G, N, ...]; each grid gets a plan
(window order, attention segments, rotary angles) computed once on the host. Attention inside an image is
restricted by a segment mask: windows for most blocks, whole frames for the configured full-attention blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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


def encode_by_grid(pixel_values, image_grid_thw, encode_group):
    """Run `encode_group(x [G, N, patch_dim], grid) -> [G, N / merge^2, D]` once per distinct patch grid and
    return the features of all images, in the order of `image_grid_thw`, as [num_image_tokens, D]."""
    grids = [tuple(int(v) for v in g) for g in np.asarray(image_grid_thw).reshape(-1, 3)]
    sizes = [t * h * w for t, h, w in grids]
    if sum(sizes) != pixel_values.shape[0]:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw {grids} describes {sum(sizes)}."
        )
    starts = np.concatenate([[0], np.cumsum(sizes)])
    by_grid: dict[tuple, list[int]] = {}
    for i, g in enumerate(grids):
        by_grid.setdefault(g, []).append(i)
    features = [None] * len(grids)
    for grid, members in by_grid.items():
        out = encode_group(jnp.stack([pixel_values[starts[i] : starts[i + 1]] for i in members]), grid)
        for slot, i in enumerate(members):
            features[i] = out[slot]
    return jnp.concatenate(features, axis=0)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = cfg.num_heads
        self.qkv = linear(cfg.hidden_size, 3 * cfg.hidden_size, ("vit_embed", "vit_heads"), **kw)
        self.proj = linear(cfg.hidden_size, cfg.hidden_size, ("vit_heads", "vit_embed"), **kw)

    def __call__(self, x, cos, sin, mask):
        g, n, d = x.shape
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(g, n, 3, self.num_heads, -1), 2, 0)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.proj(attend(q, k, v, mask[None], scale=q.shape[-1] ** -0.5))


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
        return encode_by_grid(pixel_values, image_grid_thw, self.encode_same_grid)

    def encode_same_grid(self, x, grid):
        """x [G, N, patch_dim], G images sharing the grid (t, h, w) -> [G, N / merge^2, out_hidden_size]."""
        plan = window_plan(grid, self.config)
        unit = self.config.spatial_merge_size**2
        g, n, _ = x.shape
        x = self.patch_embed(x.astype(self.dtype))
        x = x.reshape(g, n // unit, unit, -1)[:, plan["unit_order"]].reshape(g, n, -1)
        cos, sin = np.cos(plan["angles"]), np.sin(plan["angles"])
        window_mask = plan["window"][:, None] == plan["window"][None, :]
        frame_mask = plan["frame"][:, None] == plan["frame"][None, :]
        step = (lambda block, x, m: block(x, cos, sin, m))
        if self.remat:
            step = nnx.remat(step)
        for i, block in enumerate(self.blocks):
            mask = frame_mask if i in self.config.fullatt_block_indexes else window_mask
            x = step(block, x, jnp.asarray(mask))
        merged = self.merger(x)
        return merged[:, np.argsort(plan["unit_order"])]
