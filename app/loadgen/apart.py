"""The load generator in a process of its own, against a server launched in this one.

``launch`` starts the server (router, gRPC, HTTP) in the benchmark's process. A load
generator on the same event loop competes with the router for that loop and its GIL: it
parses every token's event where the router writes them, so the per-token timings it takes
describe that sharing, not what a client sees (with a separate client process, HTTP streams
at 32 users showed short gaps that the in-process client did not). ``bench_apart`` runs each
measurement in a spawned child process instead, as a real client would be.

Stamps are ``time.perf_counter()`` (CLOCK_MONOTONIC on Linux, one clock for every process),
so the child's measured window still lines up with the decode step times sampled here.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor


class Endpoint:
    """What ``launch.bench_launched`` hands the bench in place of a sender: the address only
    (the child process opens its own connection)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    async def close(self) -> None:
        """Nothing to close: the connection lives in the child."""


# measure(endpoint, specs or None) -> (specs, record); must pickle (a module-level function
# or a functools.partial of one), since it runs in the child.
Measure = Callable[[str, list | None], tuple[list, dict]]


def bench_apart(measure: Measure):
    """A ``launch.BenchFn`` that runs ``measure`` in a fresh (spawned) process."""
    async def bench(target: Endpoint, specs=None):
        pool = ProcessPoolExecutor(max_workers=1,
                                   mp_context=multiprocessing.get_context("spawn"))
        try:
            return await asyncio.get_running_loop().run_in_executor(
                pool, measure, target.endpoint, specs)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return bench
