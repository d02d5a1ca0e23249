"""Sampler speed: our compiled KV-cache decoding against transformers' `generate`, same weights, same batch.

Both decode greedily with an end token that never comes, so every row makes exactly `new` tokens.
Compile time is reported apart from the steady-state time. Each side runs `--repeats` times, alternating with
the other (ours, transformers, ours, ...), and its fastest run is reported: on a shared machine the best run is
the one least disturbed by other work, for both sides alike. Run:
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


def ours_runner(model, batch, new, eos):
    """Returns (compile seconds, run) where run() -> (seconds, tokens) is one steady-state generate call."""
    from speciarl_jax.sampling import Sampler

    sampler = Sampler()
    args = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}

    def run():
        start = time.perf_counter()
        out = sampler.generate(model, **args, max_new_tokens=new, temperature=0.0, eos_token_ids=[eos])
        return time.perf_counter() - start, out.tokens

    first, _ = run()  # compiles the vision, prefill and decode programs
    steady, _ = run()
    return first - steady, run


def transformers_runner(hf, batch, new, eos):
    import torch

    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    inputs = {k: (v if k == "pixel_values" else v.long()) for k, v in inputs.items()}
    with torch.no_grad():
        hf.generate(**inputs, max_new_tokens=2, do_sample=False, eos_token_id=eos, pad_token_id=0)  # warm-up

    def run():
        with torch.no_grad():
            start = time.perf_counter()
            out = hf.generate(**inputs, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)
            elapsed = time.perf_counter() - start
        return elapsed, out[:, batch["input_ids"].shape[1]:].numpy()

    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--lengths", default=None, help="comma-separated new-token counts for batch 32")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side and case (the best counts)")
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
    cases = [(b, 64 if not args.quick else 16) for b in batches]
    cases += [(32 if not args.quick else 8, n) for n in lengths if (32 if not args.quick else 8, n) not in cases]

    print(f"model: {params / 1e6:.1f}M parameters (transformers count), CPU, float32, greedy")
    print(f"{'batch':>5} {'new':>4} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'ours s':>7} {'hf s':>6} "
          f"{'compile s':>9} {'same tokens':>11}")
    for b, new in cases:
        batch = prompts(processor, b)
        compile_s, ours_run = ours_runner(model, batch, new, eos)
        hf_run = transformers_runner(hf, batch, new, eos)
        ours, theirs = float("inf"), float("inf")
        for _ in range(args.repeats):
            seconds, ours_tokens = ours_run()
            ours = min(ours, seconds)
            seconds, hf_tokens = hf_run()
            theirs = min(theirs, seconds)
        same = np.mean(ours_tokens == hf_tokens)
        tokens = b * new
        print(f"{b:>5} {new:>4} {tokens / ours:>11.0f} {tokens / theirs:>9.0f} {theirs / ours:>6.2f} "
              f"{ours:>7.2f} {theirs:>6.2f} {compile_s:>9.2f} {same:>11.1%}", flush=True)


if __name__ == "__main__":
    main()
