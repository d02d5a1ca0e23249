"""Device mesh and the one table that maps logical parameter axes to mesh axes."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis. Weights are split along their model dimension over `fsdp` and along
# heads / MLP width / vocabulary over `tensor`; the batch is split over `data` and `fsdp`.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "norm": None,
    "vit_embed": "fsdp",
    "vit_patch": None,
    "vit_mlp": "tensor",
    "vit_heads": "tensor",
    "vit_merged": "fsdp",
    "lora_rank": None,
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh size may be -1, got data={data} fsdp={fsdp} tensor={tensor}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into data={data} fsdp={fsdp} tensor={tensor}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"Mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {math.prod(sizes)} devices, "
            f"{len(devices)} are available."
        )
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names, shape, mesh: Mesh, rules=None) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry logical `names`.

    A dimension stays whole when its rule names no mesh axis, when the mesh axis was already used by an
    earlier dimension, or when the dimension does not divide evenly.
    """
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name, dim in zip(names or (), shape):
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    spec += [None] * (len(shape) - len(spec))
    return PartitionSpec(*spec)


def named_sharding(names, shape, mesh: Mesh, rules=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int, rules=None) -> NamedSharding:
    """Shard dimension 0 over the batch axes, replicate the rest."""
    return named_sharding(("batch",) + (None,) * (ndim - 1), (0,) * ndim, mesh, rules)


def batch_shards(mesh: Mesh | None, rules=None) -> int:
    """How many parts the rows of a batch are split into on this mesh (1 without one)."""
    if mesh is None:
        return 1
    rules = DEFAULT_RULES if rules is None else rules
    axes = rules["batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def variable_axes(variable) -> tuple | None:
    """The logical axis names stored on an nnx Variable (or None).

    They live under our own metadata key rather than flax's `out_sharding`, which flax would try to apply
    eagerly at creation; placement is done explicitly by `named_sharding`.
    """
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    return meta.get("logical_axes")


def to_host(x) -> np.ndarray:
    """A jax array as a numpy array on this host, also when it spans devices of several processes (then all
    processes must call this together: the parts are all-gathered)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
