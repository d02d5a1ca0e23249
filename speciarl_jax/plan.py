"""Memory per device for every phase of a run, before paying for it:
`python -m speciarl_jax.plan --config=configs/cub_grpo.py --devices=v5p-16 [--model=7b]`.

Prints, per device: the weights, the trainable parameters with their gradients and optimizer state, the rollout
(KV cache, prefill and vision tower temporaries, sampling logits) and the update (activations kept for the
backward pass, one layer's temporaries, the output layer's chunk), and the largest `rl.micro_batch_tokens`
that fits. The figures are computed from the shapes (`--xla` also compiles the update's program for the
largest micro-batch on this machine's backend, from abstract shapes, and prints XLA's own count next to ours).
The trainer runs the same check at start (`check_fits`) and refuses, before loading any weights, a config that
cannot fit, naming the setting to change.
"""

from __future__ import annotations

import dataclasses
import math
import os

from . import buckets
from .models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig, VisionConfig
from .rl import micro_batches
from .sampling.engine import prefill_group, slot_count

GiB = 1024**3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Per-device memory of the accelerators people run this on (GiB); name -> (devices per unit of the count, GiB).
# TPU v4 and v5p slices are named by TensorCores (two per chip); v5e and v6e slices by chips.
DEVICES = {"v4": (0.5, 32), "v5p": (0.5, 95), "v5e": (1, 16), "v6e": (1, 32),
           "H100": (1, 80), "H200": (1, 141), "A100": (1, 80), "L4": (1, 24)}

# Language and vision towers of the public Qwen2.5-VL sizes (the vision tower is shared; out_hidden follows).
MODELS = {
    "3b": dict(text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2), tie=True),
    "7b": dict(text={}, tie=False),
    "32b": dict(text=dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                          num_attention_heads=40, num_key_value_heads=8), tie=False),
    "72b": dict(text=dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8), tie=False),
}
TEXT_TOKENS = 96  # chat template, instruction and system turn of a prompt, beyond its image tokens
SAFETY = 0.9  # share of a device's memory a plan may fill (XLA keeps some for itself; fragmentation)


def model_config(name: str) -> Qwen25VLConfig:
    spec = MODELS[name]
    text = TextConfig(**spec["text"])
    return Qwen25VLConfig(text=text, vision=VisionConfig(out_hidden_size=text.hidden_size),
                          tie_word_embeddings=spec["tie"])


def parse_devices(spec: str) -> tuple[int, float]:
    """'v5p-16' -> (8 chips, 95 GiB); '8xH100' -> (8, 80); '4x24' -> four devices of 24 GiB."""
    spec = spec.strip()
    if "x" in spec:
        count, kind = spec.split("x", 1)
        if kind.replace(".", "").isdigit():
            return int(count), float(kind)
        if kind in DEVICES:
            return int(count), float(DEVICES[kind][1])
    elif "-" in spec:
        kind, count = spec.rsplit("-", 1)
        if kind in DEVICES and count.isdigit():
            per, memory = DEVICES[kind]
            return max(1, int(int(count) * per)), float(memory)
    raise ValueError(f"--devices={spec!r}: use a TPU slice (v4-8, v5p-16, v5e-8, v6e-32), '<n>x<GPU>' "
                     f"({', '.join(k for k in DEVICES if k[0] in 'AHL')}) or '<n>x<GiB per device>'.")


@dataclasses.dataclass
class Layout:
    """How the run's arrays are split over the mesh."""

    devices: int
    data: int
    fsdp: int
    tensor: int

    @property
    def batch_shards(self) -> int:
        return self.data * self.fsdp

    @property
    def weight_shards(self) -> int:
        return self.fsdp * self.tensor


def layout_of(mesh_cfg, devices: int) -> Layout:
    sizes = {k: int(mesh_cfg[k]) for k in ("data", "fsdp", "tensor")}
    known = math.prod(v for v in sizes.values() if v != -1)
    for key, value in sizes.items():
        if value == -1:
            sizes[key] = max(1, devices // known)
    if math.prod(sizes.values()) != devices:
        raise ValueError(f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} does not "
                         f"use the {devices} devices; change config.mesh.")
    return Layout(devices, **sizes)


def parameter_counts(model: Qwen25VLConfig, lora_rank: int) -> dict[str, int]:
    """Parameters of the language model, the vision tower and the LoRA adapters (every language linear)."""
    t, v = model.text, model.vision
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    linears = [(t.hidden_size, q), (t.hidden_size, kv), (t.hidden_size, kv), (q, t.hidden_size),
               (t.hidden_size, t.intermediate_size), (t.hidden_size, t.intermediate_size),
               (t.intermediate_size, t.hidden_size)]
    layer = sum(a * b for a, b in linears) + q + 2 * kv + 2 * t.hidden_size
    text = (t.vocab_size * t.hidden_size * (1 if model.tie_word_embeddings else 2) + t.num_hidden_layers * layer
            + t.hidden_size)
    # qkv and projection (with biases), the gated MLP (with biases), two norms
    block = 4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size + 7 * v.hidden_size + 2 * v.intermediate_size
    merged = v.hidden_size * v.spatial_merge_size**2
    merger = v.hidden_size + merged**2 + merged + merged * v.out_hidden_size + v.out_hidden_size
    vision = v.patch_dim * v.hidden_size + v.depth * block + merger
    adapters = t.num_hidden_layers * sum(lora_rank * (a + b) for a, b in linears)
    return {"text": text, "vision": vision, "adapters": adapters}


@dataclasses.dataclass
class Plan:
    """Bytes per device, by phase; `fits` against the device memory."""

    device_bytes: float
    rows: dict[str, float]  # label -> bytes
    rollout: float
    update: float
    micro_batch_tokens: int
    best_micro_batch_tokens: int | None
    prompt_columns: int
    notes: list[str]
    slots: int | None = None  # the rollout engine's decode slots (None: the static sampler)
    best_slots: int | None = None  # the most slots that fit

    @property
    def peak(self) -> float:
        return max(self.rollout, self.update)

    @property
    def fits(self) -> bool:
        return self.peak <= SAFETY * self.device_bytes

    def table(self) -> str:
        lines = ["| per device | GiB |", "|---|---|"]
        lines += [f"| {label} | {value / GiB:.2f} |" for label, value in self.rows.items()]
        lines.append(f"| **rollout phase** | **{self.rollout / GiB:.2f}** |")
        lines.append(f"| **update phase** | **{self.update / GiB:.2f}** |")
        lines.append(f"| device memory (x{SAFETY} usable) | {self.device_bytes / GiB:.0f} |")
        return "\n".join(lines)


def update_activation_bytes(text: TextConfig, rows: int, columns: int, response: int, chunk: int, dtype_bytes: int,
                            remat: bool, chunk_tokens: int | None = None, tensor: int = 1) -> float:
    """One device's activations for a forward/backward of `rows` x `columns` tokens with `response` of them
    through the output layer (in chunks of `chunk` positions, or of `chunk_tokens` tokens on the bucketed path,
    each recomputed in the backward pass). `tensor` splits heads, MLP columns and the vocabulary."""
    tokens = rows * columns
    d, heads = text.hidden_size, text.num_attention_heads
    per_layer_kept = tokens * d * dtype_bytes  # a block's input, kept for the recomputation
    # One block's forward intermediates, live during its backward: q/k/v/o and norms, MLP gate/up/act, scores.
    block = (tokens * 6 * d * dtype_bytes + tokens * 3 * text.intermediate_size * dtype_bytes / tensor
             + rows * heads * columns**2 * 4 * 2 / tensor)
    kept = text.num_hidden_layers * (per_layer_kept if remat else block)
    positions = min(rows * response, max(rows, chunk_tokens)) if chunk_tokens else rows * min(chunk, response)
    logits = positions * text.vocab_size * 4 * 3 / tensor  # logits, softmax and their gradient in float32
    hidden = rows * response * d * 4 * 2  # response hidden states and their gradient
    return kept + block + logits + hidden


def make_plan(config, model: Qwen25VLConfig, layout: Layout, device_bytes: float, max_patches: int) -> Plan:
    t = model.text
    weight_bytes = _DTYPE_BYTES[config.model.dtype]
    counts = parameter_counts(model, int(config.lora.rank))
    rows_out, notes = {}, []
    rows_out["weights (language + vision)"] = (counts["text"] + counts["vision"]) * weight_bytes / layout.weight_shards
    trainable = counts["adapters"] if config.lora.rank else counts["text"]
    # float32 trainable copy (LoRA) + gradient accumulator + two Adam moments; full fine-tuning trains in place.
    copies = 4 if config.lora.rank else 3
    rows_out["trainable, gradients, Adam"] = trainable * 4 * copies / layout.weight_shards

    # ---- rollout ----
    image_tokens = max_patches // model.vision.spatial_merge_size**2
    prompt = buckets.round_up(image_tokens + TEXT_TOKENS, int(config.rollout.prompt_bucket))
    new = int(config.rollout.max_new_tokens)
    generation = config.data.get("generation_batch_size", 0) or config.data.batch_size  # prompts per generation
    rollout_rows = buckets.round_up(buckets.power_of_two(generation) * config.rollout.num_samples,
                                    layout.batch_shards)
    kv_split = layout.tensor if t.num_key_value_heads % layout.tensor == 0 else 1
    kv_per_token = t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * weight_bytes / kv_split
    samples = int(config.rollout.num_samples)
    base = rows_out["weights (language + vision)"] + rows_out["trainable, gradients, Adam"]
    slots = None
    if config.rollout.get("engine", "continuous") == "continuous":
        # Decode slots of (prompt + new) entries, and one prefill group's cache next to them.
        slots = slot_count(rollout_rows, int(config.rollout.slots), samples, layout.batch_shards)
        decoding = slots / layout.batch_shards
        prefill_prompts = max(1, prefill_group(slots, samples) / layout.batch_shards)
        cache = decoding * (prompt + new) * kv_per_token
        rows_out[f"rollout KV cache ({slots} slots)"] = cache
        rows_out["prefill group's cache"] = prefill_prompts * prompt * kv_per_token
    else:
        decoding = rollout_rows / layout.batch_shards
        prefill_prompts = max(1, buckets.power_of_two(generation) / layout.batch_shards)
        cache = decoding * (buckets.round_up(prompt, 32) + new) * kv_per_token
        rows_out["rollout KV cache (every row)"] = cache
        rows_out["per-prompt cache the samples copy"] = cache / samples
    prefill = update_activation_bytes(t, int(prefill_prompts), prompt, 1, 1, weight_bytes, remat=True,
                                      tensor=layout.tensor) \
        - t.num_hidden_layers * prefill_prompts * prompt * t.hidden_size * weight_bytes
    rows_out["rollout prefill temporaries"] = prefill
    rows_out["sampling logits"] = decoding * t.vocab_size * 4 * 3 / layout.tensor
    kv_rows = [v for k, v in rows_out.items() if k.startswith("rollout KV cache")] + \
        [rows_out.get("prefill group's cache", 0), rows_out.get("per-prompt cache the samples copy", 0)]
    rollout = base + sum(kv_rows) + max(prefill, rows_out["sampling logits"])
    best_slots = None
    if slots is not None:  # the most slots (a power of two per shard) the rollout phase has room for
        per_slot = ((prompt + new) * kv_per_token + t.vocab_size * 4 * 3 / layout.tensor) / layout.batch_shards
        room = SAFETY * device_bytes - (rollout - cache - rows_out["sampling logits"])
        if room >= per_slot * layout.batch_shards:
            best_slots = layout.batch_shards * buckets.power_of_two(int(room / per_slot / layout.batch_shards) + 1) // 2

    # ---- update ----
    image_table = config.data.batch_size * image_tokens * t.hidden_size * weight_bytes  # replicated
    rows_out["update image-feature table"] = image_table

    def update_bytes(token_budget: int) -> float:  # the worst micro-batch over every width it can take
        return max(update_activation_bytes(t, micro_batches.rows_per_device(token_budget, prompt + width),
                                           prompt + width, width, _chunk(config), weight_bytes, bool(config.rl.remat),
                                           _chunk_tokens(config), layout.tensor)
                   for width in micro_batches.widths(new))

    budget = int(config.rl.get("micro_batch_tokens", 0) or 0)
    if budget:
        activations = update_bytes(budget)
    else:  # the previous path: micro_batch_size rows (or the whole mini-batch) at full width
        micro = int(config.rl.micro_batch_size or config.rl.mini_batch_size or rollout_rows)
        activations = update_activation_bytes(t, max(1, micro // layout.batch_shards), prompt + new, new,
                                              _chunk(config), weight_bytes, bool(config.rl.remat), tensor=layout.tensor)
        notes.append("rl.micro_batch_tokens=0: every micro-batch spans prompt + max_new_tokens columns")
    rows_out["update activations (largest micro-batch)"] = activations
    update = base + image_table + activations

    if layout.fsdp > 1:
        notes.append(f"fsdp={layout.fsdp} splits the weights along the model dimension: every decode step gathers "
                     "them (or XLA keeps a gathered copy); with room to spare, data parallelism with tensor "
                     "parallelism over fast links (config.mesh.data / .tensor) keeps the decode loop local")
    room = SAFETY * device_bytes - base - image_table
    best = None
    for exponent in range(10, 21):  # 1k .. 1M tokens per device
        if update_bytes(1 << exponent) <= room:
            best = 1 << exponent
    return Plan(device_bytes, rows_out, rollout, update, budget, best, prompt, notes, slots, best_slots)


def advice(plan: Plan) -> list[str]:
    """What to change, naming the settings, when a plan does not fit."""
    usable = SAFETY * plan.device_bytes
    out = []
    if plan.update > usable:
        if plan.best_micro_batch_tokens:
            out.append(f"the update needs {plan.update / GiB:.1f} GiB per device: set "
                       f"rl.micro_batch_tokens={plan.best_micro_batch_tokens} (now {plan.micro_batch_tokens or 0})")
        else:
            out.append(f"the update needs {plan.update / GiB:.1f} GiB per device even at 1k tokens per micro-batch: "
                       "use more devices (config.mesh), a smaller model, or lower data.max_pixels")
    if plan.rollout > usable:
        kv = sum(v for k, v in plan.rows.items() if k.startswith("rollout KV cache"))
        lead = f"the rollout needs {plan.rollout / GiB:.1f} GiB per device, {kv / GiB:.1f} of it KV cache: "
        if plan.slots is None:
            out.append(lead + "use the rollout engine (rollout.engine='continuous'), or lower data.batch_size or "
                       "rollout.num_samples or rollout.max_new_tokens, or use more devices (config.mesh)")
        elif plan.best_slots:
            out.append(lead + f"set rollout.slots={plan.best_slots} (now {plan.slots})")
        else:
            out.append(lead + "even one slot per device does not fit: lower rollout.max_new_tokens or use more "
                       "devices (config.mesh)")
    return out


def plan_for_run(config, model: Qwen25VLConfig, devices: int, device_bytes: float, max_patches: int) -> Plan:
    return make_plan(config, model, layout_of(config.mesh, devices), device_bytes, max_patches)


def max_patches_of(config, model: Qwen25VLConfig) -> int:
    """The most patches one image can become under the data settings (fixed size, max_pixels, or 1024x1024)."""
    patch = model.vision.patch_size
    size = tuple(config.data.get("image_size", (0, 0)) or (0, 0))
    if all(size):
        return (size[0] // patch) * (size[1] // patch)
    max_pixels = int(config.data.get("max_pixels", 0) or 1024 * 1024)
    return max_pixels // (patch * patch)


def _chunk(config) -> int:
    return int(config.rl.get("logprob_chunk", 512))


def _chunk_tokens(config) -> int:
    return int(config.rl.get("logprob_chunk_tokens", 2048))


class DoesNotFit(ValueError):
    pass


def check_fits(config, model: Qwen25VLConfig, devices: int, device_bytes: float | None) -> Plan | None:
    """Raise DoesNotFit naming the setting to change when the run cannot fit `device_bytes` per device.
    None (memory unknown, e.g. CPU without data.device_memory_gb) checks nothing."""
    if not device_bytes:
        return None
    plan = plan_for_run(config, model, devices, device_bytes, max_patches_of(config, model))
    if not plan.fits:
        raise DoesNotFit("This config does not fit the devices' memory: " + "; ".join(advice(plan))
                         + f". Per-device plan:\n{plan.table()}\n(python -m speciarl_jax.plan prints it for any setup)")
    return plan


def device_memory_bytes(config) -> float | None:
    """config.device_memory_gb if set, else what the first local device reports (None on CPU)."""
    if config.get("device_memory_gb", 0):
        return float(config.device_memory_gb) * GiB
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def _main(argv):
    del argv
    from absl import flags

    config = _CONFIG.value
    devices, memory = parse_devices(flags.FLAGS.devices)
    if flags.FLAGS.model:
        model = model_config(flags.FLAGS.model)
        name = f"Qwen2.5-VL-{flags.FLAGS.model.upper()}"
    elif config.model.path and os.path.exists(os.path.join(config.model.path, "config.json")):
        model, name = Qwen25VLConfig.from_json(config.model.path), config.model.path
    else:
        model, name = model_config("7b"), "Qwen2.5-VL-7B (config.model.path not readable here; --model to choose)"
    plan = plan_for_run(config, model, devices, memory * GiB, max_patches_of(config, model))
    layout = layout_of(config.mesh, devices)
    print(f"{name} on {flags.FLAGS.devices}: {devices} devices of {memory:.0f} GiB; mesh data={layout.data} "
          f"fsdp={layout.fsdp} tensor={layout.tensor}; {config.data.batch_size} prompts x "
          f"{config.rollout.num_samples} samples, prompts up to {plan.prompt_columns} tokens, "
          f"{config.rollout.max_new_tokens} new tokens")
    print(plan.table())
    print(f"rl.micro_batch_tokens: {plan.micro_batch_tokens or 'off'} configured; the largest that fits: "
          f"{plan.best_micro_batch_tokens or 'none'}")
    if plan.slots is not None:
        print(f"rollout.slots: {plan.slots} used (rollout engine); the most that fit: {plan.best_slots or 'none'}")
    for note in plan.notes:
        print("note:", note)
    print("FITS" if plan.fits else "DOES NOT FIT: " + "; ".join(advice(plan)))
    if flags.FLAGS.xla:
        print(xla_update_bytes(config, model, plan))


def xla_update_bytes(config, model: Qwen25VLConfig, plan: Plan) -> str:
    """Compile the update's program for the widest micro-batch on this backend, from shapes only, and report
    XLA's temporaries next to the plan's activations (one device, no mesh)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from .models import lora
    from .models.qwen2_5_vl import Qwen25VL
    from .rl import update
    from .rl.batch import abstract_batch

    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    shapes = nnx.eval_shape(lambda: Qwen25VL(model, dtype=dtype, rngs=nnx.Rngs(0)))
    if config.lora.rank:
        lora.apply_lora(shapes, lora.LoRAConfig(rank=int(config.lora.rank), alpha=float(config.lora.alpha)))
    budget = plan.micro_batch_tokens or plan.best_micro_batch_tokens or 4096
    new = int(config.rollout.max_new_tokens)
    columns = plan.prompt_columns + new
    rows = micro_batches.rows_per_device(budget, columns)
    rl = update.preset(config.rl.algorithm, logprob_chunk=_chunk(config), remat=bool(config.rl.remat),
                       kl_coef=float(config.rl.get("kl_coef", 0.01)))
    learner = update.Learner(shapes, rl, trainable=lora.trainable_filter(lora.LoRAConfig(rank=int(config.lora.rank))))
    acc = jax.eval_shape(learner._zero_acc, learner.state.params)
    analysis = learner._accumulate.lower(acc, learner.state.params, learner.frozen,
                                         abstract_batch(rows, columns, new), update.abstract_totals()).compile() \
        .memory_analysis()
    ours = update_activation_bytes(model.text, rows, columns, new, _chunk(config),
                                   _DTYPE_BYTES[config.model.dtype], bool(config.rl.remat))
    return (f"XLA ({jax.default_backend()}), update program for {rows} rows x {columns} columns: temporaries "
            f"{analysis.temp_size_in_bytes / GiB:.2f} GiB; the plan's activations for it: {ours / GiB:.2f} GiB")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags


    _CONFIG = config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "configs", "cub_grpo.py"), "Path of a config file.")
    flags.DEFINE_string("devices", "8xH100", "v5p-16, v6e-32, 8xH100, 4xH100, or <n>x<GiB per device>")
    flags.DEFINE_string("model", "", f"one of {sorted(MODELS)}; default: config.model.path's config.json, else 7b")
    flags.DEFINE_bool("xla", False, "also compile the update program from shapes on this backend (slow for 7B)")
    app.run(_main)
