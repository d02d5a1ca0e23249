"""Training checkpoints with orbax: trainable parameters, optimizer state, and a JSON record of the rest.

A checkpoint holds, per step:
  params     the trainable parameters only (the LoRA adapters when LoRA is on, otherwise the whole model);
  opt_state  the optimizer state for them;
  meta       JSON: step, RNG key data, the data iterator's state, the run config and the last metrics.
Orbax writes each step into a temporary folder and renames it once complete (on GCS it writes a commit
marker last), so a save that is killed part-way never looks like a checkpoint; `latest_step` only sees
finished ones. Paths may be local or `gs://` buckets.
"""

from __future__ import annotations

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

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = False):
        directory = os.fspath(directory)
        if not _is_remote(directory):
            directory = os.path.abspath(directory)
        self.directory = directory
        self._async = async_save
        self._manager = ocp.CheckpointManager(
            epath.Path(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
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


# What one training attempt writes into its run folder (the SFT model and the tiny model are kept across attempts).
ATTEMPT_ITEMS = ("checkpoints", "metrics.jsonl", "tb")


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
