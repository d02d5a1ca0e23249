"""Qwen2.5-VL configuration, read from a Hugging Face `config.json`.

Two layouts exist in the wild: the hub checkpoints keep the language-model fields at the top level
(with `rope_scaling`), while transformers 5 writes them under `text_config` (with `rope_parameters`).
Both are accepted; `to_hf_dict` writes the flat hub layout, which every transformers release and vLLM read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

MODEL_TYPE = "qwen2_5_vl"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch, as the image processor emits it."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None

    def __post_init__(self):
        _validate(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "Qwen25VLConfig":
        model_type = raw.get("model_type")
        if model_type != MODEL_TYPE:
            raise ValueError(
                f"{source}: model_type is {model_type!r}, expected {MODEL_TYPE!r} (a Qwen2.5-VL checkpoint)."
            )
        # transformers 5 nests the text fields; hub checkpoints keep them flat. Nested values win.
        text_raw = {**{k: v for k, v in raw.items() if k != "text_config"}, **(raw.get("text_config") or {})}
        rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
        text = TextConfig(
            **_pick(text_raw, TextConfig, exclude=("mrope_section", "rope_theta")),
            rope_theta=float(rope.get("rope_theta", text_raw.get("rope_theta", TextConfig.rope_theta))),
            mrope_section=tuple(rope.get("mrope_section", TextConfig.mrope_section)),
        )
        vision_raw = dict(raw.get("vision_config") or {})
        if "in_chans" in vision_raw and "in_channels" not in vision_raw:
            vision_raw["in_channels"] = vision_raw["in_chans"]
        if "spatial_patch_size" in vision_raw and "patch_size" not in vision_raw:
            vision_raw["patch_size"] = vision_raw["spatial_patch_size"]
        vision_rope = vision_raw.get("rope_parameters") or {}
        vision = VisionConfig(
            **_pick(vision_raw, VisionConfig, exclude=("fullatt_block_indexes", "rope_theta")),
            fullatt_block_indexes=tuple(vision_raw.get("fullatt_block_indexes", VisionConfig.fullatt_block_indexes)),
            rope_theta=float(vision_rope.get("rope_theta", VisionConfig.rope_theta)),
        )
        tie = bool(raw.get("tie_word_embeddings", False) or (raw.get("text_config") or {}).get("tie_word_embeddings"))
        eos = text_raw.get("eos_token_id", Qwen25VLConfig.eos_token_id)
        return cls(
            text=text,
            vision=vision,
            tie_word_embeddings=tie,
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            **_pick(raw, cls, exclude=("text", "vision", "tie_word_embeddings", "eos_token_id")),
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Qwen25VLConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"No config.json at {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f), source=path)

    def to_hf_dict(self) -> dict[str, Any]:
        """The flat hub layout of `config.json`."""
        t, v = self.text, self.vision
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": MODEL_TYPE,
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "vision_config": {
                "model_type": "qwen2_5_vl",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_chans": v.in_channels,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "spatial_patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size,
                "out_hidden_size": v.out_hidden_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "tokens_per_second": v.tokens_per_second,
                "hidden_act": v.hidden_act,
            },
        }

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)


def _pick(raw: dict, cls, exclude=()) -> dict:
    names = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    return {k: v for k, v in raw.items() if k in names}


def _validate(cfg: Qwen25VLConfig) -> None:
    t, v = cfg.text, cfg.vision
    problems = []
    if t.hidden_size % t.num_attention_heads:
        problems.append(f"text hidden_size {t.hidden_size} is not divisible by num_attention_heads {t.num_attention_heads}")
    if t.num_attention_heads % t.num_key_value_heads:
        problems.append(
            f"num_attention_heads {t.num_attention_heads} is not a multiple of num_key_value_heads {t.num_key_value_heads}"
        )
    if 2 * sum(t.mrope_section) != t.head_dim:
        problems.append(f"mrope_section {list(t.mrope_section)} must sum to head_dim/2 = {t.head_dim // 2}")
    if v.hidden_size % v.num_heads:
        problems.append(f"vision hidden_size {v.hidden_size} is not divisible by num_heads {v.num_heads}")
    if v.out_hidden_size != t.hidden_size:
        problems.append(f"vision out_hidden_size {v.out_hidden_size} differs from text hidden_size {t.hidden_size}")
    if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
        problems.append(f"fullatt_block_indexes {list(v.fullatt_block_indexes)} fall outside depth {v.depth}")
    if t.hidden_act != "silu" or v.hidden_act != "silu":
        problems.append(f"only silu activations are supported (text {t.hidden_act}, vision {v.hidden_act})")
    if problems:
        raise ValueError("Invalid Qwen2.5-VL config: " + "; ".join(problems))
