"""Worker handles: call a worker's methods the same way whether it is a Ray actor or a plain
object in this process (tests, the simulator-free local mode)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

POLL_TIMEOUT_S = 0.5  # the long-poll fallback's wait (a worker without stream_outputs)


class WorkerGone(RuntimeError):
    """The worker is gone for good (its actor died or was killed): no call will succeed."""


class WorkerHandle:
    def __init__(self, worker_id: str, role: str) -> None:
        self.worker_id = worker_id
        self.role = role

    async def call(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    async def stream_outputs(self) -> AsyncIterator[list]:
        """A decode worker's token deltas, one item per engine step, as each step ends.
        This fallback long-polls ``get_outputs``; the handles below stream for real."""
        while True:
            deltas = await self.call("get_outputs", POLL_TIMEOUT_S)
            if deltas:
                yield deltas

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.worker_id}, {self.role})"


class LocalHandle(WorkerHandle):
    """A worker object in this process; blocking methods run on a thread pool."""

    def __init__(self, worker_id: str, role: str, worker: Any,
                 executor: ThreadPoolExecutor) -> None:
        super().__init__(worker_id, role)
        self.worker = worker
        self._executor = executor

    async def call(self, method: str, *args: Any) -> Any:
        fn = getattr(self.worker, method)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def stream_outputs(self) -> AsyncIterator[list]:
        """The worker's ``stream_outputs`` generator, run on a thread of its own and handed
        over item by item (ends when the worker shuts down)."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        done = object()

        def pump() -> None:
            try:
                for item in self.worker.stream_outputs():
                    loop.call_soon_threadsafe(items.put_nowait, item)
            except BaseException as exc:  # handed to the consumer, never lost
                loop.call_soon_threadsafe(items.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(items.put_nowait, done)

        threading.Thread(target=pump, name=f"{self.worker_id}-outputs", daemon=True).start()
        while (item := await items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item


class RayHandle(WorkerHandle):
    """A worker running as a Ray actor (``ray.remote(cls)`` with its pool's resources)."""

    def __init__(self, worker_id: str, role: str, actor: Any) -> None:
        super().__init__(worker_id, role)
        self.actor = actor

    async def call(self, method: str, *args: Any) -> Any:
        import ray.exceptions

        try:
            return await getattr(self.actor, method).remote(*args)
        except ray.exceptions.ActorUnavailableError:
            raise  # transient (restarting, unreachable for now): the caller may retry
        except ray.exceptions.RayActorError as e:
            raise WorkerGone(f"worker {self.worker_id} died: {_first_line(e)}") from e

    async def stream_outputs(self) -> AsyncIterator[list]:
        """A Ray streaming generator: each engine step's deltas reach the router as the
        step ends, not when a poll comes round (which delivered several steps at once)."""
        import ray.exceptions

        try:
            gen = self.actor.stream_outputs.options(num_returns="streaming").remote()
            async for ref in gen:
                yield await ref
        except ray.exceptions.RayActorError as e:
            raise WorkerGone(f"worker {self.worker_id} died: {_first_line(e)}") from e


def _first_line(exc: BaseException) -> str:
    """Ray's actor errors run to many lines (class, actor id, pid, node...): the gist."""
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
