"""Every Prometheus metric splitserve exports, declared in one place.

Each router instance owns a ``ServingMetrics`` with its own ``CollectorRegistry`` (no global
registry, so tests can run several servers in one process). The router's lifecycle sets the
request metrics; the server's sync loop (app/server.py) copies the cluster's worker and pool
state onto the same object, so one ``/metrics`` endpoint shows both.

Two sets of names, one set of measurements (docs/metrics.md has the full mapping):

- ``splitserve_*``: our own families. Labels: ``worker`` is a worker id, ``pool`` is
  ``prefill``, ``decode`` or ``colocated``, ``code`` is a gRPC-style status name (``OK``,
  ``INVALID_ARGUMENT``, ...), ``direction`` is ``up`` or ``down``, ``kind`` a migration kind.
- ``vllm:*``: the names vLLM's dashboards and llm-d's / Dynamo's scrapers read, with vLLM's
  labels (``model_name``, ``engine``) and bucket boundaries. They are not measured twice: the
  ``VllmView`` collector derives them from the ``splitserve_*`` families at scrape time, so
  the two always agree. Router-level families carry ``engine="router"``; worker-level ones
  carry ``engine=<worker id>`` and ``pool``.

Labelled families start with a 0 series for every label value known in advance (status
codes, finish reasons, pools, phases, migration kinds), so panels and alert expressions show 0
instead of "No data" before the first event. Worker series exist while the worker does:
``remove_worker`` drops them when it leaves the cluster.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), for the vllm:* histograms.
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                     2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
VLLM_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# Our buckets, in seconds: vLLM's boundaries (so the vllm:* view is exact) plus finer ones
# below, because a disaggregated step or transfer takes well under vLLM's lowest bucket.
# The SLO thresholds (TTFT 0.5 s, ITL 0.05 s) are boundaries, so alerts are exact there.
_TTFT_BUCKETS = tuple(sorted({0.0005, 0.0025, *VLLM_TTFT_BUCKETS}))
_ITL_BUCKETS = tuple(sorted({0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.015,
                             0.02, 0.03, 0.04, *VLLM_ITL_BUCKETS}))
_E2E_BUCKETS = tuple(sorted({0.01, 0.025, 0.05, 0.1, 0.25, *VLLM_E2E_BUCKETS}))
# Phases and KV transfers: 100 us to 10 minutes, 7 boundaries a decade (neighbours at most
# 1.5x apart), so a p90 panel lands within ~50 % of the true value for a 0.3 ms queue wait as
# well as a minute-long decode (a 21.7 ms transfer reads 24.5 ms, not the 45 ms of a 50 ms
# lowest bucket).
_DECADE = (1, 1.5, 2, 2.5, 3.5, 5, 7)
_PHASE_BUCKETS = (*(round(m * 10.0 ** e, 6) for e in range(-4, 2) for m in _DECADE),
                  100.0, 150.0, 200.0, 300.0, 600.0)
_TRANSFER_BUCKETS = _PHASE_BUCKETS

# Phases of the timing breakdown (BackendOutput.timing keys plus the router's own two).
TIMING_PHASES = ("router_queue", "prefill_queue", "prefill_compute", "kv_transfer",
                 "decode_queue", "decode", "ttft", "e2e", "migration")
# Label values known in advance: each gets a 0 series at start.
REQUEST_CODES = ("OK", "INVALID_ARGUMENT", "REQUEST_TOO_LARGE", "NOT_FOUND", "UNAUTHENTICATED",
                 "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED",
                 "INTERNAL")  # router.errors' table plus OK (a test keeps them equal)
FINISH_REASONS = ("stop", "length", "abort")  # vLLM's FinishReason values
POOLS = ("prefill", "decode", "colocated")
SCALED_POOLS = ("prefill", "decode")  # the autoscaler's
MIGRATION_KINDS = ("prefill", "decode", "transfer")  # cluster.flight.MIGRATION_KINDS


class ServingMetrics:
    """The metrics of one router instance and the cluster behind it."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 model_name: str = "splitserve") -> None:
        self.model_name = model_name  # the vllm:* families' model_name label; set by the server
        self.registry = registry if registry is not None else CollectorRegistry()
        self._transfer_backend = "none"
        self.workers: dict[str, str] = {}  # worker id -> pool of the worker series held
        self._declare_request_metrics()
        self._declare_worker_metrics()
        self._declare_cluster_metrics()
        self._initialise_known_labels()
        self.registry.register(VllmView(self))

    @property
    def transfer_backend(self) -> str:
        """The ``backend`` label of the KV transfer metrics (the server sets it)."""
        return self._transfer_backend

    @transfer_backend.setter
    def transfer_backend(self, backend: str) -> None:
        self._transfer_backend = backend
        self.kv_transfer_bytes.labels(backend=backend)
        self.kv_transfer_seconds.labels(backend=backend)

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
            ["phase"], buckets=_PHASE_BUCKETS, registry=r)
        self.requests = Counter(
            "splitserve_requests_total",
            "Requests by outcome: OK or the gRPC-style status code they failed with.",
            ["code"], registry=r)
        self.finish_reasons = Counter(
            "splitserve_request_finish_total",
            "Finished requests by finish reason (stop, length, abort: aborted, or the "
            "client cancelled or went away).",
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
        self.request_migrations = Counter(
            "splitserve_request_migrations_total",
            "Requests moved to another worker after a failure, by kind: prefill (re-prefilled "
            "elsewhere), decode (resumed elsewhere), transfer (KV channel rebuilt, retried).",
            ["kind"], registry=r)
        self.request_migrations_failed = Counter(
            "splitserve_request_migrations_failed_total",
            "Requests failed because they ran out of migrations or time.", registry=r)

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
            "Fraction of prompt tokens served from the prefix cache since the worker started.",
            wp, registry=r)
        self.prefix_cache_queries = Counter(
            "splitserve_prefix_cache_queries_total",
            "Prompt tokens looked up in a worker's prefix cache.", wp, registry=r)
        self.prefix_cache_hits = Counter(
            "splitserve_prefix_cache_hits_total",
            "Prompt tokens found in a worker's prefix cache.", wp, registry=r)
        self.preemptions = Counter(
            "splitserve_preemptions_total", "Requests preempted for lack of KV blocks.", wp,
            registry=r)
        self.integrity_failures = Counter(
            "splitserve_kv_integrity_failures_total",
            "Failed block-pool integrity checks (each also logged as an error).", wp,
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
        self.worker_start_timeouts = Counter(
            "splitserve_worker_start_timeouts_total",
            "Workers given up because they were not placed and ready in time.", ["pool"],
            registry=r)
        self.workers_lost = Counter(
            "splitserve_workers_lost_total",
            "Workers that died or stopped answering while serving (each is replaced).",
            ["pool"], registry=r)
        self.worker_replacement_failures = Counter(
            "splitserve_worker_replacement_failures_total",
            "Starts of a lost worker's replacement that failed (each is retried, backing off).",
            ["pool"], registry=r)
        self.worker_replacements_given_up = Counter(
            "splitserve_worker_replacements_given_up_total",
            "Lost workers left unreplaced after every retry failed (the pool stays smaller).",
            ["pool"], registry=r)
        self.worker_replacements_pending = Gauge(
            "splitserve_worker_replacements_pending",
            "Lost workers not replaced yet (waiting out a crash-loop back-off, or starting).",
            ["pool"], registry=r)

    def _initialise_known_labels(self) -> None:
        """A 0 series for every label value known in advance (``labels()`` creates it)."""
        for code in REQUEST_CODES:
            self.requests.labels(code=code)
        for reason in FINISH_REASONS:
            self.finish_reasons.labels(reason=reason)
        for phase in TIMING_PHASES:
            self.request_phase.labels(phase=phase)
        for kind in MIGRATION_KINDS:
            self.request_migrations.labels(kind=kind)
        for pool in POOLS:
            self.pool_replicas.labels(pool=pool)
            self.worker_start_timeouts.labels(pool=pool)
            for family in (self.workers_lost, self.worker_replacement_failures,
                           self.worker_replacements_given_up, self.worker_replacements_pending):
                family.labels(pool=pool)
        for pool in SCALED_POOLS:
            for direction in ("up", "down"):
                self.autoscaler_decisions.labels(pool=pool, direction=direction)

    def _worker_families(self) -> tuple:
        return (self.worker_requests_running, self.worker_requests_waiting, self.kv_blocks_used,
                self.kv_blocks_free, self.prefix_cache_hit_rate, self.prefix_cache_queries,
                self.prefix_cache_hits, self.preemptions, self.integrity_failures)

    def add_worker(self, worker: str, pool: str) -> None:
        """Give a worker its series (0 until its first stats), once."""
        if self.workers.get(worker) == pool:
            return
        if worker in self.workers:  # same id, new role: the old series go
            self.remove_worker(worker)
        self.workers[worker] = pool
        for family in self._worker_families():
            family.labels(worker=worker, pool=pool)

    def remove_worker(self, worker: str) -> None:
        """Drop a departed worker's series, so dashboards stop showing it."""
        pool = self.workers.pop(worker, None)
        if pool is None:
            return
        for family in self._worker_families():  # add_worker created each of them
            family.remove(worker, pool)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _samples(metric) -> list:
    return [s for family in metric.collect() for s in family.samples]


class VllmView:
    """The vllm:* families, derived at scrape time from the splitserve_* ones (a collector).

    Nothing is counted twice: each vllm:* value is read from the splitserve_* family it maps
    to (docs/metrics.md), histograms re-bucketed to vLLM's boundaries, which are a subset of
    ours (exact: the cumulative count at a shared boundary is the same number).
    """

    def __init__(self, metrics: ServingMetrics) -> None:
        self._m = metrics

    def describe(self) -> list:
        return []  # names are not reserved: collect() is cheap and only runs on scrape

    def collect(self) -> Iterator[Metric]:
        yield from self._router_families()
        yield from self._worker_gauges()
        yield from self._worker_counters()

    def _router_families(self) -> Iterator[Metric]:
        m, router = self._m, (self._m.model_name, "router")
        yield _histogram("vllm:time_to_first_token_seconds", "Time to first token (seconds).",
                         m.time_to_first_token, VLLM_TTFT_BUCKETS, router)
        for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
            yield _histogram(name, "Time between consecutive output tokens (seconds).",
                             m.inter_token_latency, VLLM_ITL_BUCKETS, router)
        yield _histogram("vllm:e2e_request_latency_seconds",
                         "End-to-end latency of finished requests (seconds).",
                         m.e2e_request_latency, VLLM_E2E_BUCKETS, router)
        for name, phase in (("vllm:request_queue_time_seconds", "prefill_queue"),
                            ("vllm:request_prefill_time_seconds", "prefill_compute"),
                            ("vllm:request_decode_time_seconds", "decode")):
            yield _histogram(name, f"Per-request {phase} phase time (seconds).",
                             m.request_phase, None, router, phase=phase)
        for name, doc, source in (
                ("vllm:prompt_tokens", "Prompt tokens of admitted requests.", m.prompt_tokens),
                ("vllm:generation_tokens", "Generated tokens.", m.generation_tokens)):
            family = CounterMetricFamily(name, doc, labels=["model_name", "engine"])
            family.add_metric(router, _total(source))
            yield family
        success = CounterMetricFamily("vllm:request_success", "Finished requests by reason.",
                                      labels=["model_name", "engine", "finished_reason"])
        for s in _samples(m.finish_reasons):
            if s.name.endswith("_total"):
                success.add_metric([*router, s.labels["reason"]], s.value)
        yield success

    def _worker_gauges(self) -> Iterator[Metric]:
        m, labels = self._m, ["model_name", "engine", "pool"]
        for name, doc, source in (
                ("vllm:num_requests_running", "Requests in a worker's running batch.",
                 m.worker_requests_running),
                ("vllm:num_requests_waiting", "Requests queued at a worker.",
                 m.worker_requests_waiting)):
            family = GaugeMetricFamily(name, doc, labels=labels)
            for s in _samples(source):
                family.add_metric(self._worker_key(s.labels), s.value)
            yield family
        used = {(s.labels["worker"], s.labels["pool"]): s.value for s in _samples(m.kv_blocks_used)}
        free = {(s.labels["worker"], s.labels["pool"]): s.value for s in _samples(m.kv_blocks_free)}
        for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            family = GaugeMetricFamily(name, "KV-cache usage of a worker: 1 means 100 percent.",
                                       labels=labels)
            for (worker, pool), n in used.items():
                total = n + free.get((worker, pool), 0.0)
                family.add_metric([m.model_name, worker, pool], n / total if total else 0.0)
            yield family

    def _worker_counters(self) -> Iterator[Metric]:
        m = self._m
        for name, doc, source in (
                ("vllm:num_preemptions", "Requests preempted by a worker.", m.preemptions),
                ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                 m.prefix_cache_queries),
                ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                 m.prefix_cache_hits)):
            family = CounterMetricFamily(name, doc, labels=["model_name", "engine", "pool"])
            for s in _samples(source):
                if s.name.endswith("_total"):
                    family.add_metric(self._worker_key(s.labels), s.value)
            yield family

    def _worker_key(self, labels: dict[str, str]) -> list[str]:
        return [self._m.model_name, labels["worker"], labels["pool"]]


def _total(counter: Counter) -> float:
    return next(s.value for s in _samples(counter) if s.name.endswith("_total"))


def _histogram(name: str, doc: str, source: Histogram, bounds: tuple[float, ...] | None,
               labels: tuple[str, str], **match: str) -> HistogramMetricFamily:
    """The splitserve histogram ``source`` (its child with labels ``match``) re-exposed with
    vLLM's ``bounds`` (None: our own boundaries, all of them)."""
    keep = set(bounds) if bounds is not None else None
    buckets, total = [], 0.0
    for s in _samples(source):
        if any(s.labels.get(k) != v for k, v in match.items()):
            continue
        if s.name.endswith("_bucket"):
            le = s.labels["le"]
            if keep is None or le == "+Inf" or float(le) in keep:
                buckets.append((le, s.value))
        elif s.name.endswith("_sum"):
            total = s.value
    family = HistogramMetricFamily(name, doc, labels=["model_name", "engine"])
    family.add_metric(list(labels), buckets, total)
    return family
