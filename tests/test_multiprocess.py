"""Two JAX processes on localhost (CPU, gloo collectives) train like one process with the same devices: SFT warm
start, RL steps and checkpoints. (Resuming in a fresh pair: tests/test_multiprocess_failures.py.)"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

from speciarl_jax.trainer import Trainer
from tests.test_trainer import assert_same_training, read_metrics, small_config, trainable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_for(run_dir, steps):
    # A short SFT: the processes must agree on it, not learn the answer format (the RL tests need that).
    return small_config(run_dir, steps=steps, checkpoint_every=1, **{"mesh.fsdp": 2, "sft.steps": 30})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(tmp_path, run_dir, steps):
    config_file = tmp_path / f"config_{steps}.json"
    config_file.write_text(config_for(run_dir, steps).to_json())
    params_file = tmp_path / f"params_{steps}.npz"
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {REPO!r})
        from absl import flags
        flags.FLAGS.mark_as_parsed()
        from speciarl_jax.train import maybe_initialize_distributed
        maybe_initialize_distributed()
        import jax, numpy as np
        from ml_collections import ConfigDict
        from speciarl_jax import parallel
        from speciarl_jax.trainer import Trainer
        assert jax.process_count() == 2 and len(jax.devices()) == 2
        trainer = Trainer(ConfigDict(json.loads(open({str(config_file)!r}).read())))
        trainer.run()
        leaves = [parallel.to_host(x) for x in jax.tree.leaves(trainer.learner.state.params)]
        if jax.process_index() == 0:
            np.savez({str(params_file)!r}, *leaves)
    """)
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    with np.load(params_file) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def test_two_processes_match_one_process(tmp_path):
    two_dir = tmp_path / "two"
    params_two = run_two_processes(tmp_path, two_dir, steps=3)  # SFT, steps 1-3, a checkpoint after each
    assert not os.path.exists(two_dir / "sft_model.tmp") and os.path.exists(two_dir / "sft_model" / "config.json")

    one = Trainer(config_for(tmp_path / "one", steps=3), devices=jax.devices()[:2])
    one.run()
    start = trainable(Trainer(config_for(tmp_path / "one", steps=3), devices=jax.devices()[:2]))  # the SFT model
    m1 = [r for r in read_metrics(tmp_path / "one") if "reward_mean" in r]
    m2 = [r for r in read_metrics(two_dir) if "reward_mean" in r]
    sft1 = [r for r in read_metrics(tmp_path / "one") if "sft/loss" in r][0]
    sft2 = [r for r in read_metrics(two_dir) if "sft/loss" in r][0]
    np.testing.assert_allclose(sft2["sft/loss"], sft1["sft/loss"], rtol=1e-4)
    assert any(r["reward_std"] > 0 for r in m1)  # rewards differ within groups: the updates do something
    # The same prompts in the same order, the same samples, the same verdicts; the same updates.
    share = assert_same_training(m2, m1, start, params_two, trainable(one), rtol=1e-3, gap_share=5e-3)
    print(f"2 processes vs 1: parameter gap {share:.2e} of the distance moved")
    with open(two_dir / "checkpoints" / "3" / "meta" / "metadata") as f:
        meta = json.load(f)
    assert len(meta["data"]) == 2  # one data iterator state per process
