"""Building sources and pipelines from a configuration (a dict or an ml_collections ConfigDict).

A data configuration looks like this (see docs/data.md for every key):

    {"source": {"kind": "benchmark", "name": "cub", "split": "train", "data_dir": "/data/tfds",
                "num_examples": 3000, "subset_seed": 42},
     "batch_size": 256, "seed": 0, "num_epochs": 15, "prompt": "general", "worker_count": 2}

Source kinds: "tfds", "aircraft", "manifest", "coop", "synthetic", "benchmark" (one of the paper's six by
short name) and "mixed" (a list of parts, `per_source` random examples from each). Any source config may add
"num_examples" (and "subset_seed", default 42) to draw a random subset.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from .pipeline import Pipeline, PipelineOptions
from .selection import mixed_set, random_subset
from .sources import AircraftSource, ManifestSource, Source, TfdsSource, coop_split_source
from .synthetic import SyntheticWorld


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One of the paper's six data sets: where it is read from and which splits train and test on."""

    kind: str  # "tfds" or "aircraft"
    tfds_name: str | None
    train_split: str
    test_split: str
    note: str = ""


BENCHMARKS: dict[str, Benchmark] = {
    "cub": Benchmark("tfds", "caltech_birds2011", "train", "test"),  # test: 5,794 images, as in the paper
    "aircraft": Benchmark("aircraft", None, "trainval", "test"),  # test: 3,333 images, 100 variants
    "flowers": Benchmark(
        "tfds", "oxford_flowers102", "train", "test",
        note="TFDS's test split (6,149) is not CoOp's (2,463); for the paper's split use kind='coop'",
    ),
    "food": Benchmark(
        "tfds", "food101", "train", "validation",
        note="TFDS's validation split (25,250) is not CoOp's test (30,300); for the paper's split use kind='coop'",
    ),
    "pets": Benchmark("tfds", "oxford_iiit_pet", "train", "test"),  # test: 3,669 images, the same as CoOp's
    "cars": Benchmark("tfds", "cars196", "train", "test"),  # test: 8,041 images
}


def _as_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a mapping or ConfigDict, got {type(cfg).__name__}")
    return dict(cfg)


def _take(cfg: dict[str, Any], allowed: set[str], where: str) -> dict[str, Any]:
    unknown = set(cfg) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
    return cfg


def benchmark_source(name: str, split: str, *, data_dir=None, root=None) -> Source:
    """A paper benchmark by short name ("cub", "aircraft", ...) and "train" / "test" (or a literal split)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    split = {"train": bench.train_split, "test": bench.test_split}.get(split, split)
    if bench.kind == "aircraft":
        if root is None:
            raise ValueError("benchmark 'aircraft' needs 'root': the extracted fgvc-aircraft-2013b archive")
        return AircraftSource(root, split)
    return TfdsSource(bench.tfds_name, split, data_dir=data_dir)


# The keys each source kind reads, with their types; every kind also takes `num_examples` and `subset_seed`.
SOURCE_FIELDS: dict[str, dict[str, type]] = {
    "tfds": {"name": str, "split": str, "data_dir": str, "class_names_file": str, "download": bool},
    "aircraft": {"root": str, "split": str, "level": str, "crop_banner": bool},
    "manifest": {"path": str, "image_root": str, "name": str},
    "coop": {"split_file": str, "image_root": str, "split": str, "name": str},
    "synthetic": {"seed": int, "image_size": tuple, "noise": float, "variation": float, "lookalikes": list,
                  "split": str, "num_images": int, "label_level": str},
    "benchmark": {"name": str, "split": str, "data_dir": str, "root": str},
    "mixed": {"parts": list, "per_source": int, "seed": int},
}
SUBSET_FIELDS: dict[str, type] = {"num_examples": int, "subset_seed": int}
# The synthetic world itself (as opposed to which of its images a source draws).
WORLD_FIELDS = ("seed", "image_size", "noise", "variation", "lookalikes")


def source_config_dict(entry: Mapping[str, Any]):
    """`entry` as an ml_collections ConfigDict holding every key its kind reads, the absent ones as unset
    placeholders, so that any of them can be set from the command line (`--config.datasets.x.variation=0`)."""
    import ml_collections as mc

    entry = _as_dict(entry)
    kind = entry.get("kind")
    if kind not in SOURCE_FIELDS:
        raise ValueError(f"data source kind must be one of {sorted(SOURCE_FIELDS)}; got {kind!r}")
    fields = {**SOURCE_FIELDS[kind], **SUBSET_FIELDS}
    _take({k: v for k, v in entry.items() if k != "kind"}, set(fields), f"data source {kind!r}")
    out = mc.ConfigDict({"kind": kind})
    for key, kind_of in fields.items():
        if key in entry:
            out[key] = entry[key]
        elif kind_of is not list:  # a mixed source's parts (a world's look-alike sets) are not a command-line value
            out[key] = mc.config_dict.placeholder(kind_of)
    return out


def source_from_config(cfg: Any) -> Source:
    """A Source from its configuration (see the module docstring); keys set to None count as absent."""
    cfg = {k: v for k, v in _as_dict(cfg).items() if v is not None}
    num_examples = cfg.pop("num_examples", None)
    subset_seed = cfg.pop("subset_seed", 42)
    kind = cfg.pop("kind", None)
    where = f"data source {kind!r}"
    if kind in SOURCE_FIELDS:
        _take(cfg, set(SOURCE_FIELDS[kind]), where)
    if kind == "tfds":
        source = TfdsSource(**cfg)
    elif kind == "aircraft":
        source = AircraftSource(**cfg)
    elif kind == "manifest":
        source = ManifestSource(**cfg)
    elif kind == "coop":
        source = coop_split_source(cfg["split_file"], cfg["image_root"], cfg["split"], name=cfg["name"])
    elif kind == "synthetic":
        world = SyntheticWorld(**{k: cfg[k] for k in WORLD_FIELDS if k in cfg})
        source = world.source(**{k: cfg[k] for k in ("split", "num_images", "label_level") if k in cfg})
    elif kind == "benchmark":
        source = benchmark_source(cfg["name"], cfg["split"], data_dir=cfg.get("data_dir"), root=cfg.get("root"))
    elif kind == "mixed":
        parts = [source_from_config(part) for part in cfg["parts"]]
        source = mixed_set(parts, per_source=cfg.get("per_source", 500), seed=cfg.get("seed", 42))
    else:
        raise ValueError(
            f"data source kind must be one of tfds, aircraft, manifest, coop, synthetic, benchmark, mixed; got {kind!r}"
        )
    if num_examples is not None:
        source = random_subset(source, int(num_examples), seed=int(subset_seed))
    return source


PROCESSOR_KEYS = ("min_pixels", "max_pixels", "image_size")


def pipeline_from_config(cfg: Any, processor, **overrides) -> Pipeline:
    """A Pipeline from {"source": {...}, <PipelineOptions fields>, [min_pixels, max_pixels, image_size]}.

    processor: a `processing.Processor`, or the model folder to build one from; the image keys of the config
      (min / max pixel bounds, a fixed (height, width)) apply when a folder is given. `overrides` replace
      option values (e.g. process_index / process_count in tests).
    """
    cfg = _as_dict(cfg)
    if "source" not in cfg:
        raise ValueError("data config needs a 'source' entry")
    source = source_from_config(cfg.pop("source"))
    image_settings = {k: cfg.pop(k) for k in PROCESSOR_KEYS if cfg.get(k) is not None}
    cfg = {k: v for k, v in cfg.items() if k not in PROCESSOR_KEYS}
    if isinstance(processor, (str, os.PathLike)):
        from speciarl_jax.processing import Processor

        if "image_size" in image_settings:
            image_settings["image_size"] = tuple(image_settings["image_size"])
        processor = Processor.from_pretrained(processor, **image_settings)
    elif image_settings:
        raise ValueError(
            f"data config sets {sorted(image_settings)}, which only apply when a model folder is passed instead "
            "of a ready Processor"
        )
    fields = {f.name for f in dataclasses.fields(PipelineOptions)}
    options = {**_take(cfg, fields, "data config"), **overrides}
    return Pipeline(source, processor, PipelineOptions(**options))
