"""Data sources: TFDS (through tfds.testing.mock_data), FGVC-Aircraft archives, manifests, CoOp splits,
selections."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from speciarl_jax.data import (
    AircraftSource,
    BadExampleError,
    ManifestSource,
    SplitNotFoundError,
    TfdsSource,
    class_name_to_label,
    coop_split_source,
    mixed_set,
    random_subset,
    sample_ids,
    source_from_config,
)
from speciarl_jax.data.synthetic import SyntheticWorld

TFDS_NAMES = ["caltech_birds2011", "oxford_flowers102", "food101", "oxford_iiit_pet", "cars196"]


def test_class_name_to_label():
    assert class_name_to_label("001.Black_footed_Albatross") == "Black footed Albatross"
    assert class_name_to_label("black_footed_albatross") == "black footed albatross"
    assert class_name_to_label("american_pit_bull_terrier") == "american pit bull terrier"
    assert class_name_to_label("AM General Hummer SUV 2000") == "AM General Hummer SUV 2000"
    assert class_name_to_label("  hard-leaved pocket orchid ") == "hard-leaved pocket orchid"


# --- TFDS -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in TFDS_NAMES if n != "caltech_birds2011"])
def test_tfds_labels_are_readable_class_names(name):
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        source = TfdsSource(name, "test")
        names = tfds.builder(name).info.features["label"].names
        assert len(source) == 6
        for i in range(len(source)):
            example = source[i]
            assert example.sample_id == f"{name}/test/{i}"
            assert example.image.dtype == np.uint8 and example.image.ndim == 3 and example.image.shape[-1] == 3
            # The mock's label index is random; the label must be that class's name with '_' -> ' '.
            raw_index = int(source._data[i]["label"])
            assert example.label == names[raw_index].replace("_", " ")
            assert "_" not in example.label
    assert source.class_names[0] == {
        "oxford_flowers102": "pink primrose",
        "food101": "apple pie",
        "oxford_iiit_pet": "Abyssinian",
        "cars196": "AM General Hummer SUV 2000",
    }[name]


def _cub_records(self, split, **kwargs):
    """Stand-in CUB records with real-looking per-example class names (both TFDS spellings)."""
    names = ["001.Black_footed_Albatross", "black_footed_albatross", "200.Common_Yellowthroat"]
    rng = np.random.default_rng(0)
    return [
        {"image": rng.integers(0, 255, (20, 30, 3), np.uint8), "label": i, "label_name": n,
         "image/filename": f"{n}/x_{i}.jpg"}
        for i, n in enumerate(names)
    ]


def test_cub_labels_come_from_the_per_example_name():
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=_cub_records):
        source = TfdsSource("caltech_birds2011", "train")
        assert source.class_names is None  # CUB's ClassLabel only has '0'..'199'
        labels = [source[i].label for i in range(len(source))]
    assert labels == ["Black footed Albatross", "black footed albatross", "Common Yellowthroat"]


def test_tfds_class_name_file_must_match(tmp_path):
    good = tmp_path / "pets.txt"
    good.write_text("\n".join(f"pet number {i}" for i in range(37)))
    bad = tmp_path / "bad.txt"
    bad.write_text("one\ntwo\n")
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        source = TfdsSource("oxford_iiit_pet", "train", class_names_file=good)
        assert source[0].label.startswith("pet number ")
        with pytest.raises(ValueError, match=r"bad\.txt lists 2 names but .* 37 classes"):
            TfdsSource("oxford_iiit_pet", "train", class_names_file=bad)


def test_tfds_missing_split_is_named(tmp_path):
    # Metadata with real split names, so the builder knows which splits exist.
    builder = tfds.builder("oxford_iiit_pet", data_dir=tmp_path, file_format="array_record")
    builder.info.set_splits(tfds.core.SplitDict(
        [tfds.core.SplitInfo(name=s, shard_lengths=[4], num_bytes=0, filename_template=None) for s in ("train", "test")]
    ))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=tmp_path):
        assert len(TfdsSource("oxford_iiit_pet", "test")) == 4
        with pytest.raises(SplitNotFoundError, match=r"no split 'validation'.*\['test', 'train'\]"):
            TfdsSource("oxford_iiit_pet", "validation")


def test_tfds_not_prepared_is_a_clear_error_not_a_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"not prepared in {tmp_path}"):
        TfdsSource("oxford_iiit_pet", "test", data_dir=tmp_path)
    assert not any(tmp_path.rglob("*.array_record*"))


# --- FGVC-Aircraft ----------------------------------------------------------------------------------


def _save_jpeg(path, seed, size=(40, 60)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(path, quality=90)


@pytest.fixture
def aircraft_root(tmp_path):
    """A miniature fgvc-aircraft-2013b archive, laid out like the official one."""
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    variants = ["707-320", "A300B4", "F-16A/B", "Cessna 172"]
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    (data / "families.txt").write_text("Boeing 707\nA300\nF-16\nCessna 172\n")
    splits = {"train": range(0, 8), "val": range(8, 12), "test": range(12, 20)}
    for split, ids in splits.items():
        lines = [f"{1000000 + i:07d} {variants[i % 4]}" for i in ids]
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        for i in ids:
            _save_jpeg(data / "images" / f"{1000000 + i:07d}.jpg", i)
    return tmp_path / "fgvc-aircraft-2013b"


def test_aircraft_reads_the_archive_layout(aircraft_root):
    source = AircraftSource(aircraft_root, "test")
    assert len(source) == 8
    example = source[1]
    assert example.sample_id == "fgvc_aircraft/test/1000013"
    assert example.label == "A300B4"
    assert np.asarray(example.image).shape == (40, 60, 3)
    assert [source[i].label for i in range(4)] == ["707-320", "A300B4", "F-16A/B", "Cessna 172"]
    # Also found from the folder above the archive or from data/.
    assert len(AircraftSource(aircraft_root.parent, "train")) == 8
    assert len(AircraftSource(aircraft_root / "data", "val")) == 4
    cropped = AircraftSource(aircraft_root, "test", crop_banner=True)[1]
    assert cropped.image.size == (60, 20)


def test_aircraft_bad_split_and_bad_lines(aircraft_root):
    with pytest.raises(SplitNotFoundError, match=r"no split 'trainval'.*images_variant_trainval\.txt.*\['test', 'train', 'val'\]"):
        AircraftSource(aircraft_root, "trainval")
    with pytest.raises(FileNotFoundError, match="no FGVC-Aircraft data"):
        AircraftSource(aircraft_root / "nowhere", "test")
    data = aircraft_root / "data"
    with open(data / "images_variant_test.txt", "a") as f:
        f.write("1000012 Boeing 999\n1000013\n")
    os.remove(data / "images" / "1000014.jpg")
    (data / "images" / "1000015.jpg").write_bytes(b"not a jpeg at all")
    source = AircraftSource(aircraft_root, "test")
    with pytest.raises(BadExampleError, match=r"'Boeing 999' at .*images_variant_test\.txt:9 is not in variants\.txt"):
        source[8]
    with pytest.raises(BadExampleError, match=r"empty label at .*images_variant_test\.txt:10"):
        source[9]
    with pytest.raises(BadExampleError, match=r"fgvc_aircraft/test/1000014: image file not found: .*1000014\.jpg"):
        source[2]
    with pytest.raises(BadExampleError, match=r"cannot read image .*1000015\.jpg"):
        source[3]


# --- manifests and CoOp splits ----------------------------------------------------------------------


def test_jsonl_and_csv_manifests(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        _save_jpeg(tmp_path / "img" / f"{i}.png", i, (16, 24))
    rows = [{"image": "img/0.png", "label": "barn owl"}, {"image": "img/1.png", "label": " snowy  owl ", "id": "b"}]
    (tmp_path / "birds.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    source = ManifestSource(tmp_path / "birds.jsonl")
    assert source.name == "birds" and len(source) == 2
    assert [source.sample_id(i) for i in range(2)] == ["birds/img/0.png", "birds/b"]
    assert source[1].label == "snowy owl"
    assert np.asarray(source[0].image).shape == (16, 24, 3)

    (tmp_path / "pets.csv").write_text(f"image,label\n{tmp_path}/img/2.png,tabby cat\nimg/0.png,\n")
    source = ManifestSource(tmp_path / "pets.csv", name="pets")
    assert source[0].label == "tabby cat"
    with pytest.raises(BadExampleError, match=r"pets/img/0.png: empty label at .*pets\.csv:3"):
        source[1]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"image": "http://x.org/a.jpg", "label": "a"}', r"is a URL"),
        ('{"image": "a.jpg", "label": "a"}\n{"image": "a.jpg", "label": "b"}', r"m\.jsonl:2: id 'a\.jpg' repeats"),
        ("not json", r"m\.jsonl:1: not valid JSON"),
        ('{"label": "a"}', r"m\.jsonl:1: no image path"),
    ],
)
def test_manifest_errors_name_the_line(tmp_path, content, message):
    (tmp_path / "m.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        ManifestSource(tmp_path / "m.jsonl")


def test_manifest_format_errors(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.jpg,x\n")
    with pytest.raises(ValueError, match=r"lacks the columns \['image'\]"):
        ManifestSource(tmp_path / "m.csv")
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        ManifestSource(tmp_path / "missing.jsonl")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ValueError, match=r"must end in \.jsonl or \.csv"):
        ManifestSource(tmp_path / "m.txt")


def test_coop_split_file(tmp_path):
    (tmp_path / "jpg").mkdir()
    _save_jpeg(tmp_path / "jpg" / "image_00001.jpg", 0)
    split = {"train": [], "test": [["jpg/image_00001.jpg", 3, "hard-leaved_pocket_orchid"]], "val": []}
    (tmp_path / "split.json").write_text(json.dumps(split))
    source = coop_split_source(tmp_path / "split.json", tmp_path, "test", name="oxford_flowers102")
    assert source[0].label == "hard-leaved pocket orchid"
    assert source.sample_id(0) == "oxford_flowers102/test/jpg/image_00001.jpg"
    with pytest.raises(SplitNotFoundError, match="no split 'trainval'"):
        coop_split_source(tmp_path / "split.json", tmp_path, "trainval", name="x")


# --- selections -------------------------------------------------------------------------------------


def test_random_subset_is_reproducible():
    source = SyntheticWorld(seed=0, image_size=(28, 28)).source("train", 5000)
    first = sample_ids(random_subset(source, 3000, seed=42))
    assert first == sample_ids(random_subset(source, 3000, seed=42))
    assert len(set(first)) == 3000
    assert first != sample_ids(random_subset(source, 3000, seed=43))
    for n in (128, 1024, 2048):
        assert len(set(sample_ids(random_subset(source, n, seed=42)))) == n
    with pytest.raises(ValueError, match="cannot draw 6000 examples from synthetic, which has 5000"):
        random_subset(source, 6000)


def test_mixed_set_takes_the_same_number_from_each_part(aircraft_root):
    world = SyntheticWorld(seed=0, image_size=(28, 28))
    parts = [AircraftSource(aircraft_root, "train"), world.source("train", 50)]
    mixed = mixed_set(parts, per_source=5, seed=42)
    ids = sample_ids(mixed)
    assert len(ids) == 10 and len(set(ids)) == 10
    assert sum(i.startswith("fgvc_aircraft/train/") for i in ids) == 5
    assert ids == sample_ids(mixed_set(parts, per_source=5, seed=42))
    assert mixed[7].label in world.class_names
    with pytest.raises(ValueError, match="distinct names"):
        mixed_set([world.source("train", 10), world.source("test", 10)], per_source=2)


def test_source_from_config(aircraft_root):
    source = source_from_config({"kind": "synthetic", "split": "test", "num_images": 40, "image_size": (28, 28),
                                 "num_examples": 10, "subset_seed": 1})
    assert len(source) == 10 and source.sample_id(0).startswith("synthetic/test/")
    assert len(source_from_config({"kind": "benchmark", "name": "aircraft", "split": "test", "root": aircraft_root})) == 8
    with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
        cub = source_from_config({"kind": "benchmark", "name": "cub", "split": "train"})
        assert cub.name == "caltech_birds2011" and len(cub) == 7
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        source_from_config({"kind": "synthetic", "colour": "red"})
    with pytest.raises(ValueError, match="kind must be one of"):
        source_from_config({"kind": "webdataset"})
