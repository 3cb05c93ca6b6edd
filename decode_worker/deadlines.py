"""One thread that fires callbacks at deadlines (KV that never arrives), without polling."""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable


class DeadlineTimer:
    def __init__(self, on_expired: Callable[[str], None]) -> None:
        self._on_expired = on_expired
        self._heap: list[tuple[float, str]] = []
        self._live: dict[str, float] = {}  # key -> its current deadline (cancel = delete)
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="kv-deadlines", daemon=True)
        self._thread.start()

    def add(self, key: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        with self._cond:
            self._live[key] = deadline
            heapq.heappush(self._heap, (deadline, key))
            self._cond.notify()

    def cancel(self, key: str) -> None:
        with self._cond:
            self._live.pop(key, None)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        deadline, key = heapq.heappop(self._heap)
                        if self._live.get(key) == deadline:
                            del self._live[key]
                            break
                        continue  # cancelled or re-armed
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
                else:
                    return
            self._on_expired(key)
