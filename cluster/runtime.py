"""A running cluster: Ray bootstrap, the worker pools, the global scheduler and the backend.

    cluster = Cluster(config)            # mode="ray" (default) or "local" (tests)
    await cluster.start()                # ray.init (or connect), start the pools' replicas
    backend = cluster.backend            # a ServingBackend for the router
    await cluster.scale("prefill", +1)   # what the autoscaler calls
    await cluster.shutdown()
"""

from __future__ import annotations

import asyncio
import logging
import time

from cluster.cluster_backend import ClusterBackend
from cluster.config import ClusterConfig
from cluster.global_scheduler import GlobalScheduler
from cluster.pools import WorkerFactory

log = logging.getLogger(__name__)

REPLACE_ATTEMPTS = 8  # a lost worker's replacement is retried with backoff up to this often
REPLACE_MAX_BACKOFF_S = 30.0
LOSS_MEMORY_S = 300.0  # losses within this window lengthen the next replacement's delay


class Cluster:
    def __init__(self, config: ClusterConfig, mode: str = "ray") -> None:
        if not config.model.path:
            raise ValueError("the pool config names no model: set model.path or pass --model")
        self.config = config
        self.mode = mode
        self.factory = WorkerFactory(config, mode)
        self.scheduler = GlobalScheduler(config.scheduler)
        self.backend = ClusterBackend(self.scheduler)
        self._owns_ray = False
        self._starting = {"prefill": 0, "decode": 0, "colocated": 0}  # workers being created
        self._replacements: set[asyncio.Task] = set()
        self._losses: list[float] = []  # monotonic times of lost workers (crash-loop backoff)
        self._stopping = False
        self.backend.on_worker_lost = self._on_worker_lost

    @property
    def roles(self) -> tuple[str, ...]:
        return ("colocated",) if self.config.colocated else ("prefill", "decode")

    def replicas(self, role: str, include_starting: bool = False) -> int:
        """Registered workers of a role (plus those still starting, if asked)."""
        ready = sum(1 for h in self.backend.workers.values() if h.role == role)
        return ready + (self._starting[role] if include_starting else 0)

    async def start(self) -> None:
        if self.mode == "ray":
            self._init_ray()
        await self.backend.start()
        counts = {"colocated": self.config.decode.replicas} if self.config.colocated else {
            "prefill": self.config.prefill.replicas, "decode": self.config.decode.replicas}
        await asyncio.gather(*(self.add_worker(role) for role, n in counts.items()
                               for _ in range(n)))

    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        rc = self.config.ray
        if rc.address:
            ray.init(address=rc.address, namespace=rc.namespace, log_to_driver=False)
        else:  # a local node offers the pools' custom resources (a cluster's nodes would)
            resources = {name: 1000.0 for pool in (self.config.prefill, self.config.decode)
                         for name in pool.resources}
            ray.init(num_cpus=rc.num_cpus, namespace=rc.namespace, include_dashboard=False,
                     log_to_driver=False, resources=resources or None)
        self._owns_ray = True

    async def add_worker(self, role: str) -> str:
        self._starting[role] += 1
        try:
            handle = await self.factory.create(role)
            await self.backend.add_worker(handle)
        finally:
            self._starting[role] -= 1
        return handle.worker_id

    async def remove_worker(self, worker_id: str) -> None:
        """Drain (no new requests; in-flight ones finish), then stop the worker."""
        await self.backend.drain_and_remove(worker_id)
        await self.factory.destroy(worker_id)

    async def scale(self, role: str, delta: int) -> list[str]:
        """Add ``delta`` workers (> 0) or drain and remove ``-delta`` (< 0, newest first)."""
        if delta > 0:
            return list(await asyncio.gather(*(self.add_worker(role) for _ in range(delta))))
        victims = [w for w, h in self.backend.workers.items() if h.role == role][delta:]
        await asyncio.gather(*(self.remove_worker(w) for w in victims))
        return victims

    def _on_worker_lost(self, worker_id: str, role: str) -> None:
        """A worker died: start a replacement (the pool keeps its size; the autoscaler
        counts it as starting meanwhile)."""
        if self._stopping:
            return
        task = asyncio.get_running_loop().create_task(self._replace(worker_id, role))
        self._replacements.add(task)
        task.add_done_callback(self._replacements.discard)

    async def _replace(self, worker_id: str, role: str) -> None:
        now = time.monotonic()  # workers that keep dying (bad node, OOM at load) back off
        self._losses = [t for t in self._losses if now - t < LOSS_MEMORY_S] + [now]
        await asyncio.sleep(min(REPLACE_MAX_BACKOFF_S, 2.0 ** (len(self._losses) - 1) - 1))
        try:  # whatever is left of it (a hung actor is killed, its resources freed)
            await self.factory.destroy(worker_id)
        except Exception as exc:
            log.info("cleaning up lost worker %s: %s", worker_id, exc)
        for attempt in range(REPLACE_ATTEMPTS):
            try:
                new_id = await self.add_worker(role)
            except Exception as exc:  # e.g. no node fits yet: back off and retry
                delay = min(REPLACE_MAX_BACKOFF_S, 2.0**attempt)
                log.warning("replacing %s worker %s failed (%s); retry in %.0f s", role,
                            worker_id, exc, delay)
                await asyncio.sleep(delay)
            else:
                log.info("replaced lost %s worker %s with %s", role, worker_id, new_id)
                return
        log.error("gave up replacing %s worker %s after %d attempts", role, worker_id,
                  REPLACE_ATTEMPTS)

    async def shutdown(self) -> None:
        self._stopping = True
        for task in list(self._replacements):
            task.cancel()
        await asyncio.gather(*self._replacements, return_exceptions=True)
        await self.backend.shutdown()
        await self.factory.destroy_all()
        if self._owns_ray:
            import ray

            ray.shutdown()
