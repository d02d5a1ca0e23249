"""Prompts and images -> the arrays Qwen2.5-VL takes, with transformers' tokenizer and PIL image processor.

transformers' `Qwen2_5_VLProcessor` also builds a video processor, which needs torchvision; this module does
the same job for images only: the chat template, image patches from `Qwen2VLImageProcessorPil`, and the
expansion of each `<|image_pad|>` into one token per merged patch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

IMAGE_TOKEN = "<|image_pad|>"
END_TOKENS = ("<|im_end|>", "<|endoftext|>")


class Processor:
    """Tokenizer + image processor for Qwen2.5-VL.

    Args:
      tokenizer: a transformers tokenizer with the Qwen chat template and special tokens.
      image_processor: a `Qwen2VLImageProcessorPil` (or compatible) instance.
      image_size: optional (height, width); every image is resized to it first, so that all images share
        one patch grid and the vision tower compiles once. Both sides must be multiples of 28.
    """

    def __init__(self, tokenizer, image_processor, *, image_size: tuple[int, int] | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {IMAGE_TOKEN} token; it is not a Qwen2.5-VL tokenizer.")
        factor = int(image_processor.patch_size) * self.merge_size
        if image_size is not None and (image_size[0] % factor or image_size[1] % factor):
            raise ValueError(f"image_size {image_size} must be multiples of {factor} (patch size x merge size).")
        self.image_size = tuple(image_size) if image_size is not None else None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = "<|endoftext|>"

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, min_pixels=None, max_pixels=None, image_size=None):
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        path = os.fspath(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        if os.path.exists(os.path.join(path, "preprocessor_config.json")):
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs)
        else:
            image_processor = Qwen2VLImageProcessorPil(**kwargs)
        return cls(tokenizer, image_processor, image_size=image_size)

    @property
    def max_patches_per_image(self) -> int:
        """The most vision patches one image can become (its fixed size, or the processor's max_pixels)."""
        patch = int(self.image_processor.patch_size)
        if self.image_size is not None:
            return (self.image_size[0] // patch) * (self.image_size[1] // patch)
        return int(self.image_processor.size["longest_edge"]) // (patch * patch)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS]
        return tuple(i for i in ids if i is not None and i != self.tokenizer.unk_token_id)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def chat_prompt(self, instruction: str, num_images: int = 1, system: str | None = None) -> str:
        """One user turn (the images first, then the instruction) followed by the assistant's opening."""
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": instruction}]
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_images(self, images: Sequence) -> dict[str, np.ndarray]:
        """pixel_values [num_patches, patch_dim] float32 and image_grid_thw [num_images, 3] int64."""
        images = [self._prepare(im) for im in images]
        out = self.image_processor(images=images, return_tensors="np")
        return {
            "pixel_values": np.asarray(out["pixel_values"], np.float32),
            "image_grid_thw": np.asarray(out["image_grid_thw"], np.int64),
        }

    def _prepare(self, image) -> Image.Image:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        if self.image_size is not None and image.size != (self.image_size[1], self.image_size[0]):
            image = image.resize((self.image_size[1], self.image_size[0]), Image.Resampling.BICUBIC)
        return image

    def expand_image_tokens(self, text: str, grids: Sequence[Sequence[int]]) -> str:
        """Replace each <|image_pad|> in `text` with as many copies as its image has merged patches."""
        pieces = text.split(IMAGE_TOKEN)
        if len(pieces) - 1 != len(grids):
            raise ValueError(f"The text holds {len(pieces) - 1} {IMAGE_TOKEN} markers but {len(grids)} images were given.")
        out = [pieces[0]]
        for grid, piece in zip(grids, pieces[1:]):
            out.append(IMAGE_TOKEN * (int(np.prod(grid)) // self.merge_size**2) + piece)
        return "".join(out)

    def __call__(
        self,
        text: str | Sequence[str],
        images: Sequence | None = None,
        *,
        padding_side: str = "left",
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Batch arrays by the names transformers' processor uses.

        `images` lists the images of all rows in reading order (row 0's first); each row's text holds one
        <|image_pad|> marker per image, as `chat_prompt` writes it.
        """
        texts = [text] if isinstance(text, str) else list(text)
        batch: dict[str, np.ndarray] = {}
        if images:
            batch.update(self.encode_images(images))
            grids = batch["image_grid_thw"].tolist()
            expanded = []
            for t in texts:
                n = t.count(IMAGE_TOKEN)
                expanded.append(self.expand_image_tokens(t, grids[:n]))
                grids = grids[n:]
            if grids:
                raise ValueError(f"{len(grids)} images were given beyond the {IMAGE_TOKEN} markers in the texts.")
            texts = expanded
        elif any(IMAGE_TOKEN in t for t in texts):
            raise ValueError(f"The texts hold {IMAGE_TOKEN} markers but no images were given.")
        tokens = self.tokenizer(
            texts, padding=True, padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of,
            return_tensors="np", add_special_tokens=False,
        )
        batch["input_ids"] = np.asarray(tokens["input_ids"], np.int32)
        batch["attention_mask"] = np.asarray(tokens["attention_mask"], np.int32)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).astype(np.int32)
        return batch

    def decode_responses(self, tokens, lengths) -> list[str]:
        """The text of each generated row [N, L], cut at its length [N]."""
        return [self.decode(row[:n]) for row, n in zip(tokens, lengths)]

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(np.asarray(token_ids)), skip_special_tokens=skip_special_tokens)
