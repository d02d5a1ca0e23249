"""Train a policy with SpeciaRL: `python -m speciarl_jax.train --config=configs/demo.py [--config.a.b=value]`.

Without --config it runs the demo (tiny random model, synthetic world, rule verifier, CPU). On several
processes (a TPU pod slice, several GPU hosts), set the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment variables, or run where `jax.distributed.initialize()` finds them itself.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs

_DEMO = os.path.join(os.path.dirname(configs.__file__), "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEMO, "Path of a config file (see configs/).")


def maybe_initialize_distributed() -> None:
    import jax

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # CPU processes (tests, a laptop) need a collectives backend; GPU and TPU ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )


def main(argv) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and grain log every file they touch at INFO
    maybe_initialize_distributed()
    from .trainer import Trainer, TrainingInterrupted, before_after_table

    config = _CONFIG.value
    trainer = Trainer(config)
    try:
        result = trainer.run()
    except TrainingInterrupted as err:
        logging.error("%s", err)
        print(err, file=sys.stderr)
        sys.exit(3)
    if trainer.is_main and result["eval_after"]:
        print(before_after_table(result["eval_before"], result["eval_after"]))


if __name__ == "__main__":
    app.run(main)
