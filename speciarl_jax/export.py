"""Export a trained model for serving: LoRA merged into a full Hugging Face folder, or the adapter alone in PEFT form.

    python -m speciarl_jax.export --base=/models/Qwen2.5-VL-7B-Instruct --adapter=runs/cub/adapter \
        --out=/models/speciarl-7b --format=merged --dtype=bfloat16
    python -m speciarl_jax.export --base=... --adapter=... --out=runs/cub/peft --format=peft

`merged` folds alpha/r * A B into every adapted kernel and writes the hub layout through `save_pretrained`
(sharded safetensors, index, config.json, tokenizer and processor files copied from the base folder).
`peft` writes `adapter_config.json` and `adapter_model.safetensors` as PEFT saves them for
`Qwen2_5_VLForConditionalGeneration`, which is also what vLLM's `--enable-lora` reads: tensors named
`base_model.model.<module>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]), for the language model only
(vLLM serves no LoRA on the vision tower, so an adapter there is refused: export it merged instead).

Adapters come from three kinds of folder (`load_adapter`):
  * a PEFT folder (`adapter_config.json`), as written here or by PEFT itself for this architecture;
  * a training checkpoint of `speciarl_jax.checkpoint.Checkpointer`: a step folder `<run>/checkpoints/<step>`
    (or the `checkpoints` folder, meaning its latest step). Its `meta` record holds the run config, whose `lora`
    section rebuilds the adapters and whose `model` section names the base (so --base may be left out); `params`
    holds the trained variables (adapters, or with LoRA rank 0 the fine-tuned weights, exported merged);
  * an adapter checkpoint: `lora_config.json` (the `LoRAConfig` fields) next to an orbax item folder `adapter`
    holding `nnx.to_pure_dict(nnx.state(model, LoRAWeight))`. `save_adapter_checkpoint` writes exactly that.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from speciarl_jax import checkpoint
from speciarl_jax.models import lora
from speciarl_jax.models.qwen2_5_vl import hf_io

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "lora_config.json"
ADAPTER_ITEM = "adapter"
PEFT_PREFIX = "base_model.model."
# Module-name layouts of the PyTorch model: transformers >= 4.52 nests the decoder under model.language_model;
# older versions (and the hub checkpoints' tensor names) put it directly under model.
LAYOUTS = ("transformers", "legacy")
_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


# --------------------------------------------------------------------------------------------------
# Names


def module_name(path: str, layout: str = "transformers") -> str:
    """PyTorch module name of one of our adapted layers, e.g. `language_model.layers.3.mlp.up_proj` ->
    `model.language_model.layers.3.mlp.up_proj` (layout "transformers") or `model.layers.3.mlp.up_proj`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    keys = tuple(int(p) if p.isdigit() else p for p in path.split(".")) + ("kernel",)
    hub = hf_io.hf_key(keys)[: -len(".weight")]  # model.layers.3.mlp.up_proj / visual.blocks.0.attn.qkv
    if layout == "transformers" and hub.startswith("model."):
        return "model.language_model." + hub[len("model."):]
    if layout == "transformers" and hub.startswith("visual."):
        return "model." + hub
    return hub


def our_path(name: str) -> str:
    """Inverse of `module_name` for language-model layers, in either layout (a PEFT prefix is allowed)."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    for prefix in ("model.language_model.", "model."):
        if name.startswith(prefix) and name[len(prefix):].startswith("layers."):
            return "language_model." + name[len(prefix):]
    raise ValueError(
        f"adapter module {name!r} is not a layer of the Qwen2.5-VL language model "
        "(expected model.language_model.layers.N... or model.layers.N...)"
    )


def _target_modules(names: Sequence[str]) -> str | list[str]:
    """`target_modules` for adapter_config.json: a regex over every layer when all layers carry the same set of
    projections (the usual case), else the exact module names."""
    kinds: dict[str, set[int]] = {}
    prefixes = set()
    for name in names:
        match = re.fullmatch(r"(.*\.layers)\.(\d+)\.(.+)", name)
        if match is None:
            return sorted(names)
        prefixes.add(match.group(1))
        kinds.setdefault(match.group(3), set()).add(int(match.group(2)))
    layer_sets = {frozenset(v) for v in kinds.values()}
    if len(prefixes) != 1 or len(layer_sets) != 1:
        return sorted(names)
    (prefix,) = prefixes
    (layers,) = layer_sets
    if layers != set(range(max(layers) + 1)):
        return sorted(names)
    alternatives = "|".join(re.escape(k) for k in sorted(kinds))
    if prefix in ("model.language_model.layers", "model.layers"):
        # Either layout's module names match, so the config suits old and new transformers alike.
        prefix_pattern = r"model\.(?:language_model\.)?layers"
    else:
        prefix_pattern = re.escape(prefix)
    return rf"{prefix_pattern}\.\d+\.(?:{alternatives})"


# --------------------------------------------------------------------------------------------------
# PEFT format


def _adapter_layers(model: nnx.Module) -> list[tuple[str, lora.LoRALinear]]:
    layers = list(lora.lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA adapters to export (apply or load an adapter first)")
    vision = [name for name, _ in layers if not name.startswith("language_model.")]
    if vision:
        raise ValueError(
            f"{len(vision)} adapters sit outside the language model (e.g. {vision[0]}); the PEFT export is for "
            "vLLM, which serves LoRA on the language model only. Export with --format=merged instead."
        )
    ranks = {layer.rank for _, layer in layers}
    alphas = {float(layer.alpha) for _, layer in layers}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"adapters of mixed rank {sorted(ranks)} or alpha {sorted(alphas)} cannot be written as one "
                         "PEFT config")
    return layers


def save_peft_adapter(
    model: nnx.Module,
    folder: str | os.PathLike,
    *,
    base_model_name_or_path: str = "",
    dtype: str = "float32",
    layout: str = "transformers",
) -> dict:
    """Write the model's adapters as a PEFT LoRA folder; returns the adapter config written.

    dtype: storage dtype of the tensors ("float32", "bfloat16" or "float16").
    layout: "transformers" (module names of transformers >= 4.52, what PEFT writes today) or "legacy".
    """
    from safetensors.numpy import save_file

    if dtype not in _DTYPES:
        raise ValueError(f"adapter dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    layers = _adapter_layers(model)
    rank, alpha = layers[0][1].rank, float(layers[0][1].alpha)
    tensors, names = {}, []
    for path, layer in layers:
        name = module_name(path, layout)
        names.append(name)
        a = np.asarray(jax.device_get(layer.lora_a[...]), np.float32).T  # [r, in]
        b = np.asarray(jax.device_get(layer.lora_b[...]), np.float32).T  # [out, r]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.astype(_DTYPES[dtype]))
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.astype(_DTYPES[dtype]))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank),
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": _target_modules(names),
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(folder, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return config


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None


def load_peft_adapter(model: nnx.Module, folder: str | os.PathLike, *, adapter_dtype: str = "float32") -> list[str]:
    """Put the adapters of a PEFT LoRA folder onto `model` (in place); returns the adapted layer paths."""
    from safetensors import safe_open

    folder = os.fspath(folder)
    config = _read_json(os.path.join(folder, PEFT_CONFIG), "PEFT adapter config")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = [k for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save")
                   if config.get(k)]
    if unsupported or config.get("bias", "none") != "none":
        raise ValueError(f"{folder}: adapter settings {unsupported + (['bias'] if config.get('bias', 'none') != 'none' else [])} "
                         "are not supported here (plain LoRA with one rank and alpha only)")
    weights = os.path.join(folder, PEFT_WEIGHTS)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"PEFT adapter weights not found: {weights}")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(weights, "np") as f:
        for key in f.keys():
            match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight", key)
            if match is None:
                raise ValueError(f"{weights}: tensor {key!r} is not a LoRA A or B matrix")
            pairs.setdefault(our_path(match.group(1)), {})[match.group(2)] = f.get_tensor(key)
    incomplete = sorted(p for p, ab in pairs.items() if set(ab) != {"A", "B"})
    if incomplete:
        raise ValueError(f"{weights}: layers without both lora_A and lora_B: {incomplete[:5]}")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    lora_config = lora.LoRAConfig(
        rank=rank, alpha=alpha, targets=tuple(re.escape(p) for p in pairs), excludes=(), adapter_dtype=adapter_dtype
    )
    _install(model, lora_config, {p: (ab["A"].T, ab["B"].T) for p, ab in pairs.items()}, source=weights)
    return sorted(pairs)


def _install(model, config: lora.LoRAConfig, matrices: dict[str, tuple[np.ndarray, np.ndarray]], source: str):
    """apply_lora for exactly `matrices`' layers, then write A [in, r] and B [r, out] into them."""
    existing = [name for name, _ in lora.lora_layers(model)]
    if existing:
        raise ValueError(f"the model already has adapters (e.g. {existing[0]}); load the adapter into a plain model")
    known = {name for name, module in nnx.iter_modules(model) if isinstance(module, nnx.Linear)}
    known = {".".join(str(p) for p in name) for name in known}
    absent = sorted(set(matrices) - known)
    if absent:
        raise ValueError(f"{source}: adapters for layers the model does not have: {absent[:5]}")
    lora.apply_lora(model, config)
    layers = dict(lora.lora_layers(model))
    for path, (a, b) in matrices.items():
        layer = layers[path]
        for var, value in ((layer.lora_a, a), (layer.lora_b, b)):
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"{source}: {path} adapter has shape {tuple(value.shape)}, the layer needs "
                                 f"{tuple(var.shape)} (rank {config.rank})")
            new = jnp.asarray(np.asarray(value, np.float32), var[...].dtype)
            sharding = getattr(var[...], "sharding", None)
            if isinstance(sharding, jax.sharding.NamedSharding):
                new = jax.device_put(new, sharding)
            var[...] = new


# --------------------------------------------------------------------------------------------------
# Adapter checkpoints (orbax)


def save_adapter_checkpoint(model: nnx.Module, config: lora.LoRAConfig, folder: str | os.PathLike) -> None:
    """Write `lora_config.json` and the orbax item `adapter` (the LoRAWeight state as a pure dict)."""
    import orbax.checkpoint as ocp

    folder = os.path.abspath(os.fspath(folder))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LORA_CONFIG), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)
    state = nnx.to_pure_dict(nnx.state(model, lora.LoRAWeight))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(folder, ADAPTER_ITEM), state, force=True)


def load_adapter_checkpoint(model: nnx.Module, folder: str | os.PathLike) -> list[str]:
    """Apply the LoRA described by `lora_config.json` and restore its weights from the orbax item `adapter`."""
    import orbax.checkpoint as ocp

    folder = os.path.abspath(os.fspath(folder))
    fields = _read_json(os.path.join(folder, LORA_CONFIG), "LoRA config")
    known = {f.name for f in dataclasses.fields(lora.LoRAConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{folder}/{LORA_CONFIG}: unknown LoRAConfig fields {unknown}")
    config = lora.LoRAConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    item = os.path.join(folder, ADAPTER_ITEM)
    if not os.path.isdir(item):
        raise FileNotFoundError(f"adapter checkpoint item not found: {item}")
    lora.apply_lora(model, config)
    state = nnx.state(model, lora.LoRAWeight)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        nnx.to_pure_dict(state),
    )
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(item, abstract)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return [name for name, _ in lora.lora_layers(model)]


# --------------------------------------------------------------------------------------------------
# Training checkpoints (speciarl_jax.checkpoint.Checkpointer: <run>/checkpoints/<step>/{params,opt_state,meta})


def training_base_model(path: str | os.PathLike) -> str | None:
    """The folder whose weights a trainer checkpoint's adapters (or fine-tuned weights) apply to (see
    `checkpoint.RunFolder.initial_model`). None when `path` is not a training checkpoint."""
    located = checkpoint.locate_step(path)
    if located is None:
        return None
    run = checkpoint.RunFolder(os.path.dirname(located[0]))
    config = checkpoint.read_meta(path).get("config", {})
    base = run.initial_model(config)
    if config.get("sft", {}).get("enabled") and not run.has_sft_model():
        raise FileNotFoundError(f"{path} was trained after SFT, but the SFT model {base} is missing")
    return base


def load_training_checkpoint(model: nnx.Module, path: str | os.PathLike) -> list[str]:
    """Apply the run's LoRA (its config's `lora` section) and restore the trained variables of a trainer
    checkpoint: the adapters, or with rank 0 the fully fine-tuned parameters."""
    checkpointer, step = checkpoint.open_step(path)
    try:
        settings = checkpointer.read_meta(step).get("config", {}).get("lora", {})
        known = {f.name for f in dataclasses.fields(lora.LoRAConfig)}
        config = lora.LoRAConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()
                                    if k in known})
        lora.apply_lora(model, config)
        nnx.update(model, checkpointer.restore_params(step, nnx.state(model, lora.trainable_filter(config))))
    finally:
        checkpointer.close()
    return [name for name, _ in lora.lora_layers(model)]


def load_adapter(model: nnx.Module, path: str | os.PathLike) -> list[str]:
    """Load a PEFT folder, an adapter checkpoint or a training checkpoint onto `model`, in place; returns the
    adapted layer paths (empty for a fully fine-tuned training checkpoint)."""
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, PEFT_CONFIG)):
        return load_peft_adapter(model, path)
    if os.path.exists(os.path.join(path, LORA_CONFIG)):
        return load_adapter_checkpoint(model, path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter folder not found: {path}")
    if checkpoint.locate_step(path) is not None:
        return load_training_checkpoint(model, path)
    raise FileNotFoundError(
        f"{path} holds neither {PEFT_CONFIG} (a PEFT adapter), {LORA_CONFIG} + {ADAPTER_ITEM}/ (an adapter "
        "checkpoint), nor <step>/params + <step>/meta (a training checkpoint)"
    )


# --------------------------------------------------------------------------------------------------
# The command


def load_model(base: str, adapter: str | None = None, *, dtype: str = "float32", mesh=None):
    """The base model in `dtype` with the adapter applied (not merged), or the plain base without one."""
    from speciarl_jax.models.qwen2_5_vl import from_pretrained

    model = from_pretrained(base, dtype=dtype, mesh=mesh)
    if adapter:
        load_adapter(model, adapter)
    return model


def resolve_base(base: str | None, adapter: str | None) -> str:
    """The base model folder: `base` if given, else the one a training checkpoint's run config names."""
    found = training_base_model(adapter) if adapter else None
    if base:
        if found and os.path.abspath(found) != os.path.abspath(base):
            log.warning("the training checkpoint %s was trained on %s, but %s was given as its base", adapter, found,
                        base)
        return base
    if not found:
        raise ValueError("no base model: pass the Hugging Face folder (--base / config.model.path); only a training "
                         "checkpoint names its own base")
    return found


def export(base: str | None, out: str, *, adapter: str | None = None, fmt: str = "merged", dtype: str = "bfloat16",
           max_shard_bytes: int = 4 * 1024**3, layout: str = "transformers") -> dict:
    """Write `out` as a merged Hugging Face folder (fmt "merged") or a PEFT adapter (fmt "peft").

    The base is loaded in float32 on the host CPU, so merging is exact before the single cast to `dtype` and
    no accelerator memory is needed. Returns a short summary.
    """
    from speciarl_jax.models.qwen2_5_vl import save_pretrained

    base = resolve_base(base, adapter)
    if fmt not in ("merged", "peft"):
        raise ValueError(f"export format must be 'merged' or 'peft', got {fmt!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"export dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if fmt == "peft" and not adapter:
        raise ValueError("the PEFT export needs --adapter (there is nothing to export from a plain base model)")
    if os.path.abspath(out) == os.path.abspath(base):
        raise ValueError(f"refusing to write the export over its base model folder {base}")
    with jax.default_device(jax.devices("cpu")[0]):
        model = load_model(base, adapter, dtype="float32")
        adapted = [name for name, _ in lora.lora_layers(model)]
        if fmt == "peft":
            config = save_peft_adapter(model, out, base_model_name_or_path=os.path.abspath(base), dtype=dtype,
                                       layout=layout)
            return {"format": "peft", "out": out, "layers": len(adapted), "rank": config["r"]}
        merged = lora.merge_lora(model)
        save_pretrained(model, out, dtype=dtype, max_shard_bytes=max_shard_bytes, copy_from=base)
    return {"format": "merged", "out": out, "merged_layers": merged, "dtype": dtype}


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    summary = export(f.base or None, f.out, adapter=f.adapter or None, fmt=f.format, dtype=f.dtype,
                     max_shard_bytes=int(f.max_shard_gb * 1024**3), layout=f.layout)
    print(json.dumps(summary))


def _define_flags():
    from absl import flags

    flags.DEFINE_string("base", "", "base model: a Hugging Face Qwen2.5-VL folder (default: the one a training "
                        "checkpoint names)")
    flags.DEFINE_string("adapter", "", "PEFT folder, training checkpoint (<run>/checkpoints/<step>) or adapter "
                        "checkpoint (lora_config.json + adapter/)")
    flags.DEFINE_string("out", None, "output folder", required=True)
    flags.DEFINE_enum("format", "merged", ["merged", "peft"], "a full merged model, or the adapter alone (PEFT)")
    flags.DEFINE_enum("dtype", "bfloat16", sorted(_DTYPES), "storage dtype of the written tensors")
    flags.DEFINE_float("max_shard_gb", 4.0, "largest safetensors shard of a merged export, in GiB")
    flags.DEFINE_enum("layout", "transformers", list(LAYOUTS), "module names in a PEFT export")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
