"""The up-front data check: every bad example of a source is named at once, with a reason, and the check
agrees with what the pipeline itself rejects (both use `pipeline.read_example`)."""

import json

import numpy as np
import pytest
import skimage.data
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from speciarl_jax.data import BadExampleError, Example, ManifestSource, Pipeline, PipelineOptions
from speciarl_jax.data.checking import BadExamplesError, check_source, find_bad_examples
from speciarl_jax.data.image_ops import ImagePatcher
from speciarl_jax.processing import Processor

from test_data_pipeline import MAX_PIXELS, MIN_PIXELS, processor, tokenizer  # noqa: F401 (shared fixtures)


@pytest.fixture(scope="module")
def fallback_processor(tokenizer):
    """One ImagePatcher does not reproduce, so the pipeline calls transformers' image processor itself."""
    processor = Processor(tokenizer, Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, do_normalize=False))
    assert ImagePatcher.from_processor(processor) is None
    return processor


def _jpeg_bytes(seed, size=(48, 64)):
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# Sample ids of the manifest below, and what must be said about the bad ones (the processor-only one last).
GOOD = ["m/cat.jpg", "m/camera.png", "m/noise0.jpg", "m/noise1.png", "m/wide.png"]
BAD_READ = {
    "m/truncated.jpg": ["cannot read image", "truncated.jpg", "truncated"],
    "m/garbage.jpg": ["cannot read image", "garbage.jpg", "cannot identify image file"],
    "m/missing.jpg": ["image file not found", "missing.jpg"],
    "m/blank": ["empty label", "m.jsonl:"],
}
BAD_PREPROCESS = {"m/thin.png": ["cannot preprocess the image", "aspect ratio"]}
BAD_ORDER = ["m/truncated.jpg", "m/garbage.jpg", "m/missing.jpg", "m/blank", "m/thin.png"]  # manifest order


@pytest.fixture
def manifest(tmp_path):
    """Real images (skimage's cat and camera, random noise, a wide one) and one of each kind of fault."""
    Image.fromarray(skimage.data.chelsea()).resize((90, 60)).save(tmp_path / "cat.jpg", quality=90)
    Image.fromarray(skimage.data.camera()).resize((64, 64)).save(tmp_path / "camera.png")  # grayscale
    (tmp_path / "noise0.jpg").write_bytes(_jpeg_bytes(0))
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 30, 3), np.uint8)).save(tmp_path / "noise1.png")
    Image.fromarray(np.full((20, 3000, 3), 128, np.uint8)).save(tmp_path / "wide.png")  # aspect 150: allowed
    whole = _jpeg_bytes(2, size=(64, 64))
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "garbage.jpg").write_bytes(np.random.default_rng(3).integers(0, 256, 600, np.uint8).tobytes())
    Image.fromarray(np.full((1, 300, 3), 200, np.uint8)).save(tmp_path / "thin.png")  # aspect 300: refused
    rows = [
        {"image": "cat.jpg", "label": "cat"},
        {"image": "truncated.jpg", "label": "noise"},
        {"image": "camera.png", "label": "man with camera"},
        {"image": "garbage.jpg", "label": "noise"},
        {"image": "noise0.jpg", "label": "noise"},
        {"image": "missing.jpg", "label": "noise"},
        {"image": "noise1.png", "label": "noise"},
        {"image": "cat.jpg", "label": "  ", "id": "blank"},
        {"image": "thin.png", "label": "line"},
        {"image": "wide.png", "label": "band"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return ManifestSource(tmp_path / "m.jsonl")


def _assert_reasons(bad, expected):
    assert [sid for sid, _ in bad] == [sid for sid in BAD_ORDER if sid in expected]
    for sid, reason in bad:
        for part in expected[sid]:
            assert part in reason, (sid, part, reason)


def test_every_bad_example_is_named_with_its_reason(manifest, processor):
    bad = find_bad_examples(manifest, processor, threads=3, progress=False)
    _assert_reasons(bad, {**BAD_READ, **BAD_PREPROCESS})
    assert not set(GOOD) & {sid for sid, _ in bad}


def test_without_a_processor_reading_and_labels_are_checked(manifest):
    """The aspect-ratio limit belongs to the processor, so only the read and label faults remain."""
    bad = find_bad_examples(manifest, None, threads=2, progress=False)
    _assert_reasons(bad, BAD_READ)


@pytest.mark.parametrize("which", ["processor", "fallback_processor"])
def test_the_pipeline_rejects_exactly_what_the_check_reports(manifest, which, request):
    processor = request.getfixturevalue(which)
    bad = find_bad_examples(manifest, processor, progress=False)
    _assert_reasons(bad, {**BAD_READ, **BAD_PREPROCESS})

    opts = dict(batch_size=2, shuffle=False, remainder="keep", process_index=0, process_count=1, read_threads=0)
    iterator = Pipeline(manifest, processor, PipelineOptions(on_bad_example="skip", **opts)).iterator()
    used = [sid for batch in iterator for sid in batch.sample_ids]
    assert iterator.reports[0].skipped == bad  # same ids, same reasons, same order
    assert used == GOOD

    # In "raise" mode the run stops at the first of them, with the same words.
    with pytest.raises(BadExampleError) as caught:
        for _ in Pipeline(manifest, processor, PipelineOptions(**opts)):
            pass
    assert (caught.value.sample_id, caught.value.reason) == bad[0]


class MemorySource:
    """In-memory examples; `lazy` holds paths opened with Image.open but not decoded, as a custom source might."""

    name = "mem"

    def __init__(self, images, labels, fail_at=None):
        self.images, self.labels, self.fail_at = images, labels, fail_at

    def __len__(self):
        return len(self.images)

    def sample_id(self, i):
        return f"mem/{i}"

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyError("lost record")
        image = self.images[i]
        if not isinstance(image, np.ndarray):
            image = Image.open(image)  # lazy: the pixels decode on first use
        return Example(image, self.labels[i], self.sample_id(i))


def test_lazily_opened_images_are_decoded_and_checked(tmp_path, processor):
    whole = _jpeg_bytes(5, size=(64, 64))
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "fine.jpg").write_bytes(whole)
    source = MemorySource([tmp_path / "fine.jpg", tmp_path / "cut.jpg", np.zeros((30, 30, 3), np.uint8)], ["a", "b", "c"])
    bad = find_bad_examples(source, None, progress=False)
    assert len(bad) == 1 and bad[0][0] == "mem/1"
    assert "cannot decode the image" in bad[0][1] and "truncated" in bad[0][1]
    opts = PipelineOptions(batch_size=3, shuffle=False, remainder="keep", on_bad_example="skip", process_index=0,
                           process_count=1, read_threads=0)
    iterator = Pipeline(source, processor, opts).iterator()
    assert [sid for batch in iterator for sid in batch.sample_ids] == ["mem/0", "mem/2"]
    assert iterator.reports[0].skipped == bad


def test_order_and_results_do_not_depend_on_threads():
    """Many more examples than the window of futures, bad ones scattered; the pipeline's own label rule."""
    labels = ["" if i % 7 == 3 else ("\t" if i % 11 == 5 else f"thing {i}") for i in range(90)]
    images = [np.full((28, 28, 3), i, np.uint8) for i in range(90)]
    source = MemorySource(images, labels)
    expected = [(f"mem/{i}", "empty label") for i in range(90) if i % 7 == 3 or i % 11 == 5]
    assert len(expected) > 10
    for threads in (1, 2, 5):
        assert find_bad_examples(source, None, threads=threads, progress=False) == expected
    with pytest.raises(ValueError, match="threads"):
        find_bad_examples(source, threads=0)


def test_an_error_that_is_not_a_bad_example_stops_the_check():
    source = MemorySource([np.zeros((28, 28, 3), np.uint8)] * 20, ["x"] * 20, fail_at=13)
    with pytest.raises(RuntimeError, match=r"mem/13 of mem failed: KeyError\('lost record'\)"):
        find_bad_examples(source, threads=4, progress=False)


def test_progress_bar_shows_count_and_rate(manifest, capsys):
    find_bad_examples(manifest, None, threads=2, progress=True)
    err = capsys.readouterr().err
    assert "checking m" in err and "10/10" in err and "ex/s" in err and "bad=4" in err
    find_bad_examples(manifest, None, threads=2, progress=False)
    assert capsys.readouterr().err == ""


def test_the_error_names_count_first_ids_and_the_way_out(manifest, processor):
    with pytest.raises(BadExamplesError) as caught:
        check_source(manifest, processor, progress=False)
    message = str(caught.value)
    assert message.startswith("5 of 10 examples of data set 'm' cannot be used:")
    for sid in BAD_ORDER:
        assert f"  {sid}: " in message
    assert 'on_bad_example to "skip"' in message and "Fix or remove" in message
    assert isinstance(caught.value, ValueError) and [sid for sid, _ in caught.value.bad] == BAD_ORDER

    many = [(f"x/{i}", f"reason {i}") for i in range(13)]
    message = str(BadExamplesError(many))
    assert message.startswith("13 examples of the source cannot be used (the first 10):")
    assert "x/9: reason 9" in message and "x/10" not in message and "... and 3 more" in message


def test_a_clean_source_passes(processor):
    good = MemorySource([np.full((40, 30, 3), 9, np.uint8)] * 4, ["a", "b", "c", "d"])
    assert find_bad_examples(good, processor, progress=False) == []
    assert check_source(good, processor, progress=False) is None
