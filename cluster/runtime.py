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

from cluster.cluster_backend import ClusterBackend
from cluster.config import ClusterConfig
from cluster.global_scheduler import GlobalScheduler
from cluster.pools import WorkerFactory

log = logging.getLogger(__name__)


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

    async def shutdown(self) -> None:
        await self.backend.shutdown()
        await self.factory.destroy_all()
        if self._owns_ray:
            import ray

            ray.shutdown()
