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


_DEMO = os.path.join(os.path.dirname(__file__), "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEMO, "Path of a config file (see configs/).")


def maybe_initialize_distributed(heartbeat_timeout_s: int = 100) -> None:
    """Join the run's other processes when JAX_COORDINATOR_ADDRESS is set. A process whose heartbeats stop for
    `heartbeat_timeout_s` is declared dead by the coordination service, which then ends every other process."""
    import jax

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # CPU processes (tests, a laptop) need a collectives backend; GPU and TPU ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            heartbeat_timeout_seconds=int(heartbeat_timeout_s),
        )


def exit_if_processes_were_lost(err: BaseException, config) -> None:
    """After an error in a multi-process run: if other processes died, say which and exit at once (code 4),
    rather than wait in JAX's shutdown barrier for processes that will never come."""
    import jax

    from . import multihost

    if jax.process_count() == 1:
        return
    me = jax.process_index()
    print(f"process {me}: {type(err).__name__}: {err}; asking the coordination service which processes are "
          f"alive (up to {config.heartbeat_timeout_s} s)", file=sys.stderr, flush=True)
    lost = multihost.lost_processes(config.heartbeat_timeout_s + 10)
    if not lost:
        return
    from .checkpoint import RunFolder, finished_steps

    folder = RunFolder.of(config).checkpoints
    steps = finished_steps(folder)
    print(f"process {me}: lost process(es) {lost} of {jax.process_count()}: they stopped sending heartbeats "
          f"(died, were killed or preempted). The last finished checkpoint in {folder} is "
          f"{f'step {steps[-1]}' if steps else 'none'}; run the same command again on every host to resume.",
          file=sys.stderr, flush=True)
    os._exit(4)  # JAX's shutdown would wait for the lost processes


def describe(config) -> str:
    """What the run will do, in one line, printed before anything loads."""
    from .checkpoint import RunFolder
    from .training_config import generation_batch_size

    model = "a tiny random Qwen2.5-VL" if config.model.tiny else (config.model.path or "no model (set model.path)")
    length = f"{config.steps} steps" if config.steps else f"{config.epochs} epochs"
    parts = [f"Run {config.name!r} in {RunFolder.of(config).path}: {model}"]
    if config.sft.enabled:
        parts.append(f"SFT for {config.sft.steps} steps")
    if config.steps or config.epochs:
        reward = config.reward.kind + (f" ({config.reward.table})" if config.reward.kind == "static" else "")
        parts.append(f"then {config.rl.algorithm.upper()} with the {reward} reward for {length} of "
                     f"{config.data.batch_size} prompts x {config.rollout.num_samples} rollouts"
                     + (f" (generation batches of {generation_batch_size(config)})"
                        if generation_batch_size(config) != config.data.batch_size else "")
                     + f", graded by the {config.verifier.kind} verifier")
    return f"{', '.join(parts)}. {config.get('about', '')}".strip()


def main(argv) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and grain log every file they touch at INFO
    config = _CONFIG.value
    maybe_initialize_distributed(config.heartbeat_timeout_s)
    import jax

    from .metrics import before_after_table
    from .trainer import Trainer, TrainingInterrupted

    if jax.process_index() == 0:
        print(describe(config), flush=True)

    try:  # a wrong setting or path: the message names it, without a traceback (errors of the run keep theirs)
        trainer = Trainer(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        result = trainer.run()
    except TrainingInterrupted as err:
        logging.error("%s", err)
        print(err, file=sys.stderr)
        sys.exit(3)
    except Exception as err:
        exit_if_processes_were_lost(err, config)
        raise
    if trainer.is_main and result["eval_after"]:
        print(before_after_table(result["eval_before"], result["eval_after"]))


if __name__ == "__main__":
    app.run(main)
