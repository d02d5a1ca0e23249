"""Bounded programs: a run on images of varying native sizes compiles its programs in the first steps and nothing
after (buckets, high-water marks, the packed vision tower, the bucketed update), counted with JAX's compile
event."""

import json

import numpy as np
from PIL import Image

from speciarl_jax import buckets, compilation
from speciarl_jax.data.synthetic import SyntheticSource, SyntheticWorld
from test_trainer import make_trainer, read_metrics, rl_config


def varied_manifest(folder, count=48, seed=0):
    """JPEGs of the synthetic world at random sizes (28 to 140 pixels a side), with the world's taxonomy."""
    world = SyntheticWorld(seed=0, image_size=(56, 56), variation=0.0)
    source = SyntheticSource(world, split="train", num_images=count)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        example = source[i]
        size = tuple(int(v) for v in rng.integers(28, 141, 2))
        Image.fromarray(example.image).resize(size).save(folder / f"{i}.jpg")
        rows.append({"image": f"{i}.jpg", "label": example.label})
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "taxonomy.json").write_text(json.dumps(world.taxonomy()))
    return folder / "train.jsonl", folder / "taxonomy.json"


def test_images_of_varying_sizes_compile_nothing_after_the_first_steps(tmp_path, warm_model):
    manifest, taxonomy = varied_manifest(tmp_path)
    config = rl_config(tmp_path / "run", warm_model, **{
        "steps": 12, "checkpoint_every": 100, "compilation_cache_dir": "", "rollout.precompile": True,
        "data.source": {"kind": "manifest", "path": str(manifest)}, "verifier.taxonomy_path": str(taxonomy),
        "data.image_size": None, "data.max_pixels": 140 * 140})
    trainer = make_trainer(config)
    trainer.run()
    counts = [m["compile/count"] for m in read_metrics(config.run_dir) if "compile/count" in m]
    assert len(counts) == 12
    assert counts[0] > 0  # the counter sees the first step's programs
    # Images of 1 to 25 tokens: the prompt width, the image table and the vision bins all vary between batches.
    assert sum(counts[4:]) == 0, counts


def test_counter_and_buckets():
    import jax

    x, y = jax.device_put(np.ones(7, np.float32)), jax.device_put(np.ones(9, np.float32))
    f = jax.jit(lambda x: x * 3 + 1)
    counter = compilation.CompileCounter()
    f(x)
    assert counter.take()["count"] == 1
    f(x)  # cached
    assert counter.take()["count"] == 0
    f(y)  # a new shape
    taken = counter.take()
    assert taken["count"] == 1 and taken["seconds"] > 0
    assert [buckets.geometric(v) for v in (1, 16, 17, 33, 100)] == [16, 16, 20, 40, 112]
    assert [buckets.power_of_two(v) for v in (0, 1, 5, 64)] == [1, 1, 8, 64]
    mark = buckets.HighWater()
    assert [mark("x", v) for v in (3, 9, 4)] == [3, 9, 9]


def test_persistent_cache_setting(tmp_path):
    import jax

    before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
    try:
        assert compilation.enable_persistent_cache(str(tmp_path / "xla")) == str(tmp_path / "xla")
        assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        assert (tmp_path / "xla").is_dir()
        assert compilation.enable_persistent_cache("") is None  # leaves the setting alone
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    finally:
        jax.config.update("jax_enable_compilation_cache", before[0])
        jax.config.update("jax_compilation_cache_dir", before[1])
