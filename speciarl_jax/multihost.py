"""What a run with several JAX processes (hosts) needs beyond one: gathering per-process data into one batch,
sharing small Python values, and splitting verifier calls among the processes.

The training loop keeps one simple model of the world: every process holds the same global batch on the
host and runs the same program on it (its devices compute their part of the sharded arrays). Only the work
that is naturally per host is split:
  - reading and decoding examples: each process reads its own shard of the data (the pipeline's strided
    shard), and `gather_batch` assembles the global batch in the order a single process would have read it,
    so a run gives the same rollouts whatever its number of processes;
  - verifier calls: each process grades the groups assigned to it and the verdicts are all-gathered
    (`classify_split`), so an LLM verifier sees every answer once, not once per host.
With one process every function here returns its input unchanged and no collective runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import uuid
from typing import Any

import jax
import numpy as np

from .verifier.base import VerifierError


def _allgather(array: np.ndarray) -> np.ndarray:
    """[P, ...]: this host array from every process (all processes call this with the same shape)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(array), tiled=False))


def sync(name: str) -> None:
    """Wait until every process reaches the point called `name` (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather_json(value: Any) -> list[Any]:
    """A JSON-able value from every process, in process order."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = _allgather(np.array([data.size], np.int64))[:, 0]
    # Rounded up to a power of two, so that the all-gather compiles a few programs, not one per length.
    buffer = np.zeros(1 << max(6, int(sizes.max() - 1).bit_length()), np.uint8)
    buffer[: data.size] = data
    gathered = _allgather(buffer)
    return [json.loads(bytes(gathered[p, : sizes[p]])) for p in range(len(sizes))]


def _pad_axis(array: np.ndarray, axis: int, size: int, value, left: bool = False) -> np.ndarray:
    widths = [(0, 0)] * array.ndim
    missing = size - array.shape[axis]
    widths[axis] = (missing, 0) if left else (0, missing)
    return np.pad(array, widths, constant_values=value)


def gather_batch(batch, pad_token_id: int):
    """The global batch from every process's shard of it (a data.pipeline.Batch), rows in the order one
    process reading the whole data would have seen them.

    The pipeline gives process p the examples p, p + P, p + 2P, ... of each epoch's order, so the global
    row r is row r // P of process r % P.
    """
    count = jax.process_count()
    if count == 1:
        return batch
    info = allgather_json({"width": int(batch.input_ids.shape[1]), "patches": int(batch.pixel_values.shape[0]),
                           "grids": np.asarray(batch.image_grid_thw).tolist(), "labels": list(batch.labels),
                           "sample_ids": list(batch.sample_ids), "valid": np.asarray(batch.valid).tolist(),
                           "epoch": int(batch.epoch)})
    rows = {len(i["labels"]) for i in info}
    if len(rows) != 1:
        raise ValueError(f"processes hold different numbers of prompts: {[len(i['labels']) for i in info]}")
    width = max(i["width"] for i in info)
    patches = max(i["patches"] for i in info)
    ids = _allgather(_pad_axis(batch.input_ids, 1, width, pad_token_id, left=True))
    mask = _allgather(_pad_axis(batch.attention_mask, 1, width, 0, left=True))
    pixels = _allgather(_pad_axis(batch.pixel_values, 0, patches, 0.0))
    parts = [
        dataclasses.replace(batch, input_ids=ids[p], attention_mask=mask[p], pixel_values=pixels[p, : i["patches"]],
                            image_grid_thw=np.asarray(i["grids"], batch.image_grid_thw.dtype).reshape(-1, 3),
                            labels=i["labels"], sample_ids=i["sample_ids"], valid=np.asarray(i["valid"], bool),
                            epoch=i["epoch"])
        for p, i in enumerate(info)
    ]
    whole = dataclasses.replace(
        batch,
        input_ids=np.concatenate([b.input_ids for b in parts]),
        attention_mask=np.concatenate([b.attention_mask for b in parts]),
        pixel_values=np.concatenate([b.pixel_values for b in parts]),
        image_grid_thw=np.concatenate([b.image_grid_thw for b in parts]),
        labels=[label for b in parts for label in b.labels],
        sample_ids=[s for b in parts for s in b.sample_ids],
        valid=np.concatenate([b.valid for b in parts]),
    )
    local = rows.pop()
    order = [(r % count) * local + r // count for r in range(local * count)]
    return whole.select(order)


def classify_split(verifier, pairs: list[tuple[str, Any]], group_ids: np.ndarray) -> list[str]:
    """Verdicts for (label, answer) pairs that every process holds: process p grades the groups g with
    g % P == p, and the verdicts are all-gathered. A VerifierError on any process is raised on all of them."""
    count = jax.process_count()
    if count == 1:
        return list(verifier.classify(pairs))
    mine = [i for i, g in enumerate(group_ids) if int(g) % count == jax.process_index()]
    try:
        verdicts, failure = list(verifier.classify([pairs[i] for i in mine])), None
    except VerifierError as err:  # shared, so that every process stops here rather than waiting for this one
        verdicts, failure = [], str(err)
    gathered = allgather_json([mine, verdicts, failure])
    failures = [(p, f) for p, (_, _, f) in enumerate(gathered) if f is not None]
    if failures:
        raise VerifierError("; ".join(f"process {p}: {f}" for p, f in failures))
    out: list[str | None] = [None] * len(pairs)
    for rows, answers, _ in gathered:
        for i, verdict in zip(rows, answers):
            out[i] = verdict
    return out


class SharedFolderError(RuntimeError):
    """The processes of a run do not see one shared run folder."""


def check_shared_folder(folder: str, setting: str = "config.run_dir") -> None:
    """Fail, on every process, unless all processes see the same `folder`: process 0 writes a fresh token into
    it and every process must read that token back. Checkpoints and metrics rely on it."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    path = os.path.join(folder, ".shared_folder_check")
    if jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:
            f.write(uuid.uuid4().hex)
        os.replace(path + ".tmp", path)
    multihost_utils.sync_global_devices("check_shared_folder")
    try:
        with open(path) as f:
            seen = f.read()
    except OSError:
        seen = None
    views = allgather_json({"host": socket.gethostname(), "folder": os.path.abspath(folder), "seen": seen})
    blind = [p for p, v in enumerate(views) if v["seen"] is None or v["seen"] != views[0]["seen"]]
    if blind:
        where = ", ".join(f"process {p} on {v['host']} sees {v['folder']}" for p, v in enumerate(views))
        raise SharedFolderError(
            f"{setting} must be one folder shared by every process, but process(es) {blind} cannot see what "
            f"process 0 wrote into {views[0]['folder']} ({where}). Point {setting} at a shared file system mounted "
            "at the same path on every host (Filestore / NFS, or a Cloud Storage FUSE mount).")


def lost_processes(timeout_s: float) -> list[int] | None:
    """The processes the coordination service has declared dead (their heartbeats stopped), or None when that
    could not be told within `timeout_s` (the service answers once every live process asks, or once the missing
    ones time out)."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        return []
    everyone = list(range(jax.process_count()))
    answer: list = []

    def ask():
        try:
            answer.append(sorted(set(everyone) - set(client.get_live_nodes(everyone))))
        except Exception:  # the coordinator itself is gone: process 0
            answer.append([0])

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return answer[0] if answer else None
