"""Evaluating a training run uses the settings it was trained with (speciarl_jax.run_settings)."""

import json
import os

import pytest

from speciarl_jax import evaluate, reports, run_settings
from speciarl_jax.rewards import categories as cat


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, warm_model):
    """One RL step from the SFT'd tiny policy, with the trainer's own final evaluation on 16 held-out images.
    Prompt ("brief"), system turn ("Name shapes.") and world (variation 0) all differ from evaluate's defaults."""
    from test_trainer import make_trainer, rl_config

    run_dir = tmp_path_factory.mktemp("trained") / "demo"
    config = rl_config(run_dir, warm_model, steps=1,
                       **{"eval.enabled": True, "eval.source.num_images": 16, "eval.batch_size": 16})
    result = make_trainer(config).run()
    return run_dir, result["eval_after"]


def test_the_documented_command_matches_the_trainers_evaluation(trained_run):
    """`python -m speciarl_jax.evaluate --run=<run>`: the run's prompt, system turn and world by default, and the
    trainer's own categories on the same images."""
    from speciarl_jax.configs import eval_run

    run_dir, trainer_eval = trained_run
    config = evaluate.command_config(eval_run.get_config(), run=str(run_dir))
    rows = evaluate.evaluate(config)
    (row,) = rows
    assert (row["model"], row["dataset"], row["n"]) == ("demo step 1", "synthetic", 16)
    for category in (cat.SPECIFIC, cat.MORE_SPECIFIC, cat.LESS_SPECIFIC, cat.GENERIC, cat.ABSTAIN,
                     cat.WRONG, cat.PARSE_FAILURE):
        assert row[f"share/{category}"] == pytest.approx(trainer_eval[f"eval/share/{category}"], abs=1e-9), category
    assert row["share/parse failure"] < 0.5, "the SFT'd policy should answer in the format it was taught"
    out = run_dir / "eval" / "step_1"
    saved = json.loads((out / "run.json").read_text())
    taken = saved["training_run"]["taken_from_training"]
    assert (taken["prompt"], taken["system_prompt"]) == ("brief", "Name shapes.")
    assert taken["datasets.synthetic"]["variation"] == 0.0 and taken["verifier.kind"] == "rule"
    assert saved["training_run"]["changed_from_training"] == {}
    assert saved["fingerprint"]["prompt"] == "brief" and saved["datasets"]["synthetic"]["variation"] == 0.0


def test_changes_from_training_are_stated(trained_run, capsys):
    """A prompt study: the override is kept, printed, written, and labels the evaluation and its folder."""
    from speciarl_jax.configs import eval_run

    run_dir, _ = trained_run
    config = eval_run.get_config(str(run_dir / "checkpoints" / "1"))
    config.prompt = "specific"
    resolved, resolution = run_settings.resolve(config)
    assert resolved.prompt == "specific" and resolved.system_prompt == "Name shapes."
    assert resolution.changed == {"prompt": {"evaluated": "specific", "trained": "brief"}}
    assert resolved.model.name == "demo step 1 (prompt=specific)"
    assert resolved.output_dir == os.path.join(run_dir, "eval", "step_1+prompt=specific")
    assert "prompt = 'specific' (trained with 'brief')" in resolution.describe()

    # The synthetic evaluation config given the run: the world and question come from the run as well; a world
    # setting given explicitly is a change.
    from speciarl_jax.configs import eval_synthetic

    config = eval_synthetic.get_config(str(run_dir))
    config.datasets.synthetic_family.variation = 1.0
    resolved, resolution = run_settings.resolve(config)
    assert resolved.model.adapter == os.path.join(run_dir, "checkpoints", "1")
    assert resolved.decoding.max_new_tokens == 12 and tuple(resolved.image.image_size) == (56, 56)
    assert resolved.datasets.synthetic.variation == 0.0 and resolved.datasets.synthetic.image_size == (56, 56)
    assert resolution.changed == {"datasets.synthetic_family.variation": {"evaluated": 1.0, "trained": 0.0}}

    # The run folder given as the model folder is read as its latest checkpoint; "0" image settings mean none, as
    # in a training config; Best-of-N goes to a folder of its own, with about the run's rows per batch.
    config = eval_run.get_config()
    config.model.path = str(run_dir)
    config.image.min_pixels, config.image.image_size = 0, (56, 56)
    config.decoding.mode, config.decoding.n = "best_of_n", 4
    resolved, resolution = run_settings.resolve(config)
    assert (resolved.model.path, resolved.model.adapter) == ("", os.path.join(run_dir, "checkpoints", "1"))
    assert resolution.changed == {} and resolved.decoding.batch_size == 16 // 4
    assert resolved.output_dir == os.path.join(run_dir, "eval", "step_1+best_of_4")


def test_what_a_path_names_and_bad_paths(trained_run, warm_model, tmp_path):
    run_dir, _ = trained_run
    found = run_settings.find(str(run_dir))
    assert (found.step, found.label, found.stage, found.config["data"]["prompt"]) == (1, "demo step 1", "step_1",
                                                                                       "brief")
    sft = run_settings.find(warm_model)  # the SFT-only run the RL run started from
    assert sft.checkpoint is None and sft.model_path == warm_model and sft.stage == "sft_model"
    assert sft.label.endswith("after SFT")
    assert run_settings.find(str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="not a training run"):
        config = evaluate.default_config()
        config.run = str(tmp_path)
        run_settings.resolve(config)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate.command_config(evaluate.default_config())
    config = evaluate.default_config()
    config.run, config.model.path = str(run_dir), "/models/x"
    with pytest.raises(ValueError, match="leave config.model.path"):
        run_settings.resolve(config)


def test_reports_label_each_evaluation(tmp_path):
    for name in ("general", "specific"):
        folder = tmp_path / name
        folder.mkdir()
        row = {"model": "demo step 60", "selection": "greedy", "dataset": "synthetic", "n": 10, "correctness": 0.5}
        (folder / "metrics.json").write_text(json.dumps({"rows": [row]}))
    rows = reports.load_runs([str(tmp_path / "general"), str(tmp_path / "specific")], [None, None])
    assert [r["model"] for r in rows] == ["demo step 60 [general]", "demo step 60 [specific]"]
    rows = reports.load_runs([str(tmp_path / "general"), str(tmp_path / "specific")], ["a", None])
    assert [r["model"] for r in rows] == ["a", "demo step 60"]
