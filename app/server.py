"""Assemble a serving process: the cluster, the router service, gRPC and HTTP servers.

    server = await start_server(config)      # prints nothing; see server.endpoints()
    ...
    await server.stop()                        # aborts in-flight requests, stops workers
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from cluster.autoscaling import AutoscalingLoop
from cluster.config import ClusterConfig
from cluster.runtime import Cluster
from router.config import PortInUseError, RouterConfig, TLSConfig
from router.grpc_server import GrpcServer, start_grpc_server
from router.openai_server import HttpServer, start_http_server
from router.service import GenerationService

log = logging.getLogger(__name__)
METRICS_SYNC_S = 1.0


@dataclass
class RunningServer:
    cluster: Cluster
    service: GenerationService
    grpc: GrpcServer
    http: HttpServer
    _sync_task: asyncio.Task
    autoscaling: AutoscalingLoop | None = None

    def endpoints(self) -> dict[str, str]:
        host = self.service.config.host
        web = f"{'https' if self.service.config.tls else 'http'}://{host}:{self.http.port}"
        return {
            "grpc": f"{host}:{self.grpc.port}",
            "http": f"{web}/v1",
            "metrics": f"{web}/metrics",
            "health": f"{web}/health",
        }

    async def stop(self, drain_s: float = 0.0, give_up: asyncio.Event | None = None) -> None:
        """Drain (``GenerationService.drain``: for up to ``drain_s``, or until ``give_up``)
        while the servers still answer, so every stream ends with its final chunk; then
        stop the servers, the service and the cluster."""
        if self.autoscaling is not None:  # no pool changes while the requests finish
            await self.autoscaling.stop()
        self.cluster.stop_replacing()  # workers going away now are no crash loop
        await self.service.drain(drain_s, give_up)
        self._sync_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sync_task
        await self.grpc.stop()
        await self.http.stop()
        await self.service.shutdown()  # the backend (the drain ended what was in flight)
        await self.cluster.shutdown()


def router_config(config: ClusterConfig) -> RouterConfig:
    from engine.model_config import ModelConfig

    model = ModelConfig.from_pretrained(config.model.path)
    rc = config.router
    tls = TLSConfig(rc.tls_cert, rc.tls_key, rc.tls_client_ca) if rc.tls_cert else None
    return RouterConfig(
        model_name=config.model.name or Path(config.model.path).name,
        max_model_len=min(config.decode.engine.max_model_len, model.max_position_embeddings),
        max_inflight_requests=rc.max_inflight_requests, api_key=rc.api_key, host=rc.host,
        grpc_port=rc.grpc_port, http_port=rc.http_port, tls=tls,
        tool_call_parser=rc.tool_call_parser,
    )


async def start_server(config: ClusterConfig, mode: str = "ray") -> RunningServer:
    from engine.tokenizer import Tokenizer

    check_ports_free(config)  # before the cluster: no waiting for workers to learn this
    rc = router_config(config)  # before the cluster too: a bad TLS path fails at once
    cluster = Cluster(config, mode)
    try:
        await cluster.start()
    except BaseException:  # e.g. a worker not placed in time: stop the others and Ray
        await cluster.shutdown()
        raise
    grpc = None
    try:
        service = GenerationService(cluster.backend, Tokenizer(config.model.path), rc)
        service.metrics.transfer_backend = config.transfer.backend
        service.metrics.model_name = rc.model_name  # the vllm:* families' label
        await service.start()
        grpc = await start_grpc_server(service, rc.host, rc.grpc_port, tls=rc.tls)
        http = await start_http_server(service, rc.host, rc.http_port, api_key=rc.api_key,
                                       tls=rc.tls)
    except BaseException:
        if grpc is not None:  # the HTTP port was taken: free the gRPC one too
            await grpc.stop(grace=None)
        await cluster.shutdown()
        raise
    task = asyncio.create_task(_sync_metrics(cluster, service))
    autoscaling = None
    if config.autoscaler.enabled and not config.colocated:
        def count(decision) -> None:
            direction = "up" if decision.delta > 0 else "down"
            service.metrics.autoscaler_decisions.labels(pool=decision.pool,
                                                        direction=direction).inc()

        autoscaling = AutoscalingLoop(cluster, config.autoscaler_config(), config.slo, count)
        autoscaling.start()
    return RunningServer(cluster, service, grpc, http, task, autoscaling)


def check_ports_free(config: ClusterConfig) -> None:
    """Raise ``PortInUseError`` if another process listens on the gRPC or HTTP port. The
    servers' own binds report the same (this only tells before the workers start)."""
    rc = config.router
    family = socket.AF_INET6 if ":" in rc.host else socket.AF_INET
    for what, port, flag in (("gRPC", rc.grpc_port, "--grpc-port"),
                             ("HTTP", rc.http_port, "--http-port")):
        if port == 0:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
            try:
                probe.bind((rc.host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise PortInUseError(f"{what} port {port} on {rc.host} is already in use: "
                                     f"stop what holds it or choose another port ({flag})"
                                     ) from None


async def _sync_metrics(cluster: Cluster, service: GenerationService) -> None:
    """Copy the workers' latest stats into the router's Prometheus metrics, every period."""
    seen: dict[tuple[str, str], int] = {}
    while True:
        sync_metrics_once(cluster, service.metrics, seen)
        await asyncio.sleep(METRICS_SYNC_S)  # the scrape-facing refresh period


def sync_metrics_once(cluster: Cluster, m, seen: dict[tuple[str, str], int]) -> None:
    """One copy of the cluster's state into the metrics ``m`` (cumulative counters become
    increments; ``seen`` holds the totals already counted)."""
    def advance(counter, key: tuple[str, str], total: int, **labels) -> None:
        delta = total - seen.get(key, 0)
        if delta > 0:
            (counter.labels(**labels) if labels else counter).inc(delta)
        seen[key] = total

    for role in ("prefill", "decode", "colocated"):  # "ready or starting", as its help says
        m.pool_replicas.labels(pool=role).set(cluster.replicas(role, include_starting=True))
    for role, total in cluster.start_timeouts.items():
        advance(m.worker_start_timeouts, (role, "start_timeout"), total, pool=role)
    for role in cluster.workers_lost:
        advance(m.workers_lost, (role, "lost"), cluster.workers_lost[role], pool=role)
        advance(m.worker_replacement_failures, (role, "replace_failed"),
                cluster.replacement_failures[role], pool=role)
        advance(m.worker_replacements_given_up, (role, "replace_gave_up"),
                cluster.replacements_given_up[role], pool=role)
        m.worker_replacements_pending.labels(pool=role).set(cluster.replacements_pending(role))
    backend = cluster.backend
    for kind, total in backend.migrations.items():
        advance(m.request_migrations, ("migration", kind), total, kind=kind)
    advance(m.request_migrations_failed, ("migration", "failed"), backend.migrations_failed)
    stats_now = dict(backend.last_stats)
    for wid in [w for w in m.workers if w not in stats_now]:  # left the cluster
        m.remove_worker(wid)
        for key in [k for k in seen if k[0] == wid]:  # a reused id counts from its own 0
            del seen[key]
    for wid, stats in stats_now.items():
        _sync_worker(m, advance, wid, stats, cluster.config.transfer.backend)


def _sync_worker(m, advance, wid: str, stats, transfer_backend: str) -> None:
    """One worker's latest ``WorkerStats`` into its series."""
    labels = {"worker": wid, "pool": stats.role}
    m.add_worker(wid, stats.role)
    m.worker_requests_running.labels(**labels).set(stats.num_running)
    m.worker_requests_waiting.labels(**labels).set(stats.num_waiting)
    m.kv_blocks_used.labels(**labels).set(stats.total_blocks - stats.free_blocks)
    m.kv_blocks_free.labels(**labels).set(stats.free_blocks)
    if stats.prefix_cache_queries:
        m.prefix_cache_hit_rate.labels(**labels).set(
            stats.prefix_cache_hits / stats.prefix_cache_queries)
    advance(m.prefix_cache_queries, (wid, "prefix_queries"), stats.prefix_cache_queries,
            **labels)
    advance(m.prefix_cache_hits, (wid, "prefix_hits"), stats.prefix_cache_hits, **labels)
    advance(m.preemptions, (wid, "preempt"), stats.num_preemptions, **labels)
    advance(m.integrity_failures, (wid, "integrity"), stats.integrity_failures, **labels)
    advance(m.kv_transfer_bytes, (wid, "kv"), stats.kv_bytes_sent, backend=transfer_backend)
