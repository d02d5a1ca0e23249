"""Two JAX processes on localhost fail together: a SIGTERM or a verifier outage on one process makes both save
the same step and stop; a killed process makes the other exit with an error naming it; processes that do not
share the run folder refuse to start. Each pair runs the real command line (`speciarl_jax.train`)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from speciarl_jax.checkpoint import Checkpointer
from speciarl_jax.data.synthetic import source_taxonomy
from speciarl_jax.trainer import Trainer
from speciarl_jax.verifier.server import FaultPlan, LoopbackVerifierServer
from tests.test_multiprocess import free_port
from tests.test_trainer import read_metrics, rl_config, trainable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def pair_config(run_dir, warm_model, **changes):
    return rl_config(run_dir, warm_model, steps=STEPS, **{"mesh.fsdp": 2, "heartbeat_timeout_s": 5, **changes})


class Pair:
    """Two processes of `python -m speciarl_jax.train`, each with its own config and an optional action taken
    at the start of an RL step (`hooks[rank] = (step, "SIGTERM" | "SIGKILL")`)."""

    def __init__(self, tmp_path, name, configs, hooks=None):
        port = free_port()
        self.procs, self.started, self.wall_start = [], time.monotonic(), time.time()
        for rank, config in enumerate(configs):
            config_file = tmp_path / f"{name}_config{rank}.json"
            config_file.write_text(config.to_json())
            hook = (hooks or {}).get(rank)
            script = textwrap.dedent(f"""
                import json, os, signal, sys, time
                sys.path.insert(0, {REPO!r})
                from absl import app
                from ml_collections import ConfigDict
                from speciarl_jax import train
                from speciarl_jax.trainer import Trainer

                hook = {hook!r}
                if hook:
                    real_step = Trainer.rl_step

                    def rl_step(self):
                        if self.step + 1 == hook[0]:  # the signal arrives while this step runs
                            print(f"hook: {{hook[1]}} at {{time.time()}}", flush=True)
                            os.kill(os.getpid(), getattr(signal, hook[1]))
                        return real_step(self)

                    Trainer.rl_step = rl_step
                sys.argv = ["train", "--config={REPO}/tests/json_config.py:{config_file}"]
                app.run(train.main)
            """)
            # The pairs inherit the session's compilation cache (tests/conftest.py): later pairs load what the
            # first one compiled.
            env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
                   "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                   "JAX_PROCESS_ID": str(rank)}
            self.procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True))

    def wait(self, timeout=600):
        """[(return code, output, seconds from start to exit)] per process."""
        results = [None, None]
        deadline = time.monotonic() + timeout
        while any(r is None for r in results):
            for rank, proc in enumerate(self.procs):
                if results[rank] is None and proc.poll() is not None:
                    results[rank] = (proc.returncode, proc.stdout.read(), time.monotonic() - self.started)
            if time.monotonic() > deadline:
                for proc in self.procs:
                    proc.kill()
                raise AssertionError(f"the pair did not finish within {timeout} s: {results}")
            time.sleep(0.1)
        return results


@pytest.fixture(scope="module")
def straight(tmp_path_factory, warm_model):
    """The uninterrupted run: one process with the same two devices (equal to two processes: test_multiprocess)."""
    run_dir = tmp_path_factory.mktemp("straight")
    trainer = Trainer(pair_config(run_dir, warm_model), devices=jax.devices()[:2])
    start = [np.asarray(x) for x in jax.tree.leaves(trainer.learner.state.params)]
    trainer.run()
    return trainer, start, [r for r in read_metrics(run_dir) if "reward_mean" in r]


def assert_same_run(run_dir, straight):
    """The resumed run has the straight run's per-step metrics and (nearly) its parameters."""
    trainer, start, metrics = straight
    resumed = [r for r in read_metrics(run_dir) if "reward_mean" in r]
    by_step = {r["step"]: r for r in resumed}  # a step run twice (before a kill, after the resume) counts once
    assert sorted(by_step) == list(range(1, STEPS + 1))
    for key in ("reward_mean", "share/specific", "share/less specific", "response_length"):
        assert [by_step[s][key] for s in range(1, STEPS + 1)] == [r[key] for r in metrics], key
    for s, r in enumerate(metrics, 1):
        np.testing.assert_allclose(by_step[s]["update/loss"], r["update/loss"], rtol=1e-3, atol=1e-6)
    state = trainer.learner.state
    params, _, meta = Checkpointer(run_dir / "checkpoints").restore(params_like=state.params,
                                                                    opt_state_like=state.opt_state)
    assert meta["step"] == STEPS
    moved = max(np.abs(a - b).max() for a, b in zip(trainable(trainer), start))
    gap = max(np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(params), trainable(trainer)))
    assert moved > 0 and gap <= 0.05 * moved, (gap, moved)


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, warm_model, straight):
    run_dir = tmp_path / "run"
    config = pair_config(run_dir, warm_model, checkpoint_every=100)  # only the stop saves before the end
    pair = Pair(tmp_path, "sigterm", [config, config], hooks={1: (2, "SIGTERM")})
    results = pair.wait()
    for code, out, _ in results:
        assert code == 3, out[-3000:]
        assert "Stopped by signal 15 on process(es) [1] after step 2; step 2 is saved" in out, out[-3000:]
    signalled = float(results[1][1].split("hook: SIGTERM at ")[1].split()[0])
    to_exit = [pair.wall_start + end - signalled for _, _, end in results]
    assert max(to_exit) < 60, to_exit  # the step in flight, the save, the exit
    print(f"seconds from the signal to each process's exit: {to_exit[0]:.1f}, {to_exit[1]:.1f}")
    assert Checkpointer(run_dir / "checkpoints").all_steps() == [2]

    results = Pair(tmp_path, "resume", [config, config]).wait()  # a fresh pair
    assert [code for code, _, _ in results] == [0, 0], results[0][1][-3000:]
    assert [r["step"] for r in read_metrics(run_dir) if "reward_mean" in r] == [1, 2, 3]
    assert_same_run(run_dir, straight)


def test_a_killed_process_ends_the_other_and_the_rerun_resumes(tmp_path, warm_model, straight):
    run_dir = tmp_path / "run"
    config = pair_config(run_dir, warm_model, checkpoint_every=1)
    pair = Pair(tmp_path, "kill", [config, config], hooks={1: (3, "SIGKILL")})
    (code0, out0, end0), (code1, _, end1) = pair.wait()
    assert code1 == -signal.SIGKILL
    assert code0 not in (0, 3), out0[-3000:]
    assert end0 - end1 < 5 + 30, (end0, end1)  # the heartbeat timeout (5 s) and a margin
    print(f"process 0 exited {end0 - end1:.1f} s after process 1 was killed, with code {code0}:\n{out0[-1500:]}")
    # Process 0 names the lost process: in this project's words, with the checkpoint to resume from (exit code 4),
    # or in JAX's when its coordination service ends the process first (the same heartbeat timeout decides).
    if code0 == 4:
        assert ("process 0: lost process(es) [1] of 2: they stopped sending heartbeats" in out0
                and f"The last finished checkpoint in {run_dir / 'checkpoints'} is step" in out0
                and "run the same command again on every host to resume" in out0), out0[-3000:]
    else:
        assert "stopped sending heartbeats):\n1\n" in out0, out0[-3000:]
    finished = Checkpointer(run_dir / "checkpoints").all_steps()
    assert finished and max(finished) in (1, 2), finished  # step 2's save may or may not have been finished

    results = Pair(tmp_path, "rerun", [config, config]).wait()
    assert [code for code, _, _ in results] == [0, 0], results[0][1][-3000:]
    assert_same_run(run_dir, straight)


def test_a_verifier_outage_on_one_process_stops_both(tmp_path, warm_model):
    run_dir = tmp_path / "run"
    base = pair_config(run_dir, warm_model, **{"verifier.kind": "openai", "verifier.max_retries": 1,
                                                "verifier.backoff_initial_s": 0.01, "verifier.backoff_max_s": 0.01,
                                                "verifier.timeout_s": 5.0})
    taxonomy = source_taxonomy(base.data.source.to_dict())
    with LoopbackVerifierServer(taxonomy) as good, \
            LoopbackVerifierServer(taxonomy, faults=FaultPlan(first=["500"] * 10_000)) as bad:
        configs = [base.copy_and_resolve_references(), base.copy_and_resolve_references()]
        configs[0].verifier.base_url, configs[1].verifier.base_url = good.url, bad.url
        results = Pair(tmp_path, "outage", configs).wait()
    for code, out, _ in results:
        assert code == 3, out[-3000:]
        assert "The verifier failed at step 1: process 1:" in out and "step 0 is saved" in out, out[-3000:]
    assert Checkpointer(run_dir / "checkpoints").all_steps() == [0]


def test_processes_that_do_not_share_the_run_folder_refuse_to_start(tmp_path, warm_model):
    configs = [pair_config(tmp_path / f"host{rank}", warm_model) for rank in range(2)]
    results = Pair(tmp_path, "folders", configs).wait(timeout=300)
    for code, out, _ in results:
        assert code not in (0, 3), out[-3000:]
        assert "config.run_dir must be one folder shared by every process, but process(es) [1]" in out, out[-3000:]
    assert not os.path.exists(tmp_path / "host0" / "checkpoints")
