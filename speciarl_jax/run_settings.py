"""Evaluating a training run as it was trained.

A policy answers the question it was trained on: the same prompt, system turn, image size and (in the synthetic
world) the same world. A run folder (`runs/demo`), its checkpoints (`runs/demo/checkpoints`, `.../60`) and its
SFT or initial model (`runs/demo/sft_model`, `runs/demo/tiny_model`) all lead back to the config the run was
trained with, and `resolve` fills every evaluation setting left unset (None) from it:

    prompt, system_prompt, image.{min_pixels,max_pixels,image_size}, model.dtype, decoding.max_new_tokens,
    data.pad_to_multiple_of, verifier.*, and the world of each synthetic data set (seed, image_size, noise,
    variation)

A value set in the evaluation config that differs from the run's is kept (prompt studies need it) and listed
as a change from training, in the printed summary, in run.json and in the model's label. Without a run, unset
settings take `WITHOUT_RUN`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import zlib
from collections.abc import Mapping
from typing import Any

# Unset evaluation settings without a training run to take them from.
WITHOUT_RUN: dict[str, Any] = {
    "prompt": "general",
    "system_prompt": None,
    "image.min_pixels": None,
    "image.max_pixels": None,
    "image.image_size": None,
    "model.dtype": "bfloat16",
    "decoding.max_new_tokens": 2048,
    "data.pad_to_multiple_of": 64,
    "decoding.batch_size": 16,
}
# Taken quietly: they change how prompts are batched and padded, not the question asked.
_QUIET = ("data.pad_to_multiple_of", "decoding.batch_size")


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A model a training run produced: a checkpoint of it, or one of its Hugging Face folders."""

    run_dir: str
    config: dict  # the run's training config
    checkpoint: str | None = None  # <run>/checkpoints/<step>
    step: int | None = None
    model_path: str | None = None  # <run>/sft_model or <run>/tiny_model, when no checkpoint is meant

    @property
    def location(self) -> str:
        """The checkpoint or model folder evaluated."""
        return self.checkpoint or self.model_path

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.run_dir))

    @property
    def stage(self) -> str:
        """A short name of what is evaluated: "step_60", "sft_model" or "tiny_model"."""
        return f"step_{self.step}" if self.checkpoint else os.path.basename(os.path.normpath(self.model_path))

    @property
    def label(self) -> str:
        if self.checkpoint:
            return f"{self.name} step {self.step}"
        what = {"sft_model": "after SFT", "tiny_model": "at start"}.get(self.stage, self.stage)
        return f"{self.name} {what}"


def find(path: str) -> TrainedModel | None:
    """The trained model `path` names: a run folder (its latest finished checkpoint, else its SFT model), a
    checkpoints folder or one step of it, or a run's `sft_model` / `tiny_model`. None when `path` is not part
    of a training run."""
    from speciarl_jax.checkpoint import RunFolder, locate_step, read_meta

    if not path:
        return None
    path = os.path.abspath(path)
    run = RunFolder(path)
    located = locate_step(path)
    if located is None and run.training_config() is not None:  # a run folder
        located = locate_step(run.checkpoints)
        if located is None:
            if run.has_sft_model():
                return TrainedModel(path, run.training_config(), model_path=run.sft_model)
            raise FileNotFoundError(f"the run {path} has no finished checkpoint and no SFT model yet")
    if located is not None:
        directory, step = located
        step_folder = os.path.join(directory, str(step))
        config = read_meta(step_folder).get("config") or RunFolder(os.path.dirname(directory)).training_config()
        return TrainedModel(os.path.dirname(directory), config or {}, checkpoint=step_folder, step=step)
    parent = RunFolder(os.path.dirname(path))
    config = parent.training_config()
    if config is not None and os.path.exists(os.path.join(path, "config.json")):
        return TrainedModel(parent.path, config, model_path=path)
    return None


def trained_values(config: Mapping) -> dict[str, Any]:
    """The evaluation settings a training config implies, under the evaluation config's keys."""
    data, model = config.get("data", {}), config.get("model", {})
    rollout, held_out = config.get("rollout", {}), config.get("eval", {})
    size = data.get("image_size")
    return {
        "prompt": data.get("prompt", "general"),
        "system_prompt": data.get("system_prompt") or None,
        "image.min_pixels": data.get("min_pixels") or None,
        "image.max_pixels": data.get("max_pixels") or None,
        "image.image_size": tuple(size) if size and all(size) else None,
        "model.dtype": model.get("dtype", WITHOUT_RUN["model.dtype"]),
        "decoding.max_new_tokens": held_out.get("max_new_tokens") or rollout.get("max_new_tokens")
        or WITHOUT_RUN["decoding.max_new_tokens"],
        "data.pad_to_multiple_of": data.get("pad_to_multiple_of", WITHOUT_RUN["data.pad_to_multiple_of"]),
        "decoding.batch_size": held_out.get("batch_size") or WITHOUT_RUN["decoding.batch_size"],
    }


def trained_world(config: Mapping) -> dict[str, Any] | None:
    """The synthetic world a run trained in (every setting, the world's defaults included), or None."""
    import inspect

    from speciarl_jax.data.config import WORLD_FIELDS
    from speciarl_jax.data.synthetic import SyntheticWorld

    source = config.get("data", {}).get("source", {})
    if source.get("kind") != "synthetic":
        return None
    defaults = inspect.signature(SyntheticWorld).parameters
    return {k: _normal(source[k] if source.get(k) is not None else defaults[k].default) for k in WORLD_FIELDS}


def held_out_set(config: Mapping) -> tuple[str, dict]:
    """(name, source entry) of the run's own held-out set: its `eval` section (as the trainer evaluates)."""
    held_out = config.get("eval", {})
    source = dict(held_out.get("source") or {})
    if not source:
        raise ValueError("the run's config has no eval.source: name the data sets (an evaluation config file)")
    train = config.get("data", {}).get("source", {})
    if not source.get("data_dir") and train.get("data_dir") and source.get("kind") in ("tfds", "benchmark"):
        source["data_dir"] = train["data_dir"]  # the training data's folder holds the test split too
    source = {k: v for k, v in source.items() if v not in ("", None)}
    if held_out.get("num_examples"):
        source["num_examples"] = held_out["num_examples"]
    name = source.get("name") or {"synthetic": "synthetic", "aircraft": "aircraft"}.get(source.get("kind"), "held_out")
    return name, source


def _normal(value, key: str = ""):
    """Lists and tuples compare as tuples; an empty string is no value, and so is 0 for an image setting."""
    if isinstance(value, (list, tuple)):
        value = tuple(_normal(v) for v in value)
    if key.startswith("image.") and (value == 0 or (isinstance(value, tuple) and not any(value))):
        return None
    return None if value == "" else value


def _get(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _set(config, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        config = config[part]
    config[last] = value


@dataclasses.dataclass
class Resolution:
    """What `resolve` did: the trained model, the settings it took from the run, the ones that differ."""

    trained: TrainedModel | None = None
    taken: dict[str, Any] = dataclasses.field(default_factory=dict)
    changed: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # key -> evaluated, trained

    def to_json(self) -> dict:
        if self.trained is None:
            return {}
        return {"run": self.trained.run_dir, "model": self.trained.location, "taken_from_training": _plain(self.taken),
                "changed_from_training": _plain(self.changed)}

    def suffix(self) -> str:
        """The changes as a short label, e.g. "prompt=specific"."""
        parts = []
        for key, change in self.changed.items():
            value = str(change["evaluated"])
            parts.append(f"{key.split('.')[-1]}={value if len(value) <= 24 else value[:21] + '...'}")
        return ", ".join(parts)

    def describe(self) -> str:
        if self.trained is None:
            return ""
        lines = [f"Evaluating {self.trained.label} ({self.trained.location}) with the settings it was trained with:"]
        worlds: dict[str, list[str]] = {}  # datasets.<name>.<field>: one line per data set
        for key, value in self.taken.items():
            if key in _QUIET or value is None:
                continue
            if key.startswith("datasets.") and key.count(".") == 2:
                _, name, field = key.split(".")
                worlds.setdefault(name, []).append(f"{field}={value!r}")
            else:
                lines.append(f"  {key} = {value!r}")
        lines += [f"  datasets.{name} world: {', '.join(fields)}" for name, fields in worlds.items()]
        if self.changed:
            lines.append("Changed from training (set in the evaluation config):")
            lines += [f"  {key} = {c['evaluated']!r} (trained with {c['trained']!r})" for key, c in self.changed.items()]
        return "\n".join(lines)


def _plain(value):
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _locate(config) -> TrainedModel | None:
    """The trained model the evaluation config names (config.run, or a model path / adapter inside a run), and
    config.model filled in from config.run."""
    if config.model.kind != "qwen":
        if config.run:
            raise ValueError("config.run names a training run, but config.model.kind is not 'qwen'")
        return None
    if config.run:
        if config.model.adapter or config.model.path:
            raise ValueError(f"config.run ({config.run}) names the model to evaluate; leave config.model.path and "
                             "config.model.adapter empty")
        trained = find(config.run)
        if trained is None:
            raise FileNotFoundError(f"config.run: {config.run} is not a training run, a checkpoint of one or a "
                                    "run's sft_model / tiny_model (no training config.json found)")
        config.model.adapter = trained.checkpoint or ""
        config.model.path = trained.model_path or ""
        return trained
    if config.model.adapter:
        from speciarl_jax import checkpoint

        return find(config.model.adapter) if checkpoint.locate_step(config.model.adapter) else None
    trained = find(config.model.path) if config.model.path else None
    if trained is not None and trained.checkpoint:  # a run folder or checkpoint given as the model folder
        config.model.path, config.model.adapter = "", trained.checkpoint
    return trained


def resolve(config):
    """A copy of the evaluation config with its unset settings filled (from the run it evaluates, if any), and
    the `Resolution` saying what was taken and what differs from training."""
    import ml_collections as mc

    from speciarl_jax.data.config import WORLD_FIELDS, source_config_dict

    config = copy.deepcopy(config)
    config.unlock()
    trained = _locate(config)
    result = Resolution(trained)
    run = trained.config if trained else {}
    values = trained_values(run) if trained else dict(WITHOUT_RUN)
    if config.decoding.mode == "best_of_n" and trained:  # about as many rows per batch as the run's evaluation
        values["decoding.batch_size"] = max(1, values["decoding.batch_size"] // max(1, config.decoding.n))
    # The answer length a run was trained with is its rollouts'; its held-out check may have used a shorter one.
    also_trained = {"decoding.max_new_tokens": run.get("rollout", {}).get("max_new_tokens")}
    for key in WITHOUT_RUN:
        current = _get(config, key)
        if current is None:
            _set(config, key, values[key])
            if trained:
                result.taken[key] = values[key]
        elif (trained and key not in _QUIET and _normal(current, key) != _normal(values[key], key)
              and current != also_trained.get(key)):
            trained_value = also_trained.get(key) or values[key]
            result.changed[key] = {"evaluated": _normal(current, key), "trained": trained_value}

    if trained and not len(config.datasets):  # the run's own held-out set, as the trainer evaluated it
        name, entry = held_out_set(run)
        config.datasets = mc.ConfigDict({name: source_config_dict(entry)})
        result.taken[f"datasets.{name}"] = entry
    world = trained_world(run) if trained else None
    for name, entry in config.datasets.items():
        if entry.get("kind") != "synthetic" or world is None:
            continue
        for key in WORLD_FIELDS:
            value = entry.get(key)
            if value is None:
                entry[key] = world[key]
                result.taken[f"datasets.{name}.{key}"] = world[key]
            elif _normal(value) != world[key]:
                result.changed[f"datasets.{name}.{key}"] = {"evaluated": _normal(value), "trained": world[key]}

    unset = [key for key in config.verifier.keys() if config.verifier[key] is None]
    if unset:
        from speciarl_jax.verifier import VerifierConfig

        verifier = {**VerifierConfig().to_dict(), **run.get("verifier", {})}
        for key in unset:
            config.verifier[key] = verifier[key]
        if "kind" in unset and trained:
            result.taken["verifier.kind"] = config.verifier.kind

    if config.output_dir is None:
        config.output_dir = os.path.join(trained.run_dir, "eval", trained.stage + _folder_suffix(result, config, run)) \
            if trained else "runs/eval"
    if trained and not config.model.name:
        config.model.name = trained.label + (f" ({result.suffix()})" if result.changed else "")
    config.lock()
    return config, result


def _folder_suffix(result: Resolution, config, run: Mapping) -> str:
    """"" for a greedy evaluation as trained; else what differs: the changes (readable when short, a checksum
    when long), Best-of-N, and another verifier than the run's, e.g. "+prompt=specific+best_of_64"."""
    parts = [f"{k.split('.')[-1]}={c['evaluated']}" for k, c in result.changed.items()]
    text = re.sub(r"[^A-Za-z0-9_.=+-]", "_", "+".join(parts))
    if len(text) > 48:
        text = f"changed-{zlib.crc32(json.dumps(_plain(result.changed), sort_keys=True).encode()):08x}"
    extra = [text] if text else []
    if config.decoding.mode == "best_of_n":
        extra.append(f"best_of_{config.decoding.n}")
    trained_verifier = run.get("verifier", {})
    if (config.verifier.kind, config.verifier.model) != (trained_verifier.get("kind"), trained_verifier.get("model")):
        name = config.verifier.kind if config.verifier.kind != "openai" else config.verifier.model
        extra.append("verifier=" + re.sub(r"[^A-Za-z0-9_.=-]", "_", os.path.basename(str(name)))[:40])
    return "".join("+" + e for e in extra)
