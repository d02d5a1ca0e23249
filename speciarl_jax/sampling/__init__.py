"""Rollouts: the rollout engine (continuous batching over decode slots) and the static sampler it builds on."""

from .distributions import SamplingParams, choose_tokens, row_keys, sampling_logits
from .engine import ENGINES, RolloutEngine, generate, make_sampler
from .sampler import SampleOutput, Sampler

__all__ = ["ENGINES", "make_sampler", "generate", "RolloutEngine", "Sampler", "SampleOutput", "SamplingParams",
           "choose_tokens", "row_keys", "sampling_logits"]
