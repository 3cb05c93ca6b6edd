"""/metrics of a real serving stack, read by a real Prometheus.

A 1 prefill + 1 decode cluster runs in this process (loopback KV transfer, no Ray) behind the
router's gRPC and HTTP servers (``start_server(config, mode="local")``). After traffic:

- the vllm:* families exist with ``model_name`` and agree with the splitserve_* ones;
- a Prometheus server started on loopback (the ``prometheus`` binary: Debian's package, which
  .ci/run installs) scrapes the router, loads deploy/prometheus/alerts.yml, and every
  expression of the Grafana dashboard, of the alert rules (comparisons made ``bool``, so a
  quiet alert still answers 0) and of vLLM's own dashboard's queries we serve returns a
  series. Without the binary that part skips, except under CI=true where it fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "splitserve-dashboard.json"
MODEL_NAME = "tiny-llama"
ENGINE = {"block_size": 4, "max_num_batched_tokens": 64, "max_num_seqs": 8,
          "max_model_len": 256, "num_threads": 1}
# Queries of vLLM's example Grafana dashboard (examples/online_serving/prometheus_grafana/
# grafana.json) and the newer names llm-d's and Dynamo's scrapers read, that we serve.
VLLM_QUERIES = (
    'histogram_quantile(0.99, sum by(le) (rate(vllm:e2e_request_latency_seconds_bucket'
    '{model_name="$model_name"}[$__rate_interval])))',
    'rate(vllm:e2e_request_latency_seconds_sum{model_name="$model_name"}[$__rate_interval])'
    ' / rate(vllm:e2e_request_latency_seconds_count{model_name="$model_name"}'
    '[$__rate_interval])',
    'rate(vllm:prompt_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:generation_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'histogram_quantile(0.9, sum by(le) (rate(vllm:time_per_output_token_seconds_bucket'
    '{model_name="$model_name"}[$__rate_interval])))',
    'histogram_quantile(0.9, sum by(le) (rate(vllm:inter_token_latency_seconds_bucket'
    '{model_name="$model_name"}[$__rate_interval])))',
    'histogram_quantile(0.9, sum by(le) (rate(vllm:time_to_first_token_seconds_bucket'
    '{model_name="$model_name"}[$__rate_interval])))',
    'vllm:num_requests_running{model_name="$model_name"}',
    'vllm:num_requests_waiting{model_name="$model_name"}',
    'vllm:gpu_cache_usage_perc{model_name="$model_name"}',
    'vllm:kv_cache_usage_perc{model_name="$model_name"}',
    'sum by(finished_reason) (increase(vllm:request_success_total{model_name="$model_name"}'
    '[$__rate_interval]))',
    'rate(vllm:request_queue_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_prefill_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_decode_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:num_preemptions_total{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:prefix_cache_hits_total{model_name="$model_name"}[$__rate_interval])'
    ' / rate(vllm:prefix_cache_queries_total{model_name="$model_name"}[$__rate_interval])',
    'label_values(model_name)',
)


class ServerThread:
    """``start_server(config, mode="local")`` on an event loop in a background thread."""

    def __init__(self, config) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        from app.server import start_server

        # The first start in a checkout also builds the CPU kernels (~1 min, more on a
        # loaded machine); later starts take about a second.
        self.server = self._call(start_server(config, mode="local"), 180)

    def _call(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http.port}"

    def close(self) -> None:
        try:
            self._call(self.server.stop(), 60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from cluster.config import ClusterConfig
    from engine.make_model import make_model

    model = make_model(tmp_path_factory.mktemp("m") / "llama", "llama", "tiny", seed=0,
                       progress=False)
    config = ClusterConfig.model_validate({
        "model": {"path": str(model), "device": "cpu", "name": MODEL_NAME},
        "prefill": {"engine": ENGINE}, "decode": {"engine": ENGINE},
        "transfer": {"backend": "loopback", "timeout_s": 10},
        "scheduler": {"block_size": 4},
        "router": {"host": "127.0.0.1", "grpc_port": 0, "http_port": 0},
        "autoscaler": {"enabled": False},
    })
    running = ServerThread(config)
    try:
        yield running
    finally:
        running.close()


def _traffic(base_url: str, n: int = 6) -> None:
    """Finished requests (plain and streamed), a client error, and a shared prefix."""
    prefix = [5 + i for i in range(24)]  # 6 blocks of 4: the second request hits the cache
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for i in range(n):
            body = {"model": MODEL_NAME, "prompt": prefix + [100 + i, 200 + i],
                    "max_tokens": 6, "ignore_eos": True, "stream": i % 2 == 1}
            reply = http.post("/v1/completions", json=body)
            assert reply.status_code == 200, reply.text
        bad = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x",
                                                  "max_tokens": -1})
        assert bad.status_code == 400, bad.text


def _scrape(base_url: str) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _get(series: dict, name: str, **labels) -> float:
    return series[(name, frozenset(labels.items()))]


def _wait_for_worker_stats(base_url: str) -> dict:
    """A scrape taken after the sync loop copied stats that include the traffic."""
    deadline = time.monotonic() + 20
    while True:
        series = _scrape(base_url)
        queries = [v for (name, _), v in series.items()
                   if name == "splitserve_prefix_cache_queries_total"]
        if queries and sum(queries) > 0:
            return series
        assert time.monotonic() < deadline, "worker stats never reached /metrics"
        time.sleep(0.3)


def test_vllm_families_exist_with_model_name_and_agree(server):
    _traffic(server.base_url)
    s = _wait_for_worker_stats(server.base_url)
    router = {"model_name": MODEL_NAME, "engine": "router"}
    assert _get(s, "splitserve_prompt_tokens_total") > 0
    for ours, theirs in (("splitserve_prompt_tokens_total", "vllm:prompt_tokens_total"),
                         ("splitserve_generation_tokens_total",
                          "vllm:generation_tokens_total")):
        assert _get(s, theirs, **router) == _get(s, ours)
    for reason in ("stop", "length", "abort"):
        assert _get(s, "vllm:request_success_total", finished_reason=reason, **router) == \
            _get(s, "splitserve_request_finish_total", reason=reason)
    assert _get(s, "splitserve_request_finish_total", reason="length") == 6
    for ours, theirs in (
            ("splitserve_time_to_first_token_seconds", "vllm:time_to_first_token_seconds"),
            ("splitserve_inter_token_latency_seconds", "vllm:inter_token_latency_seconds"),
            ("splitserve_inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
            ("splitserve_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds")):
        for suffix in ("_count", "_sum"):
            assert _get(s, theirs + suffix, **router) == _get(s, ours + suffix), theirs
        assert _get(s, theirs + "_count", **router) > 0
    for theirs, phase in (("vllm:request_prefill_time_seconds", "prefill_compute"),
                          ("vllm:request_decode_time_seconds", "decode")):
        assert _get(s, theirs + "_count", **router) == 6 == \
            _get(s, "splitserve_request_phase_seconds_count", phase=phase)
    assert _get(s, "splitserve_request_phase_seconds_count", phase="kv_transfer") == 6
    assert _get(s, "splitserve_requests_total", code="INVALID_ARGUMENT") == 1
    assert _get(s, "splitserve_requests_total", code="INTERNAL") == 0  # known code, 0 series
    _check_worker_families(s)


def _check_worker_families(s: dict) -> None:
    workers = {dict(labels)["worker"]: dict(labels)["pool"] for name, labels in s
               if name == "splitserve_kv_blocks_used"}
    assert sorted(workers.values()) == ["decode", "prefill"], workers
    for worker, pool in workers.items():
        w, v = {"worker": worker, "pool": pool}, {"model_name": MODEL_NAME, "engine": worker,
                                                   "pool": pool}
        used, free = _get(s, "splitserve_kv_blocks_used", **w), \
            _get(s, "splitserve_kv_blocks_free", **w)
        assert _get(s, "vllm:kv_cache_usage_perc", **v) == pytest.approx(used / (used + free))
        assert _get(s, "vllm:gpu_cache_usage_perc", **v) == _get(s, "vllm:kv_cache_usage_perc",
                                                                 **v)
        for ours, theirs in (("splitserve_worker_requests_running", "vllm:num_requests_running"),
                             ("splitserve_worker_requests_waiting", "vllm:num_requests_waiting"),
                             ("splitserve_preemptions_total", "vllm:num_preemptions_total"),
                             ("splitserve_prefix_cache_queries_total",
                              "vllm:prefix_cache_queries_total"),
                             ("splitserve_prefix_cache_hits_total",
                              "vllm:prefix_cache_hits_total")):
            assert _get(s, theirs, **v) == _get(s, ours, **w), (theirs, worker)
        assert _get(s, "splitserve_kv_integrity_failures_total", **w) == 0
    prefill = next(w for w, p in workers.items() if p == "prefill")
    hits = _get(s, "splitserve_prefix_cache_hits_total", worker=prefill, pool="prefill")
    assert hits > 0, "the shared 24-token prefix was never served from the prefix cache"


# ---------------------------------------------------------------------------------------------
# A real Prometheus


def _prometheus() -> str:
    path = shutil.which("prometheus")
    if path is None:
        message = "prometheus not installed (Debian: apt-get install prometheus; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must run this test")
        pytest.skip(message)
    return path


def _free_port() -> int:
    """A free loopback port in 23000-23999 (this suite's range for Prometheus)."""
    ports = list(range(23000, 24000))
    random.shuffle(ports)
    for port in ports:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 23000-23999")


class Prometheus:
    """A Prometheus server on loopback scraping ``target`` every second, with alerts.yml."""

    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        self.port = _free_port()
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "splitserve",
                                "static_configs": [{"targets": [target]}]}]}))
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, check, what: str, timeout_s: float = 30.0):
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"prometheus exited: {self.log_text()}"
            try:
                result = check()
            except httpx.HTTPError:
                result = None
            if result:
                return result
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.25)

    def query(self, expr: str) -> list:
        reply = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = reply.json()
        assert body.get("status") == "success", (expr, body)
        return body["data"]["result"]

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-2000:]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?!\s*bool)\s*(?=-?[0-9.])")
_LABEL_VALUES = re.compile(r"label_values\(\s*(?:([A-Za-z_:][\w:]*)\s*,\s*)?(\w+)\s*\)")


def _as_query(expr: str) -> str:
    """A dashboard / alert expression as an instant query that answers even when quiet:
    Grafana variables filled in, comparisons with a number made ``bool``, and
    ``label_values(metric, label)`` as a count by that label."""
    expr = expr.replace("$__rate_interval", "30s").replace("${", "$")
    expr = re.sub(r"\$model_name\b", MODEL_NAME, expr)
    expr = re.sub(r'(\w+)=~?"\$\w+"', r'\1=~".*"', expr)  # job="$job", pool=~"$pool"
    expr = _LABEL_VALUES.sub(_count_by_label, expr)
    return _COMPARISON.sub(r"\1 bool ", expr)


def _count_by_label(match: re.Match) -> str:
    metric, label = match.group(1), match.group(2)
    selector = metric or "{" + label + '!=""}'
    return f"count by ({label}) ({selector})"


def _expressions() -> list[tuple[str, str]]:
    import yaml

    out = []
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            out.append((f"alert {rule['alert']}", rule["expr"]))
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']}", query))
    out += [(f"vLLM dashboard #{i}", q) for i, q in enumerate(VLLM_QUERIES)]
    return out


def test_every_dashboard_and_alert_expression_returns_a_series(server, tmp_path):
    prom = Prometheus(_prometheus(), server.base_url.removeprefix("http://"), tmp_path)
    try:
        prom.wait(lambda: httpx.get(prom.url + "/-/ready", timeout=5).status_code == 200,
                  "prometheus to be ready")
        prom.wait(lambda: prom.query('up{job="splitserve"} == 1'), "the first scrape")
        _traffic(server.base_url, n=4)
        _wait_for_worker_stats(server.base_url)
        time.sleep(2.5)  # two more scrapes: the traffic is inside every rate() window
        prom.wait(lambda: prom.query("splitserve_generation_tokens_total > 0"),
                  "the traffic in Prometheus")
        for ours, theirs in (("splitserve_generation_tokens_total",
                              "vllm:generation_tokens_total"),
                             ("splitserve_time_to_first_token_seconds_count",
                              "vllm:time_to_first_token_seconds_count")):
            [a], [b] = prom.query(f"sum({ours})"), prom.query(
                f'sum({theirs}{{model_name="{MODEL_NAME}"}})')
            assert float(a["value"][1]) == float(b["value"][1]) > 0, (ours, a, b)
        empty = [f"{where}: {_as_query(expr)}" for where, expr in _expressions()
                 if not prom.query(_as_query(expr))]
        assert not empty, "expressions without a series:\n" + "\n".join(empty)
        rules = prom.wait(lambda: _evaluated_rules(prom), "an evaluation of every rule")
        broken = [f"{r['name']}: {r.get('lastError')}" for r in rules if r["health"] != "ok"]
        assert not broken, broken
        assert len(rules) >= 10
    finally:
        prom.close()


def _evaluated_rules(prom: Prometheus) -> list[dict]:
    groups = httpx.get(prom.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    return rules if rules and all(r["health"] != "unknown" for r in rules) else []
