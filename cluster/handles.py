"""Worker handles: typed calls to a worker, whether it is a Ray actor or a plain object in
this process (tests, the local mode).

A handle is the worker's role API (``PrefillHandle.prefill``, ``DecodeHandle.reserve`` ...)
over a *transport* that carries the calls (``RayTransport``: actor method calls and a Ray
streaming generator; ``LocalTransport``: a thread pool). The cluster backend speaks only the
typed methods; ``call`` stays as the one untyped door, for tools and tests.

A worker that is gone for good (its actor died or was killed) raises ``WorkerGone`` from
every call, in flight or later.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class WorkerGone(RuntimeError):
    """The worker is gone for good (its actor died or was killed): no call will succeed."""


class Transport(ABC):
    """Carries method calls to one worker."""

    @abstractmethod
    async def call(self, method: str, *args: Any) -> Any:
        """Run the worker's ``method(*args)`` and return its result."""

    @abstractmethod
    def stream(self, method: str) -> AsyncIterator[Any]:
        """Items of the worker's generator ``method``, as it yields them."""


class LocalTransport(Transport):
    """A worker object in this process; blocking methods run on a thread pool."""

    def __init__(self, worker: Any, executor: ThreadPoolExecutor) -> None:
        self.worker = worker
        self._executor = executor

    async def call(self, method: str, *args: Any) -> Any:
        fn = getattr(self.worker, method)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def stream(self, method: str) -> AsyncIterator[Any]:
        """The worker's generator, run on a thread of its own and handed over item by item
        (it ends when the worker shuts down)."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        done = object()

        def hand_over(item: Any) -> bool:
            """False once the consumer's event loop has closed (nobody reads any more: a
            worker that stopped late, after its cluster's loop ended)."""
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:
                if not loop.is_closed():
                    raise
                return False
            return True

        def pump() -> None:
            try:
                outputs = getattr(self.worker, method)()
                for item in outputs:
                    if not hand_over(item):
                        outputs.close()
                        return
            except BaseException as exc:  # handed to the consumer, never lost
                hand_over(exc)
            hand_over(done)

        threading.Thread(target=pump, name=f"{method}-stream", daemon=True).start()
        while (item := await items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item


class RayTransport(Transport):
    """A worker running as a Ray actor (``ray.remote(cls)`` with its pool's resources)."""

    def __init__(self, worker_id: str, actor: Any) -> None:
        self.worker_id = worker_id
        self.actor = actor

    async def call(self, method: str, *args: Any) -> Any:
        import ray.exceptions

        try:
            return await getattr(self.actor, method).remote(*args)
        except ray.exceptions.ActorUnavailableError:
            raise  # transient (restarting, unreachable for now): the caller may retry
        except ray.exceptions.RayActorError as e:
            raise WorkerGone(f"worker {self.worker_id} died: {_first_line(e)}") from e

    async def stream(self, method: str) -> AsyncIterator[Any]:
        """A Ray streaming generator: each item reaches the caller as the worker yields it,
        not when a poll comes round (which delivered several engine steps at once)."""
        import ray.exceptions

        try:
            gen = getattr(self.actor, method).options(num_returns="streaming").remote()
            async for ref in gen:
                yield await ref
        except ray.exceptions.RayActorError as e:
            raise WorkerGone(f"worker {self.worker_id} died: {_first_line(e)}") from e


class WorkerHandle:
    """What every worker answers, whatever its role."""

    def __init__(self, worker_id: str, role: str, transport: Transport) -> None:
        self.worker_id = worker_id
        self.role = role
        self.transport = transport

    async def call(self, method: str, *args: Any) -> Any:
        """An untyped call (tools and tests); the cluster uses the typed methods."""
        return await self.transport.call(method, *args)

    async def stats(self, draining: bool = False):
        """The worker's ``WorkerStats`` (``draining``: it is being drained)."""
        return await self.call("stats", draining)

    async def abort(self, request_id: str) -> bool:
        """Free the request's resources on this worker; False if it did not know it."""
        return await self.call("abort", request_id)

    async def free_blocks(self) -> int:
        return await self.call("free_blocks")

    async def check_integrity(self) -> None:
        await self.call("check_integrity")

    async def startup_report(self) -> dict:
        """What the worker's start-up did: KV cache size, load and warm-up seconds."""
        return await self.call("startup_report")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.worker_id}, {self.role})"


class PrefillHandle(WorkerHandle):
    async def prefill(self, request_id: str, prompt_token_ids: Sequence[int], params, peer,
                      dst_block_ids: Sequence[int] | None,
                      output_token_ids: Sequence[int] = (), ship_always: bool = False):
        """Prefill and return a ``PrefillResult`` (the next token); the KV goes to ``peer``
        into ``dst_block_ids`` in the background. ``output_token_ids``: a resumed request's
        tokens already streamed. ``ship_always``: ship the KV even if that token ends the
        request (n > 1: the siblings decode from it)."""
        return await self.call("prefill", request_id, prompt_token_ids, params, peer,
                               dst_block_ids, None, list(output_token_ids), ship_always)

    async def kv_heads(self) -> list[tuple[int, int]]:
        """The KV heads each of its tensor-parallel ranks holds (one range without TP)."""
        return await self.call("kv_heads")


class DecodeHandle(WorkerHandle):
    """A decode worker (or a colocated one: the same class, prefilling locally)."""

    async def endpoint(self):
        """Where prefill workers send it KV (a ``kv_transfer.Endpoint``)."""
        return await self.call("endpoint")

    async def reserve(self, request_id: str, prompt_token_ids: Sequence[int], params,
                      output_token_ids: Sequence[int] = (),
                      siblings: Sequence[tuple] = (),
                      source_heads: Sequence[tuple[int, int]] | None = None
                      ) -> list[int] | None:
        """Blocks for the request's KV, or None when the worker has no room. ``siblings``:
        n > 1, (id, params) of the other samples, forked there from the same KV.
        ``source_heads``: the sending prefill worker's ``kv_heads()`` (TP resharding)."""
        return await self.call("reserve", request_id, prompt_token_ids, params,
                               list(output_token_ids), list(siblings),
                               None if source_heads is None else list(source_heads))

    async def start(self, request_id: str, first_token: int) -> bool:
        """The prefill's token is known: decode once the KV lands. False if the worker no
        longer knows the request (it failed or was aborted)."""
        return await self.call("start", request_id, first_token)

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int], params,
                       output_token_ids: Sequence[int] = (),
                       siblings: Sequence[tuple] = ()) -> None:
        """Prefill here and decode (conditional disaggregation, colocated workers)."""
        await self.call("generate", request_id, prompt_token_ids, params,
                        list(output_token_ids), list(siblings))

    def stream_outputs(self) -> AsyncIterator[list]:
        """Every request's ``TokenDelta``s, one item per engine step, as each step ends."""
        return self.transport.stream("stream_outputs")


def make_handle(worker_id: str, role: str, transport: Transport) -> WorkerHandle:
    """The typed handle of a worker of ``role``."""
    cls = PrefillHandle if role == "prefill" else DecodeHandle
    return cls(worker_id, role, transport)


def _first_line(exc: BaseException) -> str:
    """Ray's actor errors run to many lines (class, actor id, pid, node...): the gist."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
