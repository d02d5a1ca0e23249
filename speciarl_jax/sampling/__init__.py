"""Rollout engine: batched multimodal sampling with a KV cache."""

from .distributions import SamplingParams, choose_tokens, sampling_logits
from .sampler import SampleOutput, Sampler, generate

__all__ = ["generate", "Sampler", "SampleOutput", "SamplingParams", "choose_tokens", "sampling_logits"]
