"""The grain pipeline: a Source -> batches of Qwen2.5-VL prompts, sharded by JAX process, checkpointable.

Flow for the examples of one JAX process:

    element k = (epoch, position) ---- EpochPlan: seeded shuffle per epoch, strided shard per process
      -> source[index], image patches, token ids   (grain map op: runs in worker processes or threads;
                                                    patches by image_ops.ImagePatcher, equal to transformers')
      -> Batch                                      (main process: left-pad, concatenate patches)

Batches are assembled in the main process from the per-example stream, which grain's multiprocess prefetch
returns in order, so the batches are the same for any number of workers, and the iterator state is one
element counter: it restores exactly, even with a different worker count.

Batch (what the trainer and evaluator consume):
    input_ids       [B, T] int32, left-padded with the pad token; T rounded up to `pad_to_multiple_of`
    attention_mask  [B, T] int32, 1 on real tokens
    pixel_values    [P, patch_dim] float32, the patches of the B images in row order
    image_grid_thw  [B, 3] int64, one image per row
    labels          B ground-truth strings
    sample_ids      B stable ids
    valid           [B] bool, False on rows that only pad the last batch (remainder="pad")
    epoch           the epoch the batch belongs to
`batch.model_inputs()` gives the four arrays by the names the model takes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import grain
import numpy as np
from absl import logging
from PIL import Image

from speciarl_jax.processing import IMAGE_TOKEN

from .image_ops import ImagePatcher
from .prompts import load_prompt
from .sources import BadExampleError, Source

REMAINDERS = ("drop", "keep", "pad")
BAD_EXAMPLE_POLICIES = ("raise", "skip")
_FOREVER_EPOCHS = 1 << 30  # num_epochs=None: an epoch count no run reaches


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """How a Source becomes batches.

    batch_size: prompts per batch on this process.
    seed, shuffle: each epoch is a fresh permutation drawn from (seed, epoch); shuffle=False keeps source order.
    num_epochs: passes over the data; None repeats forever.
    remainder: what happens to the examples that do not fill a last batch:
      "drop": dropped (training; each process also gets exactly len // process_count examples per epoch),
      "keep": a smaller last batch (every example once; shards may differ in size by one),
      "pad":  the last batch is filled with copies whose `valid` is False (evaluation; every process runs
              the same number of batches).
    on_bad_example: "raise" stops at the first bad example with an error naming it; "skip" leaves it out,
      counts it, and reports the skipped ids at the end of the epoch (and in `BatchIterator.reports`).
    prompt: a name in `prompts.PROMPTS` ("general", "specific"), the path of a prompt text file, or an NDJSON
      prompt file in the original SpeciaRL format (see `prompts`).
    system_prompt: optional system turn; None keeps the chat template's default.
    pad_to_multiple_of: T is rounded up to a multiple of this, to bound recompilations.
    worker_count: grain worker processes for the per-example work (0 = in this process).
    worker_buffer_size: examples each worker prepares ahead.
    read_threads, prefetch: threads running the per-example work in each process, and how many examples
      they may prepare ahead (None = two batches).
    process_index, process_count: the shard this process reads; None = jax.process_index() / process_count().
    """

    batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    remainder: str = "drop"
    on_bad_example: str = "raise"
    prompt: str = "general"
    system_prompt: str | None = None
    pad_to_multiple_of: int = 64
    worker_count: int = 0
    worker_buffer_size: int = 16
    read_threads: int = 1
    prefetch: int | None = None
    process_index: int | None = None
    process_count: int | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.remainder not in REMAINDERS:
            raise ValueError(f"remainder must be one of {REMAINDERS}, got {self.remainder!r}")
        if self.on_bad_example not in BAD_EXAMPLE_POLICIES:
            raise ValueError(f"on_bad_example must be one of {BAD_EXAMPLE_POLICIES}, got {self.on_bad_example!r}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be positive or None, got {self.num_epochs}")
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {self.pad_to_multiple_of}")
        if (self.process_index is None) != (self.process_count is None):
            raise ValueError("set both process_index and process_count, or neither")
        if self.process_count is not None and not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} outside process_count {self.process_count}")


@dataclasses.dataclass
class Batch:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixel_values: np.ndarray
    image_grid_thw: np.ndarray
    labels: list[str]
    sample_ids: list[str]
    valid: np.ndarray
    epoch: int

    def __len__(self) -> int:
        return len(self.labels)

    def model_inputs(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
        }

    def select(self, rows) -> "Batch":
        """The batch restricted to `rows` (in that order); their image patches come along."""
        rows = [int(r) for r in rows]
        sizes = np.prod(self.image_grid_thw, axis=1)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        pixels = [self.pixel_values[starts[r] : starts[r + 1]] for r in rows]
        return dataclasses.replace(
            self,
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            pixel_values=np.concatenate(pixels) if pixels else self.pixel_values[:0],
            image_grid_thw=self.image_grid_thw[rows],
            labels=[self.labels[r] for r in rows],
            sample_ids=[self.sample_ids[r] for r in rows],
            valid=self.valid[rows],
        )


@dataclasses.dataclass
class EpochReport:
    """What one epoch of this process went through."""

    epoch: int
    examples: int  # examples read (including skipped ones and padding copies from the shard plan)
    skipped: list[tuple[str, str]]  # (sample id, reason) of bad examples left out


class EpochPlan:
    """Maps element k of this process to (epoch, source index, valid).

    Each epoch orders the whole source by a permutation drawn from (seed, epoch); process p of P then takes
    positions p, p + P, p + 2P, ... of that order, so the shards of one epoch are disjoint and together cover
    the data, and every epoch reshuffles across processes.
    """

    def __init__(self, num_examples: int, *, seed: int, shuffle: bool, shard_index: int, shard_count: int, remainder: str):
        if num_examples < 1:
            raise ValueError("the source holds no examples")
        self.num_examples, self.seed, self.shuffle = num_examples, seed, shuffle
        self.shard_index, self.shard_count = shard_index, shard_count
        if remainder == "drop":
            self.per_shard = num_examples // shard_count
        elif remainder == "pad":
            self.per_shard = -(-num_examples // shard_count)
        else:
            self.per_shard = len(range(shard_index, num_examples, shard_count))
        if self.per_shard == 0:
            raise ValueError(f"{num_examples} examples cannot be shared among {shard_count} processes")
        # (epoch, order) in one attribute: read threads share the plan, and one assignment is atomic.
        self._cache: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        cache = self._cache
        if cache is not None and cache[0] == epoch:
            return cache[1]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        else:
            order = np.arange(self.num_examples)
        self._cache = (epoch, order)
        return order

    def entry(self, k: int) -> tuple[int, int, bool]:
        epoch, position = divmod(int(k), self.per_shard)
        global_position = position * self.shard_count + self.shard_index
        valid = global_position < self.num_examples
        order = self.order(epoch)
        return epoch, int(order[global_position % self.num_examples]), valid

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}


def image_preprocessor(processor) -> tuple[ImagePatcher | None, Any]:
    """(patcher, preprocess) for a `processing.Processor`: preprocess(image) -> (patches, grid_thw).

    The patches are uint8 patch bytes from the ImagePatcher, or float patches from the processor itself when
    ImagePatcher does not reproduce its image processor (patcher is then None)."""
    patcher = ImagePatcher.from_processor(processor)
    if patcher is not None:
        return patcher, patcher.patch_bytes  # a bound method pickles with the patcher alone
    return None, _ProcessorImages(processor)


class _ProcessorImages:
    """The fallback preprocess: the processor's own image processor, one image at a time (picklable for
    grain workers, unlike a closure)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> tuple[np.ndarray, np.ndarray]:
        encoded = self.processor.encode_images([image])
        return encoded["pixel_values"], encoded["image_grid_thw"][0]


def read_example(source: Source, index: int, preprocess=None):
    """source[index] checked by the rules every example the pipeline uses must pass; returns (example,
    preprocess(image)) or (example, None) without `preprocess`.

    Raises BadExampleError for an example the pipeline rejects: one the source cannot read (missing or
    undecodable image, ...), an empty label, an image that does not decode fully or that `preprocess`
    refuses. The pipeline and `checking.find_bad_examples` both use this, so they agree on what is bad."""
    example = source[index]
    if not example.label.strip():
        raise BadExampleError(example.sample_id, "empty label")
    image = example.image
    if isinstance(image, Image.Image):
        try:
            image.load()  # a lazily opened file decodes here; truncated data fails now, not mid-run
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise BadExampleError(example.sample_id, f"cannot decode the image: {e}") from None
    if preprocess is None:
        return example, None
    try:
        return example, preprocess(image)
    except (OSError, ValueError) as e:
        raise BadExampleError(example.sample_id, f"cannot preprocess the image: {e}") from None


class _EncodeExample:
    """The per-example work: read, decode, image patches, token ids. Runs in grain workers, so it holds only
    small picklable things (no tokenizer, and no transformers unless the image processor needs it), and it
    never raises for a bad example: it returns a record naming it instead."""

    def __init__(self, source: Source, plan: EpochPlan, processor, prefix_ids: np.ndarray, suffix_ids: np.ndarray):
        self.source, self.plan = source, plan
        # Without a patcher, preprocess falls back on the processor itself (slower to start in a worker).
        self.patcher, self.preprocess = image_preprocessor(processor)
        self.merge_size, self.image_token_id = processor.merge_size, processor.image_token_id
        self.prefix_ids, self.suffix_ids = prefix_ids, suffix_ids

    def __call__(self, k: int) -> dict[str, Any]:
        _, index, valid = self.plan.entry(k)
        try:
            example, (patches, grid) = read_example(self.source, index, self.preprocess)
        except BadExampleError as e:
            return {"k": k, "bad": e.reason, "sample_id": e.sample_id}
        num_image_tokens = int(np.prod(grid)) // self.merge_size**2
        input_ids = np.concatenate(
            [self.prefix_ids, np.full(num_image_tokens, self.image_token_id, np.int32), self.suffix_ids]
        )
        return {
            "k": k,
            "input_ids": input_ids,
            "patches": patches,  # uint8 patch bytes, or float patches on the fallback
            "image_grid_thw": grid,
            "label": example.label,
            "sample_id": example.sample_id,
            "valid": valid,
        }


def _pixel_values(elements: list[dict[str, Any]], patcher: ImagePatcher | None) -> np.ndarray:
    """[P, patch_dim] float32 for the whole batch, written once."""
    if patcher is None:
        # asarray: worker outputs arrive as shared-memory arrays; the batch holds a plain copy.
        return np.concatenate([np.asarray(e["patches"]) for e in elements])
    counts = [e["patches"].shape[0] for e in elements]
    out = np.empty((sum(counts), patcher.patch_dim), np.float32)
    start = 0
    for element, count in zip(elements, counts):
        patcher.normalize_into(np.asarray(element["patches"]), out[start:start + count])
        start += count
    return out


def collate(
    elements: list[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int, epoch: int,
    patcher: ImagePatcher | None = None,
) -> Batch:
    """Left-pads token ids to a common bucketed length and gathers the image patches.

    With a `patcher`, elements carry uint8 patch bytes, normalised here into the batch's array; without, they
    carry float patches that are concatenated."""
    longest = max(len(e["input_ids"]) for e in elements)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((len(elements), length), pad_token_id, np.int32)
    attention_mask = np.zeros((len(elements), length), np.int32)
    for row, element in enumerate(elements):
        ids = element["input_ids"]
        input_ids[row, length - len(ids):] = ids
        attention_mask[row, length - len(ids):] = 1
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=_pixel_values(elements, patcher),
        image_grid_thw=np.stack([np.asarray(e["image_grid_thw"]) for e in elements]).astype(np.int64),
        labels=[e["label"] for e in elements],
        sample_ids=[e["sample_id"] for e in elements],
        valid=np.array([e["valid"] for e in elements], bool),
        epoch=epoch,
    )


def _resolve_processes(options: PipelineOptions) -> tuple[int, int]:
    if options.process_count is not None:
        return options.process_index, options.process_count
    import jax

    return jax.process_index(), jax.process_count()


class Pipeline:
    """Batches of prompts from `source` for this JAX process. Iterate it, or call `iterator()`.

    Args:
      source: any Source (a data set, a selection, the synthetic world).
      processor: a `speciarl_jax.processing.Processor` (its min / max pixels and fixed `image_size` decide
        the image preprocessing).
      options: PipelineOptions.
    """

    def __init__(self, source: Source, processor, options: PipelineOptions):
        self.source, self.processor, self.options = source, processor, options
        prompt = load_prompt(options.prompt)
        self.instruction = prompt.instruction
        # A system turn set in the options wins over one a prompt file brings.
        text = processor.chat_prompt(self.instruction, num_images=1, system=options.system_prompt or prompt.system)
        prefix, suffix = text.split(IMAGE_TOKEN)
        # The prompt text is the same for every example; only the number of image pads differs. Special tokens
        # split the text before the BPE runs, so tokenizing the two halves once gives the same ids as
        # tokenizing each expanded prompt.
        tokenize = lambda s: np.asarray(processor.tokenizer(s, add_special_tokens=False)["input_ids"], np.int32)
        self.prefix_ids, self.suffix_ids = tokenize(prefix), tokenize(suffix)
        self.process_index, self.process_count = _resolve_processes(options)
        self.plan = EpochPlan(
            len(source), seed=options.seed, shuffle=options.shuffle, shard_index=self.process_index,
            shard_count=self.process_count, remainder=options.remainder,
        )
        self.num_epochs = options.num_epochs or _FOREVER_EPOCHS
        self._encode = _EncodeExample(source, self.plan, processor, self.prefix_ids, self.suffix_ids)

    @property
    def examples_per_epoch(self) -> int:
        """Examples this process reads per epoch (including pad copies in "pad" mode)."""
        return self.plan.per_shard

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch on this process when no example is skipped."""
        full, rest = divmod(self.plan.per_shard, self.options.batch_size)
        return full + (1 if rest and self.options.remainder != "drop" else 0)

    def fingerprint(self) -> str:
        """Identifies the element order, so a state is never restored into a pipeline that reads other data."""
        o = self.options
        first_last = [self.source.sample_id(0), self.source.sample_id(len(self.source) - 1)]
        key = [len(self.source), first_last, o.seed, o.shuffle, o.remainder, self.process_index, self.process_count]
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]

    def element_stream(self, start: int):
        """Encoded examples k = start, start + 1, ... as a grain iterator (workers / threads as configured)."""
        o = self.options
        total = self.plan.per_shard * self.num_epochs
        prefetch = o.prefetch if o.prefetch is not None else 2 * o.batch_size
        ds = grain.MapDataset.range(start, total).map(self._encode)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=o.read_threads, prefetch_buffer_size=prefetch if o.read_threads else 0))
        if o.worker_count > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=o.worker_count, per_worker_buffer_size=o.worker_buffer_size))
        return iter(ds)

    def collate(self, elements: list[dict[str, Any]], epoch: int) -> Batch:
        return collate(elements, self.processor.pad_token_id, self.options.pad_to_multiple_of, epoch, self._encode.patcher)

    def iterator(self, state: dict | None = None) -> "BatchIterator":
        iterator = BatchIterator(self)
        if state is not None:
            iterator.set_state(state)
        return iterator

    def __iter__(self) -> "BatchIterator":
        return self.iterator()


class BatchIterator(grain.DatasetIterator):
    """Iterates a Pipeline's batches. `get_state()` is a small JSON-able dict; `set_state()` resumes with
    exactly the next batch. Being a grain DatasetIterator, it also works with orbax's grain checkpoint
    handlers (`grain.checkpoint.CheckpointSave` / `CheckpointRestore`), one file per JAX process."""

    def __init__(self, pipeline: Pipeline):
        super().__init__()
        self.pipeline = pipeline
        self.reports: list[EpochReport] = []
        self._next_element = 0
        self._skipped: list[tuple[str, str]] = []
        self._elements = None

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._next_element // self.pipeline.plan.per_shard

    def __next__(self) -> Batch:
        pipeline, options = self.pipeline, self.pipeline.options
        per_epoch = pipeline.plan.per_shard
        total = per_epoch * pipeline.num_epochs
        buffer: list[dict[str, Any]] = []
        while self._next_element < total:
            if self._elements is None:
                self._elements = pipeline.element_stream(self._next_element)
            element = next(self._elements)
            k = self._next_element
            if element["k"] != k:
                raise RuntimeError(f"pipeline returned element {element['k']} where {k} was due")
            self._next_element += 1
            epoch, position = divmod(k, per_epoch)
            if "bad" in element:
                if options.on_bad_example == "raise":
                    raise BadExampleError(element["sample_id"], element["bad"])
                self._skipped.append((element["sample_id"], element["bad"]))
            else:
                buffer.append(element)
            end_of_epoch = position == per_epoch - 1
            if end_of_epoch:
                self._finish_epoch(epoch)
            if len(buffer) == options.batch_size:
                return pipeline.collate(buffer, epoch)
            if end_of_epoch and buffer:
                if options.remainder == "keep":
                    return pipeline.collate(buffer, epoch)
                if options.remainder == "pad":
                    filler = dict(buffer[-1], valid=False)
                    buffer += [filler] * (options.batch_size - len(buffer))
                    return pipeline.collate(buffer, epoch)
                buffer = []
        raise StopIteration

    def _finish_epoch(self, epoch: int):
        report = EpochReport(epoch=epoch, examples=self.pipeline.plan.per_shard, skipped=self._skipped)
        self.reports.append(report)
        self._skipped = []
        if report.skipped:
            shown = "; ".join(f"{sid}: {why}" for sid, why in report.skipped[:10])
            more = f" (and {len(report.skipped) - 10} more)" if len(report.skipped) > 10 else ""
            logging.warning(
                "data %s, epoch %d, process %d: skipped %d of %d examples: %s%s", self.pipeline.source.name, epoch,
                self.pipeline.process_index, len(report.skipped), report.examples, shown, more,
            )

    def get_state(self) -> dict[str, Any]:
        return {
            "next_element": self._next_element,
            "skipped_in_epoch": [list(pair) for pair in self._skipped],
            "fingerprint": self.pipeline.fingerprint(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        expected = self.pipeline.fingerprint()
        if state.get("fingerprint") != expected:
            raise ValueError(
                f"iterator state was saved by a pipeline over other data or another shard/seed "
                f"(fingerprint {state.get('fingerprint')}, this pipeline {expected})"
            )
        self._close_elements()
        self._next_element = int(state["next_element"])
        self._skipped = [tuple(pair) for pair in state.get("skipped_in_epoch", [])]

    def _close_elements(self):
        if self._elements is not None and hasattr(self._elements, "close"):
            self._elements.close()
        self._elements = None

    def close(self) -> None:
        self._close_elements()
        super().close()

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
