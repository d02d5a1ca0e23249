"""Rollout engine: batched multimodal sampling with a KV cache."""

from .distributions import SamplingParams, choose_tokens, row_keys, sampling_logits
from .engine import RolloutEngine
from .sampler import SampleOutput, Sampler, generate

__all__ = ["generate", "RolloutEngine", "Sampler", "SampleOutput", "SamplingParams", "choose_tokens", "row_keys",
           "sampling_logits"]
