"""Open-loop dispatch: send each request at its arrival time, whatever the server is doing
(optionally capped at N requests in flight).

Requests are sent as independent tasks at ``start + spec.arrival_s`` (a slow server does not
slow the arrivals down: queueing shows up in TTFT, as it would for real users). With
``max_concurrency`` N, at most N requests are in flight: a request due while N are running
waits for one of them to finish and is sent then (its TTFT counts from that send, as in
vLLM's ``--max-concurrency``); with ``rate = inf`` this is a closed loop of N users. The run stops
by itself when every request has finished, or at ``timeout_s`` after the start: requests
still running then are cancelled (which aborts them on the server) and recorded as failed
("timeout"), and requests not sent yet are recorded as "not sent".
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from app.loadgen.drivers import measure
from app.loadgen.stats import RequestResult, duration
from app.loadgen.workload import RequestSpec

TIMEOUT_ERROR = "timeout (benchmark time limit)"
NOT_SENT_ERROR = "not sent (benchmark time limit)"


@dataclass
class RunOutcome:
    results: list[RequestResult]  # one per spec, in workload order
    duration_s: float  # first send -> last completion
    wall_s: float  # start -> everything finished or cancelled
    timed_out: bool  # the time limit cut the run short


async def run_workload(specs: Sequence[RequestSpec], sender, *, timeout_s: float,
                       progress: bool = True,
                       max_concurrency: int | None = None) -> RunOutcome:
    """Send ``specs`` at their arrival times through ``sender``, at most ``max_concurrency``
    at a time (None: no cap); see the module doc."""
    from tqdm import tqdm

    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1 (got {max_concurrency})")
    start = time.perf_counter()
    deadline = start + timeout_s
    tasks: dict[int, asyncio.Task] = {}
    slots = asyncio.Semaphore(max_concurrency or len(specs) or 1)
    with tqdm(total=len(specs), desc="requests", unit="req", file=sys.stderr,
              disable=not progress, leave=False) as bar:
        for spec in specs:
            if start + spec.arrival_s > deadline:
                break
            await asyncio.sleep(max(0.0, start + spec.arrival_s - time.perf_counter()))
            if not await _acquire_until(slots, deadline):
                break
            task = asyncio.create_task(measure(spec, sender, start))
            task.add_done_callback(lambda _t: (slots.release(), bar.update()))
            tasks[spec.index] = task
        pending = await _wait_until(list(tasks.values()), deadline)
    results = [_result_of(spec, tasks.get(spec.index)) for spec in specs]
    wall = time.perf_counter() - start
    return RunOutcome(results, duration(results), wall,
                      timed_out=bool(pending) or len(tasks) < len(specs))


async def _acquire_until(slots: asyncio.Semaphore, deadline: float) -> bool:
    """Take a concurrency slot, or give up at ``deadline`` (False)."""
    try:
        await asyncio.wait_for(slots.acquire(), max(0.0, deadline - time.perf_counter()))
    except asyncio.TimeoutError:  # noqa: UP041 (Python 3.10: not the builtin yet)
        return False
    return True


async def _wait_until(tasks: list[asyncio.Task], deadline: float) -> set[asyncio.Task]:
    """Wait for ``tasks`` until ``deadline``; cancel and reap the rest, which are returned."""
    if not tasks:
        return set()
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return pending


def _result_of(spec: RequestSpec, task: asyncio.Task | None) -> RequestResult:
    if task is None:
        return RequestResult(spec.index, spec.prompt_len, spec.output_len, spec.arrival_s,
                             error=NOT_SENT_ERROR)
    if task.cancelled():
        return RequestResult(spec.index, spec.prompt_len, spec.output_len, spec.arrival_s,
                             error=TIMEOUT_ERROR)
    return task.result()


async def warmup(sender, specs: Sequence[RequestSpec]) -> list[RequestResult]:
    """Send ``specs`` one after the other, unmeasured: first-call costs (allocations, lazy
    initialisation, connection setup) are paid before the timed run."""
    start = time.perf_counter()
    return [await measure(spec, sender, start) for spec in specs]
