"""A training run evaluated as it was trained: `python -m speciarl_jax.evaluate`'s default config.

    python -m speciarl_jax.evaluate --run=runs/demo                    # its latest checkpoint
    python -m speciarl_jax.evaluate --run=runs/demo/checkpoints/20     # one step
    python -m speciarl_jax.evaluate --run=runs/demo/sft_model          # the SFT warm start
    python -m speciarl_jax.evaluate --run=runs/demo --config.prompt=specific   # a prompt study

The run's own held-out set (its `eval` section, as the trainer evaluates it at the end), prompt, system turn,
image settings, synthetic world, decoding length and verifier, all read from the config saved with the run.
Any setting given here (`--config.<key>=...`) that differs from training is kept, printed as a change from
training, written to run.json and added to the model's label. Reports go to `<run>/eval/<step_N>`.
"""

from speciarl_jax.evaluate import default_config, unset_section


def get_config(run: str = ""):
    config = default_config()
    config.run = run
    config.verifier = unset_section(config.verifier)  # the run's verifier
    return config
