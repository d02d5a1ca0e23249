"""The instructions the policy reads under each image (docs/method.md, the policy's answer), selectable by name
or from a file.

"general" asks what the image shows; "specific" adds a request for the finest name the model is sure of.
Both ask for reasoning inside <think> </think> and a single label inside <answer> </answer>, or None to
abstain, which is what `rewards.parsing` extracts.

A prompt file is either plain text (the instruction) or, to run the original SpeciaRL prompts verbatim, one of
its NDJSON prompt files (`general_base.ndjson`, `specific_base.ndjson`, ...): one JSON object per line with the
instruction in "user_prompt_template" and an optional "system_prompt". The line used is the one not tied to a
data set ("dataset_specific" empty), as the original's builder picks for these files; its text is stripped as
the original strips it, and a non-empty system prompt becomes the system turn.
"""

from __future__ import annotations

import dataclasses
import json
import os

_FORMAT = (
    "First reason briefly inside <think> </think>. Then give your final answer inside <answer> </answer>: "
    "one label only, never a list of options. If you cannot tell, answer <answer>None</answer>."
)

PROMPTS: dict[str, str] = {
    # For tiny CPU models (the demo), where every prompt token costs time and dilutes the few image tokens: it
    # does not state the answer format, which the demo's SFT warm start teaches. Real models need the others.
    "brief": "Name it.",
    "general": f"What is the main subject of this image? Name it. {_FORMAT}",
    "specific": (
        "What is the main subject of this image? Name it as precisely as you can: prefer the most "
        f"fine-grained name you are confident in (the exact species, model or variety) over a broad category. {_FORMAT}"
    ),
}


def load_prompt_file(path: str | os.PathLike) -> str:
    """A prompt written in a UTF-8 text file: the whole file, stripped."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file not found: {path}") from None
    if not text:
        raise ValueError(f"prompt file {path} is empty")
    return text


@dataclasses.dataclass(frozen=True)
class Prompt:
    instruction: str  # the user turn's text, after the image
    system: str | None = None  # a system turn the prompt brings with it (NDJSON files), else None


def load_ndjson_prompt(path: str | os.PathLike) -> Prompt:
    """The general (not data-set-specific) prompt of an NDJSON prompt file in the original's format."""
    general = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not valid JSON ({err})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("user_prompt_template"), str):
                raise ValueError(f"{path}:{number} has no \"user_prompt_template\" text")
            if not entry.get("dataset_specific"):
                general.append(entry)
    if len(general) != 1:
        raise ValueError(f"{path} holds {len(general)} prompts not tied to a data set; one prompt applies to a "
                         "whole run here, so keep exactly one such line")
    entry = general[0]
    instruction = entry["user_prompt_template"].strip()
    if not instruction:
        raise ValueError(f"{path}: the prompt's user_prompt_template is empty")
    return Prompt(instruction, entry.get("system_prompt") or None)


def load_prompt(name_or_path: str) -> Prompt:
    """A built-in prompt by name ("general", "specific"), a text file, or an NDJSON prompt file."""
    if name_or_path in PROMPTS:
        return Prompt(PROMPTS[name_or_path])
    if os.path.isfile(name_or_path):
        if str(name_or_path).endswith((".ndjson", ".jsonl")):
            return load_ndjson_prompt(name_or_path)
        return Prompt(load_prompt_file(name_or_path))
    raise ValueError(f"unknown prompt {name_or_path!r}: use one of {sorted(PROMPTS)}, the path of a text file, "
                     "or an NDJSON prompt file")


def get_prompt(name_or_path: str) -> str:
    """The instruction of `load_prompt(name_or_path)`."""
    return load_prompt(name_or_path).instruction
