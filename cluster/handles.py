"""Worker handles: call a worker's methods the same way whether it is a Ray actor or a plain
object in this process (tests, the simulator-free local mode)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class WorkerGone(RuntimeError):
    """The worker is gone for good (its actor died or was killed): no call will succeed."""


class WorkerHandle:
    def __init__(self, worker_id: str, role: str) -> None:
        self.worker_id = worker_id
        self.role = role

    async def call(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

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
            raise WorkerGone(f"worker {self.worker_id} died: {e}") from e
