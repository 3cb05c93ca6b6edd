"""Every Prometheus metric splitserve exports, declared in one place.

Each router instance owns a ``ServingMetrics`` with its own ``CollectorRegistry`` (no global
registry, so tests can run several servers in one process). The router's lifecycle sets the
request metrics; the cluster backend sets the worker and pool metrics on the same object, so
one ``/metrics`` endpoint shows both.

Labels: ``worker`` is a worker id, ``pool`` is ``prefill`` or ``decode`` (or ``colocated``),
``code`` is a gRPC-style status name (``OK``, ``INVALID_ARGUMENT``, ...), ``direction`` is
``up`` or ``down``.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Latency buckets in seconds: dense below a second (TTFT, ITL), sparse up to minutes (E2E).
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0,
                120.0, 240.0, 480.0)
_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0)

# Phases of the timing breakdown (BackendOutput.timing keys plus the router's own two).
TIMING_PHASES = ("router_queue", "prefill_queue", "prefill_compute", "kv_transfer",
                 "decode_queue", "decode", "ttft", "e2e")


class ServingMetrics:
    """The metrics of one router instance and the cluster behind it."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.transfer_backend = "none"  # label for KV transfer metrics; set by the server
        self.registry = registry if registry is not None else CollectorRegistry()
        self._declare_request_metrics()
        self._declare_worker_metrics()
        self._declare_cluster_metrics()

    def _declare_request_metrics(self) -> None:
        r = self.registry
        self.time_to_first_token = Histogram(
            "splitserve_time_to_first_token_seconds",
            "Arrival at the router until the first generated token reaches it.",
            buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "splitserve_inter_token_latency_seconds",
            "Time between consecutive generated tokens (a step's tokens share its gap).",
            buckets=_ITL_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            "splitserve_e2e_request_latency_seconds",
            "Arrival at the router until the request's terminal event, for finished requests.",
            buckets=_E2E_BUCKETS, registry=r)
        self.request_phase = Histogram(
            "splitserve_request_phase_seconds",
            "Per-phase time of finished requests (router_queue, prefill_compute, ...).",
            ["phase"], buckets=_E2E_BUCKETS, registry=r)
        self.requests = Counter(
            "splitserve_requests_total",
            "Requests by outcome: OK or the gRPC-style status code they failed with.",
            ["code"], registry=r)
        self.finish_reasons = Counter(
            "splitserve_request_finish_total",
            "Successful requests by finish reason (stop, length, abort).",
            ["reason"], registry=r)
        self.requests_running = Gauge(
            "splitserve_requests_running",
            "Requests in the router that have produced their first token.",
            registry=r)
        self.requests_waiting = Gauge(
            "splitserve_requests_waiting",
            "Requests admitted by the router still waiting for their first token.",
            registry=r)
        self.prompt_tokens = Counter(
            "splitserve_prompt_tokens_total", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter(
            "splitserve_generation_tokens_total", "Generated tokens streamed back.", registry=r)

    def _declare_worker_metrics(self) -> None:
        r, wp = self.registry, ["worker", "pool"]
        self.worker_requests_running = Gauge(
            "splitserve_worker_requests_running", "Requests in a worker's running batch.",
            wp, registry=r)
        self.worker_requests_waiting = Gauge(
            "splitserve_worker_requests_waiting", "Requests queued at a worker.", wp,
            registry=r)
        self.kv_blocks_used = Gauge(
            "splitserve_kv_blocks_used", "KV cache blocks held by requests or the prefix cache.",
            wp, registry=r)
        self.kv_blocks_free = Gauge(
            "splitserve_kv_blocks_free", "KV cache blocks free to allocate.", wp, registry=r)
        self.prefix_cache_hit_rate = Gauge(
            "splitserve_prefix_cache_hit_rate",
            "Fraction of prompt tokens served from the prefix cache (recent window).",
            wp, registry=r)
        self.preemptions = Counter(
            "splitserve_preemptions_total", "Requests preempted for lack of KV blocks.", wp,
            registry=r)

    def _declare_cluster_metrics(self) -> None:
        r = self.registry
        self.kv_transfer_bytes = Counter(
            "splitserve_kv_transfer_bytes_total",
            "Bytes of KV cache sent from prefill to decode workers.", ["backend"], registry=r)
        self.kv_transfer_seconds = Histogram(
            "splitserve_kv_transfer_seconds", "Time to move one request's KV cache.",
            ["backend"], buckets=_TRANSFER_BUCKETS, registry=r)
        self.pool_replicas = Gauge(
            "splitserve_pool_replicas", "Workers in a pool (ready or starting).", ["pool"],
            registry=r)
        self.autoscaler_decisions = Counter(
            "splitserve_autoscaler_decisions_total",
            "Autoscaler decisions that changed a pool's size.", ["pool", "direction"],
            registry=r)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
