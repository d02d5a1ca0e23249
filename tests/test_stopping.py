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
from tests.test_trainer import read_metrics, rl_config


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
    trainer = Trainer(rl_config(tmp_path, warm_model, steps=5, checkpoint_every=100, checkpoint_every_seconds=1e-6))
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
