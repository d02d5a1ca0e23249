"""Images per second through the whole data pipeline on this machine's CPU.

JPEG files on disk (448x448, drawn by the synthetic world) -> manifest source -> decode -> Qwen2.5-VL
patches -> prompt token ids -> padded batches, with 0 and 2 grain worker processes. Worker start-up is
timed apart from the steady rate (the first batch pays it). Also times the per-image preprocessing alone:
`image_ops.ImagePatcher` against transformers' own image processor.

    python benchmarks/data.py [--num-images 512] [--batch-size 32] [--workers 0 2] [--read-threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from absl import flags
from PIL import Image

from speciarl_jax.data import ManifestSource, Pipeline, PipelineOptions, SyntheticWorld
from speciarl_jax.data.image_ops import ImagePatcher
from speciarl_jax.tiny_model import build_tokenizer
from speciarl_jax.processing import Processor

SIZE = 448


def write_images(folder: str, count: int) -> str:
    world = SyntheticWorld(seed=0, image_size=(SIZE, SIZE))
    rows = []
    for i in range(count):
        path = os.path.join(folder, f"{i:05d}.jpg")
        Image.fromarray(world.render("train", i)).save(path, quality=90)
        rows.append({"image": os.path.basename(path), "label": world.label(world.class_id("train", i))})
    manifest = os.path.join(folder, "images.jsonl")
    with open(manifest, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    return manifest


def time_pipeline(source, processor, batch_size: int, workers: int, read_threads: int) -> dict:
    options = PipelineOptions(
        batch_size=batch_size, worker_count=workers, read_threads=read_threads, num_epochs=1, remainder="drop",
        process_index=0, process_count=1, prompt="specific",
    )
    start = time.perf_counter()
    with Pipeline(source, processor, options).iterator() as iterator:
        first = next(iterator)
        after_first = time.perf_counter()
        count = 0
        for batch in iterator:
            count += len(batch)
        end = time.perf_counter()
    return {
        "workers": workers,
        "read_threads": read_threads,
        "first_batch_s": after_first - start,
        "steady_images_per_s": count / (end - after_first),
        "overall_images_per_s": (count + len(first)) / (end - start),
        "batch_shapes": {"input_ids": list(first.input_ids.shape), "pixel_values": list(first.pixel_values.shape)},
    }


def time_preprocessing(processor, repeats: int = 50) -> dict:
    image = Image.fromarray(SyntheticWorld(seed=1, image_size=(SIZE, SIZE)).render("train", 0))
    patcher = ImagePatcher.from_processor(processor)
    out = {}
    for name, fn in (("image_patcher_ms", patcher), ("transformers_ms", lambda im: processor.encode_images([im]))):
        fn(image)
        start = time.perf_counter()
        for _ in range(repeats):
            fn(image)
        out[name] = (time.perf_counter() - start) / repeats * 1e3
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--read-threads", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags

    from transformers import Qwen2VLImageProcessorPil

    # Qwen2.5-VL's pixel bounds: a 448x448 image keeps its size (1024 patches, 256 image tokens).
    processor = Processor(build_tokenizer(), Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280))
    print(json.dumps({"cpu_count": os.cpu_count(), **time_preprocessing(processor)}))
    with tempfile.TemporaryDirectory() as folder:
        source = ManifestSource(write_images(folder, args.num_images))
        for workers in args.workers:
            for threads in args.read_threads:
                print(json.dumps(time_pipeline(source, processor, args.batch_size, workers, threads)), flush=True)


if __name__ == "__main__":
    main()
