"""Low-rank adapters (LoRA) on the `nnx.Linear` layers of a model, and the switch that turns them off.

`apply_lora` swaps each targeted `nnx.Linear` for a `LoRALinear` in place. The swap keeps the base layer's own
`kernel` and `bias` Variables at the same paths (`...q_proj.kernel`), so Hugging Face IO, sharding rules and
anything that reads the base weights see an unchanged model. The adapters are two extra matrices per layer,

    y = x W + b + (alpha / rank) * (x A) B,      A: [in, rank], B: [rank, out], B = 0 at the start,

stored as `LoRAWeight` Variables. `LoRAWeight` is deliberately *not* an `nnx.Param`: filters on `nnx.Param`
(checkpoint export, base-model tools) keep seeing only the base weights, while `nnx.state(model, LoRAWeight)`
selects exactly what the optimizer trains and what an adapter checkpoint holds.

The reference policy of the RL loss is the same model with the adapters off (`adapters_disabled(model)`), so no
second copy of the base weights exists. The on/off flag is a plain attribute of each `LoRALinear`, hence part of
the graph definition: a jitted function traced with adapters off is a different program from one traced with
them on, and a cached trace can never silently run with the wrong setting.

Full fine-tuning is the same configuration with `rank=0`: no adapters, and `trainable_filter` selects the base
parameters whose paths match `full_finetune_targets` instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .. import parallel


class LoRAWeight(nnx.Variable):
    """An adapter matrix (lora_a or lora_b): the trainable part of a LoRA model."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which layers get adapters and how large they are.

    rank: adapter rank r; 0 means no adapters (full fine-tuning of `full_finetune_targets`).
    alpha: the adapter output is scaled by alpha / rank.
    targets: regexes; a linear layer is adapted when its dotted module path (e.g.
      `language_model.layers.3.self_attn.q_proj`) fully matches one of them...
    excludes: ...and matches none of these.
    adapter_dtype: storage dtype of A and B (float32 keeps small updates from rounding away under bf16 weights).
    full_finetune_targets: with rank 0, the parameters (dotted paths, e.g. `lm_head.kernel`) that are trained.
    seed: seeds the random initialisation of A.
    """

    rank: int = 64
    alpha: float = 32.0
    targets: tuple[str, ...] = (r"language_model\..*",)
    excludes: tuple[str, ...] = (r"visual\..*",)
    adapter_dtype: str = "float32"
    full_finetune_targets: tuple[str, ...] = (r"language_model\..*", r"lm_head\..*")
    seed: int = 0

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"LoRAConfig.rank must be >= 0 (0 = full fine-tuning), got {self.rank}.")
        if self.rank > 0 and self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be positive, got {self.alpha}.")
        for key in ("targets", "excludes", "full_finetune_targets"):
            for pattern in getattr(self, key):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"LoRAConfig.{key} holds an invalid regex {pattern!r}: {err}") from None

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nnx.Linear):
    """An `nnx.Linear` plus a low-rank update. Built from an existing layer with `LoRALinear.wrap`.

    It subclasses `nnx.Linear` so that code expecting a linear layer (isinstance checks, the base computation
    in `nnx.Linear.__call__`) keeps working; its constructor takes over the base layer's Variables instead of
    creating new weights.
    """

    # Settings copied from the base layer; nnx.Linear.__call__ reads them.
    _LINEAR_FIELDS = (
        "in_features", "out_features", "use_bias", "dtype", "param_dtype", "precision", "dot_general",
        "promote_dtype", "preferred_element_type",
    )

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, adapter_dtype=jnp.float32, rngs: nnx.Rngs):
        # Deliberately no nnx.Linear.__init__: that would allocate a second, random kernel.
        for name in self._LINEAR_FIELDS:
            setattr(self, name, getattr(base, name))
        self.kernel = base.kernel
        self.bias = base.bias if base.bias is not None else nnx.data(None)
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.adapters_enabled = True
        in_axis, out_axis = parallel.variable_axes(base.kernel) or (None, None)
        # A as PEFT initialises it (uniform in +-1/sqrt(in)); B = 0 so the adapted model starts equal to the base.
        bound = 1.0 / math.sqrt(self.in_features)
        a = jax.random.uniform(rngs.params(), (self.in_features, rank), adapter_dtype, -bound, bound)
        b = jnp.zeros((rank, self.out_features), adapter_dtype)
        self.lora_a = LoRAWeight(a, logical_axes=(in_axis, "lora_rank"))
        self.lora_b = LoRAWeight(b, logical_axes=("lora_rank", out_axis))

    @classmethod
    def wrap(cls, base: nnx.Linear, rank: int, alpha: float, *, adapter_dtype=jnp.float32, rngs: nnx.Rngs):
        return cls(base, rank, alpha, adapter_dtype=adapter_dtype, rngs=rngs)

    def delta(self) -> jax.Array:
        """The adapter's weight update scale * A @ B, [in, out] in float32."""
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        return self.scale * (a @ b)

    def __call__(self, inputs, out_sharding=None):
        y = super().__call__(inputs, out_sharding)
        if not self.adapters_enabled:
            return y
        # Rank-r bottleneck in the layer's compute dtype; the full [in, out] update is never formed.
        dtype = y.dtype
        low = jnp.dot(inputs.astype(dtype), self.lora_a[...].astype(dtype), precision=self.precision)
        return y + (self.scale * jnp.dot(low, self.lora_b[...].astype(dtype), precision=self.precision)).astype(dtype)


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def linear_paths(model: nnx.Module, config: LoRAConfig) -> list[str]:
    """Dotted paths of the plain `nnx.Linear` layers that `config` selects for adapters."""
    return [
        _dotted(path)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, nnx.Linear) and not isinstance(module, LoRALinear)
        and _matches(_dotted(path), config.targets) and not _matches(_dotted(path), config.excludes)
    ]


def _set_child(model: nnx.Module, path: tuple, module: nnx.Module) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = module
    else:
        setattr(parent, path[-1], module)


def apply_lora(model: nnx.Module, config: LoRAConfig) -> list[str]:
    """Wrap every linear layer that `config` targets in a `LoRALinear`, in place; return their dotted paths.

    Adapters are placed on the model's mesh when its kernels are sharded (`lora_rank` stays replicated).
    With `config.rank == 0` nothing changes (full fine-tuning) and an empty list is returned.
    """
    if not config.enabled:
        return []
    chosen = linear_paths(model, config)
    if not chosen:
        raise ValueError(
            f"LoRA targets {config.targets} (minus excludes {config.excludes}) match no nnx.Linear layer of the model."
        )
    if any(p == "lm_head" or p.endswith(".lm_head") for p in chosen):
        # Qwen25VL.logits reads lm_head.kernel directly, so an adapter there would never be applied.
        raise ValueError("LoRA on lm_head is not supported (the model reads its kernel directly); exclude 'lm_head'.")
    rngs = nnx.Rngs(config.seed)
    dtype = jnp.dtype(config.adapter_dtype)
    modules = dict((_dotted(p), (p, m)) for p, m in nnx.iter_modules(model))
    for name in chosen:
        path, base = modules[name]
        wrapped = LoRALinear.wrap(base, config.rank, config.alpha, adapter_dtype=dtype, rngs=rngs)
        _place_adapters(wrapped)
        _set_child(model, path, wrapped)
    return chosen


def _place_adapters(layer: LoRALinear) -> None:
    sharding = getattr(layer.kernel.get_value(), "sharding", None)  # also works on abstract (eval_shape) models
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return
    for var in (layer.lora_a, layer.lora_b):
        target = parallel.named_sharding(parallel.variable_axes(var), var.shape, sharding.mesh)
        var[...] = jax.device_put(var[...], target)


def lora_layers(model: nnx.Module) -> Iterator[tuple[str, LoRALinear]]:
    for path, module in nnx.iter_modules(model):
        if isinstance(module, LoRALinear):
            yield _dotted(path), module


@contextlib.contextmanager
def adapters_disabled(model: nnx.Module):
    """Within the block, `model` computes with its base weights only (the reference policy).

    Usable inside a jitted function on a model merged there. The previous state of every layer is restored
    on exit, exceptions included.
    """
    layers = [layer for _, layer in lora_layers(model)]
    before = [layer.adapters_enabled for layer in layers]
    for layer in layers:
        layer.adapters_enabled = False
    try:
        yield model
    finally:
        for layer, flag in zip(layers, before):
            layer.adapters_enabled = flag


def merge_lora(model: nnx.Module) -> int:
    """Fold every adapter into its base kernel (W += alpha/rank * A @ B) and turn the layer back into a plain
    `nnx.Linear`, in place. Returns the number of layers merged. The kernel keeps its dtype and sharding."""
    merged = 0
    for name, layer in list(lora_layers(model)):
        kernel = layer.kernel[...]
        new = (kernel.astype(jnp.float32) + layer.delta()).astype(kernel.dtype)
        if isinstance(getattr(kernel, "sharding", None), jax.sharding.NamedSharding):
            new = jax.device_put(new, kernel.sharding)
        layer.kernel[...] = new
        plain = _plain_linear(layer)
        path = tuple(int(p) if p.isdigit() else p for p in name.split("."))
        _set_child(model, path, plain)
        merged += 1
    return merged


def _plain_linear(layer: LoRALinear) -> nnx.Linear:
    """An nnx.Linear holding `layer`'s own kernel and bias Variables (no weights are copied or created)."""
    plain = nnx.eval_shape(
        lambda: nnx.Linear(
            layer.in_features, layer.out_features, use_bias=layer.use_bias, dtype=layer.dtype,
            param_dtype=layer.param_dtype, precision=layer.precision, dot_general=layer.dot_general,
            promote_dtype=layer.promote_dtype, preferred_element_type=layer.preferred_element_type,
            rngs=nnx.Rngs(0),
        )
    )
    plain.kernel = layer.kernel
    if layer.bias is not None:
        plain.bias = layer.bias
    return plain


def trainable_filter(config: LoRAConfig):
    """The nnx filter for what the optimizer updates: the adapters, or (rank 0) the selected base parameters."""
    if config.enabled:
        return LoRAWeight
    patterns = config.full_finetune_targets
    return nnx.All(nnx.Param, lambda path, _: _matches(_dotted(path), patterns))


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int  # base parameters + adapters
    adapted_layers: int

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"{self.trainable:,} trainable of {self.total:,} parameters ({100 * self.fraction:.3f}%), "
                f"{self.adapted_layers} layers with adapters")


def count_parameters(model: nnx.Module, config: LoRAConfig) -> ParameterCount:
    def size(state) -> int:
        return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(state))

    trainable = size(nnx.state(model, trainable_filter(config)))
    total = size(nnx.state(model, nnx.Any(nnx.Param, LoRAWeight)))
    return ParameterCount(trainable, total, sum(1 for _ in lora_layers(model)))
