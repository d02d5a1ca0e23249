"""Where examples come from: TFDS data sets, the FGVC-Aircraft archive, user manifests.

Every source is a random-access sequence of `Example`s (an RGB image, a human-readable label, a sample id
that stays the same across runs and machines). `sample_id(i)` and `len()` are cheap, so selections can be
drawn without reading a single image; `source[i]` reads and decodes.

A broken example (a missing or unreadable image, an empty label, a label the class list lacks) raises
`BadExampleError` from `source[i]`, naming the example and the file. The pipeline then either stops with
that error or skips the example and counts it, as configured. Problems with the data set as a whole (a split
that does not exist, a class-name file that does not match) raise at construction: they cannot be skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class Example:
    """One image with its ground truth.

    image: uint8 [H, W, 3] array or a PIL image (RGB).
    label: the ground-truth class name as the verifier sees it (e.g. "black footed albatross").
    sample_id: stable across runs, e.g. "caltech_birds2011/train/17".
    """

    image: Any
    label: str
    sample_id: str


class BadExampleError(Exception):
    """One example that cannot be used; the message names the sample id and the file."""

    def __init__(self, sample_id: str, reason: str):
        super().__init__(f"bad example {sample_id}: {reason}")
        self.sample_id = sample_id
        self.reason = reason


class SplitNotFoundError(ValueError):
    """A split that the data set does not have."""


@runtime_checkable
class Source(Protocol):
    """A random-access data set of Examples."""

    name: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...

    def sample_id(self, index: int) -> str: ...


def class_name_to_label(name: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross': drop a numeric prefix, underscores to spaces."""
    name = re.sub(r"^\d+\.", "", name.strip())
    return " ".join(name.replace("_", " ").split())


def read_class_names(path: str | os.PathLike) -> list[str]:
    """One class name per non-empty line, in label-index order."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise FileNotFoundError(f"class-name file not found: {path}") from None
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class-name file {path} lists these names more than once: {dupes[:5]}")
    return names


def load_image(path: str | os.PathLike, sample_id: str) -> Image.Image:
    """Opens and fully decodes an image file as RGB, or raises BadExampleError naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() forces the decode, so truncated files fail here
    except FileNotFoundError:
        raise BadExampleError(sample_id, f"image file not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadExampleError(sample_id, f"cannot read image {path}: {e}") from None


def _checked_label(label: str, sample_id: str, where: str) -> str:
    label = " ".join(str(label).split())
    if not label:
        raise BadExampleError(sample_id, f"empty label ({where})")
    return label


# --------------------------------------------------------------------------------------------------
# TFDS


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """How to read one TFDS image-classification data set."""

    image_key: str = "image"
    label_key: str = "label"
    # A per-example text feature holding the class name, for data sets whose ClassLabel has no names (CUB).
    label_name_key: str | None = None


TFDS_SPECS: dict[str, TfdsSpec] = {
    "caltech_birds2011": TfdsSpec(label_name_key="label_name"),
    "oxford_flowers102": TfdsSpec(),
    "food101": TfdsSpec(),
    "oxford_iiit_pet": TfdsSpec(),
    "cars196": TfdsSpec(),
}


class TfdsSource:
    """A prepared TFDS data set read through `tfds.data_source` (ArrayRecord; no TensorFlow needed).

    Args:
      name: TFDS name, e.g. "caltech_birds2011" (optionally with ":version").
      split: a split name or TFDS slice ("train", "test", "train[:10%]").
      data_dir: where the prepared data lives (a local folder or a bucket path); None = TFDS default.
      class_names_file: optional file with one class name per line, replacing the data set's own names;
        it must list exactly as many names as the data set has classes.
      download: let TFDS download and prepare the data if it is missing. Off by default: a missing data set is
        an error naming the folder, never a surprise download.

    Labels: the ClassLabel name of the example with `_` -> space; when the ClassLabel has no real names (CUB
    names its classes '0'..'199'), the per-example text feature named by `TfdsSpec.label_name_key`, with the
    numeric prefix dropped. Sample ids: "<name>/<split>/<record index>" (TFDS record order is deterministic).
    """

    def __init__(
        self,
        name: str,
        split: str,
        *,
        data_dir: str | os.PathLike | None = None,
        class_names_file: str | os.PathLike | None = None,
        download: bool = False,
        spec: TfdsSpec | None = None,
    ):
        import tensorflow_datasets as tfds

        self.name = name.split(":")[0].split("/")[0]
        self.split = split
        self.spec = spec or TFDS_SPECS.get(self.name, TfdsSpec())
        data_dir = os.fspath(data_dir) if data_dir is not None else None
        builder = tfds.builder(name, data_dir=data_dir)
        known = list(builder.info.splits.keys()) if builder.info.splits else []
        base = re.match(r"[\w-]+", split)
        if known and (base is None or base.group(0) not in known):
            raise SplitNotFoundError(f"TFDS data set {name} has no split {split!r}; it has {sorted(known)}")
        try:
            self._data = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
        except Exception as e:
            if known:
                raise
            where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
            raise FileNotFoundError(
                f"TFDS data set {name} (split {split!r}) is not prepared in {where} in the array_record format "
                f"({type(e).__name__}: {str(e)[:200]}). Prepare it once with `tfds build {name} "
                f"--file_format=array_record --data_dir=...` or pass download=True."
            ) from e
        features = builder.info.features
        label_feature = features[self.spec.label_key]
        self.num_classes = int(label_feature.num_classes)
        self.class_names: list[str] | None = self._class_names(label_feature, class_names_file)
        if self.class_names is None and self.spec.label_name_key is None:
            raise ValueError(
                f"TFDS data set {name} has no class names for {self.spec.label_key!r}; pass class_names_file"
            )

    def _class_names(self, label_feature, class_names_file) -> list[str] | None:
        if class_names_file is not None:
            names = read_class_names(class_names_file)
            if len(names) != self.num_classes:
                raise ValueError(
                    f"class-name file {class_names_file} lists {len(names)} names but TFDS data set {self.name} "
                    f"has {self.num_classes} classes"
                )
            return [class_name_to_label(n) for n in names]
        names = list(label_feature.names or [])
        if not names or all(n.isdigit() for n in names):
            return None  # placeholder names: labels come from the per-example name feature
        return [class_name_to_label(n) for n in names]

    def __len__(self) -> int:
        return len(self._data)

    def sample_id(self, index: int) -> str:
        return f"{self.name}/{self.split}/{index}"

    def __getitem__(self, index: int) -> Example:
        sample_id = self.sample_id(index)
        record = self._data[int(index)]
        if self.class_names is not None:
            label_index = int(record[self.spec.label_key])
            if not 0 <= label_index < len(self.class_names):
                raise BadExampleError(sample_id, f"label index {label_index} outside the {self.num_classes} classes")
            label = self.class_names[label_index]
        else:
            raw = record[self.spec.label_name_key]
            label = class_name_to_label(raw.decode() if isinstance(raw, bytes) else str(raw))
        label = _checked_label(label, sample_id, f"TFDS {self.name} {self.split} record {index}")
        image = np.asarray(record[self.spec.image_key])
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) == 0:
            raise BadExampleError(sample_id, f"image has unusable shape {image.shape}")
        if image.shape[-1] != 3:
            image = np.asarray(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).convert("RGB"))
        return Example(image=image, label=label, sample_id=sample_id)


# --------------------------------------------------------------------------------------------------
# FGVC-Aircraft


AIRCRAFT_LEVELS = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}


def find_aircraft_data_dir(root: str | os.PathLike) -> str:
    """The folder holding images/ and variants.txt, given the archive root or any folder above it."""
    root = os.fspath(root)
    for candidate in (root, os.path.join(root, "data"), os.path.join(root, "fgvc-aircraft-2013b", "data")):
        if os.path.isdir(os.path.join(candidate, "images")) and os.path.isfile(os.path.join(candidate, "variants.txt")):
            return candidate
    raise FileNotFoundError(
        f"no FGVC-Aircraft data under {root}: expected fgvc-aircraft-2013b/data/ with images/ and variants.txt"
    )


class AircraftSource:
    """FGVC-Aircraft read from the official archive, extracted (fgvc-aircraft-2013b/data/...).

    Args:
      root: the extracted archive (fgvc-aircraft-2013b, its data/ folder, or the folder holding it).
      split: "train", "val", "trainval" or "test" (the images_<level>_<split>.txt files).
      level: "variant" (100 classes, the paper's setting), "family" or "manufacturer".
      crop_banner: drop the 20-pixel copyright banner at the bottom of every image.

    Every label in the split file must appear in the level's class list (variants.txt, ...); a line that does
    not is a bad example. Sample ids: "fgvc_aircraft/<split>/<image id>".
    """

    name = "fgvc_aircraft"
    BANNER_PIXELS = 20

    def __init__(self, root: str | os.PathLike, split: str = "test", *, level: str = "variant", crop_banner: bool = False):
        if level not in AIRCRAFT_LEVELS:
            raise ValueError(f"FGVC-Aircraft level must be one of {sorted(AIRCRAFT_LEVELS)}, got {level!r}")
        self.data_dir = find_aircraft_data_dir(root)
        self.split, self.level, self.crop_banner = split, level, crop_banner
        self.class_names = read_class_names(os.path.join(self.data_dir, AIRCRAFT_LEVELS[level]))
        known = set(self.class_names)
        split_file = os.path.join(self.data_dir, f"images_{level}_{split}.txt")
        if not os.path.isfile(split_file):
            found = sorted(
                m.group(1) for f in os.listdir(self.data_dir) if (m := re.fullmatch(rf"images_{level}_(\w+)\.txt", f))
            )
            raise SplitNotFoundError(f"FGVC-Aircraft has no split {split!r}: {split_file} is missing (found {found})")
        self._ids: list[str] = []
        self._labels: list[str] = []
        self._problems: dict[int, str] = {}
        with open(split_file, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                image_id, _, label = line.strip().partition(" ")
                label = label.strip()
                if not label:
                    self._problems[len(self._ids)] = f"empty label at {split_file}:{line_number}"
                elif label not in known:
                    self._problems[len(self._ids)] = (
                        f"label {label!r} at {split_file}:{line_number} is not in {AIRCRAFT_LEVELS[level]}"
                    )
                self._ids.append(image_id)
                self._labels.append(label)

    def __len__(self) -> int:
        return len(self._ids)

    def sample_id(self, index: int) -> str:
        return f"{self.name}/{self.split}/{self._ids[index]}"

    def image_path(self, index: int) -> str:
        return os.path.join(self.data_dir, "images", f"{self._ids[index]}.jpg")

    def __getitem__(self, index: int) -> Example:
        sample_id = self.sample_id(index)
        if index in self._problems:
            raise BadExampleError(sample_id, self._problems[index])
        image = load_image(self.image_path(index), sample_id)
        if self.crop_banner and image.height > self.BANNER_PIXELS:
            image = image.crop((0, 0, image.width, image.height - self.BANNER_PIXELS))
        return Example(image=image, label=self._labels[index], sample_id=sample_id)


# --------------------------------------------------------------------------------------------------
# Image files listed with their labels: manifests and CoOp split files


class FileListSource:
    """Images on disk, each with a label and an id. Built by ManifestSource and `coop_split_source`."""

    def __init__(self, name: str, rows: Sequence[tuple[str, str, str, str]]):
        """rows: (image path, label, id, where) with `where` naming the file and line for error messages."""
        self.name = name
        self._paths: list[str] = []
        self._labels: list[str] = []
        self._ids: list[str] = []
        self._problems: dict[int, str] = {}
        seen: dict[str, str] = {}
        for path, label, sample_id, where in rows:
            if sample_id in seen:
                raise ValueError(f"{where}: id {sample_id!r} repeats {seen[sample_id]}")
            seen[sample_id] = where
            label = " ".join(label.split())
            if not label:
                self._problems[len(self._ids)] = f"empty label at {where}"
            self._paths.append(path)
            self._labels.append(label)
            self._ids.append(sample_id)

    def __len__(self) -> int:
        return len(self._ids)

    def sample_id(self, index: int) -> str:
        return f"{self.name}/{self._ids[index]}"

    def image_path(self, index: int) -> str:
        return self._paths[index]

    def __getitem__(self, index: int) -> Example:
        sample_id = self.sample_id(index)
        if index in self._problems:
            raise BadExampleError(sample_id, self._problems[index])
        return Example(image=load_image(self._paths[index], sample_id), label=self._labels[index], sample_id=sample_id)


class ManifestSource(FileListSource):
    """A user data set listed in a manifest: JSONL or CSV with an image path and a label per row.

    JSONL: one object per line, {"image": "birds/0001.jpg", "label": "barn owl"} with an optional "id".
    CSV: a header row naming the columns image, label and optionally id.
    Image paths are relative to `image_root` (default: the manifest's folder) or absolute; URLs are refused.
    Sample ids: "<name>/<id>", where id defaults to the image path; ids must be unique. `name` defaults to
    the manifest's file name without its extension.
    """

    def __init__(self, path: str | os.PathLike, *, image_root: str | os.PathLike | None = None, name: str | None = None):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"manifest not found: {self.path}")
        root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(self.path))
        rows = []
        for where, row in self._read_rows():
            image = str(row.get("image") or "").strip()
            if not image:
                raise ValueError(f"{where}: no image path")
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", image):
                raise ValueError(f"{where}: image {image!r} is a URL; manifests list files on disk")
            sample_id = str(row.get("id") or image).strip()
            path_on_disk = image if os.path.isabs(image) else os.path.join(root, image)
            rows.append((path_on_disk, str(row.get("label") or ""), sample_id, where))
        super().__init__(name or os.path.splitext(os.path.basename(self.path))[0], rows)

    def _read_rows(self) -> list[tuple[str, dict]]:
        rows = []
        if self.path.endswith(".jsonl"):
            with open(self.path, encoding="utf-8") as f:
                for line_number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{self.path}:{line_number}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{where}: not valid JSON ({e})") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{where}: expected an object with image and label")
                    rows.append((where, row))
        elif self.path.endswith(".csv"):
            with open(self.path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                missing = {"image", "label"} - set(reader.fieldnames or ())
                if missing:
                    raise ValueError(f"{self.path}: the CSV header lacks the columns {sorted(missing)}")
                for line_number, row in enumerate(reader, 2):
                    rows.append((f"{self.path}:{line_number}", row))
        else:
            raise ValueError(f"manifest {self.path} must end in .jsonl or .csv")
        return rows


def coop_split_source(
    split_json: str | os.PathLike, image_root: str | os.PathLike, split: str, *, name: str
) -> FileListSource:
    """A split from CoOp's split files (split_zhou_*.json: {"train": [[path, label index, class name], ...]}).

    The paper evaluates Flowers102, Food101 and Pets on these splits, which differ from TFDS's own splits.
    `image_root` is the folder the listed paths are relative to. Labels: the class name, `_` -> space.
    """
    with open(split_json, encoding="utf-8") as f:
        splits = json.load(f)
    if split not in splits:
        raise SplitNotFoundError(f"CoOp split file {split_json} has no split {split!r}; it has {sorted(splits)}")
    rows = [
        (os.path.join(os.fspath(image_root), path), class_name_to_label(class_name), f"{split}/{path}",
         f"{split_json} {split}[{row_number}]")
        for row_number, (path, _, class_name) in enumerate(splits[split])
    ]
    return FileListSource(name, rows)
