"""Drive an Engine on a background thread: the shape every serving process takes.

Other threads never touch the engine directly: they ``call(fn)`` and get a Future; the loop
thread runs queued calls between steps, so the engine stays single-threaded. While no
request is running the thread sleeps on a condition variable (woken by the next call), not
in a polling loop. A step that raises fails every request in flight with an error output
(none is left hanging) and the loop goes on. Each time the loop falls idle after work it
runs ``engine.check_integrity()`` once (the block pool's invariants): a failure is logged as
an error and counted (``counters.integrity_failures``), never raised into the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from engine.outputs import RequestOutput

log = logging.getLogger(__name__)


@dataclass
class StepCounters:
    """Throughput counters, for WorkerStats (tokens per second of busy time)."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0
    integrity_checks: int = 0
    integrity_failures: int = 0
    # Wall time of the most recent steps (seconds): what a client's inter-token gaps should
    # look like on a decode worker.
    recent_steps: deque = field(default_factory=lambda: deque(maxlen=512))
    # (seconds from one step's start to the next's, decodes of the first) while requests
    # kept running: the cadence at which a decoding stream's tokens come out, loop and
    # RPC threads' time between steps included.
    recent_intervals: deque = field(default_factory=lambda: deque(maxlen=512))

    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def step_time_p50(self) -> float:
        """Median wall time of the recent steps (0 before the first)."""
        steps = sorted(self.recent_steps)
        return steps[len(steps) // 2] if steps else 0.0

    def step_interval_p50(self) -> float:
        """Median time between consecutive steps' starts, weighted by the decoding streams
        of each (the median gap a decoding stream sees between its tokens; 0 if none)."""
        pairs = sorted(self.recent_intervals)
        total = sum(w for _, w in pairs)
        seen = 0
        for interval, weight in pairs:
            seen += weight
            if 2 * seen >= total and total:
                return interval
        return 0.0


class EngineLoop:
    def __init__(self, engine, on_outputs: Callable[[list[RequestOutput]], None],
                 name: str = "engine-loop") -> None:
        self.engine = engine
        self.on_outputs = on_outputs
        self.counters = StepCounters()
        self._calls: deque[tuple[Callable, tuple, Future]] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._checked_since_work = True  # nothing to check before the first call or step
        self._last_step: tuple[float, int] | None = None  # (start, decodes) of the last step
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        """True while the loop thread runs (it stops only when asked)."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def call(self, fn: Callable, *args) -> Future:
        """Run ``fn(engine, *args)`` on the loop thread between steps."""
        future: Future = Future()
        with self._cond:
            if self._stopped:
                future.set_exception(RuntimeError("engine loop is stopped"))
                return future
            self._calls.append((fn, args, future))
            self._cond.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._cond:
                check = self._idle() and not self._checked_since_work
                while not check and self._idle():
                    self._cond.wait()
                if self._stopped:
                    break
                calls, self._calls = list(self._calls), deque()
            if check:  # idle now: the moment the pool's invariants must hold
                self._check_integrity()
                continue
            self._checked_since_work = False
            for fn, args, future in calls:
                self._run_call(fn, args, future)
            if self.engine.has_unfinished_requests():
                self._step()
        self._fail_pending_calls()

    def _idle(self) -> bool:
        return not (self._stopped or self._calls or self.engine.has_unfinished_requests())

    def _check_integrity(self) -> None:
        self._checked_since_work = True
        self.counters.integrity_checks += 1
        try:
            self.engine.check_integrity()
        except Exception:  # a broken invariant is a bug: say so loudly, keep serving
            self.counters.integrity_failures += 1
            log.exception("KV block pool integrity check failed while idle")

    def _run_call(self, fn: Callable, args: tuple, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(self.engine, *args))
        except BaseException as exc:  # handed to the caller through the future
            future.set_exception(exc)

    def _step(self) -> None:
        t0 = time.perf_counter()
        previous, self._last_step = self._last_step, (t0, 0)
        if previous is not None and previous[1]:
            self.counters.recent_intervals.append((t0 - previous[0], previous[1]))
        try:
            outputs = self.engine.step()
        except Exception:
            log.exception("engine step failed; failing every request in flight")
            outputs = self._fail_all()
        elapsed = time.perf_counter() - t0
        self._count(outputs, elapsed)
        batch = self.engine.last_batch
        if batch is not None and self.engine.has_unfinished_requests():  # the cadence goes on
            self._last_step = (t0, batch.num_decodes)
        else:
            self._last_step = None
        if outputs:
            self.on_outputs(outputs)

    def _count(self, outputs: list[RequestOutput], elapsed: float) -> None:
        c = self.counters
        c.steps += 1
        c.recent_steps.append(elapsed)
        batch = self.engine.last_batch
        if batch is None:
            return
        num_decodes = batch.num_decodes
        num_prefill = batch.num_batched_tokens - num_decodes
        if num_prefill:  # split the step's time by tokens: a cheap, monotone estimate
            share = num_prefill / batch.num_batched_tokens
            c.prefill_tokens += num_prefill
            c.prefill_seconds += elapsed * share
            c.decode_seconds += elapsed * (1 - share)
        else:
            c.decode_seconds += elapsed
        c.decode_tokens += num_decodes

    def _fail_all(self) -> list[RequestOutput]:
        outputs = []
        for request_id in list(self.engine.scheduler.requests):
            out = self.engine.fail(request_id, "internal error while running the model")
            if out is not None:
                outputs.append(out)
        return outputs

    def _fail_pending_calls(self) -> None:
        with self._cond:
            calls, self._calls = list(self._calls), deque()
        for _, _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("engine loop stopped"))
