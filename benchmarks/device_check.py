"""One command for an accelerator session (a GPU or TPU lent for minutes): everything worth measuring there, in
about 8 minutes of device time, printed as one JSON report (and written with --json).

  1. bf16 vs f32: logits of the tiny random model in both dtypes (max difference, top-1 agreement); on an NVIDIA
     GPU also cuDNN's fused attention against XLA's (`model.attention="cudnn"`).
  2. Decode speed against the memory-bandwidth limit: benchmarks/decode_bandwidth.py (3B shapes, batch 1 and 64).
  3. One RL update of a Qwen2.5-VL-3B-shaped model with LoRA r64 on 256 rows x 512 tokens (bucketed path, GRPO:
     old and reference log-probabilities, then the optimizer step): compile and step time, model-FLOPs utilisation,
     the device's peak memory next to the planner's prediction for the same shapes.

    python benchmarks/device_check.py --json device_check.json     # on the accelerator
    python benchmarks/device_check.py --tiny                       # a CPU smoke run of the same code (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import update as update_bench  # noqa: E402  (benchmarks/update.py: model builder, FLOP count, peak table)

from speciarl_jax import plan  # noqa: E402
from speciarl_jax.models import lora  # noqa: E402
from speciarl_jax.rl import micro_batches, update  # noqa: E402


def bf16_vs_f32(seed: int = 0) -> dict:
    """The tiny random model's logits computed in bfloat16 (weights rounded from the float32 ones) against float32."""
    from flax import nnx

    full = update_bench.build_model("tiny", jnp.float32)
    half = update_bench.build_model("tiny", jnp.bfloat16)
    nnx.update(half, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(full, nnx.Param)))
    ids = np.random.default_rng(seed).integers(8, full.config.text.vocab_size - 8, (4, 48)).astype(np.int32)
    positions, _ = full.position_ids(ids)  # text rows: computed on the host, passed into the compiled forward
    forward = nnx.jit(lambda m, i, p: m(i, position_ids=p).logits)
    a, b = (np.asarray(forward(m, ids, positions), np.float32) for m in (full, half))
    return {"max_abs_diff": float(np.abs(a - b).max()), "logit_scale": float(np.abs(a).max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}


def cudnn_attention(seed: int = 0) -> dict | str:
    """On an NVIDIA GPU: the tiny model's bf16 logits with cuDNN's fused attention against XLA's."""
    from flax import nnx

    from speciarl_jax.models.qwen2_5_vl import set_attention_implementation

    if jax.default_backend() != "gpu":
        return f"skipped: cuDNN attention needs an NVIDIA GPU (backend: {jax.default_backend()})"
    model = update_bench.build_model("tiny", jnp.bfloat16)
    ids = np.random.default_rng(seed).integers(8, model.config.text.vocab_size - 8, (4, 48)).astype(np.int32)
    positions, _ = model.position_ids(ids)
    forward = nnx.jit(lambda m, i, p: m(i, position_ids=p).logits)
    xla = np.asarray(forward(model, ids, positions), np.float32)
    set_attention_implementation(model, "cudnn")
    cudnn = np.asarray(forward(model, ids, positions), np.float32)
    return {"max_abs_diff": float(np.abs(xla - cudnn).max()), "top1_agreement": float(
        (xla.argmax(-1) == cudnn.argmax(-1)).mean())}


def decode_bandwidth(tiny: bool) -> str:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_bandwidth.py")
    argv = [sys.executable, script]
    if tiny:
        argv += ["--preset", "tiny", "--bandwidth-gbs", "20", "--new", "4", "--prompt-len", "8", "--batches", "1",
                 "--repeats", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def update_step(tiny: bool) -> dict:
    """One bucketed GRPO update; sizes from the issue's device check (3B, r64, 256 rows x 512 tokens)."""
    size, rows, prompt, response, rank = ("tiny", 16, 32, 32, 8) if tiny else ("3b", 256, 256, 256, 64)
    dtype = jnp.float32 if tiny else jnp.bfloat16
    if size == "3b":
        update_bench.TEXT_SHAPES.setdefault("3b", plan.MODELS["3b"]["text"])
    start = time.perf_counter()
    model = update_bench.build_model(size, dtype)
    lora.apply_lora(model, lora.LoRAConfig(rank=rank, alpha=rank / 2))
    built = time.perf_counter() - start
    budget = 16384
    learner = update.Learner(model, update.preset("grpo", micro_batch_tokens=budget))
    batch = update_bench.random_rollouts(model.config, rows, 8, prompt, response)
    batch = batch.replace(response_mask=np.ones_like(batch.response_mask))  # every column real: a clean MFU
    start = time.perf_counter()
    learner.step(batch)
    first = time.perf_counter() - start
    start = time.perf_counter()
    metrics = learner.step(batch)
    step = time.perf_counter() - start
    flops = update_bench.forward_flops(model.config.text, rows, prompt + response, response)
    kind = jax.local_devices()[0].device_kind
    peak_flops = next((v for k, v in update_bench.PEAK_FLOPS.items() if k in kind), None)
    text = model.config.text
    dtype_bytes = 4 if tiny else 2
    counts = plan.parameter_counts(model.config, rank)
    micro_rows = micro_batches.rows_per_device(budget, prompt + response)
    predicted = ((counts["text"] + counts["vision"]) * dtype_bytes + counts["adapters"] * 4 * 4
                 + plan.update_activation_bytes(text, micro_rows, prompt + response, response, 512, dtype_bytes, True,
                                                2048))
    result = {"model": size, "rows": rows, "tokens_per_row": prompt + response, "lora_rank": rank,
              "build_s": round(built, 1), "first_step_s (compiles)": round(first, 1), "step_s": round(step, 3),
              "loss": metrics["loss"], "device_peak_bytes": update_bench.device_peak_bytes(),
              "planned_bytes": int(predicted)}
    if peak_flops:  # two forwards (old, reference) and one training pass (2F) per update
        result["mfu"] = round(4 * flops / step / peak_flops, 3)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run on CPU")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    report = {"device": jax.local_devices()[0].device_kind, "jax": jax.__version__, "devices": jax.device_count()}
    for name, fn in (("bf16_vs_f32", bf16_vs_f32), ("cudnn_attention", cudnn_attention),
                     ("decode_bandwidth", lambda: decode_bandwidth(args.tiny)),
                     ("update", lambda: update_step(args.tiny))):
        start = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as err:  # report what failed and go on: device minutes are scarce
            report[name] = {"error": f"{type(err).__name__}: {err}"}
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
