"""The error a tensor-parallel engine raises when its group breaks."""

from __future__ import annotations

import signal

from engine.errors import WorkerFatalError


class TensorParallelError(WorkerFatalError):
    """A tensor-parallel rank died, stopped answering or could not start: the engine cannot
    run its model any more (fatal: the worker, all its ranks, must be restarted)."""


def describe_exit(code: int | None) -> str:
    """A rank's exit status in words (no pid, no path)."""
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed ({name})"
    return f"exited with status {code}"
