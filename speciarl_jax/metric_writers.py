"""Where per-step metrics go: a JSONL file, TensorBoard event files, and a one-line console summary."""

from __future__ import annotations

import json
import os
import time


class MetricWriter:
    """Writes scalar metrics per step to `<run_dir>/metrics.jsonl` and TensorBoard events in `<run_dir>/tb/`.

    Only process 0 of a multi-host run should create one (`enabled=False` elsewhere makes it a no-op).
    """

    def __init__(self, run_dir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        clean = {f"{prefix}{k}": float(v) for k, v in metrics.items() if _is_number(v)}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in clean.items():
                self._tb.add_scalar(name.replace(" ", "_"), value, step)  # TensorBoard tags cannot hold spaces
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def summary_line(metrics: dict[str, float], keys: list[str]) -> str:
    """A compact 'key value' line with the chosen metrics that are present."""
    parts = []
    for key in keys:
        if key in metrics:
            value = metrics[key]
            parts.append(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)
