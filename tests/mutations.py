"""Deliberate breaks of the code, each with the tests that must catch it (a test that cannot fail is a defect).

    .venv/bin/python tests/mutations.py                 # every break, about 12 minutes on 2 cores
    .venv/bin/python tests/mutations.py "resume" "NaN"  # the breaks whose names contain these words

Each break replaces one line (or a test's setting), runs the named tests, and puts the file back whatever
happens; "caught" means the tests failed. Not collected by pytest (no test_ prefix): run it after changing a
test, to see that the test still fails when the code is wrong.
"""
import subprocess, sys, time, pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
T = "tests/test_trainer.py::"
BREAKS = [
    ("1 eight devices: 8-device run's learning rate 5% higher (a scale bug under sharding)", "tests/test_trainer.py",
     'eight = Trainer(rl_config(tmp_path / "eight", warm_model, steps=2, **{"mesh.fsdp": 4, "mesh.tensor": 2}))',
     'eight = Trainer(rl_config(tmp_path / "eight", warm_model, steps=2, **{"mesh.fsdp": 4, "mesh.tensor": 2, "rl.learning_rate": 1.05e-4}))',
     [T + "test_eight_devices_match_one"]),
    ("1 two processes: the pair's learning rate 5% higher (a scale bug across processes)", "tests/test_multiprocess.py",
     'return small_config(run_dir, steps=steps, checkpoint_every=1, **{"mesh.fsdp": 2, "sft.steps": 30})',
     'return small_config(run_dir, steps=steps, checkpoint_every=1, **{"mesh.fsdp": 2, "sft.steps": 30, "rl.learning_rate": 1.05e-4 if run_dir.name == "two" else 1e-4})',
     ["tests/test_multiprocess.py"]),
    ("2 zero advantages", "speciarl_jax/trainer.py",
     "advantages = group_advantages(rollouts.rewards, rollouts.group_ids, self.rl_config.normalize_std)",
     "advantages = 0 * group_advantages(rollouts.rewards, rollouts.group_ids, self.rl_config.normalize_std)",
     [T + "test_three_steps_of_each_algorithm"]),
    ("2 dynamic sampling filters on the shaped reward", "speciarl_jax/rl/dapo.py",
     "scores = np.asarray(batch.scores)",
     "scores = np.asarray(batch.rewards)",
     [T + "test_three_steps_of_each_algorithm[dapo]"]),
    ("2 overlong shaping against the wrong length", "speciarl_jax/rl/dapo.py",
     "excess = lengths - (max_len - buffer)", "excess = lengths - (max_len - buffer) + 1",
     [T + "test_three_steps_of_each_algorithm[dapo]"]),
    ("2 select_groups reads the first group's image rows", "speciarl_jax/rl/rollouts.py",
     "np.concatenate([starts[g] + np.arange(counts[g]) for g in groups])",
     "np.concatenate([starts[0] + np.arange(counts[g]) for g in groups])",
     [T + "test_selected_and_merged_rollouts_with_images_match_a_full_forward"]),
    ("2 merge_rollouts does not renumber groups", "speciarl_jax/rl/rollouts.py",
     "np.concatenate([p.group_ids + o for p, o in zip(pieces, offsets)]),",
     "np.concatenate([p.group_ids for p, o in zip(pieces, offsets)]),",
     [T + "test_selected_and_merged_rollouts_with_images_match_a_full_forward"]),
    ("3 a verifier outage is not caught", "speciarl_jax/trainer.py",
     "except VerifierError as err:", "except ZeroDivisionError as err:",
     ["tests/test_stopping.py::test_a_verifier_outage_saves_the_last_finished_step_and_the_rerun_goes_on"]),
    ("3 a NaN loss is not checked", "speciarl_jax/trainer.py",
     "if decision.nonfinite:", "if False:",
     ["tests/test_stopping.py::test_a_nonfinite_loss_stops_without_saving_over_the_last_good_checkpoint"]),
    ("3 resume='' keeps the earlier attempt in place", "speciarl_jax/trainer.py",
     "moved = self.folder.set_aside() if self.is_main else None", "moved = None",
     [T + "test_resume_repeats_the_straight_run_step_for_step"]),
    ("3 another process count is not refused", "speciarl_jax/trainer.py",
     "if states is not None and len(states) != jax.process_count():", "if False:",
     [T + "test_resume_repeats_the_straight_run_step_for_step"]),
    ("4 the noise RNG is not restored", "speciarl_jax/trainer.py",
     'self.noise_rng.bit_generator.state = meta["noise_rng"]', "pass",
     [T + "test_resume_repeats_the_straight_run_step_for_step"]),
    ("5 the entropy bonus with the wrong sign", "speciarl_jax/rl/update.py",
     "loss = loss - config.entropy_coef * entropy_agg", "loss = loss + config.entropy_coef * entropy_agg",
     ["tests/test_rl_update.py::test_combined_loss_equals_numpy_from_a_full_forward"]),
    ("5 the KL term without its coefficient", "speciarl_jax/rl/update.py",
     "loss = loss + config.kl_coef * kl", "loss = loss + kl",
     ["tests/test_rl_update.py::test_combined_loss_equals_numpy_from_a_full_forward"]),
    ("6 remat silently ignored", "speciarl_jax/rl/update.py",
     "model.language_model.remat = config.remat", "model.language_model.remat = False",
     ["tests/test_rl_update.py::test_remat_keeps_gradients_and_holds_one_layer_of_activations"]),
    ("6 SFT targets ignore the levels", "speciarl_jax/sft.py",
     "level = int(self.rng.choice(len(self.levels), p=self.levels / self.levels.sum()))", "level = 0",
     ["tests/test_sft.py"]),
    ("6 SFT mask one token short", "speciarl_jax/sft.py",
     "mask[row, : len(seq)] = 1", "mask[row, : len(seq) - 1] = 1",
     ["tests/test_sft.py"]),
    ("6 evaluation drops the adapter", "speciarl_jax/evaluate.py",
     "self.model = export.load_model(path, config.model.adapter or None,", "self.model = export.load_model(path, None,",
     ["tests/test_evaluate.py::test_tiny_model_on_mock_tfds_and_synthetic_world"]),
    ("6 bootstrap gives a 92% interval", "speciarl_jax/metrics.py",
     "tail = 50.0 * (1.0 - level)", "tail = 50.0 * (1.0 - level) * 1.6",
     ["tests/test_metrics.py::test_bootstrap_matches_resampling_images"]),
    ("6 more specific ranked below specific", "speciarl_jax/rewards/categories.py",
     "    MORE_SPECIFIC: 1,\n    SPECIFIC: 1,", "    MORE_SPECIFIC: 2,\n    SPECIFIC: 1,",
     ["tests/test_rewards.py::test_paper_sized_batch_matches_a_per_group_loop"]),
    ("3 SIGTERM does not save and stop", "speciarl_jax/trainer.py",
     "            if decision.stop:", "            if False:",
     ["tests/test_stopping.py::test_sigterm_saves_the_finished_step_and_time_based_checkpoints"]),
    ("3 a named checkpoint folder is ignored", "speciarl_jax/trainer.py",
     'checkpointer = self.checkpointer if resume == "auto" else Checkpointer(resume)', "checkpointer = self.checkpointer",
     ["tests/test_trainer.py::test_resume_repeats_the_straight_run_step_for_step"]),
    ("4 the data iterator is not restored", "speciarl_jax/trainer.py",
     "self.data_iter = self.pipeline.iterator(self._data_state)", "self.data_iter = self.pipeline.iterator(None)",
     ["tests/test_trainer.py::test_resume_repeats_the_straight_run_step_for_step"]),
    ("19 dynamic sampling keeps the surplus groups of its last batch", "speciarl_jax/rl/dapo.py",
     "chosen = chosen[: groups_wanted - have]", "chosen = chosen",
     ["tests/test_rl_formulas.py::test_dynamic_sampling_fills_the_batch_across_generation_batches"]),
    ("19 an answer that ends at the limit counts as cut", "speciarl_jax/answering.py",
     "truncated = (lengths == decoding.max_new_tokens) & ~ended", "truncated = lengths == decoding.max_new_tokens",
     ["tests/test_answering.py"]),
    ("19 answers paired with labels in the wrong order", "speciarl_jax/answering.py",
     "np.repeat(np.asarray(labels, object), self.num_samples)", "np.tile(np.asarray(labels, object), self.num_samples)",
     ["tests/test_answering.py"]),
    ("19 generated tokens one position too far", "speciarl_jax/models/qwen2_5_vl/rope.py",
     "response = np.asarray(first)[:, None] + np.arange(response_len)[None, :]",
     "response = np.asarray(first)[:, None] + 1 + np.arange(response_len)[None, :]",
     ["tests/test_rl_update.py::test_rollout_logprobs_with_images_match_a_full_forward"]),
    ("19 bad images pass under on_bad_example='raise'", "speciarl_jax/training_config.py",
     'if bad and config.data.get("on_bad_example", "raise") == "raise":', "if False:",
     [T + "test_a_manifest_from_the_command_line_and_its_bad_images_named_before_anything_loads"]),
    ("19 a checkpoint trained after SFT restored onto the base model", "speciarl_jax/checkpoint.py",
     'if config.get("sft", {}).get("enabled"):', "if False:",
     ["tests/test_export.py"]),
    ("layers: the model package imports data", "speciarl_jax/models/qwen2_5_vl/rope.py",
     "from __future__ import annotations\n", "from __future__ import annotations\nfrom ...data import config\n",
     ["tests/test_import_contracts.py"]),
    ("layers: SFT imports the trainer (a cycle)", "speciarl_jax/sft.py",
     "    targets = TargetWriter(levels, taxonomy, think, seed=seed)\n",
     "    from .trainer import Trainer  # noqa: F401\n    targets = TargetWriter(levels, taxonomy, think, seed=seed)\n",
     ["tests/test_import_contracts.py"]),
]


def run(selected):
    for name, path, old, new, tests in BREAKS:
        if selected and not any(s in name for s in selected):
            continue
        file = REPO / path
        text = file.read_text()
        assert text.count(old) == 1, (name, old)
        file.write_text(text.replace(old, new))
        start = time.time()
        try:
            done = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   *tests], cwd=REPO, capture_output=True, text=True, timeout=1200)
        finally:
            file.write_text(text)
        last = [l for l in done.stdout.splitlines() if l.startswith(("FAILED", "ERROR")) or " passed" in l or " failed" in l]
        verdict = "caught" if done.returncode else "MISSED"
        print(f"{verdict:7s} {name} ({time.time() - start:.0f} s): {' / '.join(last[-2:])[:300]}", flush=True)


if __name__ == "__main__":
    run(sys.argv[1:])
