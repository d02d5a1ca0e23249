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
`--rl` runs a workload shaped like RL rollouts instead: P prompts x S samples, greedy, answers whose lengths spread
from a few tokens to the cap. Nobody picks the lengths: the static sampler first decodes every prompt to the cap
with no end token, then a set of end tokens is chosen from those trajectories, one token at a time, to bring the
row lengths closest to a log-uniform spread between 1 and the cap (printed as a histogram). The same call then runs
on the rollout engine (continuous batching), the static sampler and transformers' generate, and the table gives
wall time, useful tokens/s (the tokens of the answers, end token included), whether the tokens are the same, the
KV-cache bytes each holds at its peak, and a floor: the decoding steps' weight products for the useful tokens
alone (batched like the engine's slots), with the faster prefill added.
Run:
    python benchmarks/sampler.py                 # ~35M-parameter model, batch 1 / 32 / 128, 64 new tokens
    python benchmarks/sampler.py --quick         # small model, fewer cases (a smoke run)
    python benchmarks/sampler.py --rl            # RL workload: 64 prompts x 8 samples, up to 512 new tokens
    python benchmarks/sampler.py --rl --quick --rl-shape 8x4 --rl-max-new 64   # its smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def build(folder: str, quick: bool):
    from speciarl_jax.tiny_model import TinySpec, make_tiny_checkpoint

    spec = TinySpec() if quick else TinySpec(
        hidden_size=512, intermediate_size=1536, num_layers=12, num_heads=8, num_kv_heads=2,
        vision_hidden=128, vision_intermediate=256, vision_depth=4, vision_heads=4, fullatt_block_indexes=(3,),
    )
    return make_tiny_checkpoint(folder, spec)


def prompts(processor, batch: int, sizes=((56, 56),)):
    rng = np.random.default_rng(0)
    questions = ["What is this?", "Name the species in the picture.", "Which kind of shape is it, exactly?"]
    texts = [processor.chat_prompt(questions[i % 3], 1) for i in range(batch)]
    images = [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(batch)]
    return processor(texts, images=images)


def first_hits(trajectories, end_tokens, cap: int) -> np.ndarray:
    """Row lengths if `end_tokens` ended the rows: the first position holding one of them, plus one (else cap)."""
    hit = np.isin(trajectories, list(end_tokens))
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, cap)


def choose_end_tokens(trajectories, cap: int, max_tokens: int = 24) -> tuple[list[int], np.ndarray]:
    """End tokens that spread the row lengths of these greedy trajectories [rows, cap] most evenly in log-length
    between 1 and cap (smallest Kolmogorov distance to that), added one at a time while the distance falls."""
    grid = np.arange(1, cap + 1)
    target = np.log(grid) / np.log(cap)

    def distance(lengths):
        return np.abs(np.searchsorted(np.sort(lengths), grid, side="right") / len(lengths) - target).max()

    candidates = np.unique(trajectories)
    ends = np.stack([first_hits(trajectories, [t], cap) for t in candidates])  # [candidates, rows]
    chosen, lengths = [], np.full(len(trajectories), cap)
    best = distance(lengths)
    while len(chosen) < max_tokens:
        scores = [distance(np.minimum(lengths, e)) for e in ends]
        i = int(np.argmin(scores))
        if scores[i] >= best:
            break
        chosen.append(int(candidates[i]))
        lengths, best = np.minimum(lengths, ends[i]), scores[i]
    return chosen, lengths


def histogram(lengths, cap: int) -> str:
    edges = [1, 2, 5, 9, 17, 33, 65, 129, 257, 513, 1025, 2049]
    edges = [e for e in edges if e <= cap] + [cap, cap + 1]
    edges = sorted(set(edges))
    counts = np.histogram(lengths, bins=edges)[0]
    labels = [f"{a}-{b - 1}" if b - 1 > a else f"{a}" for a, b in zip(edges[:-1], edges[1:])]
    return "  ".join(f"{label}: {c}" for label, c in zip(labels, counts))


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


def repeat_prompts(batch, n: int) -> dict:
    """The batch with every prompt (and its images) repeated n times in a row, as transformers' greedy generate
    needs them for n rows per prompt."""
    grids = batch["image_grid_thw"]
    starts = np.concatenate([[0], np.cumsum(grids.prod(axis=1))])
    images = [batch["pixel_values"][a:b] for a, b in zip(starts[:-1], starts[1:])]  # one image per prompt here
    return dict(input_ids=np.repeat(batch["input_ids"], n, 0), attention_mask=np.repeat(batch["attention_mask"], n, 0),
                mm_token_type_ids=np.repeat(batch["mm_token_type_ids"], n, 0),  # transformers' image positions need it
                pixel_values=np.concatenate([im for im in images for _ in range(n)]),
                image_grid_thw=np.repeat(grids, n, 0))


def rl_workload(args):
    import jax
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from speciarl_jax.models.qwen2_5_vl import from_pretrained
    from speciarl_jax.processing import Processor
    from speciarl_jax.sampling import RolloutEngine, Sampler

    torch.set_num_threads(max(1, torch.get_num_threads()))
    folder = build(tempfile.mkdtemp(prefix="sampler_bench_"), args.quick)
    model = from_pretrained(folder)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = Processor.from_pretrained(folder)
    num_prompts, samples = (int(v) for v in (args.rl_shape or "64x8").split("x"))
    cap, rows = args.rl_max_new, num_prompts * samples
    batch = prompts(processor, num_prompts, sizes=((56, 56), (84, 56), (56, 112), (112, 84)))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    print(f"model: {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M parameters, CPU, float32, greedy; "
          f"{num_prompts} prompts x {samples} samples, up to {cap} new tokens, engine with {args.slots} slots")

    # The workload: end tokens chosen from the greedy trajectories (the samples of a prompt are alike).
    start = time.perf_counter()
    never = model.config.text.vocab_size - 1
    static = Sampler()
    trajectories = static.generate(model, **inputs, max_new_tokens=cap, temperature=0.0, eos_token_ids=[never]).tokens
    ends, lengths = choose_end_tokens(trajectories, cap)
    lengths = np.repeat(lengths, samples)
    print(f"end tokens {ends} (chosen in {time.perf_counter() - start:.0f} s); row lengths: mean {lengths.mean():.0f}, "
          f"median {np.median(lengths):.0f}, {np.mean(lengths == cap):.0%} at the cap")
    print(f"  histogram  {histogram(lengths, cap)}")
    kw = dict(max_new_tokens=cap, temperature=0.0, num_samples=samples, eos_token_ids=ends)

    def timed(fn):
        begin = time.perf_counter()
        out = fn()
        return time.perf_counter() - begin, out

    engine = RolloutEngine(slots=args.slots, chunk_steps=args.chunk_steps)
    first, _ = timed(lambda: engine.generate(model, **inputs, **kw))  # compiles every program the call meets
    engine_s, engine_out = timed(lambda: engine.generate(model, **inputs, **kw))
    stats, programs, engine_kv = engine.stats, engine.compilations, engine.last_kv_bytes
    # The static sampler's decode program, compiled by a call whose rows all end at their first token (as many
    # end tokens as the workload's, so the program is the same).
    firsts = sorted(set(trajectories[:, 0].tolist()))
    warm = firsts + [t for t in ends if t not in firsts][:max(0, len(ends) - len(firsts))]
    static.generate(model, **inputs, **dict(kw, eos_token_ids=warm))
    static_s, static_out = timed(lambda: static.generate(model, **inputs, **kw))
    expanded = {k: torch.from_numpy(v) for k, v in repeat_prompts(batch, samples).items()}
    expanded = {k: (v if k == "pixel_values" else v.long()) for k, v in expanded.items()}
    with torch.no_grad():
        hf_s, hf_out = timed(lambda: hf.generate(**expanded, max_new_tokens=cap, do_sample=False, eos_token_id=ends,
                                                 pad_token_id=0))
    hf_tokens = hf_out[:, batch["input_ids"].shape[1]:].numpy()
    useful = int(engine_out.lengths.sum())

    # Floor: the weight products of the useful tokens in batches of the engine's slots, plus the faster prefill.
    prefill = min(timed(lambda: engine.generate(model, **inputs, **dict(kw, max_new_tokens=1)))[0] for _ in range(2))
    layers, head = _text_weights(model)
    slots = min(args.slots, rows)
    steps = -(-useful // slots)
    products = [runner(layers, head, slots, steps) for runner in (xla_products_runner, torch_products_runner)]
    floor = prefill + min(run() for run in products for _ in range(2))

    def same(tokens, lengths):
        match = [np.array_equal(tokens[r, :n], engine_out.tokens[r, :n]) for r, n in enumerate(lengths)]
        return f"{np.mean(match):.1%}"

    token_bytes = model.config.text.num_hidden_layers * 2 * model.config.text.num_key_value_heads * \
        model.config.text.head_dim * 4
    hf_kv = rows * (batch["input_ids"].shape[1] + hf_tokens.shape[1]) * token_bytes
    print(f"engine: {stats.chunks} chunks, {stats.prefills} prefills, {stats.moves} slots moved; decoding ran "
          f"{stats.slot_steps} slot-steps for {stats.row_steps} tokens ({stats.row_steps / stats.slot_steps:.0%} "
          f"useful); compile {first - engine_s:.1f} s; {programs} programs")
    print(f"{'':>14} {'seconds':>8} {'useful tok/s':>12} {'speed-up':>8} {'KV MB':>8} {'KV share':>8} "
          f"{'same rows':>9}")
    rows_out = [("engine", engine_s, engine_kv, "-"),
                ("static", static_s, static.last_kv_bytes, same(static_out.tokens, engine_out.lengths)),
                ("transformers", hf_s, hf_kv, same(hf_tokens, engine_out.lengths)),
                ("floor", floor, None, "")]
    for name, seconds, kv, match in rows_out:
        kv_cols = f"{kv / 2**20:>8.1f} {kv / static.last_kv_bytes:>8.2f}" if kv else f"{'':>8} {'':>8}"
        print(f"{name:>14} {seconds:>8.2f} {useful / seconds:>12.0f} {static_s / seconds:>8.2f} {kv_cols} {match:>9}",
              flush=True)
    assert np.array_equal(engine_out.lengths, lengths), "the engine's lengths differ from the chosen workload"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--lengths", default=None, help="comma-separated new-token counts for batch 32")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side and case (the best counts)")
    parser.add_argument("--rl-shape", default="4x8", help="PROMPTSxSAMPLES: an extra case shaped like RL rollouts, "
                        "several samples per prompt at temperature 1 ('' to skip)")
    parser.add_argument("--rl", action="store_true", help="the RL workload (see the module's text)")
    parser.add_argument("--rl-max-new", type=int, default=512, help="--rl: the cap on new tokens")
    parser.add_argument("--slots", type=int, default=128, help="--rl: the engine's decode slots")
    parser.add_argument("--chunk-steps", type=int, default=16, help="--rl: the engine's steps per chunk")
    args = parser.parse_args()
    if args.rl:
        if args.rl_shape == parser.get_default("rl_shape"):
            args.rl_shape = "64x8"
        return rl_workload(args)

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
