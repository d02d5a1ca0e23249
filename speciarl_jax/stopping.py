"""Stop decisions that every process of a run takes together.

A preemption notice (SIGTERM), a non-finite loss or a due time-based checkpoint reaches one process at a time;
if that process alone entered a collective save while the others went on to the next step's collectives, the
run would hang. So each process only *records* what it saw, and at one fixed point of every step all processes
exchange their records (`StopFlags.agree`, a small all-gather) and act on the union: all of them save the same
step, or all of them go on. Verifier failures are shared where they happen (`multihost.classify_split`).

Where JAX's preemption service runs (any multi-process run), the platform's own notice is honoured as well:
`reached_preemption_sync_point` is asked at every agreement, which catches a notice that JAX's listener took
before this module's handler was installed (for example while the weights were loading).
"""

from __future__ import annotations

import dataclasses
import signal
import time

import jax
from absl import logging

from . import multihost


class TrainingInterrupted(RuntimeError):
    """Raised (on every process) after a clean save when training cannot or should not go on."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """What all processes agreed on at one point of the run."""

    stop: bool = False  # a stop was requested (signal / preemption notice) on some process
    nonfinite: bool = False  # the loss was not finite on some process
    checkpoint_due: bool = False  # some process's clock says a time-based checkpoint is due
    who: tuple[int, ...] = ()  # the processes that asked for the stop
    signal: int | None = None  # the signal that asked for it (None: JAX's preemption notice)

    def cause(self) -> str:
        what = f"signal {self.signal}" if self.signal is not None else "a preemption notice"
        return what if jax.process_count() == 1 else f"{what} on process(es) {list(self.who)}"


class StopFlags:
    """Records stop requests of this process and turns them into decisions shared by all processes.

    Args:
      checkpoint_every_seconds: > 0: `agree` reports a checkpoint due this many seconds after `mark_saved`.
    """

    def __init__(self, checkpoint_every_seconds: float = 0.0):
        self.signal: int | None = None
        self.checkpoint_every_seconds = checkpoint_every_seconds
        self._last_save = time.monotonic()
        self._previous_handler = None

    # ---- this process ----

    def install(self) -> None:
        """Catch SIGTERM (what preemptible VMs and `launch/*.sh stop` send): finish the step, then stop."""
        if self._previous_handler is None:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)

    def uninstall(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def _on_signal(self, signum, frame):
        del frame
        self.signal = signum
        logging.warning("signal %d received: finishing the current step, then saving and stopping", signum)

    def mark_saved(self) -> None:
        self._last_save = time.monotonic()

    # ---- all processes ----

    def agree(self, step: int | None = None, *, nonfinite: bool = False) -> Decision:
        """Every process calls this at the same point; all get the same Decision.

        Args:
          step: the RL step just finished, for JAX's preemption sync point (which needs every step, in order,
            with the ids orbax also uses); None elsewhere (SFT).
          nonfinite: this process saw a non-finite loss.
        """
        preempted = step is not None and _reached_preemption_sync_point(step)
        due = bool(self.checkpoint_every_seconds) and (
            time.monotonic() - self._last_save >= self.checkpoint_every_seconds)
        mine = {"stop": self.signal is not None or preempted, "signal": self.signal, "nonfinite": bool(nonfinite),
                "due": due}
        everyone = multihost.allgather_json(mine)
        who = tuple(p for p, r in enumerate(everyone) if r["stop"])
        signals = [r["signal"] for r in everyone if r["signal"] is not None]
        return Decision(stop=bool(who), nonfinite=any(r["nonfinite"] for r in everyone),
                        checkpoint_due=any(r["due"] for r in everyone), who=who,
                        signal=signals[0] if signals else None)


def _reached_preemption_sync_point(step: int) -> bool:
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # the preemption service is switched off (jax_enable_preemption_service=False)
        return False
