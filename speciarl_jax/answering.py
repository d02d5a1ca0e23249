"""Asking the policy to name images: generate, decode, parse. The one path from prompts to answers, used by the
training rollouts, the evaluation during training, the evaluation command and the demo; each of them then
grades the (label, answer) pairs its own way (across processes, through a resumable store, or directly).

    answers = ask(sampler, model, processor, batch.model_inputs(), Decoding(max_new_tokens=64, num_samples=8), rng)
    categories = verifier.classify(answers.pairs(batch.labels))
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import numpy as np

from .rewards.parsing import parse_answer


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How answers are drawn. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1

    @classmethod
    def greedy(cls, max_new_tokens: int, num_samples: int = 1) -> Decoding:
        return cls(max_new_tokens, temperature=0.0, num_samples=num_samples)


@dataclasses.dataclass
class Answers:
    """The responses to a prompt batch, rows prompt-major (the samples of prompt 0 first).

    output: the sampler's `SampleOutput` (tokens, response_mask, lengths, image_features, ...).
    texts: each response decoded; answers: the name inside its answer tags, None when it has none.
    truncated [N] bool: cut at max_new_tokens before an end token.
    generate_seconds: the time the sampler took (decoding and parsing not included).
    """

    output: object
    texts: list[str]
    answers: list[str | None]
    truncated: np.ndarray
    num_samples: int
    generate_seconds: float = 0.0

    def pairs(self, labels: Sequence[str]) -> list[tuple[str, str | None]]:
        """(label, answer) per response: what a verifier grades."""
        return list(zip(np.repeat(np.asarray(labels, object), self.num_samples), self.answers))

    @property
    def group_ids(self) -> np.ndarray:
        """[N] the prompt each response answers."""
        return np.arange(len(self.texts)) // self.num_samples


def ask(sampler, model, processor, inputs: Mapping[str, np.ndarray], decoding: Decoding, rng=None) -> Answers:
    """Sample `decoding.num_samples` responses per prompt of `inputs` (input_ids, attention_mask, pixel_values,
    image_grid_thw, as the processor or `Batch.model_inputs()` give them), decode and parse them."""
    start = time.perf_counter()
    out = sampler.generate(
        model, inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"), inputs.get("image_grid_thw"),
        max_new_tokens=decoding.max_new_tokens, temperature=decoding.temperature, top_p=decoding.top_p,
        top_k=decoding.top_k, num_samples=decoding.num_samples, eos_token_ids=processor.eos_token_ids, rng=rng,
        pad_token_id=processor.pad_token_id,
    )
    generate_seconds = time.perf_counter() - start
    lengths = np.asarray(out.lengths)
    texts = processor.decode_responses(out.tokens, lengths)
    eos = np.asarray(processor.eos_token_ids)
    last = np.asarray(out.tokens)[np.arange(len(lengths)), np.maximum(lengths - 1, 0)]
    ended = (lengths > 0) & np.isin(last, eos)
    truncated = (lengths == decoding.max_new_tokens) & ~ended
    return Answers(out, texts, [parse_answer(t) for t in texts], truncated, decoding.num_samples, generate_seconds)
