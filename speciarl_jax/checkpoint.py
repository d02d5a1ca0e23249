"""The run folder and its checkpoints: what a training run writes where, and how it is read back.

A run folder (`RunFolder`) holds:
  config.json      the run's config, as trained
  checkpoints/     orbax steps, `checkpoints/<step>/{params,opt_state,meta}` (below)
  sft_model/       the Hugging Face folder SFT ended with (present once SFT finished)
  tiny_model/      the tiny random starting model of `model.tiny` runs
  metrics.jsonl, tb/   the logs; with checkpoints/, what one attempt writes (`set_aside` moves them)
  earlier/<time>/  attempts set aside by a run told to start over


A checkpoint holds, per step:
  params     the trainable parameters only (the LoRA adapters when LoRA is on, otherwise the whole model);
  opt_state  the optimizer state for them;
  meta       JSON: step, RNG key data, the data iterator's state, the run config and the last metrics.
Orbax writes each step into a temporary folder and renames it once complete (on GCS it writes a commit
marker last), so a save that is killed part-way never looks like a checkpoint; `latest_step` only sees
finished ones. Paths may be local or `gs://` buckets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def _is_remote(path: str) -> bool:
    return "://" in path


class Checkpointer:
    """Save and restore training state under `directory/<step>/`, keeping the last `keep` steps.

    With `async_save`, `save` returns once the arrays are copied off the devices and the files are written in
    the background (the next `save`, `wait` or `close` waits for them); a step counts as saved only after the
    rename that finishes it, so a crash mid-write still leaves the previous step as the latest.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = False,
                 read_only: bool = False):  # read_only: for readers (evaluation, export): it keeps every step
        directory = os.fspath(directory)
        if not _is_remote(directory):
            directory = os.path.abspath(directory)
        self.directory = directory
        self._async = async_save
        self._manager = ocp.CheckpointManager(
            epath.Path(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep, create=not read_only,
                                               enable_async_checkpointing=async_save),
            item_names=("params", "opt_state", "meta"),
        )

    def latest_step(self) -> int | None:
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return list(self._manager.all_steps())

    def save(self, step: int, *, params, opt_state, meta: dict[str, Any]) -> None:
        """Write one step (in the background with `async_save`; otherwise wait until it is complete on disk)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(_jsonable(meta)),
            ),
            force=True,
        )
        if not self._async:
            self.wait()

    def wait(self) -> None:
        """Block until every save started so far is complete on disk."""
        self._manager.wait_until_finished()

    def restore(self, step: int | None = None, *, params_like, opt_state_like) -> tuple[Any, Any, dict]:
        """(params, opt_state, meta) of `step` (default: the latest), shaped and sharded like the templates."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No finished checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(params_like)),
                opt_state=ocp.args.StandardRestore(_abstract(opt_state_like)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["params"], restored["opt_state"], dict(restored["meta"])

    def restore_params(self, step: int, params_like):
        """Only the trained parameters of `step` (evaluation, export), shaped and sharded like the template."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params_like))))
        return restored["params"]

    def read_meta(self, step: int) -> dict:
        """The JSON record of `step`: step, RNG state, data iterator state, the run config."""
        return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def close(self) -> None:
        self._manager.close()  # waits for a save in flight


def finished_steps(directory: str) -> list[int]:
    """The finished steps under a local checkpoint folder, read from its listing alone (no orbax, no
    collectives: safe when other processes are gone). Unfinished saves live under temporary names."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def locate_step(path: str | os.PathLike) -> tuple[str, int] | None:
    """(checkpoints folder, step) when `path` is a finished step folder `<...>/checkpoints/<step>`, or a
    checkpoints folder (its latest finished step); None otherwise."""
    path = os.path.abspath(os.fspath(path))

    def finished(folder: str) -> bool:
        return os.path.isdir(os.path.join(folder, "params")) and os.path.isdir(os.path.join(folder, "meta"))

    if finished(path) and os.path.basename(path).isdigit():
        return os.path.dirname(path), int(os.path.basename(path))
    if os.path.isdir(path):
        steps = [int(n) for n in os.listdir(path) if n.isdigit() and finished(os.path.join(path, n))]
        if steps:
            return path, max(steps)
    return None


def open_step(path: str | os.PathLike) -> tuple[Checkpointer, int]:
    """A read-only Checkpointer on the step `path` names (see `locate_step`), and that step. Close it after use."""
    located = locate_step(path)
    if located is None:
        raise FileNotFoundError(f"{path} is not a training checkpoint (no <step>/params and <step>/meta)")
    directory, step = located
    return Checkpointer(directory, read_only=True), step


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON record (step, run config, ...) of the training checkpoint `path` names."""
    checkpointer, step = open_step(path)
    try:
        return checkpointer.read_meta(step)
    finally:
        checkpointer.close()


# What one training attempt writes into its run folder (the SFT model and the tiny model are kept across attempts).
ATTEMPT_ITEMS = ("checkpoints", "metrics.jsonl", "tb")


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """Where a run keeps what it writes (the layout is in this module's docstring)."""

    path: str

    @classmethod
    def of(cls, config) -> RunFolder:
        """The folder of a run config: `run_dir`, or runs/<name>."""
        return cls(config.get("run_dir") or os.path.join("runs", config["name"]))

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.path, "checkpoints")

    @property
    def sft_model(self) -> str:
        return os.path.join(self.path, "sft_model")

    @property
    def tiny_model(self) -> str:
        return os.path.join(self.path, "tiny_model")

    @property
    def config_file(self) -> str:
        return os.path.join(self.path, "config.json")

    def has_sft_model(self) -> bool:
        """SFT finished: its folder is renamed into place only once complete, config.json included."""
        return os.path.exists(os.path.join(self.sft_model, "config.json"))

    def training_config(self) -> dict | None:
        """The config the run was trained with, or None when this is not a run folder."""
        try:
            with open(self.config_file) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None
        return config if isinstance(config, dict) and "rl" in config and "data" in config else None

    def write_config(self, config) -> None:
        with open(self.config_file, "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    def initial_model(self, config) -> str | None:
        """The Hugging Face folder RL starts from (and a checkpoint's parameters apply to): the SFT model when
        the run warm-starts with SFT, else the tiny model of `model.tiny`, else `model.path`."""
        if config.get("sft", {}).get("enabled"):
            return self.sft_model
        model = config.get("model", {})
        if model.get("tiny"):
            return self.tiny_model
        return model.get("path") or None

    def set_aside(self) -> str | None:
        return set_aside(self.path)


def set_aside(run_dir: str) -> str | None:
    """Move an earlier attempt's checkpoints and logs to `run_dir/earlier/<UTC time>/`, so that a run told to
    start over (config.resume="") neither resumes from them nor deletes them. Returns that folder, or None
    when there was nothing to move. Call it on one process, before anything opens these items."""
    present = [name for name in ATTEMPT_ITEMS if os.path.exists(os.path.join(run_dir, name))]
    if not present:
        return None
    folder = os.path.join(run_dir, "earlier", time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    while os.path.exists(folder):  # two restarts within a second
        folder += "+"
    os.makedirs(folder)
    for name in present:
        os.replace(os.path.join(run_dir, name), os.path.join(folder, name))
    return folder


def _abstract(tree):
    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    return value
