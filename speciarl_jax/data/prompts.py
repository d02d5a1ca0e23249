"""The instructions the policy reads under each image (SPEC section 2), selectable by name or from a file.

"general" asks what the image shows; "specific" adds a request for the finest name the model is sure of.
Both ask for reasoning inside <think> </think> and a single label inside <answer> </answer>, or None to
abstain, which is what `rewards.parsing` extracts.
"""

from __future__ import annotations

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


def get_prompt(name_or_path: str) -> str:
    """A built-in prompt by name ("general", "specific"), or the text of a prompt file."""
    if name_or_path in PROMPTS:
        return PROMPTS[name_or_path]
    if os.path.isfile(name_or_path):
        return load_prompt_file(name_or_path)
    raise ValueError(f"unknown prompt {name_or_path!r}: use one of {sorted(PROMPTS)} or the path of a text file")
