"""What XLA compiles during a run: a counter of compiled programs, and JAX's persistent compilation cache.

A paper-scale program takes minutes to compile, so a run should compile a small fixed set of programs in its
first steps and nothing after (every shape comes from `buckets`). `CompileCounter` makes that visible: the
trainer records `compile/count` and `compile/seconds` per step and warns when a late step compiled anything.
"""

from __future__ import annotations

import os
import threading

import jax
import jax.monitoring

# Recorded by JAX once per program handed to the XLA compiler (a persistent-cache hit records none).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_lock = threading.Lock()
_totals = {"count": 0, "seconds": 0.0}
_installed = False


def _on_duration(event: str, seconds: float, **_) -> None:
    if event == BACKEND_COMPILE_EVENT:
        with _lock:
            _totals["count"] += 1
            _totals["seconds"] += seconds


def _install() -> None:
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            _installed = True


class CompileCounter:
    """Programs compiled (and seconds spent compiling them) since the last `take()`, in this process."""

    def __init__(self):
        _install()
        self._seen = dict(_totals)

    def take(self) -> dict[str, float]:
        """{"count", "seconds"} since the previous call (or since construction)."""
        with _lock:
            now = dict(_totals)
        delta = {"count": now["count"] - self._seen["count"], "seconds": now["seconds"] - self._seen["seconds"]}
        self._seen = now
        return delta


def enable_persistent_cache(folder: str) -> str | None:
    """Keep compiled programs in `folder` (shared by every host of a pod when it is on a shared disk), so a
    restarted or resumed run loads them instead of compiling again. "" changes nothing (JAX keeps the cache off,
    or the one the calling program set up). Returns the folder."""
    if not folder:
        return None
    folder = os.path.expanduser(folder)
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", folder)
    # Cache every program that took real time to compile; tiny ones are cheaper to compile than to read.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return folder
