"""LocalTransport: in-process workers (``mode="local"``), their calls on a thread pool and
their output streams on a thread each."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from cluster.handles import LocalTransport


class _Streaming:
    """A worker whose output stream goes on after its consumer's event loop has closed
    (a worker that stops late, after the cluster it served has ended)."""

    def __init__(self) -> None:
        self.go_on, self.closed = threading.Event(), threading.Event()

    def outputs(self):
        yield 1
        self.go_on.wait(10)
        try:
            yield 2
            yield 3
        finally:
            self.closed.set()


def test_a_stream_that_outlives_its_event_loop_stops_quietly(monkeypatch):
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    worker = _Streaming()

    async def main():
        with ThreadPoolExecutor(1) as executor:
            stream = LocalTransport(worker, executor).stream("outputs")
            return await anext(stream)

    assert asyncio.run(main()) == 1
    worker.go_on.set()  # the loop is closed: item 2 has nobody to go to
    assert worker.closed.wait(10), "the worker's generator was never closed"
    stream_threads = [t for t in threading.enumerate() if t.name == "outputs-stream"]
    for thread in stream_threads:
        thread.join(10)
    assert thread_errors == []
