"""Sampler speed: our compiled KV-cache decoding against transformers' `generate`, same weights, same batch.

Both decode greedily with an end token that never comes, so every row makes exactly `new` tokens. One more case
is shaped like RL rollouts (`--rl-shape`, default 4 prompts x 8 samples at temperature 1): transformers expands the
prompts before its prefill, ours prefills each prompt once and copies its cache to the samples. (Sampled rows may
meet the end token, about once in 770 draws with these random weights, on both sides alike; finished rows still
take part in every step on both sides, so the times compare.)
Compile time is reported apart from the steady-state time. Each side runs `--repeats` times, alternating with
the other (ours, transformers, ours, ...), and its fastest run is reported: on a shared machine the best run is
the one least disturbed by other work, for both sides alike.

To show how far any implementation could go on this machine, each case also reports a floor: the faster of the
two prefills (vision tower and prompt forward, timed as a one-token generate on each side) plus a loop that does
nothing but the decoding steps' weight products, x @ W for every projection of every layer and the output head,
with the model's weights, in XLA and in torch (the faster counts). Attention, norms, rotary and sampling are left
out, so no exact decoder doing the same float32 arithmetic can beat it; `ceiling` is transformers' time over the
floor: the best ratio reachable here. (With the --quick model, fixed per-call costs outweigh the arithmetic and
the floor means little.)
Run:
    python benchmarks/sampler.py                 # ~35M-parameter model, batch 1 / 32 / 128, 64 new tokens
    python benchmarks/sampler.py --quick         # small model, fewer cases (a smoke run)
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def build(folder: str, quick: bool):
    from speciarl_jax.models.qwen2_5_vl.tiny import TinySpec, make_tiny_checkpoint

    spec = TinySpec() if quick else TinySpec(
        hidden_size=512, intermediate_size=1536, num_layers=12, num_heads=8, num_kv_heads=2,
        vision_hidden=128, vision_intermediate=256, vision_depth=4, vision_heads=4, fullatt_block_indexes=(3,),
    )
    return make_tiny_checkpoint(folder, spec)


def prompts(processor, batch: int):
    rng = np.random.default_rng(0)
    questions = ["What is this?", "Name the species in the picture.", "Which kind of shape is it, exactly?"]
    texts = [processor.chat_prompt(questions[i % 3], 1) for i in range(batch)]
    images = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(batch)]
    return processor(texts, images=images)


def ours_runner(model, batch, new, eos, samples=1):
    """Returns (compile seconds, run) where run() -> (seconds, tokens) is one steady-state generate call.
    With samples > 1: `samples` responses per prompt, sampled at temperature 1 (greedy otherwise)."""
    import jax

    from speciarl_jax.sampling import Sampler

    sampler = Sampler()
    args = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    mode = dict(temperature=1.0, num_samples=samples, rng=jax.random.key(0)) if samples > 1 else dict(temperature=0.0)

    def run():
        start = time.perf_counter()
        out = sampler.generate(model, **args, max_new_tokens=new, eos_token_ids=[eos], **mode)
        return time.perf_counter() - start, out.tokens

    first, _ = run()  # compiles the vision, prefill and decode programs
    steady, _ = run()
    return first - steady, run


def transformers_runner(hf, batch, new, eos, samples=1):
    import torch

    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    inputs = {k: (v if k == "pixel_values" else v.long()) for k, v in inputs.items()}
    mode = dict(do_sample=False)
    if samples > 1:  # plain sampling: transformers' defaults would otherwise add top-k 50
        mode = dict(do_sample=True, num_return_sequences=samples, temperature=1.0, top_k=0, top_p=1.0)
    with torch.no_grad():
        hf.generate(**inputs, max_new_tokens=2, eos_token_id=eos, pad_token_id=0, **mode)  # warm-up

    def run():
        with torch.no_grad():
            start = time.perf_counter()
            out = hf.generate(**inputs, max_new_tokens=new, eos_token_id=eos, pad_token_id=0, **mode)
            elapsed = time.perf_counter() - start
        return elapsed, out[:, batch["input_ids"].shape[1]:].numpy()

    return run


def _text_weights(model):
    """Per layer (q, k, v, o, gate, up, down) kernels [in, out] and the output head [D, V], as numpy float32."""
    def kernel(linear):
        return np.array(linear.kernel[...], np.float32)  # a writable copy (torch reads it too)

    layers = []
    for layer in model.language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(tuple(kernel(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                                 mlp.gate_proj, mlp.up_proj, mlp.down_proj)))
    if model.config.tie_word_embeddings:  # the embedding table [V, D], transposed into a writable copy
        head = np.ascontiguousarray(np.asarray(model.language_model.embed_tokens.embedding[...], np.float32).T)
    else:
        head = kernel(model.lm_head)
    return layers, head


def _products_step(x, layers, head, dot, squash):
    """One decoding step's weight products for rows x [N, D]; `squash` keeps the values bounded (cheap)."""
    kv = 0
    for wq, wk, wv, wo, wg, wu, wd in layers:
        h = squash(x)
        x = x + dot(dot(h, wq), wo)
        kv = kv + dot(h, wk) + dot(h, wv)
        h = squash(x)
        x = x + dot(dot(h, wg) * dot(h, wu), wd)
    return x, kv, dot(squash(x), head)


def xla_products_runner(layers, head, rows, steps):
    import jax
    import jax.numpy as jnp

    @jax.jit
    def loop(layers, head, x):
        def body(_, carry):
            x, kv, logits = _products_step(carry[0], layers, head, jnp.matmul, lambda a: jnp.clip(a, -1.0, 1.0))
            return x, kv + carry[1], logits
        kv_dim = layers[0][1].shape[1]
        init = (x, jnp.zeros((rows, kv_dim), x.dtype), jnp.zeros((rows, head.shape[1]), x.dtype))
        return jax.lax.fori_loop(0, steps, body, init)

    args = (jax.tree.map(jnp.asarray, layers), jnp.asarray(head), jnp.full((rows, head.shape[0]), 0.01, jnp.float32))
    jax.block_until_ready(loop(*args))

    def run():
        start = time.perf_counter()
        jax.block_until_ready(loop(*args))
        return time.perf_counter() - start

    return run


def torch_products_runner(layers, head, rows, steps):
    import torch

    layers = [tuple(torch.from_numpy(w) for w in layer) for layer in layers]
    head = torch.from_numpy(head)
    x0 = torch.full((rows, head.shape[0]), 0.01)

    def run():
        with torch.no_grad():
            start = time.perf_counter()
            x = x0
            for _ in range(steps):
                x, _, _ = _products_step(x, layers, head, torch.matmul, lambda a: a.clamp(-1.0, 1.0))
            return time.perf_counter() - start

    run()  # warm-up
    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--lengths", default=None, help="comma-separated new-token counts for batch 32")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side and case (the best counts)")
    parser.add_argument("--rl-shape", default="4x8", help="PROMPTSxSAMPLES: an extra case shaped like RL rollouts, "
                        "several samples per prompt at temperature 1 ('' to skip)")
    args = parser.parse_args()

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from speciarl_jax.models.qwen2_5_vl import from_pretrained
    from speciarl_jax.processing import Processor

    torch.set_num_threads(max(1, torch.get_num_threads()))
    folder = build(tempfile.mkdtemp(prefix="sampler_bench_"), args.quick)
    model = from_pretrained(folder)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = Processor.from_pretrained(folder)
    params = sum(p.numel() for p in hf.parameters())
    eos = model.config.text.vocab_size - 1  # never sampled by the tokenizer's text: every row runs to the end
    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,32,128")).split(",")]
    lengths = [int(n) for n in (args.lengths or ("16" if args.quick else "32,64,128")).split(",")]
    cases = [(b, 64 if not args.quick else 16, 1) for b in batches]
    cases += [(32 if not args.quick else 8, n, 1) for n in lengths if (32 if not args.quick else 8, n, 1) not in cases]
    if args.rl_shape:
        num_prompts, samples = (int(v) for v in args.rl_shape.split("x"))
        cases.append((num_prompts, 64 if not args.quick else 16, samples))

    print(f"model: {params / 1e6:.1f}M parameters (transformers count), CPU, float32, greedy "
          f"(PxS rows: P prompts x S samples each, sampled)")
    layers, head = _text_weights(model)
    print(f"{'batch':>5} {'new':>4} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'ours s':>7} {'hf s':>6} "
          f"{'prefill s':>9} {'floor s':>7} {'ceiling':>7} {'compile s':>9} {'same tokens':>11}")
    for num_prompts, new, samples in cases:
        batch = prompts(processor, num_prompts)
        b = num_prompts * samples  # rows
        compile_s, ours_run = ours_runner(model, batch, new, eos, samples)
        prefill_runs = [ours_runner(model, batch, 1, eos, samples)[1], transformers_runner(hf, batch, 1, eos, samples)]
        hf_run = transformers_runner(hf, batch, new, eos, samples)
        products = [runner(layers, head, b, new - 1) for runner in (xla_products_runner, torch_products_runner)]
        ours = theirs = prefill = floor = float("inf")
        for _ in range(args.repeats):
            seconds, ours_tokens = ours_run()
            ours = min(ours, seconds)
            seconds, hf_tokens = hf_run()
            theirs = min(theirs, seconds)
            prefill = min(prefill, *(run()[0] for run in prefill_runs))
            floor = min(floor, *(run() for run in products))
        floor += prefill
        same = f"{np.mean(ours_tokens == hf_tokens):.1%}" if samples == 1 else "(sampled)"
        tokens = b * new
        label = str(b) if samples == 1 else f"{num_prompts}x{samples}"
        print(f"{label:>5} {new:>4} {tokens / ours:>11.0f} {tokens / theirs:>9.0f} {theirs / ours:>6.2f} "
              f"{ours:>7.2f} {theirs:>6.2f} {prefill:>9.2f} {floor:>7.2f} {theirs / floor:>7.2f} "
              f"{compile_s:>9.2f} {same:>11}", flush=True)


if __name__ == "__main__":
    main()
