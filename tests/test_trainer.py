"""The training loop end to end on the tiny model: each algorithm, resume, interrupted saves, sharding."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs.demo import get_config as demo_config
from speciarl_jax.checkpoint import Checkpointer
from speciarl_jax.trainer import Trainer, before_after_table

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


def rl_config(run_dir, warm_model, **changes):
    return small_config(run_dir, **{"model.tiny": False, "model.path": warm_model, "sft.enabled": False, **changes})


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def trainable(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(trainer.learner.state.params)]


@pytest.mark.parametrize("algorithm", ["grpo", "drgrpo", "dapo"])
def test_three_steps_of_each_algorithm(tmp_path, warm_model, algorithm):
    changes = {"rl.algorithm": algorithm}
    if algorithm == "dapo":
        changes["rl.overlong_buffer"] = 4  # shaping over the last 4 of the 12 new tokens
    trainer = Trainer(rl_config(tmp_path, warm_model, **changes))
    before = trainable(trainer)
    trainer.run()
    rows = [r for r in read_metrics(tmp_path) if "reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert np.isfinite(r["update/loss"]) and r["update/optimizer_steps"] == 2
        assert abs(sum(v for k, v in r.items() if k.startswith("share/")) - 1) < 1e-6
        assert r["time/generate"] > 0 and r["time/update"] > 0
    if algorithm == "dapo":
        assert all(r["dapo/generation_batches"] >= 1 for r in rows)
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 3
    assert any(np.abs(a - b).max() > 0 for a, b in zip(before, trainable(trainer))), "the update changed nothing"


def test_resume_reaches_the_same_parameters(tmp_path, warm_model):
    straight = Trainer(rl_config(tmp_path / "straight", warm_model, steps=4))
    straight.run()
    first = Trainer(rl_config(tmp_path / "split", warm_model, steps=2))
    first.run()
    resumed = Trainer(rl_config(tmp_path / "split", warm_model, steps=4))
    resumed.run()
    assert resumed.step == 4
    for a, b in zip(trainable(straight), trainable(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in read_metrics(tmp_path / "split") if "reward_mean" in r]
    assert steps == [1, 2, 3, 4]


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
    resumed = Trainer(rl_config(run_dir, warm_model, steps=2, checkpoint_every=1))
    resumed.run()
    assert resumed.step == 2 and Checkpointer(run_dir / "checkpoints").latest_step() == 2


def test_eight_devices_match_one(tmp_path, warm_model):
    one = Trainer(rl_config(tmp_path / "one", warm_model, steps=2), devices=jax.devices()[:1])
    one.run()
    eight = Trainer(rl_config(tmp_path / "eight", warm_model, steps=2, **{"mesh.fsdp": 4, "mesh.tensor": 2}))
    assert eight.mesh.devices.size == 8
    eight.run()
    m1 = [r for r in read_metrics(tmp_path / "one") if "reward_mean" in r]
    m8 = [r for r in read_metrics(tmp_path / "eight") if "reward_mean" in r]
    assert [r["reward_mean"] for r in m1] == [r["reward_mean"] for r in m8]  # same rollouts, same verdicts
    # The first update starts from identical weights: its numbers agree to rounding.
    for key in ("update/loss", "update/grad_norm", "update/clip_fraction"):
        np.testing.assert_allclose(m8[0][key], m1[0][key], rtol=1e-3, atol=1e-6, err_msg=key)
    # Adam turns rounding differences of near-zero gradients into steps of up to the learning rate, so after
    # it the runs drift apart slightly: later gradient norms agree to 2% or to 5% of the first step's (when the
    # second batch's gradient is near zero, the relative drift is larger), parameters to learning rate x steps.
    np.testing.assert_allclose(m8[1]["update/grad_norm"], m1[1]["update/grad_norm"], rtol=2e-2,
                               atol=0.05 * m1[0]["update/grad_norm"])
    bound = 2 * one.rl_config.learning_rate * int(one.learner.state.step)
    for a, b in zip(trainable(one), trainable(eight)):
        assert np.abs(a - b).max() <= bound


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
    from speciarl_jax.trainer import DataUsedUp, Rollouts, merge_rollouts

    config = rl_config(tmp_path, warm_model, steps=0, epochs=1, **{
        "rl.algorithm": "dapo", "rl.overlong_buffer": 4, "data.generation_batch_size": 8,
        "data.source.num_images": 24})
    trainer = Trainer(config)
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
