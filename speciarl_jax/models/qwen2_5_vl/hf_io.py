"""Hugging Face checkpoints in and out: config.json + (sharded) safetensors.

Tensors are read one at a time on the host, converted to our layout (linear kernels are stored [in, out];
the patch embedding's 3-D convolution becomes a matmul over flattened patches), cast to the requested dtype
and placed straight onto the devices that their logical axes map to, so a sharded 7B model never has to
sit whole on one device.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from ... import parallel
from .config import Qwen25VLConfig
from .model import Qwen25VL

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files next to the weights that describe the tokenizer and processor; copied along on save.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "processor_config.json", "generation_config.json",
)
# Buffers some exporters write that carry no learned weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def canonical_key(key: str) -> str:
    """Map any key naming transformers accepts for Qwen2.5-VL to the hub layout (`model.*`, `visual.*`, `lm_head.*`)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("language_model.model."):
        return "model." + key[len("language_model.model.") :]
    if key.startswith("language_model.lm_head."):
        return key[len("language_model.") :]
    return key


def hf_key(path: tuple) -> str:
    """Hub tensor name of one of our parameters, given its state path."""
    parts = [str(p) for p in path]
    leaf = parts[-1]
    if parts[0] == "visual":
        body = parts[1:-1]
        if body == ["patch_embed"]:
            body = ["patch_embed", "proj"]
        body = ["mlp.0" if p == "fc1" else "mlp.2" if p == "fc2" else p for p in body]
        prefix = ["visual"]
    elif parts[0] == "language_model":
        body, prefix = parts[1:-1], ["model"]
    elif parts[0] == "lm_head":
        body, prefix = [], ["lm_head"]
    else:
        raise KeyError(f"No Hugging Face name for parameter {'.'.join(parts)}")
    name = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join(prefix + body + [name])


def to_ours(path: tuple, tensor: np.ndarray, config: Qwen25VLConfig) -> np.ndarray:
    if path[-1] != "kernel":
        return tensor
    if path[:2] == ("visual", "patch_embed"):
        return tensor.reshape(tensor.shape[0], -1).T  # conv [E, C, T, P, P] -> [C*T*P*P, E]
    return tensor.T


def to_hf(path: tuple, array: np.ndarray, config: Qwen25VLConfig) -> np.ndarray:
    if path[-1] != "kernel":
        return array
    if path[:2] == ("visual", "patch_embed"):
        v = config.vision
        return array.T.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return array.T


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not os.path.exists(os.path.join(folder, f))]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are not in {folder}: {absent}")
        return [os.path.join(folder, f) for f in files]
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"No {SINGLE_FILE} or {INDEX_FILE} in {folder}")


def from_pretrained(
    path: str | os.PathLike,
    dtype: str | jnp.dtype = "float32",
    mesh: jax.sharding.Mesh | None = None,
    *,
    remat: bool = False,
    rules: dict | None = None,
) -> Qwen25VL:
    """Load a local Hugging Face Qwen2.5-VL folder into our model, in `dtype`, sharded over `mesh` if given."""
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Model folder {folder} does not exist")
    config = Qwen25VLConfig.from_json(folder)
    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    abstract = nnx.eval_shape(lambda: Qwen25VL(config, dtype=dtype, remat=remat, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    wanted = {hf_key(p): (p, v) for p, v in nnx.to_flat_state(state)}

    located: dict[str, tuple[str, str]] = {}  # canonical name -> (file, name in file)
    for file in _weight_files(folder):
        with safe_open(file, "np") as f:
            for name in f.keys():
                located[canonical_key(name)] = (file, name)
    missing = sorted(set(wanted) - set(located))
    unexpected = sorted(
        k for k in set(located) - set(wanted)
        if not k.endswith(_IGNORED_SUFFIXES) and not (k == "lm_head.weight" and config.tie_word_embeddings)
    )
    if unexpected:
        log.warning("Ignoring %d tensors that Qwen2.5-VL does not use: %s", len(unexpected), _preview(unexpected))

    loaded, mismatched = {}, []
    handles = {}
    try:
        for name, (p, var) in wanted.items():
            if name not in located:
                continue
            file, stored = located[name]
            if file not in handles:
                handles[file] = safe_open(file, "np")
            tensor = to_ours(p, handles[file].get_tensor(stored), config)
            if tuple(tensor.shape) != tuple(var.shape):
                mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(var.shape)} (our layout)")
                continue
            loaded[p] = _place(tensor, dtype, var, mesh, rules)
    finally:
        handles.clear()
    if missing or mismatched:
        lines = [f"Cannot load {folder}:"]
        if missing:
            lines.append(f"{len(missing)} missing tensors: {_preview(missing)}")
        if mismatched:
            lines.append(f"{len(mismatched)} tensors with the wrong shape: {_preview(mismatched)}")
        raise ValueError("\n  ".join(lines))
    flat = [(p, v.replace(loaded[p])) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _place(tensor: np.ndarray, dtype, var, mesh, rules):
    host = tensor.astype(ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.dtype(dtype))
    if mesh is None:
        return jnp.asarray(host)
    sharding = parallel.named_sharding(parallel.variable_axes(var), host.shape, mesh, rules)
    return jax.device_put(host, sharding)


def _preview(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def save_pretrained(
    model: Qwen25VL,
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 4 * 1024**3,
    copy_from: str | os.PathLike | None = None,
) -> None:
    """Write `model` as a Hugging Face folder: config.json, sharded safetensors with an index, and the
    tokenizer / processor files copied from `copy_from` (the folder the model came from), if given.

    In a run of several JAX processes every process must call this (the weights are gathered from all of
    them); process 0 writes the folder.
    """
    folder = os.fspath(path)
    config = model.config
    target = None if dtype is None else np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    tensors: dict[str, np.ndarray] = {}
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        array = parallel.to_host(var[...])
        tensors[hf_key(p)] = np.ascontiguousarray(to_hf(p, array if target is None else array.astype(target), config))
    if jax.process_index() != 0:
        return
    os.makedirs(folder, exist_ok=True)
    shards = _split_shards(tensors, max_shard_bytes)
    for name in os.listdir(folder):  # stale shards from an earlier save would confuse loaders
        if name.startswith("model-") and name.endswith(".safetensors") or name in (SINGLE_FILE, INDEX_FILE):
            os.remove(os.path.join(folder, name))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(folder, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    hf_config = config.to_hf_dict()
    first = next(iter(tensors.values()))
    hf_config["torch_dtype"] = "bfloat16" if first.dtype == ml_dtypes.bfloat16 else str(first.dtype)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if copy_from is not None:
        copy_side_files(copy_from, folder)


def copy_side_files(source: str | os.PathLike, folder: str | os.PathLike) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        src = os.path.join(source, name)
        if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(folder, name)):
            shutil.copy2(src, os.path.join(folder, name))
            copied.append(name)
    return copied


def _split_shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    return shards


def iter_param_names(model: Qwen25VL) -> Iterable[str]:
    return (hf_key(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
