"""image_ops.ImagePatcher against transformers' Qwen2-VL image processor: the very same numbers."""

import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as transformers_smart_resize

from speciarl_jax.data import Pipeline, PipelineOptions
from speciarl_jax.data.image_ops import ImagePatcher, smart_resize
from speciarl_jax.tiny_model import build_tokenizer
from speciarl_jax.processing import Processor


def test_smart_resize_matches_transformers():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        height, width = (int(x) for x in rng.integers(1, 3000, 2))
        factor = int(rng.choice([28, 32]))
        low = int(rng.integers(1, 200_000))
        high = low + int(rng.integers(0, 2_000_000))
        try:
            expected = transformers_smart_resize(height, width, factor, low, high)
        except ValueError:
            with pytest.raises(ValueError, match="aspect ratio"):
                smart_resize(height, width, factor, low, high)
            continue
        assert smart_resize(height, width, factor, low, high) == expected, (height, width, factor, low, high)


class _Settings:
    """Just what ImagePatcher.from_processor reads."""

    def __init__(self, image_processor, image_size=None):
        self.image_processor, self.image_size = image_processor, image_size


@pytest.mark.parametrize("bounds", [(28 * 28, 448 * 448), (56 * 56, 28 * 28 * 1280), (3136, 64 * 64)])
def test_patches_equal_transformers(bounds):
    reference = Qwen2VLImageProcessorPil(min_pixels=bounds[0], max_pixels=bounds[1])
    patcher = ImagePatcher.from_processor(_Settings(reference))
    rng = np.random.default_rng(1)
    for height, width in [(448, 448), (37, 91), (500, 333), (900, 20), (28, 28), (5, 9)]:
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8))
        expected = reference(images=[image], return_tensors="np")
        pixel_values, grid = patcher(image)
        assert pixel_values.dtype == np.float32
        np.testing.assert_array_equal(pixel_values, expected["pixel_values"])
        np.testing.assert_array_equal(grid, expected["image_grid_thw"][0])
    # Grey and RGBA images go through the same RGB conversion.
    for mode in ("L", "RGBA"):
        image = Image.fromarray(rng.integers(0, 255, (60, 80, 3), np.uint8)).convert(mode)
        np.testing.assert_array_equal(patcher(image)[0], reference(images=[image], return_tensors="np")["pixel_values"])


def test_custom_statistics_and_fallback():
    custom = Qwen2VLImageProcessorPil(min_pixels=784, max_pixels=112 * 112, image_mean=[0.5, 0.4, 0.3],
                                      image_std=[0.2, 0.3, 0.25], resample=Image.Resampling.BILINEAR)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (90, 70, 3), np.uint8))
    np.testing.assert_array_equal(ImagePatcher.from_processor(_Settings(custom))(image)[0],
                                  custom(images=[image], return_tensors="np")["pixel_values"])
    # Settings the patcher does not reproduce: the pipeline falls back to the processor itself.
    unnormalized = Qwen2VLImageProcessorPil(min_pixels=784, max_pixels=112 * 112, do_normalize=False)
    assert ImagePatcher.from_processor(_Settings(unnormalized)) is None
    processor = Processor(build_tokenizer(), unnormalized)

    class One:
        name = "one"

        def __len__(self):
            return 1

        def sample_id(self, i):
            return "one/0"

        def __getitem__(self, i):
            from speciarl_jax.data import Example
            return Example(np.asarray(image), "thing", "one/0")

    batch = next(iter(Pipeline(One(), processor, PipelineOptions(batch_size=1, process_index=0, process_count=1))))
    np.testing.assert_array_equal(batch.pixel_values, unnormalized(images=[image], return_tensors="np")["pixel_values"])
