"""Rollout engine: batched multimodal sampling with a KV cache."""

from .distributions import SamplingParams, choose_tokens, row_keys, sampling_logits
from .engine import ENGINES, RolloutEngine, make_sampler
from .sampler import SampleOutput, Sampler, generate

__all__ = ["ENGINES", "make_sampler", "generate", "RolloutEngine", "Sampler", "SampleOutput", "SamplingParams", "choose_tokens", "row_keys",
           "sampling_logits"]
