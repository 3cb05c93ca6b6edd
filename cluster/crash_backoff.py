"""How long to wait before replacing a lost worker.

A worker *line* is a worker and the replacements that followed it. A line that keeps dying
soon after each start (a bad node, an OOM while loading) backs off exponentially: 0, 1, 3,
7, 15 s, then ``MAX_WAIT_S``. A worker that served for ``STABLE_S`` before it died starts
its line's count again, and lines never share a count: the first loss of one pool's worker
is replaced at once, however many workers of another pool died before (Kubernetes'
CrashLoopBackOff, likewise, counts restarts per container and resets after stable running).
"""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_WAIT_S = 30.0
STABLE_S = 120.0  # served this long: its death is not part of a crash loop


class CrashBackoff:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ready_at: dict[str, float] = {}  # worker id -> when it became ready
        self._streak: dict[str, int] = {}  # worker id -> early deaths of its line so far

    def ready(self, worker_id: str, streak: int = 0) -> None:
        """``worker_id`` serves from now; ``streak``: its line's count (see ``lost``)."""
        self._ready_at[worker_id] = self._clock()
        self._streak[worker_id] = streak

    def forget(self, worker_id: str) -> None:
        """The worker was removed on purpose (scaled down): no line goes on."""
        self._ready_at.pop(worker_id, None)
        self._streak.pop(worker_id, None)

    def lost(self, worker_id: str) -> tuple[float, int]:
        """The worker died: (seconds to wait before starting its replacement, the streak to
        pass to the replacement's ``ready``)."""
        ready_at = self._ready_at.pop(worker_id, None)
        streak = self._streak.pop(worker_id, 0)
        early = ready_at is None or self._clock() - ready_at < STABLE_S
        streak = streak + 1 if early else 1
        return min(MAX_WAIT_S, 2.0 ** (streak - 1) - 1), streak
