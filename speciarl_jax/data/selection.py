"""Which examples a run uses: seeded random subsets, concatenations, and the paper's mixed set.

Selections are Sources themselves (views holding indices), so they compose and never copy images.
Random choices use numpy's PCG64 through `np.random.default_rng(seed)`: the same seed picks the same
sample ids on every machine and numpy version that keeps that generator stable (numpy promises it does).
The paper's own draw (3000 CUB training images, seed 42) came from its Python code, so our 3000 images
are a different random sample of the same size and seed, not the identical list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .sources import Example, Source


class Subset:
    """The examples of `source` at `indices`, in that order."""

    def __init__(self, source: Source, indices: Sequence[int], name: str | None = None):
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(source)):
            raise IndexError(f"subset indices must lie in [0, {len(source)}) for source {source.name}")
        self.source = source
        self.indices = indices
        self.name = name or source.name

    def __len__(self) -> int:
        return int(self.indices.size)

    def sample_id(self, index: int) -> str:
        return self.source.sample_id(int(self.indices[index]))

    def __getitem__(self, index: int) -> Example:
        return self.source[int(self.indices[index])]


class Concat:
    """Several sources one after the other. Sample ids stay those of the parts (they start with the part's
    name), so the parts must have distinct names."""

    def __init__(self, parts: Sequence[Source], name: str = "mixed"):
        names = [p.name for p in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"parts of a concatenation need distinct names, got {names}")
        self.parts = list(parts)
        self.name = name
        self._ends = np.cumsum([len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _locate(self, index: int) -> tuple[Source, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside the {len(self)} examples of {self.name}")
        part = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[part - 1]) if part else 0
        return self.parts[part], index - start

    def sample_id(self, index: int) -> str:
        part, local = self._locate(int(index))
        return part.sample_id(local)

    def __getitem__(self, index: int) -> Example:
        part, local = self._locate(int(index))
        return part[local]


def random_subset(source: Source, num_examples: int, seed: int = 42) -> Subset:
    """`num_examples` distinct examples drawn at random with `seed` (kept in ascending index order)."""
    if not 0 < num_examples <= len(source):
        raise ValueError(f"cannot draw {num_examples} examples from {source.name}, which has {len(source)}")
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(len(source), size=num_examples, replace=False))
    return Subset(source, indices)


def mixed_set(sources: Mapping[str, Source] | Sequence[Source], per_source: int = 500, seed: int = 42) -> Concat:
    """The paper's mixed training set: `per_source` random examples from each source, concatenated.

    Each part is drawn with its own stream derived from (seed, position), so adding a data set at the end
    leaves the earlier parts unchanged.
    """
    parts = list(sources.values()) if isinstance(sources, Mapping) else list(sources)
    subsets = []
    for position, source in enumerate(parts):
        if per_source > len(source):
            raise ValueError(f"cannot draw {per_source} examples from {source.name}, which has {len(source)}")
        rng = np.random.default_rng([seed, position])
        subsets.append(Subset(source, np.sort(rng.choice(len(source), size=per_source, replace=False))))
    return Concat(subsets)


def sample_ids(source: Source) -> list[str]:
    return [source.sample_id(i) for i in range(len(source))]
