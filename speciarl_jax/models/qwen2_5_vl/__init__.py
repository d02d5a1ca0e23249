"""Qwen2.5-VL in Flax NNX."""

from .config import Qwen25VLConfig, TextConfig, VisionConfig
from .model import KVCache, ModelOutput, Qwen25VL, set_attention_implementation
from .rope import get_position_ids
from .hf_io import from_pretrained, save_pretrained

__all__ = [
    "set_attention_implementation",
    "Qwen25VL", "Qwen25VLConfig", "TextConfig", "VisionConfig", "KVCache", "ModelOutput",
    "get_position_ids", "from_pretrained", "save_pretrained",
]
