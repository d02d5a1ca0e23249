"""The one path from prompts to answers (answering.ask): what it asks the sampler for, and how it decodes, parses
and flags the responses, on token rows written by hand with the tiny model's real tokenizer."""

import types

import numpy as np

from speciarl_jax.answering import Decoding, ask


class RecordingSampler:
    """Returns fixed responses and remembers the request."""

    def __init__(self, tokens, lengths):
        self.tokens, self.lengths = tokens, lengths

    def generate(self, model, input_ids, attention_mask, pixel_values, image_grid_thw, **request):
        self.request = dict(request, input_ids=input_ids, pixel_values=pixel_values)
        return types.SimpleNamespace(tokens=self.tokens, lengths=self.lengths)


def test_ask_decodes_parses_and_flags_responses_cut_at_the_length_limit(tiny_processor):
    p = tiny_processor
    end, pad = p.eos_token_ids[0], p.pad_token_id
    ids = lambda text: p.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    first = ids("<answer>barn owl</answer>") + [end]  # ended by the end token
    width = len(first) + 3
    cut = (ids("<answer>gull") + ids(" and more words") * width)[:width]  # reaches the limit, no end token
    short = ids("no tags")  # short, nothing to parse, not cut
    tokens = np.full((3, width), pad, np.int32)
    for i, row in enumerate((first, cut, short)):
        tokens[i, : len(row)] = row
    sampler = RecordingSampler(tokens, np.array([len(first), width, len(short)]))
    inputs = {"input_ids": np.zeros((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int32)}
    decoding = Decoding(max_new_tokens=width, temperature=0.7, top_p=0.9, top_k=5, num_samples=3)

    answers = ask(sampler, model=None, processor=p, inputs=inputs, decoding=decoding, rng="key")

    assert sampler.request["pixel_values"] is None  # a text-only batch asks for no images
    asked = {k: sampler.request[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k", "num_samples", "rng",
                                             "pad_token_id", "eos_token_ids")}
    assert asked == dict(max_new_tokens=width, temperature=0.7, top_p=0.9, top_k=5, num_samples=3, rng="key",
                         pad_token_id=pad, eos_token_ids=p.eos_token_ids)
    assert answers.texts[0] == "<answer>barn owl</answer>" and answers.texts[2] == "no tags"
    assert answers.texts[1].startswith("<answer>gull and more words")
    assert answers.answers == ["barn owl", None, None]
    assert answers.truncated.tolist() == [False, True, False]
    assert answers.pairs(["barn owl"]) == [("barn owl", "barn owl"), ("barn owl", None), ("barn owl", None)]
    np.testing.assert_array_equal(answers.group_ids, [0, 0, 0])


def test_an_end_token_at_the_limit_is_not_a_cut(tiny_processor):
    p = tiny_processor
    row = p.tokenizer("<answer>gull</answer>", add_special_tokens=False)["input_ids"] + [p.eos_token_ids[0]]
    tokens = np.array([row, row[:-1] + [p.pad_token_id]], np.int32)
    sampler = RecordingSampler(tokens, np.array([len(row), len(row) - 1]))
    inputs = {"input_ids": np.zeros((2, 4), np.int32), "attention_mask": np.ones((2, 4), np.int32)}
    answers = ask(sampler, None, p, inputs, Decoding.greedy(len(row)))
    assert answers.truncated.tolist() == [False, False]
    assert sampler.request["temperature"] == 0.0 and sampler.request["num_samples"] == 1
    answers = ask(sampler, None, p, inputs, Decoding.greedy(len(row) - 1))  # the second row now fills the limit
    assert answers.truncated.tolist() == [False, True]
    assert answers.answers == ["gull", "gull"]
    np.testing.assert_array_equal(answers.group_ids, [0, 1])


def test_pairs_repeat_each_label_for_its_samples():
    from speciarl_jax.answering import Answers

    answers = Answers(output=None, texts=["t"] * 6, answers=list("uvwxyz"), truncated=np.zeros(6, bool),
                      num_samples=3)
    assert answers.pairs(["a", "b"]) == [("a", "u"), ("a", "v"), ("a", "w"), ("b", "x"), ("b", "y"), ("b", "z")]
    np.testing.assert_array_equal(answers.group_ids, [0, 0, 0, 1, 1, 1])
