"""Qwen2-VL image patches with numpy and PIL only, equal to transformers' `Qwen2VLImageProcessorPil`.

Why a second implementation: the pipeline's worker processes then import neither transformers nor torch
(several seconds per worker), and the per-pixel arithmetic becomes one table look-up per channel. The
steps and their floating-point order are transformers' own, so the output is bit-identical (the tests
compare the two on many sizes):

    RGB -> [fixed resize, Processor.image_size] -> smart_resize (PIL, the processor's resample filter)
        -> float64 x rescale_factor -> float32 -> (x - mean) / std in float32 -> patches

Settings are read from a `processing.Processor`; `ImagePatcher.from_processor` returns None for image
processors it does not reproduce, and the pipeline then calls the processor itself.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size Qwen2-VL resizes to: multiples of `factor`, pixel count within bounds, aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclasses.dataclass(frozen=True)
class ImagePatcher:
    """Image -> (pixel_values [num_patches, patch_dim] float32, grid_thw [3] int64)."""

    min_pixels: int
    max_pixels: int
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    fixed_size: tuple[int, int] | None = None  # (height, width), resized with bicubic before anything else

    @classmethod
    def from_processor(cls, processor) -> "ImagePatcher | None":
        """The settings of a `processing.Processor`, or None if its image processor works differently."""
        ip = processor.image_processor
        if type(ip).__name__ not in ("Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor"):
            return None
        if getattr(ip, "backend", "pil") != "pil":
            return None
        if not (ip.do_resize and ip.do_rescale and ip.do_normalize and ip.do_convert_rgb):
            return None
        size = dict(ip.size)
        if not (size.get("shortest_edge") and size.get("longest_edge")):
            return None
        mean, std = tuple(np.atleast_1d(ip.image_mean).tolist()), tuple(np.atleast_1d(ip.image_std).tolist())
        if len(mean) != 3 or len(std) != 3:
            return None
        return cls(
            min_pixels=int(size["shortest_edge"]),
            max_pixels=int(size["longest_edge"]),
            patch_size=int(ip.patch_size),
            merge_size=int(ip.merge_size),
            temporal_patch_size=int(ip.temporal_patch_size),
            resample=int(ip.resample if ip.resample is not None else Image.Resampling.BILINEAR),
            rescale_factor=float(ip.rescale_factor),
            image_mean=mean,
            image_std=std,
            fixed_size=processor.image_size,
        )

    def _lookup_table(self) -> np.ndarray:
        """[3, 256] float32: every uint8 value of every channel through rescale and normalize, in transformers'
        order and precision (the steps are elementwise, so a table gives the very same numbers)."""
        table = self.__dict__.get("_table")
        if table is None:
            values = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
            mean = np.asarray(self.image_mean, np.float32)[:, None]
            std = np.asarray(self.image_std, np.float32)[:, None]
            table = (values[None, :] - mean) / std
            object.__setattr__(self, "_table", table)  # a cache on a frozen dataclass
        return table

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    def __getstate__(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state):
        for key, value in state.items():
            object.__setattr__(self, key, value)

    def patch_bytes(self, image) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1, per image: resize, then the raw pixels in patch order.

        Returns uint8 [num_patches, 3, patch_size**2] (an eighth of the float patches' bytes, which is what
        crosses from a worker process) and grid_thw [3] int64.
        """
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        if self.fixed_size is not None and image.size != (self.fixed_size[1], self.fixed_size[0]):
            image = image.resize((self.fixed_size[1], self.fixed_size[0]), Image.Resampling.BICUBIC)
        factor = self.patch_size * self.merge_size
        height, width = smart_resize(image.height, image.width, factor, self.min_pixels, self.max_pixels)
        if (width, height) != image.size:
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image)  # [H, W, 3]
        p, m = self.patch_size, self.merge_size
        grid_h, grid_w = height // p, width // p
        # Patch order as transformers: merge groups of m x m patches stay together; inside a patch, channel-major.
        patches = pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
        return np.ascontiguousarray(patches.reshape(grid_h * grid_w, 3, p * p)), np.array([1, grid_h, grid_w], np.int64)

    def normalize_into(self, patch_bytes: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Stage 2: uint8 [N, 3, p*p] -> float32 patches written into `out` [N, patch_dim], each frame repeated
        temporal_patch_size times (a still image), so a batch is written once, straight into its array."""
        n = patch_bytes.shape[0]
        t, pp = self.temporal_patch_size, self.patch_size**2
        frames = out.reshape(n, 3, t, pp)
        table = self._lookup_table()
        for channel in range(3):
            # mode="clip" lets take write into the strided view without an extra buffer; uint8 indices never clip.
            np.take(table[channel], patch_bytes[:, channel], out=frames[:, channel, 0], mode="clip")
        frames[:, :, 1:] = frames[:, :, :1]
        return out

    def __call__(self, image) -> tuple[np.ndarray, np.ndarray]:
        """Both stages: pixel_values [num_patches, patch_dim] float32 and grid_thw [3] int64."""
        patch_bytes, grid = self.patch_bytes(image)
        return self.normalize_into(patch_bytes, np.empty((patch_bytes.shape[0], self.patch_dim), np.float32)), grid
