"""Decode speed against the memory-bandwidth limit, for a Qwen2.5-VL-3B-shaped random model in bfloat16.

A decoding step must read every weight the step multiplies by and the KV cache it attends over; at small batch
nothing else costs as much, so bytes per step / memory bandwidth is the least time a step can take. This script
times our sampler's decode steps (prefill timed apart, compile excluded) and prints the fraction of that limit it
reaches, with the device's peak memory. Meant for an accelerator:
    python benchmarks/decode_bandwidth.py                         # 3B shape, batch 1 and 64, 128-token prompts
    python benchmarks/decode_bandwidth.py --bandwidth-gbs 3350    # a device not in the table below
    python benchmarks/decode_bandwidth.py --preset tiny --bandwidth-gbs 20 --new 8   # a CPU smoke run
    python benchmarks/decode_bandwidth.py --rl 64x8 --new 512     # the rollout engine on an RL workload
The weights are random and the prompts random token ids (text only: the vision tower plays no part in decoding);
rows may stop early at an end token, so the step count is the longest row's.

`--rl PxS` times the rollout engine instead, on P prompts x S samples whose lengths spread from a few tokens to
`--new` (end tokens chosen from greedy trajectories, as in benchmarks/sampler.py --rl), against the static
sampler on the same call. Its limit is the bytes the engine's decoding steps had to read: the weights once per
step plus the KV entries its attention windows covered (counted by the engine), over the bandwidth.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

# Peak memory bandwidth in GB/s by device kind (vendor figures), matched by substring of `device_kind`.
BANDWIDTH_GBS = {
    "H200": 4800, "H100": 3350, "A100": 2039, "L40S": 864, "L4": 300,
    "TPU v6": 1640, "TPU v5p": 2765, "TPU v5 lite": 819, "TPU v5e": 819, "TPU v4": 1228,
}


def model_config(preset: str):
    from speciarl_jax.models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig, VisionConfig

    if preset == "3b":  # Qwen2.5-VL-3B-Instruct's shapes
        text = TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                          num_attention_heads=16, num_key_value_heads=2)
        return Qwen25VLConfig(text=text, vision=VisionConfig(out_hidden_size=2048), tie_word_embeddings=True)
    if preset == "tiny":
        text = TextConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, mrope_section=(8, 4, 4))
        vision = VisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128,
                              fullatt_block_indexes=(0,))
        return Qwen25VLConfig(text=text, vision=vision, image_token_id=1000, video_token_id=1001,
                              vision_start_token_id=1002, vision_end_token_id=1003, bos_token_id=1004,
                              eos_token_id=1005, tie_word_embeddings=True)
    raise ValueError(f"Unknown preset {preset!r}: use 3b or tiny.")


def weight_bytes_per_step(model) -> int:
    """Bytes of the parameters one decoding step reads: every decoder-layer weight, the final norm and the output
    head (the embedding table when tied); the input embedding lookup reads one row per token, left out."""
    import jax
    from flax import nnx

    text = model.language_model
    head = text.embed_tokens if model.config.tie_word_embeddings else model.lm_head
    arrays = [a for part in (text.layers, text.norm, head) for a in jax.tree.leaves(nnx.state(part, nnx.Param))]
    return sum(a.size * np.dtype(a.dtype).itemsize for a in arrays)  # works on abstract (eval_shape) models too


def cache_bytes(config, rows: int, slots: int, itemsize: int) -> int:
    """Bytes of keys and values for `slots` positions of `rows` rows, all layers."""
    t = config.text
    return 2 * t.num_hidden_layers * rows * t.num_key_value_heads * t.head_dim * slots * itemsize


def _sibling(name):
    """Another script of this folder, as a module."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rl_case(model, config, args, bandwidth, weights, dtype):
    """The rollout engine against the static sampler on spread-out lengths; tokens/s against the byte limit."""
    import jax

    from speciarl_jax.sampling import RolloutEngine, Sampler
    from speciarl_jax.sampling.sampler import kv_token_bytes

    workload = _sibling("sampler")
    num_prompts, samples = (int(v) for v in args.rl.split("x"))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(config.text.vocab_size - 8, 150000), (num_prompts, args.prompt_len)).astype(np.int32)
    ids[ids == config.image_token_id] = 0
    mask = np.ones_like(ids)
    static = Sampler()
    never = config.text.vocab_size - 1
    trajectories = static.generate(model, ids, mask, max_new_tokens=args.new, temperature=0.0,
                                   eos_token_ids=[never]).tokens
    ends, lengths = workload.choose_end_tokens(trajectories, args.new)
    print(f"RL workload: {num_prompts} prompts x {samples} samples, end tokens {ends}; lengths: "
          f"{workload.histogram(np.repeat(lengths, samples), args.new)}")
    kw = dict(max_new_tokens=args.new, temperature=0.0, num_samples=samples, eos_token_ids=ends)

    def timed(sampler, **extra):
        begin = time.perf_counter()
        out = sampler.generate(model, ids, mask, **dict(kw, **extra))
        return time.perf_counter() - begin, out

    engine = RolloutEngine(slots=args.slots)
    first, _ = timed(engine)
    seconds, out = min((timed(engine) for _ in range(args.repeats)), key=lambda r: r[0])
    stats, kv = engine.stats, engine.last_kv_bytes
    firsts = sorted(set(trajectories[:, 0].tolist()))
    timed(static, eos_token_ids=firsts + [t for t in ends if t not in firsts][:max(0, len(ends) - len(firsts))])
    static_s, static_out = timed(static)
    useful = int(out.lengths.sum())
    limit = (stats.steps * weights + stats.columns_read * kv_token_bytes(model)) / (bandwidth * 1e9)
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    print(f"{'':>7} {'seconds':>8} {'useful tok/s':>12} {'steps':>6} {'limit s':>8} {'of limit':>8} {'KV MB':>9} "
          f"{'speed-up':>8}")
    print(f"{'engine':>7} {seconds:>8.2f} {useful / seconds:>12.0f} {stats.steps:>6} {limit:>8.2f} "
          f"{limit / seconds:>8.1%} {kv / 1e6:>9.2f} {static_s / seconds:>8.2f}")
    print(f"{'static':>7} {static_s:>8.2f} {useful / static_s:>12.0f} {int(static_out.lengths.max()):>6} {'':>8} "
          f"{'':>8} {static.last_kv_bytes / 1e6:>9.2f} {1.0:>8.2f}")
    print(f"engine compile {first - seconds:.1f} s, {engine.compilations} programs; same tokens as static: "
          f"{np.array_equal(out.tokens, static_out.tokens)}; peak device memory "
          f"{peak / 1e9 if peak else float('nan'):.1f} GB")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="3b", choices=("3b", "tiny"))
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=256, help="new tokens per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (the best counts)")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="peak memory bandwidth, GB/s")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--rl", default="", help="PROMPTSxSAMPLES: the rollout engine on an RL workload instead")
    parser.add_argument("--slots", type=int, default=256, help="--rl: the engine's decode slots")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from speciarl_jax.models.qwen2_5_vl import Qwen25VL
    from speciarl_jax.sampling import Sampler

    device = jax.devices()[0]
    bandwidth = args.bandwidth_gbs or next((v for k, v in BANDWIDTH_GBS.items() if k in device.device_kind), None)
    if bandwidth is None:
        raise SystemExit(f"No bandwidth known for {device.device_kind!r}: pass --bandwidth-gbs.")
    config = model_config(args.preset)
    dtype = jnp.dtype(args.dtype)
    start = time.perf_counter()
    model = Qwen25VL(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    params = sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    weights = weight_bytes_per_step(model)
    built = time.perf_counter() - start
    print(f"device: {device.device_kind} ({jax.device_count()} devices, the first used), {bandwidth:.0f} GB/s; "
          f"model: {args.preset}, {params / 1e9:.2f}B parameters, {args.dtype}, built in {built:.0f} s")
    print(f"weights read per step: {weights / 1e9:.2f} GB; prompts {args.prompt_len} tokens, {args.new} new tokens")
    if args.rl:
        return rl_case(model, config, args, bandwidth, weights, dtype)
    print(f"{'batch':>5} {'steps':>5} {'prefill s':>9} {'ms/step':>8} {'tok/s':>9} {'GB/step':>8} {'limit ms':>8} "
          f"{'of limit':>8} {'filled-cache limit':>18} {'compile s':>9} {'peak GB':>8}")

    sampler = Sampler()
    eos = config.eos_token_ids
    rng = np.random.default_rng(0)
    for rows in [int(b) for b in args.batches.split(",")]:
        ids = rng.integers(0, min(config.text.vocab_size, 150000), (rows, args.prompt_len)).astype(np.int32)
        ids[ids == config.image_token_id] = 0  # text-only prompts
        mask = np.ones_like(ids)

        def run(new):
            begin = time.perf_counter()
            out = sampler.generate(model, ids, mask, max_new_tokens=new, temperature=0.0, eos_token_ids=eos)
            return time.perf_counter() - begin, out

        first, _ = run(args.new)
        run(1)
        total = prefill = float("inf")
        for _ in range(args.repeats):
            seconds, out = run(args.new)
            total = min(total, seconds)
            prefill = min(prefill, run(1)[0])
        steps = int(out.lengths.max()) - 1  # the first token comes from the prefill's logits
        # Decode time is the difference of two timings: for a very short run noise can make it vanish, and then
        # the timed columns say n/a instead of showing nonsense.
        step_s = (total - prefill) / steps if steps > 0 and total > prefill else float("nan")
        # The decode program attends over every allocated slot; the filled part grows from the prompt by one a step.
        slots, allocated = sampler.cache_slots(args.prompt_len, args.new)
        step_bytes = weights + cache_bytes(config, rows, allocated, dtype.itemsize)
        filled_bytes = weights + cache_bytes(config, rows, slots + steps / 2, dtype.itemsize)
        limit_s = step_bytes / (bandwidth * 1e9)
        stats = device.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        print(f"{rows:>5} {steps:>5} {prefill:>9.3f} {step_s * 1e3:>8.2f} {rows / step_s:>9.0f} "  # nan prints nan
              f"{step_bytes / 1e9:>8.2f} {limit_s * 1e3:>8.2f} {limit_s / step_s:>8.1%} "
              f"{filled_bytes / (bandwidth * 1e9) / step_s:>18.1%} {first - total:>9.1f} "
              f"{peak / 1e9 if peak else float('nan'):>8.1f}", flush=True)


if __name__ == "__main__":
    main()
