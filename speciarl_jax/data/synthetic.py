"""A synthetic fine-grained world: drawn shapes with a three-level label hierarchy.

    shape                                  the generic name
      circle, square, triangle, ...        families: the silhouette (a large cue)
        striped circle, dotted circle, ... fine classes: the texture inside the silhouette (a small cue)

Six families x five textures = 30 fine classes. Colours, size, position, rotation (a little) and pixel noise
vary freely and carry no label information, so a model has to look at the silhouette to get the family and
at the texture to get the fine class. Every image is a pure function of (seed, split, index): random access,
any number of images, any resolution, the same pixels on every machine. `taxonomy()` exports the hierarchy
in the rule verifier's JSON format, so every answer about this world can be graded exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from .sources import Example

GENERIC = ("shape", ("figure", "geometric shape"))

# family name -> synonyms
FAMILIES: dict[str, tuple[str, ...]] = {
    "circle": ("disc", "disk"),
    "square": ("box",),
    "triangle": ("trigon",),
    "star": ("pentagram",),
    "hexagon": ("hex",),
    "cross": ("plus", "plus sign"),
}

# texture name -> synonyms (each is combined with the family name and its synonyms)
TEXTURES: dict[str, tuple[str, ...]] = {
    "plain": ("solid", "filled"),
    "striped": ("banded", "lined"),
    "dotted": ("spotted", "polka dot"),
    "checkered": ("checked", "chequered"),
    "hollow": ("outlined", "empty"),
}

SPLITS = {"train": 0, "val": 1, "test": 2}
LABEL_LEVELS = ("fine", "family", "generic")


@dataclasses.dataclass(frozen=True)
class FineClass:
    name: str  # e.g. "striped circle"
    family: str  # e.g. "circle"
    texture: str  # e.g. "striped"
    synonyms: tuple[str, ...]


# --------------------------------------------------------------------------------------------------
# Silhouettes: boolean masks over unit coordinates (u right, v up), every shape fits in the unit disc.


def _circle(u, v):
    return u * u + v * v <= 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.78


def _triangle(u, v):
    # Equilateral, pointing up, circumradius 1: three half-planes at distance 0.5 from the centre.
    inside = v >= -0.5
    for angle in (np.pi / 6, 5 * np.pi / 6):
        inside &= u * np.cos(angle) + v * np.sin(angle) <= 0.5
    return inside


def _hexagon(u, v):
    inside = np.ones(np.broadcast(u, v).shape, bool)
    for angle in (0.0, np.pi / 3, 2 * np.pi / 3):
        inside &= np.abs(u * np.cos(angle) + v * np.sin(angle)) <= 0.88
    return inside


_STAR_INNER = 0.45


def _star(u, v):
    # Five points: fold the angle into one 36-degree half-spike and test against the edge from tip to notch.
    r = np.hypot(u, v)
    phi = np.abs((np.arctan2(u, v) + np.pi / 5) % (2 * np.pi / 5) - np.pi / 5)
    x, y = r * np.cos(phi), r * np.sin(phi)
    nx, ny = _STAR_INNER * np.cos(np.pi / 5), _STAR_INNER * np.sin(np.pi / 5)
    # Inside when (tip->point) x (tip->notch) keeps the same sign as for the centre.
    return (x - 1.0) * ny - y * (nx - 1.0) <= 0.0


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.9)) | ((av <= 0.3) & (au <= 0.9))


SILHOUETTES = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "hexagon": _hexagon,
    "cross": _cross,
}

# --------------------------------------------------------------------------------------------------
# Textures: which pixels of the silhouette take the second colour. Periods are in shape units, so the
# texture scales with the shape and stays visible down to ~56 pixel images.

_PERIOD = 0.42


def _texture_mask(texture: str, u, v, silhouette, family: str, phase: np.ndarray):
    if texture == "hollow":
        return silhouette & SILHOUETTES[family](u / 0.6, v / 0.6)  # the inside takes the background colour
    # A rim of body colour stays untextured, so the silhouette reads whatever the texture colour is.
    silhouette = silhouette & SILHOUETTES[family](u / 0.86, v / 0.86)
    if texture == "plain":
        return np.zeros_like(silhouette)
    if texture == "striped":
        return silhouette & (((v / _PERIOD + phase[0]) % 1.0) < 0.5)
    if texture == "checkered":
        return silhouette & ((np.floor(u / _PERIOD + phase[0]) + np.floor(v / _PERIOD + phase[1])) % 2 == 0)
    if texture == "dotted":
        du = (u / _PERIOD + phase[0]) % 1.0 - 0.5
        dv = (v / _PERIOD + phase[1]) % 1.0 - 0.5
        return silhouette & (du * du + dv * dv <= 0.3**2)
    raise ValueError(f"unknown texture {texture!r}")


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], np.float32)


class SyntheticWorld:
    """The world: its classes, its hierarchy, and a deterministic renderer.

    Args:
      seed: changes every image (and the order of classes within a split), not the classes themselves.
      image_size: (height, width) of rendered images; any size, though textures need ~48 pixels to read.
      noise: standard deviation of the per-pixel noise, in 0..255 units.
      variation: how much position, size and rotation vary, from 0 (every shape centred, upright, one size)
        to 1 (the default: anywhere in the frame, 60-85% of it, up to 15 degrees). Colours always vary.
        A model trained from scratch in minutes (the CPU demo) needs a low value.
      lookalikes: sets of fine class names of one family (e.g. ("dotted circle", "checkered circle")) whose
        images are drawn identically, as the first of the set: no model can tell them apart, so the best
        answer to any of them names the family. Labels and the hierarchy stay as they are.
    """

    def __init__(self, seed: int = 0, image_size: tuple[int, int] = (112, 112), noise: float = 6.0,
                 variation: float = 1.0, lookalikes=()):
        self.seed = int(seed)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        if min(self.image_size) < 8:
            raise ValueError(f"image_size {image_size} is too small to draw anything; use at least 8x8")
        self.noise = float(noise)
        if not 0.0 <= variation <= 1.0:
            raise ValueError(f"variation must be in [0, 1], got {variation}")
        self.variation = float(variation)
        self.classes = [
            FineClass(
                name=f"{texture} {family}",
                family=family,
                texture=texture,
                synonyms=tuple(
                    f"{t} {f}" for t in (texture, *t_syn) for f in (family, *f_syn) if (t, f) != (texture, family)
                ),
            )
            for family, f_syn in FAMILIES.items()
            for texture, t_syn in TEXTURES.items()
        ]
        self.families = list(FAMILIES)
        self.generic = GENERIC[0]
        self.lookalikes = tuple(tuple(str(name) for name in group) for group in lookalikes)
        self.drawn_as = self._drawn_as(self.lookalikes)

    def _drawn_as(self, groups) -> list[int]:
        """The class each class is drawn as: itself, or the first class of its look-alike set."""
        ids = {name: i for i, name in enumerate(self.class_names)}
        drawn, seen = list(range(len(self.classes))), set()
        for group in groups:
            unknown = [name for name in group if name not in ids]
            if unknown:
                raise ValueError(f"lookalikes: {unknown} are not classes of the world (e.g. 'dotted circle')")
            if len(group) < 2 or len(set(group)) != len(group):
                raise ValueError(f"lookalikes: a set needs two or more different classes, got {list(group)}")
            if len({self.classes[ids[name]].family for name in group}) > 1:
                raise ValueError(f"lookalikes: {list(group)} span several families; a set lies within one")
            if seen & set(group):
                raise ValueError(f"lookalikes: {sorted(seen & set(group))} are in more than one set")
            seen |= set(group)
            for name in group:
                drawn[ids[name]] = ids[group[0]]
        return drawn

    def is_lookalike(self, name: str) -> bool:
        """Whether the fine class `name` belongs to a look-alike set (its images cannot be told apart)."""
        return any(name in group for group in self.lookalikes)

    # --- hierarchy --------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def label(self, class_id: int, level: str = "fine") -> str:
        cls = self.classes[class_id]
        if level == "fine":
            return cls.name
        if level == "family":
            return cls.family
        if level == "generic":
            return self.generic
        raise ValueError(f"label level must be one of {LABEL_LEVELS}, got {level!r}")

    def taxonomy(self) -> dict:
        """The hierarchy as the rule verifier's JSON tree: {"name", "synonyms", "children"}."""
        return {
            "name": GENERIC[0],
            "synonyms": list(GENERIC[1]),
            "children": [
                {
                    "name": family,
                    "synonyms": list(FAMILIES[family]),
                    "children": [
                        {"name": c.name, "synonyms": list(c.synonyms), "children": []}
                        for c in self.classes
                        if c.family == family
                    ],
                }
                for family in self.families
            ],
        }

    def save_taxonomy(self, path: str | os.PathLike) -> str:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.taxonomy(), f, indent=1)
        return path

    # --- sampling ---------------------------------------------------------------------------------
    def _split_key(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"the synthetic world has no split {split!r}; it has {sorted(SPLITS)}")
        return SPLITS[split]

    def class_id(self, split: str, index: int) -> int:
        """Balanced: each block of len(classes) consecutive indices holds every class once, in a seeded order."""
        num = len(self.classes)
        block, offset = divmod(int(index), num)
        order = np.random.default_rng([self.seed, self._split_key(split), block]).permutation(num)
        return int(order[offset])

    def render(self, split: str, index: int) -> np.ndarray:
        """The image of example `index` of `split`: uint8 [H, W, 3]."""
        class_id = self.class_id(split, index)
        rng = np.random.default_rng([self.seed, self._split_key(split), int(index), 1])
        return self._draw(self.classes[self.drawn_as[class_id]], rng)

    def _draw(self, cls: FineClass, rng: np.random.Generator) -> np.ndarray:
        height, width = self.image_size
        half = min(height, width) / 2
        jitter = self.variation
        radius = half * (0.8 + jitter * rng.uniform(-0.2, 0.05))  # 0.6-0.85 of the half-frame at full variation
        cy = height / 2 + jitter * rng.uniform(-1, 1) * (height / 2 - radius) * 0.9
        cx = width / 2 + jitter * rng.uniform(-1, 1) * (width / 2 - radius) * 0.9
        angle = jitter * rng.uniform(-0.26, 0.26)  # at most ~15 degrees: a square must not turn into a diamond
        ys = (np.arange(height, dtype=np.float32) + 0.5 - cy)[:, None] / radius
        xs = (np.arange(width, dtype=np.float32) + 0.5 - cx)[None, :] / radius
        cos, sin = np.cos(angle), np.sin(angle)
        u = xs * cos - ys * sin  # ys points down; v points up
        v = -(xs * sin + ys * cos)
        silhouette = SILHOUETTES[cls.family](u, v)
        texture = _texture_mask(cls.texture, u, v, silhouette, cls.family, rng.uniform(0, 1, 2))

        hue = rng.uniform()
        body = _hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 0.95))
        background = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.25), rng.uniform(0.8, 1.0))
        luminance = float(body @ np.array([0.299, 0.587, 0.114], np.float32))
        accent = (
            _hsv_to_rgb(hue, rng.uniform(0.0, 0.3), rng.uniform(0.0, 0.2))
            if luminance > 0.45
            else _hsv_to_rgb(hue, rng.uniform(0.0, 0.2), rng.uniform(0.9, 1.0))
        )
        if cls.texture == "hollow":
            accent = background

        image = np.empty((height, width, 3), np.float32)
        image[...] = background * 255
        image[silhouette] = body * 255
        image[texture] = accent * 255
        if self.noise > 0:
            image += rng.standard_normal(image.shape, dtype=np.float32) * self.noise
        return np.clip(image + 0.5, 0, 255).astype(np.uint8)

    def source(self, split: str = "train", num_images: int = 1024, label_level: str = "fine") -> "SyntheticSource":
        return SyntheticSource(self, split, num_images, label_level)


def source_taxonomy(source_cfg):
    """The label hierarchy (a verifier `Taxonomy`) of the world a data source config draws from, or None when the
    source is not the synthetic world."""
    if source_cfg.get("kind") != "synthetic":
        return None
    from ..verifier.rules import Taxonomy

    world = SyntheticWorld(seed=source_cfg.get("seed", 0), image_size=tuple(source_cfg.get("image_size", (112, 112))))
    return Taxonomy.from_dict(world.taxonomy())


class SyntheticSource:
    """`num_images` examples of one split of a SyntheticWorld, as a Source.

    label_level: "fine" (the default), "family" or "generic": the level the ground truth is given at, so a
    fine answer to a family-level label can be graded "more specific". Sample ids: "synthetic/<split>/<i>".
    """

    name = "synthetic"

    def __init__(self, world: SyntheticWorld, split: str, num_images: int, label_level: str = "fine"):
        world._split_key(split)
        if label_level not in LABEL_LEVELS:
            raise ValueError(f"label_level must be one of {LABEL_LEVELS}, got {label_level!r}")
        if num_images < 1:
            raise ValueError(f"num_images must be positive, got {num_images}")
        self.world, self.split, self.num_images, self.label_level = world, split, int(num_images), label_level

    def __len__(self) -> int:
        return self.num_images

    def sample_id(self, index: int) -> str:
        return f"{self.name}/{self.split}/{index}"

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} outside the {self.num_images} synthetic examples")
        label = self.world.label(self.world.class_id(self.split, index), self.label_level)
        return Example(image=self.world.render(self.split, index), label=label, sample_id=self.sample_id(index))
