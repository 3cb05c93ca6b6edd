"""The engine loop checks the block pool's invariants whenever it falls idle after work."""

from __future__ import annotations

import threading

from engine.engine_loop import EngineLoop


class _Engine:
    """Just what EngineLoop touches; ``check_integrity`` can be made to fail."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.checks = threading.Event()
        self.last_batch = None

    def has_unfinished_requests(self) -> bool:
        return False

    def check_integrity(self) -> None:
        self.checks.set()
        if self.broken:
            raise AssertionError("block 3: ref 1 vs free")


def _run_one_call(engine) -> EngineLoop:
    loop = EngineLoop(engine, lambda outputs: None)
    loop.start()
    try:
        assert loop.call(lambda e: 42).result(5) == 42
        assert engine.checks.wait(5), "no integrity check after the loop fell idle"
        loop.call(lambda e: None).result(5)  # a later call still runs: the loop lives
    finally:
        loop.stop()
    return loop


def test_an_idle_loop_checks_integrity_once_per_idle_period():
    loop = _run_one_call(_Engine())
    assert loop.counters.integrity_checks >= 1 and loop.counters.integrity_failures == 0


def test_a_failed_integrity_check_is_logged_and_counted_not_raised(caplog):
    loop = _run_one_call(_Engine(broken=True))
    assert loop.counters.integrity_failures >= 1
    assert any("integrity check failed" in r.getMessage() and r.levelname == "ERROR"
               for r in caplog.records)


def test_a_loop_that_never_worked_does_not_check():
    engine = _Engine()
    loop = EngineLoop(engine, lambda outputs: None)
    loop.start()
    try:
        assert not engine.checks.wait(0.2)
    finally:
        loop.stop()


def test_step_cadence_is_weighted_by_decoding_streams():
    """The token cadence a stream sees: intervals between steps' starts, weighted by the
    decodes of the step that began each interval."""
    from engine.engine_loop import StepCounters

    counters = StepCounters()
    counters.recent_intervals.extend([(0.010, 1), (0.002, 30), (0.050, 1)])
    assert counters.step_interval_p50() == 0.002  # 30 of 32 streams saw 2 ms
    assert StepCounters().step_interval_p50() == 0.0
