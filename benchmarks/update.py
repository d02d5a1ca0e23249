"""Speed and memory of the RL update (LoRA, GRPO preset: old + reference log-probabilities, then the optimizer
steps), on random weights and random text rollouts.

Sizes: `tiny` (the unit-test model, ~0.2M), `50m` (~56M: hidden 512, 8 layers, vocab 32k) and `7b` (the
Qwen2.5-VL-7B language model's shapes, vocab 152k; its vision tower is shrunk to a stub since the rollouts
here are text and the tower is frozen). Reported per phase: compile time, steady-state time, tokens/s, and
model FLOPs utilisation when the peak of the chip is known.

FLOPs are counted analytically for one forward over the batch (F): the linear layers over every token,
attention scores and mixing over the full context (as computed, no causal saving), the output layer over the
response tokens only. A LoRA training pass counts 2F (forward + gradients w.r.t. activations; the frozen
weights get no gradients, the adapters' own matmuls are ignored); gradient checkpointing's recomputed forward
is not counted (model FLOPs, not hardware FLOPs). Peak memory: the device's peak allocation where the runtime
reports it (GPU), else XLA's buffer assignment of the compiled step plus the process's peak RSS (CPU).

`--compare`: the RL workload (response lengths long-tailed, median an eighth of `--response`, a few at the cap)
through the previous update path (every micro-batch at the batch's full width, one program) and the bucketed
one (`RLConfig.micro_batch_tokens`: rows grouped by length, each micro-batch cut to its own width), each in a
fresh process, and prints them side by side: seconds per update (old + reference log-probabilities + optimizer
steps, after warm-up), computed token slots against real tokens, the process's peak memory, and XLA's temporary
bytes of the largest compiled program.

Run:
    python benchmarks/update.py --compare --size 50m --rows 64 --prompt 128 --response 512
    python benchmarks/update.py --size tiny
    python benchmarks/update.py --size 50m --rows 16 --prompt 256 --response 256 --micro 4
    python benchmarks/update.py --size 7b --rank 64 --dtype bfloat16 --rows 32 --mini 16 --micro 4 \
        --prompt 512 --response 512            # on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from speciarl_jax.models import lora
from speciarl_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, TextConfig, VisionConfig
from speciarl_jax.rl import update
from speciarl_jax.rl.batch import make_rollout_batch

STUB_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=(0,))
TEXT_SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=(4, 2, 2)),
    "50m": dict(vocab_size=32768, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, mrope_section=(16, 8, 8)),
    "7b": {},  # TextConfig's defaults are Qwen2.5-VL-7B's
}
# Dense bf16 peak FLOP/s by device kind (for MFU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build_model(size: str, dtype, abstract: bool = False) -> Qwen25VL:
    """Random weights of the given size; with abstract=True only their shapes (nothing is allocated)."""
    text = TextConfig(**TEXT_SHAPES[size])
    config = Qwen25VLConfig(text=text, vision=VisionConfig(out_hidden_size=text.hidden_size, **STUB_VISION),
                            image_token_id=text.vocab_size - 1, video_token_id=text.vocab_size - 2,
                            vision_start_token_id=text.vocab_size - 3, vision_end_token_id=text.vocab_size - 4,
                            bos_token_id=0, eos_token_id=1, pad_token_id=0)
    # Initialise on the device in one compiled program instead of op by op.
    shapes = nnx.eval_shape(lambda: Qwen25VL(config, dtype=dtype, rngs=nnx.Rngs(0)))
    if abstract:
        return shapes
    graphdef, _ = nnx.split(shapes)
    state = jax.jit(lambda: nnx.split(Qwen25VL(config, dtype=dtype, rngs=nnx.Rngs(0)))[1])()
    return nnx.merge(graphdef, state)


def random_rollouts(config, rows: int, samples: int, prompt: int, response: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vocab = config.text.vocab_size - 8
    prompts = rows // samples
    ids = rng.integers(8, vocab, (prompts, prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    responses = rng.integers(8, vocab, (rows, response))
    lengths = rng.integers(response // 2, response + 1, rows)  # ragged, as real rollouts are
    response_mask = (np.arange(response)[None] < lengths[:, None]).astype(np.int32)
    advantages = rng.normal(size=rows).astype(np.float32)
    return make_rollout_batch(config, {"input_ids": ids, "attention_mask": mask}, responses, response_mask,
                              advantages, num_samples=samples)


def rl_lengths(rows: int, cap: int, seed: int = 0) -> np.ndarray:
    """Response lengths as reasoning rollouts spread: log-normal with median cap / 8, and the longest 3% (at
    least two) run into the cap, as answers that never close do."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(np.exp(rng.normal(np.log(cap / 8), 1.1, rows))), 4, cap).astype(np.int64)
    lengths[np.argsort(lengths)[-max(2, round(0.03 * rows)):]] = cap
    return lengths


def rl_rollouts(config, rows: int, samples: int, prompt: int, response: int, seed: int = 0):
    """Random rollouts whose response lengths follow `rl_lengths`."""
    batch = random_rollouts(config, rows, samples, prompt, response, seed)
    lengths = rl_lengths(rows, response, seed)
    mask = (np.arange(response)[None] < lengths[:, None]).astype(np.int32)
    return batch.replace(response_mask=mask)


def run_path(args) -> dict:
    """One update path on the RL workload, in this process: the JSON `--compare` collects."""
    from speciarl_jax import compilation
    from speciarl_jax.rl import micro_batches

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = build_model(args.size, dtype)
    lora.apply_lora(model, lora.LoRAConfig(rank=args.rank, alpha=args.rank / 2))
    bucketed = args.path == "bucketed"
    # The previous path runs micro-batches of --micro rows at full width; the bucketed one fills --tokens per pass.
    config = update.preset("grpo", mini_batch_size=args.mini, micro_batch_size=None if bucketed else args.micro or None,
                           logprob_chunk=args.chunk, remat=not args.no_remat,
                           micro_batch_tokens=args.tokens if bucketed else None)
    learner = update.Learner(model, config)
    batch = rl_rollouts(model.config, args.rows, args.samples, args.prompt, args.response)
    compiles = compilation.CompileCounter()
    start = time.perf_counter()
    learner.step(batch)  # compiles every program the workload needs
    first = time.perf_counter() - start
    compiled = compiles.take()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        learner.step(batch)
        times.append(time.perf_counter() - start)
    real = int(np.asarray(batch.response_mask).sum() + args.rows * args.prompt)
    if bucketed:
        plan = learner.plan(np.asarray(batch.response_mask).sum(1), args.prompt, args.response)
        slots = micro_batches.padded_tokens(plan, args.prompt)
        largest = max(plan, key=lambda m: len(m.rows) * (args.prompt + m.response_width))
        piece = learner._piece(jax.tree.map(np.asarray, batch.replace(
            old_logprobs=np.zeros(batch.response_mask.shape, np.float32),
            ref_logprobs=np.zeros(batch.response_mask.shape, np.float32))), np.arange(args.rows), largest, None)
        mask = np.asarray(batch.response_mask)
        totals = {"tokens": np.float32(mask.sum()), "rows": np.float32(args.rows), "num_micro": np.float32(1),
                  "max_len": np.float32(args.response)}
        lowered = learner._accumulate.lower(learner._zero_acc(learner.state.params), learner.state.params,
                                            learner.frozen, piece, totals)
        shapes = sorted({m.shape for m in plan}, reverse=True)
    else:
        micro = args.micro or args.mini or args.rows  # --micro 0: the whole mini-batch in one pass
        slots = args.rows * (args.prompt + args.response)
        placed = learner.place(batch)
        placed = placed.replace(old_logprobs=jnp.zeros(placed.response_mask.shape),
                                ref_logprobs=jnp.zeros(placed.response_mask.shape))
        lowered = learner.train_step.lower(learner.state, learner.frozen, placed)
        shapes = [(micro, args.response)]
    analysis = lowered.compile().memory_analysis()
    return {
        "path": args.path, "update_s": round(float(np.median(times)), 4), "first_update_s": round(first, 2),
        "programs_compiled": compiled["count"], "real_tokens": real, "token_slots": int(slots),
        "micro_batch_shapes": [list(s) for s in shapes],
        "largest_program_temp_bytes": int(analysis.temp_size_in_bytes) if analysis is not None else None,
        "device_peak_bytes": device_peak_bytes(),
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def compare(args) -> dict:
    """Both paths in fresh processes (so each peak is its own), side by side."""
    import subprocess
    import sys
    import tempfile

    results = {}
    for path in ("previous", "bucketed"):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            argv, skip = [], False
            for a in sys.argv[1:]:
                if not skip and a != "--compare" and not a.startswith("--json"):
                    argv.append(a)
                skip = a == "--json"
            subprocess.run([sys.executable, __file__, *argv, "--path", path, "--json", out.name], check=True,
                           stdout=subprocess.DEVNULL)
            with open(out.name) as f:
                results[path] = json.load(f)
    lengths = rl_lengths(args.rows, args.response)
    print(f"RL workload: {args.rows} rows, prompt {args.prompt}, responses up to {args.response} "
          f"(median {int(np.median(lengths))}, mean {lengths.mean():.0f}, {int((lengths == args.response).sum())} "
          f"at the cap), {args.size} model, LoRA r{args.rank}, {args.dtype}")
    rows = [("seconds per update", "update_s"), ("first update (compiles), s", "first_update_s"),
            ("programs compiled", "programs_compiled"), ("token slots computed", "token_slots"),
            ("process peak memory, MB", "process_peak_rss_bytes"),
            ("largest program's XLA temporaries, MB", "largest_program_temp_bytes"),
            ("device peak memory, MB", "device_peak_bytes")]
    print(f"| | previous | bucketed | previous / bucketed |\n|---|---|---|---|")
    for label, key in rows:
        a, b = results["previous"][key], results["bucketed"][key]
        if a is None or b is None:
            continue
        scale = 1e6 if key.endswith("bytes") else 1
        print(f"| {label} | {a / scale:,.4g} | {b / scale:,.4g} | {a / b:.2f}x |")
    print(f"real tokens: {results['bucketed']['real_tokens']:,}; bucketed micro-batch shapes (rows, response "
          f"width): {results['bucketed']['micro_batch_shapes']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def forward_flops(text: TextConfig, rows: int, length: int, response: int) -> float:
    """Model FLOPs of one forward over rows x length tokens with logits on the response positions only."""
    d, hd = text.hidden_size, text.head_dim
    q, kv = text.num_attention_heads * hd, text.num_key_value_heads * hd
    per_token_linear = 2 * (d * (q + 2 * kv) + q * d + 3 * d * text.intermediate_size)
    per_token_attention = 2 * 2 * length * q  # scores and mixing over the full context
    per_layer = per_token_linear + per_token_attention
    return rows * (length * text.num_hidden_layers * per_layer + response * 2 * d * text.vocab_size)


def timed(fn, repeats: int):
    """(first call seconds, mean of the next `repeats` calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, float(np.mean(times))


def device_peak_bytes():
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(TEXT_SHAPES), default="tiny")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--rows", type=int, default=16, help="rollouts per update")
    parser.add_argument("--samples", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--mini", type=int, default=None, help="rows per optimizer step (default: all)")
    parser.add_argument("--micro", type=int, default=4, help="rows per forward/backward")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=512, help="logprob_chunk")
    parser.add_argument("--no-remat", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--compile-only", action="store_true",
                        help="no weights: compile the train step from shapes and print XLA's memory estimate")
    parser.add_argument("--compare", action="store_true",
                        help="the RL workload through the previous and the bucketed update paths, side by side")
    parser.add_argument("--path", choices=["previous", "bucketed"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=8192, help="micro_batch_tokens of the bucketed path")
    return parser


def main():
    args = build_parser().parse_args()
    if args.compile_only:
        return compile_only(args)
    if args.compare:
        return compare(args)
    if args.path:
        result = run_path(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f)
        return print(json.dumps(result))

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    start = time.perf_counter()
    model = build_model(args.size, dtype)
    adapted = lora.apply_lora(model, lora.LoRAConfig(rank=args.rank, alpha=args.rank / 2))
    count = lora.count_parameters(model, lora.LoRAConfig(rank=args.rank))
    built = time.perf_counter() - start

    config = update.preset("grpo", mini_batch_size=args.mini, micro_batch_size=args.micro,
                           logprob_chunk=args.chunk, remat=not args.no_remat)
    learner = update.Learner(model, config)
    batch = learner.place(random_rollouts(model.config, args.rows, args.samples, args.prompt, args.response))
    old_first, old_time = timed(lambda: learner.rollout_logprobs(batch), args.repeats)
    ref_first, ref_time = timed(lambda: learner.rollout_logprobs(batch, reference=True), args.repeats)
    batch = batch.replace(old_logprobs=learner.rollout_logprobs(batch),
                          ref_logprobs=learner.rollout_logprobs(batch, reference=True))
    start = time.perf_counter()
    compiled = learner.train_step.lower(learner.state, learner.frozen, batch).compile()
    train_compile = time.perf_counter() - start

    def train_once():
        learner.state, metrics = compiled(learner.state, learner.frozen, batch)
        return metrics

    _, train_time = timed(train_once, args.repeats)

    length = args.prompt + args.response
    tokens = args.rows * length
    flops = forward_flops(model.config.text, args.rows, length, args.response)
    kind = jax.local_devices()[0].device_kind
    peak = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
    analysis = compiled.memory_analysis()
    result = {
        "size": args.size, "device": kind, "dtype": args.dtype, "rank": args.rank, "adapted_layers": len(adapted),
        "trainable_params": count.trainable, "total_params": count.total,
        "rows": args.rows, "prompt": args.prompt, "response": args.response, "micro": args.micro,
        "mini": args.mini or args.rows, "remat": not args.no_remat, "build_s": round(built, 2),
        "old_logprobs": {"compile_s": round(old_first - old_time, 2), "step_s": round(old_time, 4),
                         "tokens_per_s": round(tokens / old_time, 1)},
        "ref_logprobs": {"compile_s": round(ref_first - ref_time, 2), "step_s": round(ref_time, 4),
                         "tokens_per_s": round(tokens / ref_time, 1)},
        "train": {"compile_s": round(train_compile, 2), "step_s": round(train_time, 4),
                  "tokens_per_s": round(tokens / train_time, 1),
                  "optimizer_steps": args.rows // (args.mini or args.rows)},
        "update_total_s": round(old_time + ref_time + train_time, 4),
        "forward_gflop": round(flops / 1e9, 2),
        "xla_train_step_bytes": {
            "arguments": int(analysis.argument_size_in_bytes), "outputs": int(analysis.output_size_in_bytes),
            "temporaries": int(analysis.temp_size_in_bytes),
        } if analysis is not None else None,
        "device_peak_bytes": device_peak_bytes(),
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if peak:
        result["train"]["mfu"] = round(2 * flops / train_time / peak, 4)
        result["old_logprobs"]["mfu"] = round(flops / old_time / peak, 4)
        whole = 4 * flops / (old_time + ref_time + train_time)  # two forwards + one training pass
        result["update_mfu"] = round(whole / peak, 4)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def compile_only(args):
    """XLA's buffer sizes for the train step, from shapes only: a fit check before allocating a large model.

    Caution on CPU: its scheduler runs the recomputed forwards of the unrolled decoder blocks early, so the
    estimate there is close to the no-remat one.
    """
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = build_model(args.size, dtype, abstract=True)
    lora.apply_lora(model, lora.LoRAConfig(rank=args.rank, alpha=args.rank / 2))
    config = update.preset("grpo", mini_batch_size=args.mini, micro_batch_size=args.micro,
                           logprob_chunk=args.chunk, remat=not args.no_remat)
    learner = update.Learner(model, config)
    batch = random_rollouts(model.config, args.rows, args.samples, args.prompt, args.response)
    per_token = np.zeros((args.rows, args.response), np.float32)
    batch = batch.replace(old_logprobs=per_token, ref_logprobs=per_token)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), batch)
    start = time.perf_counter()
    analysis = learner.train_step.lower(learner.state, learner.frozen, batch).compile().memory_analysis()
    result = {
        "size": args.size, "device": jax.local_devices()[0].device_kind, "dtype": args.dtype, "rank": args.rank,
        "rows": args.rows, "micro": args.micro, "prompt": args.prompt, "response": args.response,
        "compile_s": round(time.perf_counter() - start, 1),
        "arguments_gb": round(analysis.argument_size_in_bytes / 1e9, 2),
        "outputs_gb": round(analysis.output_size_in_bytes / 1e9, 2),
        "temporaries_gb": round(analysis.temp_size_in_bytes / 1e9, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
