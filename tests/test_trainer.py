"""The training loop end to end on the tiny model: each algorithm, resume, interrupted saves, sharding."""

import collections
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from speciarl_jax.configs.demo import get_config as demo_config
from speciarl_jax.checkpoint import Checkpointer
from speciarl_jax.metrics import before_after_table
from speciarl_jax.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(run_dir, **changes):
    """The demo shrunk to seconds: a 2-layer model, 4 prompts x 4 samples, 12 new tokens."""
    c = demo_config()
    c.run_dir = str(run_dir)
    c.compilation_cache_dir = ""  # tests leave the user's cache folder alone
    c.model.tiny_spec.update(dict(hidden_size=64, intermediate_size=128, num_layers=2))
    c.steps = 3
    c.checkpoint_every = 2
    c.data.batch_size = 4
    c.rollout.num_samples = 4
    c.rollout.max_new_tokens = 12
    c.rollout.precompile = False  # compile what each short run meets (tests/test_bounded_programs.py checks it on)
    c.rl.mini_batch_size = 8  # two optimizer steps per batch
    c.eval.enabled = False
    # Enough SFT for the answer format (the brief prompt does not state it), so rollouts earn differing rewards.
    c.sft.steps = 60
    c.sft.batch_size = 16
    c.sft.learning_rate = 5e-3
    c.sft.warmup_steps = 5
    c.update_from_flattened_dict(changes)  # dotted keys, e.g. "mesh.fsdp"
    return c


def make_trainer(config):
    """A Trainer on one device. On 2 CPU cores the 8 simulated devices make every step about 1.5x slower, and
    the sharded paths have tests of their own (test_eight_devices_match_one, tests/test_rl_update.py)."""
    return Trainer(config, devices=jax.devices()[:1])


def rl_config(run_dir, warm_model, **changes):
    return small_config(run_dir, **{"model.tiny": False, "model.path": warm_model, "sft.enabled": False, **changes})


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def trainable(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(trainer.learner.state.params)]


def overlong_penalty_by_hand(lengths, max_len, buffer):
    """DAPO's soft overlong punishment: 0 up to max_len - buffer tokens, then falling linearly to -1 at max_len."""
    return [min(0.0, -(n - (max_len - buffer)) / buffer) for n in lengths]


@pytest.mark.parametrize("algorithm", ["grpo", "drgrpo", "dapo"])
def test_three_steps_of_each_algorithm(tmp_path, warm_model, algorithm, monkeypatch):
    """Three real steps. Every update has a policy gradient (rewards differ within groups). Under DAPO the first
    generation batch of every step is made uninformative (its raw rewards equal), so each step needs a second
    one, drops groups, selects and merges rollouts with image features, and trains on them; the overlong
    shaping is the formula's, on the rows' real lengths."""
    changes = {"rl.algorithm": algorithm}
    if algorithm == "dapo":
        changes["rl.overlong_buffer"] = 9  # shaping over the last 9 of the 12 new tokens: most answers reach it
    trainer = make_trainer(rl_config(tmp_path, warm_model, **changes))
    graded = []
    if algorithm == "dapo":
        real = trainer.generate_and_grade

        def first_batch_uninformative(prompts, rng, timings):
            rollouts = real(prompts, rng, timings)
            first_of_step = not graded or graded[-1][0] != trainer.step
            graded.append((trainer.step, rollouts.lengths, rollouts.rewards - rollouts.scores))
            if first_of_step:
                rollouts.scores = np.zeros_like(rollouts.scores)
            return rollouts

        monkeypatch.setattr(trainer, "generate_and_grade", first_batch_uninformative)
    before = trainable(trainer)
    trainer.run()
    rows = [r for r in read_metrics(tmp_path) if "reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert np.isfinite(r["update/loss"]) and r["update/optimizer_steps"] == 2
        assert abs(sum(v for k, v in r.items() if k.startswith("share/")) - 1) < 1e-6
        assert r["time/generate"] > 0 and r["time/update"] > 0
        assert r["reward_std"] > 0 and r["update/grad_norm"] > 1e-3, r
    if algorithm == "dapo":
        for r in rows:
            assert r["dapo/generation_batches"] >= 2 and r["dapo/dropped_groups"] >= 4, r
        lengths = np.concatenate([lengths for _, lengths, _ in graded])
        shaping = np.concatenate([shaping for _, _, shaping in graded])
        np.testing.assert_allclose(shaping, overlong_penalty_by_hand(lengths, 12, 9), atol=1e-6)
        assert shaping.min() < 0
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 3
    moved = max(np.abs(a - b).max() for a, b in zip(before, trainable(trainer)))
    # Weight decay alone (lr 3e-5 x 0.01 x |w| per optimizer step) would move weights by far less than Adam's steps.
    assert moved > 0.5 * trainer.rl_config.learning_rate, moved


STEP_METRICS = ("reward_mean", "reward_std", "response_length", "share/specific", "share/less specific",
                "share/generic", "share/wrong", "update/loss", "update/grad_norm")


def assert_same_steps(rows, expected, steps):
    by_step = {r["step"]: r for r in rows if "reward_mean" in r}
    assert sorted(by_step) == list(steps), sorted(by_step)
    for key in STEP_METRICS:
        got = [by_step[s][key] for s in steps]
        want = [r[key] for r in expected if r["step"] in steps]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=key)


def test_resume_repeats_the_straight_run_step_for_step(tmp_path, warm_model):
    """With label noise on, a run stopped after step 2 and resumed, in its folder or from its checkpoints into a
    new folder, repeats every step of the straight run: the same prompts (data iterator), samples (RNG), noisy
    verdicts (noise RNG), rewards and updates, and ends with the same parameters."""
    noisy = {"reward.noise": 0.3, "steps": 4}
    straight = make_trainer(rl_config(tmp_path / "straight", warm_model, **noisy))
    straight.run()
    expected = [r for r in read_metrics(tmp_path / "straight") if "reward_mean" in r]
    make_trainer(rl_config(tmp_path / "split", warm_model, **{**noisy, "steps": 2})).run()
    elsewhere = make_trainer(rl_config(tmp_path / "elsewhere", warm_model, resume=str(tmp_path / "split" / "checkpoints"),
                                  **noisy))
    elsewhere.run()
    resumed = make_trainer(rl_config(tmp_path / "split", warm_model, **noisy))
    resumed.run()
    assert resumed.step == elsewhere.step == 4
    assert_same_steps(read_metrics(tmp_path / "split"), expected, [1, 2, 3, 4])
    assert_same_steps(read_metrics(tmp_path / "elsewhere"), expected, [3, 4])
    for a, b, c in zip(trainable(straight), trainable(resumed), trainable(elsewhere)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)

    # resume="" starts over in a folder that has checkpoints: its step 1 is the straight run's step 1, and the
    # earlier attempt's checkpoints and metrics are set aside, not deleted.
    again = make_trainer(rl_config(tmp_path / "split", warm_model, resume="", **{**noisy, "steps": 1}))
    again.run()
    assert again.step == 1 and Checkpointer(tmp_path / "split" / "checkpoints").all_steps() == [1]
    assert_same_steps(read_metrics(tmp_path / "split"), expected, [1])
    (earlier,) = (tmp_path / "split" / "earlier").iterdir()
    assert Checkpointer(earlier / "checkpoints").all_steps() == [2, 4]
    assert_same_steps(read_metrics(earlier), expected, [1, 2, 3, 4])

    # A checkpoint written by two processes is refused by one, naming both counts.
    meta_file = tmp_path / "elsewhere" / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["data"] = meta["data"] * 2
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="was written by a run of 2 processes; resume it with the same number "
                                         r"\(this run has 1\)"):
        make_trainer(rl_config(tmp_path / "elsewhere", warm_model, **{**noisy, "steps": 5})).run()


def test_a_killed_save_leaves_the_previous_checkpoint_usable(tmp_path, warm_model):
    """A process dies while orbax finalises step 2: step 1 must stay the latest, complete checkpoint."""
    run_dir = tmp_path / "killed"
    config = rl_config(run_dir, warm_model, steps=2, checkpoint_every=1)
    config_file = tmp_path / "config.json"
    config_file.write_text(config.to_json())
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {REPO!r})
        from absl import flags
        flags.FLAGS.mark_as_parsed()
        from ml_collections import ConfigDict
        from orbax.checkpoint._src.path import async_path
        from speciarl_jax.trainer import Trainer

        real_rename = async_path.rename

        async def dying_rename(src, dst):
            if str(dst).rstrip("/").endswith("checkpoints/2"):
                os._exit(17)  # killed after step 2's data is written, before the rename that commits it
            return await real_rename(src, dst)

        async_path.rename = dying_rename
        Trainer(ConfigDict(json.loads(open({str(config_file)!r}).read()))).run()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode == 17, result.stderr[-3000:]
    checkpointer = Checkpointer(run_dir / "checkpoints")
    assert checkpointer.all_steps() == [1]
    resumed = make_trainer(rl_config(run_dir, warm_model, steps=2, checkpoint_every=1))
    resumed.run()
    assert resumed.step == 2 and Checkpointer(run_dir / "checkpoints").latest_step() == 2


def parameter_gap(start, a, b):
    """(gap, moved): the L2 distance between two runs' parameters, and how far run a moved from the start."""
    norm = lambda xs, ys: float(np.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(xs, ys))))  # noqa: E731
    return norm(a, b), norm(a, start)


def assert_same_training(rows, expected, start, params, expected_params, *, rtol, gap_share):
    """Per-step rollouts and verdicts equal, per-step loss and gradient norm close, and the final
    parameters apart by less than gap_share of how far the expected run moved them."""
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for key in ("reward_mean", "response_length", "share/specific", "share/generic", "share/wrong"):
        assert [r[key] for r in rows] == [r[key] for r in expected], key  # same rollouts, same verdicts
    for key in ("update/loss", "update/grad_norm"):  # to rtol of each value, or of the run's largest (near 0)
        want = np.array([r[key] for r in expected])
        np.testing.assert_allclose([r[key] for r in rows], want, rtol=rtol, atol=rtol * np.abs(want).max(),
                                   err_msg=key)
    gap, moved = parameter_gap(start, expected_params, params)
    assert moved > 0 and gap <= gap_share * moved, (gap, moved)
    return gap / moved


def test_eight_devices_match_one(tmp_path, warm_model):
    one = Trainer(rl_config(tmp_path / "one", warm_model, steps=2), devices=jax.devices()[:1])
    start = trainable(one)
    one.run()
    eight = Trainer(rl_config(tmp_path / "eight", warm_model, steps=2, **{"mesh.fsdp": 4, "mesh.tensor": 2}))
    assert eight.mesh.devices.size == 8
    eight.run()
    m1 = [r for r in read_metrics(tmp_path / "one") if "reward_mean" in r]
    m8 = [r for r in read_metrics(tmp_path / "eight") if "reward_mean" in r]
    share = assert_same_training(m8, m1, start, trainable(eight), trainable(one), rtol=1e-3, gap_share=1e-3)
    print(f"8 devices vs 1: parameter gap {share:.2e} of the distance moved")


def test_config_errors_fail_before_anything_compiles(tmp_path):
    with pytest.raises(ValueError, match="mini_batch_size 7 does not divide"):
        Trainer(small_config(tmp_path, **{"rl.mini_batch_size": 7}))
    with pytest.raises(ValueError, match=r"reward.kind"):
        Trainer(small_config(tmp_path, **{"reward.kind": "magic"}))
    with pytest.raises(ValueError, match="overlong_buffer 512 must be below"):
        Trainer(small_config(tmp_path, **{"rl.algorithm": "dapo"}))
    with pytest.raises(ValueError, match="model.path is empty"):
        Trainer(small_config(tmp_path, **{"model.tiny": False}))
    # The ablation trap: fewer images than one batch makes a run of 0 steps, refused before anything runs.
    with pytest.raises(ValueError, match="training would run 0 steps: 15 epochs of 0 batches"):
        Trainer(small_config(tmp_path, steps=0, **{"data.source.num_images": 3}))
    with pytest.raises(ValueError, match="generation_batch_size 8 differs"):
        Trainer(small_config(tmp_path, **{"data.generation_batch_size": 8}))


def test_the_command_says_what_it_will_do_and_names_a_bad_setting(tmp_path):
    """The first line of `python -m speciarl_jax.train` says what the run will do; a missing model folder or an
    impossible batch size ends it with the message alone (exit code 2)."""
    from speciarl_jax.train import describe

    assert describe(demo_config()) == (
        "Run 'demo' in runs/demo: a tiny random Qwen2.5-VL, SFT for 1500 steps, then GRPO with the speciarl reward "
        "for 60 steps of 16 prompts x 8 rollouts, graded by the rule verifier. About 7 minutes on 2 CPU cores; it "
        "ends with a before/after table of held-out answers.")
    for setting, message in (("--config.model.path=/no/such/folder", "No config.json at /no/such/folder"),
                             ("--config.rl.mini_batch_size=7", "rl.mini_batch_size 7 does not divide the 128")):
        done = subprocess.run([sys.executable, "-m", "speciarl_jax.train", "--config.model.tiny=False", setting,
                               f"--config.run_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "XLA_FLAGS": ""})
        assert done.stdout.startswith("Run 'demo' in "), done.stdout
        assert done.returncode == 2 and "error: " in done.stderr and message in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_before_after_table():
    before = {"eval/share/specific": 0.1, "eval/correctness": 0.9, "eval/specificity": 0.1, "eval/hm": 0.18,
              "eval/score": 0.3}
    after = {"eval/share/specific": 0.4, "eval/correctness": 0.88, "eval/specificity": 0.45, "eval/hm": 0.6,
             "eval/score": 0.5}
    table = before_after_table(before, after)
    assert "| share/specific | 0.100 | 0.400 | +0.300 |" in table
    assert "| correctness | 0.900 | 0.880 | -0.020 |" in table


def test_dynamic_sampling_filters_on_raw_rewards_and_counts_generation_batches(tmp_path, warm_model, monkeypatch):
    """DAPO with 8-prompt generation batches for 4-group updates over 24 images and one epoch: three generation
    batches in all (as verl counts epochs). Groups are kept on their raw reward: a group whose raw rewards agree
    is dropped even when the overlong shaping makes its rewards differ. An update that needs two generation
    batches merges them; the next one finds the data used up."""
    from speciarl_jax.rl.rollouts import Rollouts, merge_rollouts
    from speciarl_jax.trainer import DataUsedUp

    config = rl_config(tmp_path, warm_model, steps=0, epochs=1, **{
        "rl.algorithm": "dapo", "rl.overlong_buffer": 4, "data.generation_batch_size": 8,
        "data.source.num_images": 24})
    trainer = make_trainer(config)
    assert trainer.generation_budget == trainer.total_steps == 3
    trainer.data_iter = trainer.pipeline.iterator()
    samples = config.rollout.num_samples

    def fake_rollouts(prompts, rng, timings):  # groups 1 and 5 have differing raw rewards; all differ once shaped
        groups = len(prompts.labels)
        scores = np.zeros((groups, samples), np.float32)
        scores[[1, 5], 0] = 1.0
        rewards = scores + np.linspace(-0.5, 0, samples)[None]
        rows = groups * samples
        return Rollouts(prompts, np.zeros((rows, 3), np.int32), np.ones((rows, 3), np.int32), np.full(rows, 3),
                        None, ["t"] * rows, ["wrong"] * rows, rewards.reshape(-1), np.repeat(np.arange(groups), samples),
                        scores.reshape(-1))

    monkeypatch.setattr(trainer, "generate_and_grade", fake_rollouts)
    pieces, extra = trainer.collect(jax.random.key(0), {})
    assert extra == {"dapo/generation_batches": 2, "dapo/dropped_groups": 12, "dapo/generated_groups": 16}
    first = trainer.pipeline.iterator()
    ids = [next(first).sample_ids for _ in range(2)]
    merged = merge_rollouts(pieces, trainer.processor.pad_token_id, trainer.model.config.image_token_id)
    assert merged.prompts.sample_ids == [ids[0][1], ids[0][5], ids[1][1], ids[1][5]]
    np.testing.assert_array_equal(merged.group_ids, np.repeat(np.arange(4), samples))
    np.testing.assert_array_equal(merged.scores.reshape(4, samples)[:, 0], 1.0)
    assert trainer.generation_batches == 2
    with pytest.raises(DataUsedUp):  # one batch is left: two informative groups, then nothing to draw
        trainer.collect(jax.random.key(1), {})
    assert trainer.generation_batches == 3


def test_selected_and_merged_rollouts_with_images_match_a_full_forward(tmp_path, warm_model):
    """Two real generation batches with images; groups picked from each (select_groups), the second re-padded
    wider on the left and both merged (merge_rollouts), as dynamic sampling does. Every row's log-probabilities
    in the update's batch equal a plain forward of that row's own prompt, image (encoded again from its pixels)
    and response."""
    from speciarl_jax.rl.batch import make_rollout_batch
    from speciarl_jax.rl.rollouts import merge_rollouts, select_groups

    trainer = make_trainer(rl_config(tmp_path, warm_model))
    trainer.data_iter = trainer.pipeline.iterator()
    pad, image_token, samples = trainer.processor.pad_token_id, trainer.model.config.image_token_id, 4
    timings = collections.defaultdict(float)
    first, second = (trainer.generate_and_grade(trainer.next_prompts(), jax.random.key(i), timings) for i in (0, 1))
    wider = dataclasses.replace(second.prompts, input_ids=np.pad(second.prompts.input_ids, ((0, 0), (3, 0)),
                                                                 constant_values=pad),
                                attention_mask=np.pad(second.prompts.attention_mask, ((0, 0), (3, 0))))
    second = dataclasses.replace(second, prompts=wider)
    picks = [(first, [2, 0]), (second, [3, 1])]
    merged = merge_rollouts([select_groups(b, g, samples, image_token) for b, g in picks], pad, image_token)
    assert merged.prompts.input_ids.shape[1] == first.prompts.input_ids.shape[1] + 3
    np.testing.assert_array_equal(merged.group_ids, np.repeat(np.arange(4), samples))
    batch = make_rollout_batch(trainer.model.config, merged.prompts.model_inputs(), merged.tokens,
                               merged.response_mask, np.zeros(len(merged.lengths)), num_samples=samples,
                               image_features=merged.image_features, pad_token_id=pad)
    got = np.asarray(trainer.learner.rollout_logprobs(trainer.learner.place(batch)))

    # The oracle: each row's prompt without padding, its response, and its image's pixels, in one plain forward
    # (rows right-padded to a common width: later columns cannot change the earlier columns' logits).
    rows = [(source, g, g * samples + s) for source, groups in picks for g in groups for s in range(samples)]
    prompts = [source.prompts.select([g]) for source, g, _ in rows]
    live = [p.input_ids[0][p.attention_mask[0].astype(bool)] for p in prompts]
    assert len({len(ids) for ids in live}) == 1  # the synthetic prompts all have the same length
    width = merged.tokens.shape[1]
    ids = np.stack([np.concatenate([ids, np.where(source.response_mask[r] > 0, source.tokens[r], pad)])
                    for ids, (source, _, r) in zip(live, rows)])
    logits = trainer.model(ids, pixel_values=np.concatenate([p.pixel_values for p in prompts]),
                           image_grid_thw=np.concatenate([p.image_grid_thw for p in prompts])).logits
    logp = np.asarray(jax.nn.log_softmax(logits[:, -width - 1:-1]))
    expected = np.take_along_axis(logp, ids[:, -width:, None], -1)[..., 0]
    for row, (source, _, r) in enumerate(rows):
        n = int(source.lengths[r])
        assert merged.lengths[row] == n and merged.texts[row] == source.texts[r]
        np.testing.assert_array_equal(merged.tokens[row, :n], source.tokens[r, :n])
        np.testing.assert_allclose(got[row, :n], expected[row, :n], atol=2e-4, err_msg=f"row {row}")
    assert len(rows) == 16


def image_manifest(folder, bad: dict[str, bytes], count=6):
    """A manifest of `count` good synthetic-world JPEGs plus one row per `bad` file (name -> its bytes)."""
    from speciarl_jax.data.synthetic import SyntheticSource, SyntheticWorld

    folder.mkdir(parents=True, exist_ok=True)
    source = SyntheticSource(SyntheticWorld(seed=0, image_size=(56, 56)), split="train", num_images=count)
    rows = []
    for i in range(count):
        Image.fromarray(source[i].image).save(folder / f"{i}.jpg")
        rows.append({"image": f"{i}.jpg", "label": source[i].label})
    for name, data in bad.items():
        (folder / name).write_bytes(data)
        rows.append({"image": name, "label": "plain circle"})
    path = folder / "images.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_a_manifest_from_the_command_line_and_its_bad_images_named_before_anything_loads(tmp_path):
    """`--config=configs/manifest.py:<train>,<held out>` needs no config file of one's own; every bad image of
    both sets is named at once, with exit code 2 and no traceback, before a weight is loaded."""
    import io

    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(jpeg, "JPEG")
    train = image_manifest(tmp_path / "train", {"cut.jpg": jpeg.getvalue()[:300], "noise.jpg": b"not an image"})
    held_out = image_manifest(tmp_path / "test", {}, count=3)
    done = subprocess.run([sys.executable, "-m", "speciarl_jax.train", f"--config=configs/manifest.py:{train},{held_out}",
                           "--config.model.tiny=True", f"--config.run_dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "XLA_FLAGS": ""})
    assert done.stdout.startswith("Run 'manifest' in "), done.stdout
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "2 of 8 examples of data set 'images' cannot be used" in done.stderr, done.stderr[-3000:]
    assert "images/cut.jpg: cannot" in done.stderr and "images/noise.jpg: cannot" in done.stderr, done.stderr[-3000:]
    assert 'set data.on_bad_example to "skip"' in done.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    with pytest.raises(ValueError, match="needs the training manifest"):
        from speciarl_jax.configs.manifest import get_config

        get_config("")


def test_bad_images_skipped_when_asked_are_counted(tmp_path, caplog):
    """With data.on_bad_example "skip" the check names how many examples the run leaves out, and goes on."""
    from speciarl_jax.data import source_from_config
    from speciarl_jax.processing import Processor
    from speciarl_jax.tiny_model import make_tiny_checkpoint
    from speciarl_jax.training_config import check_examples

    path = image_manifest(tmp_path / "data", {"noise.jpg": b"not an image"})
    config = small_config(tmp_path / "run", **{"data.source": {"kind": "manifest", "path": str(path)},
                                               "data.on_bad_example": "skip"})
    model = make_tiny_checkpoint(tmp_path / "model")
    processor = Processor.from_pretrained(model, image_size=(56, 56))
    source = source_from_config(config.data.source.to_dict())
    with caplog.at_level("WARNING"):
        check_examples(config, processor, source)
    assert "1 of 7 examples of data.source cannot be used and will be skipped" in caplog.text
    assert "images/noise.jpg" in caplog.text
    config.data.on_bad_example = "raise"
    with pytest.raises(ValueError, match="1 of 7 examples"):
        check_examples(config, processor, source)
    config.data.check_images = False
    check_examples(config, processor, source)  # no check, no error


def test_a_size_spelled_as_zero_is_refused_with_the_convention():
    """Derived settings are unset (None); a 0 (the old spelling) names the setting instead of changing meaning."""
    from speciarl_jax.training_config import ConfigError, validate

    config = demo_config()
    config.update_from_flattened_dict({"data.min_pixels": 0, "data.image_size": (0, 0), "eval.num_examples": 0})
    with pytest.raises(ConfigError) as err:
        validate(config)
    for key in ("data.min_pixels 0", "data.image_size (0, 0)", "eval.num_examples 0"):
        assert f"{key}: not a size; leave it unset (None)" in str(err.value)
    validate(demo_config())  # the shipped config passes


def test_evaluation_by_subset_and_best_of_n_from_the_verdicts_it_got(tmp_path, warm_model):
    """Trainer.evaluate's subset reports and Best-of-N, recomputed by hand from every verdict the verifier gave."""
    from speciarl_jax.rewards import categories as cat

    config = rl_config(tmp_path, warm_model, **{"eval.enabled": True, "eval.source.num_images": 12,
                                                 "eval.batch_size": 8})
    trainer = make_trainer(config)
    asked = []
    real = trainer.grade
    trainer.grade = lambda pairs, groups: asked.append((pairs, real(pairs, groups))) or asked[-1][1]
    subset = lambda label: "circles" if label.endswith("circle") else "others"  # noqa: E731
    rank = [cat.SPECIFIC, cat.MORE_SPECIFIC, cat.LESS_SPECIFIC, cat.GENERIC, cat.ABSTAIN, cat.WRONG,
            cat.PARSE_FAILURE]

    for best_of in (1, 4):
        asked.clear()
        report = trainer.evaluate("e/", subsets=subset, best_of=best_of)
        pairs = [p for ps, _ in asked for p in ps]
        verdicts = [v for _, vs in asked for v in vs]
        assert len(pairs) == 16 * best_of  # two batches of 8 (the last padded), best_of answers each
        per_image = [(pairs[i * best_of][0], min(verdicts[i * best_of:(i + 1) * best_of], key=rank.index))
                     for i in range(12)]  # the 4 padding copies come last and are not counted
        for name in ("circles", "others"):
            mine = [c for label, c in per_image if subset(label) == name]
            assert report[f"e/{name}/images"] == len(mine) > 0
            assert report[f"e/{name}/share/specific"] == pytest.approx(mine.count(cat.SPECIFIC) / len(mine))
            assert report[f"e/{name}/share/wrong"] == pytest.approx(mine.count(cat.WRONG) / len(mine))
        assert report["e/share/less specific"] == pytest.approx(
            sum(c == cat.LESS_SPECIFIC for _, c in per_image) / 12)
