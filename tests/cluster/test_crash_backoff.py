"""Replacement back-off per worker line (a probe saw a prefill worker's first death wait 15
and 30 s for its replacement because decode workers had died before it)."""

from __future__ import annotations

from cluster.crash_backoff import MAX_WAIT_S, STABLE_S, CrashBackoff


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _crash_loop(backoff: CrashBackoff, clock: Clock, worker: str, times: int
                ) -> tuple[list[float], str]:
    """``worker`` and each replacement die 5 s after becoming ready: the waits chosen, and
    the last replacement's id."""
    waits = []
    for i in range(times):
        clock.now += 5
        wait, streak = backoff.lost(worker)
        waits.append(wait)
        clock.now += wait
        worker = f"{worker.split('+')[0]}+{i}"
        backoff.ready(worker, streak)
    return waits, worker


def test_a_line_that_keeps_dying_backs_off_up_to_the_cap():
    clock = Clock()
    backoff = CrashBackoff(clock)
    backoff.ready("decode-0")
    assert _crash_loop(backoff, clock, "decode-0", 8)[0] == [0, 1, 3, 7, 15, MAX_WAIT_S,
                                                             MAX_WAIT_S, MAX_WAIT_S]


def test_other_lines_start_from_no_wait():
    clock = Clock()
    backoff = CrashBackoff(clock)
    for worker in ("prefill-0", "decode-0", "decode-1"):
        backoff.ready(worker)
    _crash_loop(backoff, clock, "decode-0", 4)
    assert backoff.lost("prefill-0") == (0.0, 1)  # its first death: replaced at once
    assert backoff.lost("decode-1") == (0.0, 1)  # the same pool, another line


def test_a_line_that_served_long_enough_starts_again():
    clock = Clock()
    backoff = CrashBackoff(clock)
    backoff.ready("decode-0")
    _, last = _crash_loop(backoff, clock, "decode-0", 3)  # waits 0, 1, 3: at streak 3
    clock.now += STABLE_S - 1
    assert backoff.lost(last) == (7.0, 4)  # not yet
    backoff.ready(last, 3)
    clock.now += STABLE_S
    assert backoff.lost(last) == (0.0, 1)


def test_a_worker_that_never_became_ready_counts_as_an_early_death():
    backoff = CrashBackoff(Clock())
    assert backoff.lost("unknown") == (0.0, 1)
    backoff.ready("decode-0")
    backoff.forget("decode-0")  # scaled down: gone on purpose
    assert backoff.lost("decode-0") == (0.0, 1)
