"""Read every example of a source up front and name all the bad ones, before a run compiles anything.

The pipeline finds a bad example only when a step reaches it: with on_bad_example="raise" the run stops
there. `find_bad_examples` applies the pipeline's own rule (`pipeline.read_example`) to every example, with
a thread pool (image decoding and resizing release the GIL), and returns each one the pipeline would reject.
`check_source` raises `BadExamplesError` naming them.

    bad = find_bad_examples(source, processor)   # [(sample_id, reason), ...] in source order
    check_source(source, processor)              # or: raise BadExamplesError if any
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools

from tqdm import tqdm

from .pipeline import image_preprocessor, read_example
from .sources import BadExampleError, Source

SHOWN = 10  # bad examples listed in a BadExamplesError message


class BadExamplesError(ValueError):
    """Some examples of a source cannot be used; `bad` lists (sample_id, reason) for each."""

    def __init__(self, bad: list[tuple[str, str]], *, source_name: str | None = None, num_examples: int | None = None,
                 skip_setting: str = "the pipeline's on_bad_example"):
        self.bad = list(bad)
        self.source_name = source_name
        self.num_examples = num_examples
        of = f" of {num_examples}" if num_examples is not None else ""
        where = f"data set {source_name!r}" if source_name else "the source"
        lines = [f"  {sample_id}: {reason}" for sample_id, reason in self.bad[:SHOWN]]
        if len(self.bad) > SHOWN:
            lines.append(f"  ... and {len(self.bad) - SHOWN} more")
        super().__init__(
            f"{len(self.bad)}{of} examples of {where} cannot be used"
            + (f" (the first {SHOWN}):\n" if len(self.bad) > SHOWN else ":\n")
            + "\n".join(lines)
            + f"\nFix or remove these examples, or set {skip_setting} to \"skip\" to leave them "
            "out (each epoch then reports how many it skipped, and which)."
        )


def find_bad_examples(source: Source, processor=None, *, threads: int = 8, progress: bool = True) -> list[tuple[str, str]]:
    """(sample_id, reason) of every example of `source` that the pipeline would reject, in source order.

    Args:
      source: any Source; every index 0 .. len(source) - 1 is read and decoded.
      processor: the `speciarl_jax.processing.Processor` the pipeline will use; each image then also goes
        through its preprocessing (resize, patches), which catches images it refuses (an aspect ratio over
        200, ...). None checks reading, decoding and labels only.
      threads: examples read at once.
      progress: show a progress bar (with the rate) on stderr.

    An error that is not a bad example (a bug, a lost connection) is not reported as one: it stops the check,
    as it would stop the pipeline, with the sample id in the message.
    """
    if threads < 1:
        raise ValueError(f"threads must be positive, got {threads}")
    preprocess = image_preprocessor(processor)[1] if processor is not None else None
    name = getattr(source, "name", "data")

    def check(index: int) -> tuple[str, str] | None:
        try:
            read_example(source, index, preprocess)  # the image data is dropped at once
        except BadExampleError as e:
            return e.sample_id, e.reason
        except Exception as e:
            raise RuntimeError(f"checking example {source.sample_id(index)} of {name} failed: {e!r}") from e
        return None

    bad: list[tuple[str, str]] = []
    indices = iter(range(len(source)))
    with tqdm(total=len(source), desc=f"checking {name}", unit="ex", disable=not progress, dynamic_ncols=True) as bar, \
            concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="data-check") as pool:
        # A bounded window of futures, taken in order: memory stays small and the results come in source order.
        window = collections.deque(pool.submit(check, i) for i in itertools.islice(indices, 4 * threads))
        try:
            while window:
                result = window.popleft().result()
                following = next(indices, None)
                if following is not None:
                    window.append(pool.submit(check, following))
                if result is not None:
                    bad.append(result)
                    bar.set_postfix(bad=len(bad), refresh=False)
                bar.update(1)
        finally:
            for future in window:
                future.cancel()
    return bad


def check_source(source: Source, processor=None, *, threads: int = 8, progress: bool = True) -> None:
    """Raises BadExamplesError naming every example of `source` the pipeline would reject (see
    `find_bad_examples` for the arguments); returns None when all are good."""
    bad = find_bad_examples(source, processor, threads=threads, progress=progress)
    if bad:
        raise BadExamplesError(bad, source_name=getattr(source, "name", None), num_examples=len(source))
