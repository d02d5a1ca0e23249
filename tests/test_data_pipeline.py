"""The grain pipeline: batch contents against transformers, shuffling, sharding, remainders, bad examples,
prompts, and exact resumption from a saved iterator state (with and without worker processes)."""

import json

import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from speciarl_jax.data import (
    PROMPTS,
    BadExampleError,
    Example,
    ManifestSource,
    Pipeline,
    PipelineOptions,
    Prompt,
    SyntheticWorld,
    get_prompt,
    load_prompt,
    pipeline_from_config,
)
from speciarl_jax.tiny_model import build_tokenizer
from speciarl_jax.processing import Processor

MIN_PIXELS, MAX_PIXELS = 28 * 28, 112 * 112


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    """Variable image sizes within [MIN_PIXELS, MAX_PIXELS]."""
    return Processor(tokenizer, Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS))


@pytest.fixture(scope="module")
def fixed_processor(tokenizer):
    """Every image resized to 56x56 first: one patch grid for all."""
    return Processor(tokenizer, Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS), image_size=(56, 56))


@pytest.fixture(scope="module")
def shapes():
    return SyntheticWorld(seed=3, image_size=(56, 56)).source("train", 22)


class ListSource:
    """Images of assorted sizes, for checks against transformers."""

    name = "list"

    def __init__(self, sizes, seed=0):
        rng = np.random.default_rng(seed)
        self.examples = [
            Example(rng.integers(0, 255, (h, w, 3), np.uint8), f"thing {i}", f"list/{i}") for i, (h, w) in enumerate(sizes)
        ]

    def __len__(self):
        return len(self.examples)

    def sample_id(self, i):
        return self.examples[i].sample_id

    def __getitem__(self, i):
        return self.examples[i]


def options(**kw):
    base = dict(batch_size=4, process_index=0, process_count=1, read_threads=0)
    return PipelineOptions(**{**base, **kw})


def all_ids(iterator):
    return [batch.sample_ids for batch in iterator]


# --- contents -----------------------------------------------------------------------------------------


def test_batch_equals_the_processor_output(processor):
    source = ListSource([(40, 60), (90, 30), (28, 28), (120, 100), (33, 77)])
    pipeline = Pipeline(source, processor, options(batch_size=5, shuffle=False, prompt="specific"))
    batch = next(iter(pipeline))
    text = processor.chat_prompt(PROMPTS["specific"])
    expected = processor([text] * 5, images=[e.image for e in source.examples], padding_side="left", pad_to_multiple_of=64)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        np.testing.assert_array_equal(batch.model_inputs()[key], expected[key], err_msg=key)
    assert batch.input_ids.dtype == np.int32 and batch.input_ids.shape[1] % 64 == 0
    assert batch.pixel_values.dtype == np.float32 and batch.image_grid_thw.shape == (5, 3)
    assert len(set(batch.image_grid_thw[:, 1:].prod(-1).tolist())) > 1  # really different sizes
    assert batch.labels == [f"thing {i}" for i in range(5)] and batch.valid.all()
    assert batch.sample_ids == [f"list/{i}" for i in range(5)]
    assert "precisely" in processor.decode(batch.input_ids[0])


@pytest.mark.parametrize("image_size", [None, (56, 84)])
def test_preprocessing_equals_transformers_image_processor(tokenizer, image_size):
    """The patches equal those of transformers' own Qwen2-VL image processor with the same settings."""
    source = ListSource([(70, 45), (150, 200)], seed=1)
    processor = Processor(tokenizer, Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS), image_size=image_size)
    batch = next(iter(Pipeline(source, processor, options(batch_size=2, shuffle=False))))
    reference = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    images = [Image.fromarray(e.image) for e in source.examples]
    if image_size is not None:  # the fixed-size option resizes with PIL's bicubic filter first
        images = [im.resize((image_size[1], image_size[0]), Image.Resampling.BICUBIC) for im in images]
    expected = reference(images=images, return_tensors="np")
    np.testing.assert_array_equal(batch.pixel_values, expected["pixel_values"].astype(np.float32))
    np.testing.assert_array_equal(batch.image_grid_thw, expected["image_grid_thw"])
    if image_size is not None:
        assert (batch.image_grid_thw == [1, 4, 6]).all()


def test_prompts_by_name_and_file(tmp_path, fixed_processor, shapes):
    assert PROMPTS["general"] != PROMPTS["specific"]
    for name, text in PROMPTS.items():
        if name == "brief":  # the demo's: a tiny model learns the format from SFT, and tokens cost time
            assert len(text.split()) <= 4
            continue
        assert "<answer>" in text and "</answer>" in text and "<think>" in text and "None" in text, name
    prompt_file = tmp_path / "mine.txt"
    prompt_file.write_text("  Which shape is this? Answer inside <answer> </answer>.\n")
    assert get_prompt(str(prompt_file)) == "Which shape is this? Answer inside <answer> </answer>."
    with pytest.raises(ValueError, match="unknown prompt 'fancy'"):
        get_prompt("fancy")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        get_prompt(str(tmp_path / "empty.txt"))
    pipeline = Pipeline(shapes, fixed_processor, options(prompt=str(prompt_file), system_prompt="Be brief."))
    text = fixed_processor.decode(next(iter(pipeline)).input_ids[0], skip_special_tokens=False)
    assert "Which shape is this?" in text and "Be brief." in text and "helpful assistant" not in text


def test_original_ndjson_prompt_files_are_used_verbatim(tmp_path, fixed_processor, shapes):
    """A prompt file in the original's NDJSON form: the line not tied to a data set, its text stripped, its system
    prompt as the system turn (unless the options set one); the tokens equal those of the same chat built by hand."""
    import json

    lines = [
        {"name": "mine", "system_prompt": "", "user_prompt_template": "\nSort the picture.\nWrap the label in "
         "<answer> </answer>.\n", "requires_reasoning": True, "answer_format": {"type": "tag", "value": "answer"},
         "dataset_specific": None},
        {"name": "birds only", "system_prompt": "", "user_prompt_template": "Which bird?", "dataset_specific": "cub200"},
    ]
    path = tmp_path / "mine.ndjson"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert load_prompt(str(path)) == Prompt("Sort the picture.\nWrap the label in <answer> </answer>.")
    batch = next(iter(Pipeline(shapes, fixed_processor, options(prompt=str(path)))))
    expected = fixed_processor.chat_prompt("Sort the picture.\nWrap the label in <answer> </answer>.", 1)
    got = fixed_processor.decode(batch.input_ids[0][batch.attention_mask[0] > 0], skip_special_tokens=False)
    assert got.replace("<|image_pad|>", "") == expected.replace("<|image_pad|>", "")
    lines[0]["system_prompt"] = "You sort pictures."
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert load_prompt(str(path)).system == "You sort pictures."
    text = fixed_processor.decode(next(iter(Pipeline(shapes, fixed_processor, options(prompt=str(path))))).input_ids[0],
                                  skip_special_tokens=False)
    assert "You sort pictures." in text and "helpful assistant" not in text
    path.write_text(json.dumps(lines[1]) + "\n")
    with pytest.raises(ValueError, match="holds 0 prompts not tied to a data set"):
        load_prompt(str(path))
    path.write_text('{"name": "x"}\n')
    with pytest.raises(ValueError, match="mine.ndjson:1 has no \"user_prompt_template\""):
        load_prompt(str(path))


# --- order, shards, remainders ----------------------------------------------------------------------


def test_shuffle_is_set_by_seed_and_epoch(fixed_processor, shapes):
    def epochs(seed):
        batches = list(Pipeline(shapes, fixed_processor, options(seed=seed, num_epochs=2, batch_size=11)))
        return [sum((b.sample_ids for b in batches if b.epoch == e), []) for e in (0, 1)]

    first, second = epochs(0)
    assert [first, second] == epochs(0)
    assert sorted(first) == sorted(second) == sorted(shapes.sample_id(i) for i in range(len(shapes)))
    assert first != second  # a new order every epoch
    assert epochs(1)[0] != first
    unshuffled = list(Pipeline(shapes, fixed_processor, options(shuffle=False, batch_size=11)))
    assert unshuffled[0].sample_ids == [f"synthetic/train/{i}" for i in range(11)]


@pytest.mark.parametrize("remainder", ["keep", "drop", "pad"])
def test_two_processes_get_disjoint_shards(fixed_processor, shapes, remainder):
    for epoch in (0, 1):
        shards = []
        for index in (0, 1):
            pipeline = Pipeline(shapes, fixed_processor, options(
                num_epochs=2, batch_size=3, remainder=remainder, process_index=index, process_count=2))
            batches = [b for b in pipeline if b.epoch == epoch]
            shards.append([sid for b in batches for sid, ok in zip(b.sample_ids, b.valid) if ok])
            assert len(batches) == pipeline.batches_per_epoch
        assert not set(shards[0]) & set(shards[1])
        union = set(shards[0]) | set(shards[1])
        if remainder == "drop":  # 11 examples each, 3 per batch: 2 left over on each process
            assert len(shards[0]) == len(shards[1]) == 9
        else:
            assert union == {shapes.sample_id(i) for i in range(len(shapes))}


def test_remainders(fixed_processor, shapes):
    sizes = lambda **kw: [len(b) for b in Pipeline(shapes, fixed_processor, options(batch_size=8, **kw))]
    assert sizes(remainder="drop") == [8, 8]
    assert sizes(remainder="keep") == [8, 8, 6]
    padded = list(Pipeline(shapes, fixed_processor, options(batch_size=8, remainder="pad", shuffle=False)))
    assert [len(b) for b in padded] == [8, 8, 8]
    assert padded[-1].valid.tolist() == [True] * 6 + [False] * 2
    assert padded[-1].sample_ids[6:] == [padded[-1].sample_ids[5]] * 2
    # Uneven shards with "pad": both processes run the same number of batches.
    counts = [len(list(Pipeline(shapes, fixed_processor, options(batch_size=4, remainder="pad", process_index=i,
                                                                  process_count=3)))) for i in range(3)]
    assert counts == [2, 2, 2]


def test_read_threads_do_not_change_the_batches(fixed_processor, shapes):
    ids = lambda threads: all_ids(Pipeline(shapes, fixed_processor, options(num_epochs=3, batch_size=4, read_threads=threads)))
    assert ids(3) == ids(0)


def test_repeat_forever(fixed_processor, shapes):
    iterator = iter(Pipeline(shapes, fixed_processor, options(num_epochs=None, batch_size=10)))
    epochs = [next(iterator).epoch for _ in range(7)]
    assert epochs == [0, 0, 1, 1, 2, 2, 3]


# --- resumption ---------------------------------------------------------------------------------------


def test_restored_iterator_continues_with_the_next_batch(fixed_processor, shapes):
    pipeline = Pipeline(shapes, fixed_processor, options(num_epochs=3, batch_size=5))
    reference = list(pipeline)
    iterator = pipeline.iterator()
    for _ in range(5):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # survives a JSON checkpoint
    expected = next(iterator)
    restored = Pipeline(shapes, fixed_processor, options(num_epochs=3, batch_size=5)).iterator(state)
    batch = next(restored)
    assert batch.sample_ids == expected.sample_ids == reference[5].sample_ids
    np.testing.assert_array_equal(batch.pixel_values, expected.pixel_values)
    np.testing.assert_array_equal(batch.input_ids, expected.input_ids)
    assert all_ids(restored) == [b.sample_ids for b in reference[6:]]
    other = Pipeline(shapes, fixed_processor, options(num_epochs=3, batch_size=5, seed=9))
    with pytest.raises(ValueError, match="saved by a pipeline over other data"):
        other.iterator(state)


def test_workers_give_the_same_batches_and_resume_exactly(fixed_processor, shapes):
    """Two worker processes: the same batches as in-process, resumed from a state saved without workers."""
    reference = list(Pipeline(shapes, fixed_processor, options(num_epochs=2, batch_size=4)))
    iterator = Pipeline(shapes, fixed_processor, options(num_epochs=2, batch_size=4)).iterator()
    next(iterator), next(iterator), next(iterator)
    state = iterator.get_state()
    with Pipeline(shapes, fixed_processor, options(num_epochs=2, batch_size=4, worker_count=2, read_threads=1)).iterator(state) as resumed:
        batches = list(resumed)
    assert [b.sample_ids for b in batches] == [b.sample_ids for b in reference[3:]]
    for got, want in zip(batches, reference[3:]):
        np.testing.assert_array_equal(got.pixel_values, want.pixel_values)
        np.testing.assert_array_equal(got.input_ids, want.input_ids)


# --- bad examples ---------------------------------------------------------------------------------------


@pytest.fixture
def flawed_manifest(tmp_path):
    rows = []
    for i in range(8):
        Image.fromarray(np.full((30, 30, 3), 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "label": f"colour {i}"})
    rows[2]["image"] = "missing.png"
    (tmp_path / "5.png").write_bytes(b"\x89PNG broken")
    rows[6]["label"] = "   "
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return ManifestSource(tmp_path / "m.jsonl")


def test_bad_examples_are_skipped_and_reported(fixed_processor, flawed_manifest):
    iterator = Pipeline(flawed_manifest, fixed_processor, options(on_bad_example="skip", shuffle=False, remainder="keep",
                                                                   batch_size=2, num_epochs=2)).iterator()
    batches = list(iterator)
    assert [b.sample_ids for b in batches if b.epoch == 0] == [["m/0.png", "m/1.png"], ["m/3.png", "m/4.png"], ["m/7.png"]]
    assert all(label == f"colour {sid[2]}" for b in batches for sid, label in zip(b.sample_ids, b.labels))
    assert len(iterator.reports) == 2
    report = iterator.reports[0]
    assert report.epoch == 0 and report.examples == 8
    assert [sid for sid, _ in report.skipped] == ["m/missing.png", "m/5.png", "m/6.png"]
    reasons = dict(report.skipped)
    assert "image file not found" in reasons["m/missing.png"] and "missing.png" in reasons["m/missing.png"]
    assert "cannot read image" in reasons["m/5.png"] and "empty label" in reasons["m/6.png"]


def test_skipped_examples_survive_a_restore_mid_epoch(fixed_processor, flawed_manifest):
    opts = options(on_bad_example="skip", shuffle=False, remainder="keep", batch_size=2)
    iterator = Pipeline(flawed_manifest, fixed_processor, opts).iterator()
    next(iterator), next(iterator)  # past the missing image
    resumed = Pipeline(flawed_manifest, fixed_processor, opts).iterator(iterator.get_state())
    list(resumed)
    assert [sid for sid, _ in resumed.reports[0].skipped] == ["m/missing.png", "m/5.png", "m/6.png"]


def test_bad_examples_raise_by_default(fixed_processor, flawed_manifest):
    iterator = iter(Pipeline(flawed_manifest, fixed_processor, options(shuffle=False, batch_size=2)))
    next(iterator)
    with pytest.raises(BadExampleError, match=r"m/missing.png: image file not found: .*missing\.png"):
        next(iterator)


# --- configuration ----------------------------------------------------------------------------------------


def test_pipeline_from_config_with_a_model_folder(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(tmp_path)
    config = {
        "source": {"kind": "synthetic", "num_images": 30, "image_size": [40, 50], "num_examples": 12, "subset_seed": 0},
        "batch_size": 4, "seed": 1, "prompt": "specific", "image_size": [28, 56], "read_threads": 0,
    }
    pipeline = pipeline_from_config(config, str(tmp_path), process_index=1, process_count=2)
    batches = list(pipeline)
    assert len(batches) == pipeline.batches_per_epoch == 1 and len(batches[0]) == 4
    assert (batches[0].image_grid_thw == [1, 2, 4]).all()
    with pytest.raises(ValueError, match="only apply when a model folder is passed"):
        pipeline_from_config(config, Processor.from_pretrained(tmp_path))
    with pytest.raises(ValueError, match=r"unknown keys \['batchsize'\]"):
        pipeline_from_config({"source": config["source"], "batchsize": 3}, str(tmp_path))


def test_option_errors():
    with pytest.raises(ValueError, match="remainder must be one of"):
        PipelineOptions(batch_size=2, remainder="wrap")
    with pytest.raises(ValueError, match="on_bad_example must be one of"):
        PipelineOptions(batch_size=2, on_bad_example="ignore")
    with pytest.raises(ValueError, match="process_index 2 outside process_count 2"):
        PipelineOptions(batch_size=2, process_index=2, process_count=2)


def test_mixed_tfds_and_synthetic_pipeline(fixed_processor):
    import tensorflow_datasets as tfds

    config = {
        "source": {"kind": "mixed", "per_source": 4, "seed": 42, "parts": [
            {"kind": "benchmark", "name": "pets", "split": "train"},
            {"kind": "synthetic", "num_images": 20, "image_size": [40, 40]},
        ]},
        "batch_size": 8, "read_threads": 0,
    }
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        pets = tfds.builder("oxford_iiit_pet").info.features["label"].names
        (batch,) = list(pipeline_from_config(config, fixed_processor, process_index=0, process_count=1))
    names = {n.replace("_", " ") for n in pets} | set(SyntheticWorld().class_names)
    assert set(batch.labels) <= names
    assert sum(sid.startswith("oxford_iiit_pet/train/") for sid in batch.sample_ids) == 4
    assert (batch.image_grid_thw == [1, 4, 4]).all()


def test_orbax_checkpoint_of_the_iterator(tmp_path, fixed_processor, shapes):
    """The iterator saves and restores through orbax with grain's checkpoint handler (one file per process)."""
    import grain
    import orbax.checkpoint as ocp

    opts = options(num_epochs=2)
    iterator = Pipeline(shapes, fixed_processor, opts).iterator()
    next(iterator), next(iterator)
    manager = ocp.CheckpointManager(tmp_path, item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = next(iterator).sample_ids
    restored = Pipeline(shapes, fixed_processor, opts).iterator()
    manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert next(restored).sample_ids == expected
    assert (tmp_path / "2" / "data" / "process_0-of-1.json").exists()
