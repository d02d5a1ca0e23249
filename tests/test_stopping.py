"""Stop decisions and background checkpoints in one process: SIGTERM saves the finished step, time-based
checkpoints, and an asynchronous save that survives the donation of the arrays it was given."""

import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speciarl_jax.checkpoint import Checkpointer, finished_steps
from speciarl_jax.stopping import StopFlags
from speciarl_jax.trainer import Trainer, TrainingInterrupted
from tests.test_trainer import make_trainer, read_metrics, rl_config


def test_stop_flags_report_what_this_process_saw():
    flags = StopFlags(checkpoint_every_seconds=0.05)
    assert flags.agree(1) == flags.agree(1, nonfinite=False)
    first = flags.agree(1)
    assert not first.stop and not first.nonfinite and not first.checkpoint_due
    assert flags.agree(2, nonfinite=True).nonfinite
    time.sleep(0.06)
    assert flags.agree(3).checkpoint_due
    flags.mark_saved()
    assert not flags.agree(4).checkpoint_due
    flags.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # handled, not fatal
        decision = flags.agree(5)
    finally:
        flags.uninstall()
    assert decision.stop and decision.signal == signal.SIGTERM and decision.who == (0,)
    assert decision.cause() == f"signal {int(signal.SIGTERM)}"
    assert signal.getsignal(signal.SIGTERM) != flags._on_signal  # the previous handler is back
    assert not StopFlags().agree(1).checkpoint_due  # 0 seconds: time-based checkpoints off


def test_sigterm_saves_the_finished_step_and_time_based_checkpoints(tmp_path, warm_model, monkeypatch):
    real_step = Trainer.rl_step

    def rl_step(self):
        if self.step + 1 == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 3 runs
        return real_step(self)

    monkeypatch.setattr(Trainer, "rl_step", rl_step)
    # No step-count checkpoint would fall before step 100; the clock asks for one after every step.
    trainer = make_trainer(rl_config(tmp_path, warm_model, steps=5, checkpoint_every=100, checkpoint_every_seconds=1e-6))
    with pytest.raises(TrainingInterrupted, match=r"Stopped by signal 15 after step 3; step 3 is saved"):
        trainer.run()
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [1, 2, 3]
    assert finished_steps(str(tmp_path / "checkpoints")) == [1, 2, 3]
    assert [r["step"] for r in read_metrics(tmp_path) if "reward_mean" in r] == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) != trainer.stop_flags._on_signal  # the previous handler is back


def test_an_asynchronous_save_keeps_the_values_it_was_given(tmp_path):
    """The learner donates its state to the next step right after a save: the save must not read it later."""
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(4)}
    expected = jax.tree.map(np.asarray, params)
    opt_state = {"mu": jnp.zeros(3)}
    checkpointer = Checkpointer(tmp_path / "ckpt", async_save=True)
    checkpointer.save(7, params=params, opt_state=opt_state, meta={"step": 7})
    like = jax.tree.map(jnp.zeros_like, params)
    for leaf in jax.tree.leaves(params):
        leaf.delete()  # what donation does to the buffers
    checkpointer.wait()
    restored, _, meta = checkpointer.restore(params_like=like, opt_state_like={"mu": jnp.zeros(3)})
    assert meta["step"] == 7
    for key in expected:
        np.testing.assert_array_equal(np.asarray(restored[key]), expected[key])
    checkpointer.close()


def test_a_verifier_outage_saves_the_last_finished_step_and_the_rerun_goes_on(tmp_path, warm_model, monkeypatch):
    """The LLM verifier starts failing during step 2: step 1 is saved, the run stops with the command to resume,
    and once the verifier is back the same command finishes the run."""
    from speciarl_jax.data.synthetic import source_taxonomy
    from speciarl_jax.verifier.server import FaultPlan, LoopbackVerifierServer

    changes = {"verifier.kind": "openai", "verifier.max_retries": 1, "verifier.backoff_initial_s": 0.01,
               "verifier.backoff_max_s": 0.01, "verifier.timeout_s": 5.0}
    config = rl_config(tmp_path, warm_model, steps=3, checkpoint_every=100, **changes)
    real_step = Trainer.rl_step
    with LoopbackVerifierServer(source_taxonomy(config.data.source.to_dict())) as server:
        def rl_step(self):
            if self.step + 1 == 2:  # every request from here on fails
                server.faults = FaultPlan(first=[""] * server.requests + ["500"] * 100_000)
            return real_step(self)

        monkeypatch.setattr(Trainer, "rl_step", rl_step)
        config.verifier.base_url = server.url
        with pytest.raises(TrainingInterrupted, match=r"The verifier failed at step 2: .*; step 1 is saved\. "
                                                      r"resume with: python -m speciarl_jax.train"):
            make_trainer(config).run()
        assert Checkpointer(tmp_path / "checkpoints").all_steps() == [1]
        monkeypatch.setattr(Trainer, "rl_step", real_step)
        server.faults = FaultPlan()
        resumed = make_trainer(config)
        resumed.run()
    assert resumed.step == 3
    assert [r["step"] for r in read_metrics(tmp_path) if "reward_mean" in r] == [1, 2, 3]


def test_a_nonfinite_loss_stops_without_saving_over_the_last_good_checkpoint(tmp_path, warm_model, monkeypatch):
    """Advantages that turn NaN at step 3 make a NaN loss and NaN weights: the run stops naming the step, and
    the checkpoints stay those of steps 1 and 2, finite, step 2 holding the weights step 3 started from."""
    import speciarl_jax.trainer as trainer_module

    real_advantages = trainer_module.group_advantages
    trainer = make_trainer(rl_config(tmp_path, warm_model, steps=4, checkpoint_every=1))
    weights = {}

    def advantages(*args, **kwargs):
        weights[trainer.step] = [np.asarray(x) for x in jax.tree.leaves(trainer.learner.state.params)]
        values = real_advantages(*args, **kwargs)
        return values * np.nan if trainer.step + 1 == 3 else values

    monkeypatch.setattr(trainer_module, "group_advantages", advantages)
    with pytest.raises(TrainingInterrupted, match=r"The loss became nan at step 3; nothing was saved over the last "
                                                  r"good checkpoint"):
        trainer.run()
    assert not all(np.isfinite(x).all() for x in jax.tree.leaves(trainer.learner.state.params))
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    assert checkpointer.all_steps() == [1, 2] and finished_steps(str(tmp_path / "checkpoints")) == [1, 2]
    state = trainer.learner.state
    params, _, meta = checkpointer.restore(params_like=state.params, opt_state_like=state.opt_state)
    assert meta["step"] == 2
    for saved, started in zip(jax.tree.leaves(params), weights[2]):
        np.testing.assert_array_equal(np.asarray(saved), started)
    assert [r["step"] for r in read_metrics(tmp_path) if "reward_mean" in r] == [1, 2]
