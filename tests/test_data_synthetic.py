"""The synthetic fine-grained world: hierarchy, determinism, cues, and exact grading by the rule verifier."""

import re

import numpy as np
import pytest

from speciarl_jax.data.synthetic import FAMILIES, TEXTURES, SyntheticWorld
from speciarl_jax.rewards.parsing import normalize_label


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(seed=0, image_size=(56, 56))


def _all_labels(node):
    yield node["name"]
    yield from node.get("synonyms", [])
    for child in node.get("children", []):
        yield from _all_labels(child)


def test_hierarchy_has_three_levels_and_enough_fine_classes(world):
    tree = world.taxonomy()
    assert tree["name"] == "shape"
    assert len(tree["children"]) == len(FAMILIES) >= 4
    fine = [leaf for family in tree["children"] for leaf in family["children"]]
    assert len(fine) == len(world.classes) >= 24
    assert all(leaf["children"] == [] for leaf in fine)
    labels = list(_all_labels(tree))
    assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", label) for label in labels), labels
    # Every name and synonym points at one node only, so grading is never ambiguous.
    normalized = [normalize_label(label) for label in labels]
    assert len(normalized) == len(set(normalized))


def test_every_answer_grades_exactly(world, tmp_path):
    rules = pytest.importorskip("speciarl_jax.verifier.rules")
    taxonomy = rules.Taxonomy.from_json(world.save_taxonomy(tmp_path / "shapes.json"))
    grade = taxonomy.grade
    assert grade("striped circle", "Striped circle") == "specific"
    assert grade("striped circle", "banded disc") == "specific"
    assert grade("striped circle", "circle") == "less specific"
    assert grade("striped circle", "disk") == "less specific"
    assert grade("striped circle", "shape") == "generic"
    assert grade("striped circle", "dotted circle") == "wrong"
    assert grade("striped circle", "striped square") == "wrong"
    assert grade("striped circle", "square") == "wrong"
    assert grade("circle", "hollow circle") == "more specific"
    assert grade("striped circle", "none") == "abstain"
    for cls in world.classes:
        assert grade(cls.name, cls.name) == "specific"
        assert grade(cls.name, cls.family) == "less specific"
        assert grade(cls.family, cls.name) == "more specific"


def test_images_are_deterministic_and_sized(world):
    a = world.render("train", 7)
    assert a.dtype == np.uint8 and a.shape == (56, 56, 3)
    np.testing.assert_array_equal(a, SyntheticWorld(seed=0, image_size=(56, 56)).render("train", 7))
    assert not np.array_equal(a, SyntheticWorld(seed=1, image_size=(56, 56)).render("train", 7))
    assert not np.array_equal(a, world.render("test", 7))
    assert SyntheticWorld(image_size=(28, 44)).render("val", 3).shape == (28, 44, 3)
    assert SyntheticWorld(image_size=(448, 448)).render("train", 0).shape == (448, 448, 3)
    with pytest.raises(ValueError, match="no split 'dev'"):
        world.render("dev", 0)


def test_classes_are_balanced_and_sources_label_by_level(world):
    num = len(world.classes)
    assert sorted(world.class_id("train", i) for i in range(num)) == list(range(num))
    assert [world.class_id("train", i) for i in range(num)] != [world.class_id("test", i) for i in range(num)]
    fine = world.source("train", 10)
    family = world.source("train", 10, label_level="family")
    for i in range(10):
        assert fine[i].label == world.classes[world.class_id("train", i)].name
        assert fine[i].label.endswith(" " + family[i].label)
        np.testing.assert_array_equal(fine[i].image, family[i].image)
    assert fine.sample_id(3) == "synthetic/train/3"
    with pytest.raises(IndexError):
        fine[10]


def test_family_is_the_silhouette_and_fine_class_the_texture():
    """Same draw, other texture: the same pixels leave the background. Other family: a different outline."""
    world = SyntheticWorld(seed=0, image_size=(64, 64), noise=0.0)

    def draw(name, seed):
        cls = next(c for c in world.classes if c.name == name)
        image = world._draw(cls, np.random.default_rng(seed))
        background = image[0, 0]  # shapes never reach the corner
        return image, np.any(image != background, axis=-1)

    for seed in range(5):
        plain, plain_mask = draw("plain star", seed)
        for texture in ("striped", "dotted", "checkered"):
            textured, mask = draw(f"{texture} star", seed)
            np.testing.assert_array_equal(mask, plain_mask)
            changed = np.any(textured != plain, axis=-1).sum()
            assert 0.1 * plain_mask.sum() < changed < 0.7 * plain_mask.sum(), (texture, seed)
        _, square_mask = draw("plain square", seed)
        assert (square_mask != plain_mask).sum() > 0.1 * plain_mask.sum()
    assert set(TEXTURES) == {c.texture for c in world.classes}


def test_variation_zero_centres_every_shape_and_keeps_the_colours():
    still = SyntheticWorld(seed=0, image_size=(64, 64), noise=0.0, variation=0.0)
    moving = SyntheticWorld(seed=0, image_size=(64, 64), noise=0.0)

    def box(image):
        ys, xs = np.nonzero(np.any(image != image[0, 0], axis=-1))
        return ys.min(), ys.max(), xs.min(), xs.max()

    boxes = {"still": {}, "moving": {}}
    for index in range(60):
        family = still.classes[still.class_id("train", index)].family
        for name, world in (("still", still), ("moving", moving)):
            boxes[name].setdefault(family, set()).add(box(world.render("train", index)))
        assert (still.render("train", index)[0, 0] == moving.render("train", index)[0, 0]).all()  # same colours
    assert all(len(b) == 1 for b in boxes["still"].values())  # one outline per family: same place, same size
    assert all(len(b) > 1 for b in boxes["moving"].values())
    with pytest.raises(ValueError, match="variation"):
        SyntheticWorld(variation=1.5)


LOOKALIKES = (("dotted circle", "checkered circle", "striped circle"), ("plain star", "hollow star"))


def test_lookalike_classes_are_drawn_identically_and_keep_their_labels():
    """Every image of a look-alike class is, pixel for pixel, the image the first class of its set would have
    at that index; other classes and all labels are untouched."""
    plain = SyntheticWorld(seed=3, image_size=(48, 48))
    world = SyntheticWorld(seed=3, image_size=(48, 48), lookalikes=LOOKALIKES)
    ids = {name: i for i, name in enumerate(world.class_names)}
    seen = set()
    for index in range(2 * len(world.classes)):
        cls = world.classes[world.class_id("test", index)]
        image = world.render("test", index)
        assert world.source("test", 2 * len(world.classes))[index].label == cls.name
        group = next((g for g in LOOKALIKES if cls.name in g), None)
        if group is None:
            np.testing.assert_array_equal(image, plain.render("test", index))
            continue
        seen.add(cls.name)
        rng = np.random.default_rng([3, 2, index, 1])  # the renderer's draw for this index of the test split
        np.testing.assert_array_equal(image, plain._draw(plain.classes[ids[group[0]]], rng))
        if cls.name != group[0]:
            assert not np.array_equal(image, plain.render("test", index))  # not its own texture
    assert seen == {name for group in LOOKALIKES for name in group}
    assert world.is_lookalike("hollow star") and not world.is_lookalike("hollow circle")


def test_lookalike_sets_are_checked():
    for sets, message in (
        ((("dotted circle", "dotted disc"),), "not classes of the world"),
        ((("dotted circle", "dotted square"),), "span several families"),
        ((("dotted circle",),), "two or more"),
        ((("dotted circle", "plain circle"), ("plain circle", "hollow circle")), "more than one set"),
    ):
        with pytest.raises(ValueError, match=message):
            SyntheticWorld(lookalikes=sets)


def test_a_lookalike_world_from_a_config_and_from_a_run_folders_json():
    """The data config builds the same world, also from JSON's lists (a run's config.json), and evaluation
    reads the trained world back whole (run_settings.trained_world)."""
    import json

    from speciarl_jax.data import source_from_config
    from speciarl_jax.run_settings import trained_world

    entry = dict(kind="synthetic", seed=3, image_size=(48, 48), split="test", num_images=40, lookalikes=LOOKALIKES)
    direct = SyntheticWorld(seed=3, image_size=(48, 48), lookalikes=LOOKALIKES).source("test", 40)
    as_json = json.loads(json.dumps(entry))
    for source in (source_from_config(entry), source_from_config(as_json)):
        for index in range(40):
            np.testing.assert_array_equal(source[index].image, direct[index].image)
    world = trained_world({"data": {"source": as_json}})
    assert world["lookalikes"] == LOOKALIKES
    rebuilt = source_from_config(dict(kind="synthetic", split="test", num_images=40, **world))
    np.testing.assert_array_equal(rebuilt[7].image, direct[7].image)
