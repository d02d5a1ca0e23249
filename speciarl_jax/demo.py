"""A short end-to-end rollout on CPU with no weights, no API key and no network.

It builds the tiny random Qwen2.5-VL checkpoint, draws held-out images of the synthetic fine-grained world,
samples several answers per image with the rollout engine, grades them with the rule verifier and scores
them with the SpeciaRL best-prediction reward: one RL step's data path, without the update.

    python -m speciarl_jax.demo [--images 8] [--samples 4] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import collections
import os
import time

import jax


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from speciarl_jax.answering import Decoding, ask
    from speciarl_jax.data.prompts import get_prompt
    from speciarl_jax.data.synthetic import SyntheticWorld
    from speciarl_jax.models.qwen2_5_vl import from_pretrained
    from speciarl_jax.processing import Processor
    from speciarl_jax.rewards import best_prediction_rewards
    from speciarl_jax.sampling import RolloutEngine
    from speciarl_jax.tiny_model import make_tiny_checkpoint
    from speciarl_jax.verifier import Taxonomy, make_verifier

    print(f"One RL step's data path on a tiny random Qwen2.5-VL, without the update: {args.images} held-out "
          f"synthetic images x {args.samples} samples, graded by the rule verifier, scored by SpeciaRL's reward "
          "(under a minute on CPU).", flush=True)
    timings = {}
    start = time.perf_counter()
    model_dir = os.path.join(args.out, "tiny_model")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        make_tiny_checkpoint(model_dir, seed=args.seed)
    model = from_pretrained(model_dir)
    processor = Processor.from_pretrained(model_dir, image_size=(56, 56))
    world = SyntheticWorld(seed=args.seed, image_size=(56, 56))
    verifier = make_verifier({"kind": "rule"}, taxonomy=Taxonomy.from_dict(world.taxonomy()))
    timings["set-up"] = time.perf_counter() - start

    source = world.source("test", num_images=args.images)
    examples = [source[i] for i in range(len(source))]
    prompt = processor.chat_prompt(get_prompt("specific"), 1)
    batch = processor([prompt] * len(examples), images=[e.image for e in examples])

    start = time.perf_counter()
    answers = ask(RolloutEngine(), model, processor, batch,
                  Decoding(args.max_new_tokens, temperature=1.0, num_samples=args.samples), jax.random.key(args.seed))
    out, texts = answers.output, answers.texts
    timings["generate"] = time.perf_counter() - start

    labels = [e.label for e in examples for _ in range(args.samples)]
    start = time.perf_counter()
    categories = verifier.classify(answers.pairs([e.label for e in examples]))
    timings["verify"] = time.perf_counter() - start
    rewards = best_prediction_rewards(categories, answers.group_ids)

    print(f"tiny random policy: {sum(x.size for x in jax.tree.leaves(model)) / 1e6:.2f}M parameters")
    for i in range(min(len(texts), 2 * args.samples)):
        print(f"  [{labels[i]}] -> {texts[i][:60]!r} : {categories[i]}, reward {rewards[i]:+.1f}")
    shares = collections.Counter(categories)
    print("categories: " + ", ".join(f"{k} {v / len(categories):.0%}" for k, v in shares.most_common()))
    print(f"mean reward {rewards.mean():+.3f}; mean response length {out.lengths.mean():.1f} tokens")
    tokens = int(out.lengths.sum())
    print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
          + f" ({tokens / timings['generate']:.0f} generated tokens/s, compilation included)")
    print("An untrained random policy does not follow the answer format yet, so its answers are parse failures;"
          " training teaches it.")


if __name__ == "__main__":
    main()
