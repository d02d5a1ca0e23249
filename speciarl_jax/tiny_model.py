"""A small random Qwen2.5-VL with a tokenizer built offline: the checkpoint behind the tests and the demo.

Everything is made locally: a byte-level BPE trained on a short built-in text with the Qwen special tokens,
a chat template in the Qwen format, the PIL image processor's settings, and random weights saved as a
Hugging Face folder that transformers loads as it would the real model. It sits beside the packages rather than
in `models/`: its tokenizer learns the project's prompts and synthetic-world names (`data`), which the model
package must not import (tests/test_import_contracts.py).
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
from flax import nnx

from .models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig, VisionConfig
from .models.qwen2_5_vl.hf_io import save_pretrained
from .models.qwen2_5_vl.model import Qwen25VL

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)

# The Qwen chat layout: a default system turn, user content with images as vision blocks, then the assistant opening.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' or 'image' in part %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Text the BPE merges are learned from: the prompt and answer format plus everyday words.
_CORPUS = """
You are a helpful assistant. What is shown in this image? Classify the main subject of the picture.
Think step by step inside <think> </think> and give the final answer inside <answer> </answer>.
Answer with a single label, as specific as you can, or None if you do not know.
<think> The image shows a bird with a red crest and a black face. </think> <answer> Northern Cardinal </answer>
<think> It is a small round shape with stripes. </think> <answer> shape </answer>
bird dog cat flower food car aircraft plane airplane warbler sparrow finch eagle owl duck gull tern wren
red green blue yellow orange purple black white gray brown pink cyan magenta striped dotted plain
circle square triangle star hexagon ring cross diamond heart moon arrow spiral
the a an of and or in on with is are this that it its none unknown species family genus kind type
""".strip()


def _corpus_lines() -> list[str]:
    """The built-in text plus the project's own prompts and synthetic-world names, so that the prompts the
    demo and tests send tokenize into few tokens (a tiny model's sequences stay short)."""
    from .data.prompts import PROMPTS
    from .data.synthetic import SyntheticWorld

    world = SyntheticWorld()
    names = [n for c in world.classes for n in (c.name, *c.synonyms)] + list(world.families) + [world.generic]
    answers = [f"<think></think><answer>{n}</answer>" for n in names]
    return _CORPUS.splitlines() + list(PROMPTS.values()) + names + answers


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Sizes of the random model. The defaults give a ~0.2M-parameter model for unit tests."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    fullatt_block_indexes: tuple[int, ...] = (1,)
    window_size: int = 56  # 2x2 merged patches per window: small images already use several windows
    tokenizer_vocab: int = 1024
    tie_word_embeddings: bool = False
    min_pixels: int = 28 * 28
    max_pixels: int = 224 * 224


def build_tokenizer(spec: TinySpec = TinySpec()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.tokenizer_vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus_lines() * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer, spec: TinySpec = TinySpec()) -> Qwen25VLConfig:
    head_dim = spec.hidden_size // spec.num_heads
    quarter = head_dim // 2
    mrope = (quarter - 2 * (quarter // 3), quarter // 3, quarter // 3)  # sums to head_dim / 2
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = -(-len(tokenizer) // 64) * 64
    return Qwen25VLConfig(
        text=TextConfig(
            vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads, mrope_section=mrope, max_position_embeddings=4096,
        ),
        vision=VisionConfig(
            depth=spec.vision_depth, hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
            num_heads=spec.vision_heads, out_hidden_size=spec.hidden_size, window_size=spec.window_size,
            fullatt_block_indexes=spec.fullatt_block_indexes,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=(ids["<|im_end|>"], ids["<|endoftext|>"]),
        pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=spec.tie_word_embeddings,
    )


def make_tiny_checkpoint(path: str | os.PathLike, spec: TinySpec = TinySpec(), seed: int = 0) -> str:
    """Write a random Qwen2.5-VL Hugging Face folder (weights, config, tokenizer, image processor) to `path`."""
    from transformers import Qwen2VLImageProcessorPil

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer(spec)
    config = tiny_config(tokenizer, spec)
    model = Qwen25VL(config, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    save_pretrained(model, path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels).save_pretrained(path)
    return path
