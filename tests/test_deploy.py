"""Offline checks of everything under deploy/: it parses, and it agrees with the code.

- every YAML / JSON file parses (Helm templates: balanced ``{{ }}``, values.yaml parses);
- both example pool configs and the Helm chart's ``pool:`` validate with ``ClusterConfig``;
- every metric and label used by the alert rules and the Grafana dashboard exists in
  ``router.metrics.ServingMetrics`` (histogram ``_bucket/_sum/_count``, counter ``_total``);
- the alert thresholds equal the example pool config's SLOs;
- the KubeRay worker groups (plain manifest and Helm values) can hold the pools: custom
  resource names, GPUs and CPUs per pod, maxReplicas;
- ports, config paths and names line up between the pool config, the manifests and the image.

With ``promtool`` installed (Debian's ``prometheus`` package; .ci/run installs it) the alert
rules are also checked and unit-tested (deploy/prometheus/alerts_test.yml). Helm itself lints
and renders the chart in tests/test_deploy_helm.py, the RayService is checked in
tests/test_deploy_rayservice.py. No network, no cluster; about a second.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.config import ClusterConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "splitserve"
POOL_GPU = DEPLOY / "examples" / "pool.yaml"
POOL_CPU = DEPLOY / "examples" / "pool-cpu-local.yaml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "splitserve-dashboard.json"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
SERVICE = DEPLOY / "kuberay" / "service.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"

# Labels Prometheus attaches to every scraped series (target labels, prometheus.yml relabeling).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "cluster", "ray_cluster"}
ROLES = ("prefill", "decode")


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def _load_all(path: Path) -> tuple:
    """The YAML documents of a file (parsed once per session; treat them as read-only)."""
    docs = yaml.load_all(path.read_text(), Loader=_Loader)  # CSafeLoader or SafeLoader
    return tuple(doc for doc in docs if doc is not None)


def _load(path: Path):
    docs = _load_all(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    return docs[0]


# ---------------------------------------------------------------------------------------------
# Everything parses


def _files(*suffixes: str) -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in suffixes)


def test_expected_files_exist():
    for rel in ("examples/pool.yaml", "examples/pool-cpu-local.yaml", "docker/Dockerfile",
                "kuberay/raycluster.yaml", "kuberay/service.yaml", "kuberay/rayservice.yaml",
                "kuberay/splitserve_gate.py", "helm/splitserve/Chart.yaml",
                "helm/splitserve/values.yaml", "helm/splitserve/values.schema.json",
                "helm/splitserve/templates/raycluster.yaml",
                "helm/splitserve/templates/rayservice.yaml",
                "helm/splitserve/templates/service.yaml",
                "helm/splitserve/templates/configmap.yaml", "prometheus/prometheus.yml",
                "prometheus/alerts.yml", "grafana/splitserve-dashboard.json", "README.md"):
        assert (DEPLOY / rel).is_file(), f"deploy/{rel} is missing"


@pytest.mark.parametrize("path", _files(".yaml", ".yml"), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path):
    text = path.read_text()
    if CHART / "templates" in path.parents:
        # Go templates are not YAML until rendered: check the actions are well formed.
        assert text.count("{{") == text.count("}}"), f"{path}: unbalanced {{{{ }}}}"
        opened = len(re.findall(r"{{-?\s*(?:if|with|range|define)\b", text))
        closed = len(re.findall(r"{{-?\s*end\s*-?}}", text))
        assert opened == closed, f"{path}: {opened} blocks opened, {closed} closed"
        return
    assert _load_all(path), f"{path} is empty"


@pytest.mark.parametrize("path", _files(".json"), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_json_parses(path: Path):
    assert json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Pool configs


@pytest.mark.parametrize("path", [POOL_GPU, POOL_CPU], ids=lambda p: p.name)
def test_example_pool_config_validates(path: Path):
    config = ClusterConfig.from_yaml(path)
    assert not config.colocated
    assert config.prefill.replicas >= 1 and config.decode.replicas >= 1
    # The autoscaler's bounds and the pools' bounds say the same thing.
    a = config.autoscaler
    assert (a.min_prefill, a.max_prefill) == (config.prefill.min_replicas,
                                              config.prefill.max_replicas)
    assert (a.min_decode, a.max_decode) == (config.decode.min_replicas,
                                            config.decode.max_replicas)


def test_gpu_example_is_the_documented_deployment():
    c = ClusterConfig.from_yaml(POOL_GPU)
    assert (c.prefill.replicas, c.decode.replicas) == (2, 4)
    assert c.prefill.num_gpus >= 1 and c.decode.num_gpus >= 1
    # A TP=2 prefill group beside TP=1 decode workers: 2 GPUs per prefill worker.
    assert (c.prefill.tensor_parallel_size, c.decode.tensor_parallel_size) == (2, 1)
    assert (c.prefill.gpus_per_worker, c.decode.gpus_per_worker) == (2, 1)
    assert c.transfer.backend == "torch_dist" and c.scheduler.policy == "kv_aware"
    assert (c.slo.ttft_s, c.slo.itl_s, c.slo.percentile) == (0.5, 0.05, 90)
    assert c.autoscaler.enabled
    assert c.router.host == "0.0.0.0", "inside a pod the router must listen on every interface"
    # flash-attn's paged KV path takes multiples of 256 tokens.
    for pool in (c.prefill, c.decode):
        if pool.engine.attention_backend == "flash_attn":
            assert pool.engine.block_size % 256 == 0
    assert c.scheduler.max_decode_partners_per_prefill <= c.transfer.max_channels
    assert set(c.prefill.resources) and set(c.decode.resources)
    assert not set(c.prefill.resources) & set(c.decode.resources)


def test_cpu_example_runs_on_a_laptop():
    c = ClusterConfig.from_yaml(POOL_CPU)
    assert c.model.device == "cpu" and c.prefill.num_gpus == 0 and c.decode.num_gpus == 0
    assert (c.prefill.replicas, c.decode.replicas) == (1, 1)
    assert not c.prefill.resources and not c.decode.resources  # a plain local Ray has none
    assert c.ray.address is None


def _helm_values() -> dict:
    return _load(CHART / "values.yaml")


def test_helm_values_pool_validates():
    pool = ClusterConfig.model_validate(_helm_values()["pool"])
    gpu = ClusterConfig.from_yaml(POOL_GPU)
    # The chart's default deployment is the example's.
    for role in ROLES:
        mine, example = getattr(pool, role), getattr(gpu, role)
        assert mine.resources == example.resources
        assert (mine.replicas, mine.min_replicas, mine.max_replicas) == (
            example.replicas, example.min_replicas, example.max_replicas)
    assert pool.slo == gpu.slo
    assert pool.router.host == "0.0.0.0"


# ---------------------------------------------------------------------------------------------
# Helm chart: every `.Values.x.y` a template reads exists in values.yaml


def _lookup(values: dict, dotted: str) -> bool:
    node = values
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return True  # below a leaf (a method or a map key chosen at render time)
        if part not in node:
            return False
        node = node[part]
    return True


def test_helm_chart_metadata():
    chart = _load(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2" and chart["name"] == "splitserve"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])


def test_helm_templates_reference_existing_values():
    values = _helm_values()
    templates = sorted((CHART / "templates").glob("*"))
    assert {p.name for p in templates} >= {"raycluster.yaml", "rayservice.yaml", "service.yaml",
                                          "configmap.yaml", "_helpers.tpl", "_cluster.tpl"}
    missing = []
    for path in templates:
        text = path.read_text()
        for ref in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", text):
            if not _lookup(values, ref.rstrip(".")):
                missing.append(f"{path.name}: .Values.{ref}")
        # worker-group fields read through `$group.x`
        for ref in re.findall(r"\$group\.([A-Za-z0-9_]+)", text):
            for role in ROLES:
                if ref not in values["workerGroups"][role]:
                    missing.append(f"{path.name}: workerGroups.{role}.{ref}")
    assert not missing, "templates read values that values.yaml does not define: " + str(missing)


# ---------------------------------------------------------------------------------------------
# Metric names and labels


def _metric_catalogue() -> dict[str, set[str]]:
    """Every series name splitserve exports -> the label names it may carry."""
    from prometheus_client.metrics import MetricWrapperBase

    from router.metrics import ServingMetrics

    metrics = ServingMetrics()
    names: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        base, kind, labels = obj._name, obj._type, set(obj._labelnames)
        if kind == "counter":
            for suffix in ("_total", "_created"):
                names[base + suffix] = labels
        elif kind == "histogram":
            names[base + "_bucket"] = labels | {"le"}
            for suffix in ("_sum", "_count", "_created"):
                names[base + suffix] = labels
        else:
            names[base] = labels
    assert names, "router.metrics.ServingMetrics declares no metric"
    return names


def _alert_rules() -> list[dict]:
    return [rule for group in _load(ALERTS)["groups"] for rule in group["rules"]]


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _dashboard_queries() -> list[tuple[str, str, str]]:
    """(where, PromQL, legendFormat) of every dashboard target and template variable."""
    out = []
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", target["expr"],
                        target.get("legendFormat", "")))
    for var in _dashboard()["templating"]["list"]:
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']}", query, ""))
    return out


_METRIC_REF = re.compile(r"\b(splitserve_[A-Za-z0-9_]+)\s*(\{[^}]*\})?")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*(splitserve_[A-Za-z0-9_]+)\s*,\s*(\w+)\s*\)")


def _check_query(where: str, expr: str, legend: str, catalogue: dict[str, set[str]]) -> list:
    problems = []
    refs = _METRIC_REF.findall(expr)
    if not refs and "splitserve" not in where:
        return problems  # e.g. `up{job=...}`: Prometheus' own series
    labels_in_play = set(TARGET_LABELS)
    for name, selector in refs:
        if name not in catalogue:
            problems.append(f"{where}: unknown metric {name}")
            continue
        labels_in_play |= catalogue[name]
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
            if label not in catalogue[name] | TARGET_LABELS:
                problems.append(f"{where}: {name} has no label {label!r}")
    for group in _GROUPING.findall(expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            if label not in labels_in_play:
                problems.append(f"{where}: grouping by unknown label {label!r}")
    for name, label in _LABEL_VALUES.findall(expr):
        if label not in catalogue.get(name, set()) | TARGET_LABELS:
            problems.append(f"{where}: label_values of unknown label {label!r}")
    for label in re.findall(r"{{\s*(\w+)\s*}}", legend):
        if label not in labels_in_play:
            problems.append(f"{where}: legend uses unknown label {label!r}")
    return problems


def test_alert_metrics_exist():
    catalogue = _metric_catalogue()
    problems, used = [], set()
    for rule in _alert_rules():
        problems += _check_query(f"alert {rule['alert']}", rule["expr"], "", catalogue)
        used |= {name for name, _ in _METRIC_REF.findall(rule["expr"])}
        # annotations may only template labels the expression can carry
        for text in rule.get("annotations", {}).values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                exprlabels = set(TARGET_LABELS)
                for name, _ in _METRIC_REF.findall(rule["expr"]):
                    exprlabels |= catalogue.get(name, set())
                if label not in exprlabels:
                    problems.append(f"alert {rule['alert']}: annotation uses $labels.{label}")
    assert not problems, "\n".join(problems)
    assert used, "the alert rules use no splitserve metric"


def test_alert_rules_cover_the_brief():
    names = {rule["alert"] for rule in _alert_rules()}
    assert {"SplitserveTTFTOverSLO", "SplitserveITLOverSLO", "SplitserveKVCacheNearlyFull",
            "SplitserveHighErrorRate", "SplitservePoolHasNoWorkers"} <= names
    for rule in _alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_dashboard_metrics_exist():
    catalogue = _metric_catalogue()
    problems, used = [], set()
    for where, expr, legend in _dashboard_queries():
        problems += _check_query(where, expr, legend, catalogue)
        used |= {name for name, _ in _METRIC_REF.findall(expr)}
    assert not problems, "\n".join(problems)
    # The dashboard shows every family the brief asks for.
    for family in ("splitserve_time_to_first_token_seconds",
                   "splitserve_inter_token_latency_seconds",
                   "splitserve_e2e_request_latency_seconds", "splitserve_request_phase_seconds",
                   "splitserve_requests_total", "splitserve_requests_running",
                   "splitserve_requests_waiting", "splitserve_kv_blocks_used",
                   "splitserve_kv_blocks_free", "splitserve_prefix_cache_hit_rate",
                   "splitserve_kv_transfer_bytes_total", "splitserve_kv_transfer_seconds",
                   "splitserve_pool_replicas", "splitserve_autoscaler_decisions_total",
                   "splitserve_preemptions_total", "splitserve_worker_requests_running"):
        assert any(name == family or name.startswith(family + "_") for name in used), family


def test_dashboard_structure():
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    for _, expr, _ in _dashboard_queries():
        for var in re.findall(r"\$(\w+)", expr):
            assert var.startswith("__") or var in variables, f"undefined variable ${var}"


def _quantile_threshold(expr: str) -> tuple[float, float]:
    """(q, threshold) of ``histogram_quantile(q, ...) > threshold``."""
    q = float(re.search(r"histogram_quantile\(\s*([0-9.]+)", expr).group(1))
    start = expr.index("histogram_quantile(") + len("histogram_quantile")
    depth, end = 0, start
    for end in range(start, len(expr)):  # the matching closing parenthesis
        depth += {"(": 1, ")": -1}.get(expr[end], 0)
        if depth == 0:
            break
    threshold = float(re.match(r"\s*>\s*([0-9.]+)", expr[end + 1:]).group(1))
    return q, threshold


def test_alert_thresholds_equal_the_slo():
    slo = ClusterConfig.from_yaml(POOL_GPU).slo
    rules = {rule["alert"]: rule for rule in _alert_rules()}
    for alert, target in (("SplitserveTTFTOverSLO", slo.ttft_s),
                          ("SplitserveITLOverSLO", slo.itl_s)):
        q, threshold = _quantile_threshold(rules[alert]["expr"])
        assert math.isclose(q, slo.percentile / 100), (alert, q, slo.percentile)
        assert math.isclose(threshold, target), (alert, threshold, target)
    # ... and the SLO sits on a bucket boundary, so the estimate is exact there.
    from router import metrics

    assert slo.ttft_s in metrics._TTFT_BUCKETS and slo.itl_s in metrics._ITL_BUCKETS


# ---------------------------------------------------------------------------------------------
# KubeRay: the worker groups can hold the pools


def _ray_custom_resources(ray_start_params: dict) -> dict[str, int]:
    """Parse rayStartParams.resources the way the Ray autoscaler does
    (ray/autoscaler/_private/kuberay/autoscaling_config.py): '"{\\"name\\": 1}"'."""
    raw = ray_start_params.get("resources")
    if raw is None:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), f"resources must be quoted: {raw!r}"
    parsed = json.loads(raw[1:-1].replace("\\", ""))
    assert all(isinstance(v, int) for v in parsed.values()), "custom resources must be ints"
    return parsed


def _k8s_cpu(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _check_groups(raycluster: dict, config: ClusterConfig) -> None:
    spec = raycluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert raycluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "no worker actor on the head"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for role in ROLES:
        pool = getattr(config, role)
        group = groups.get(role)
        assert group is not None, f"no worker group for the {role} pool"
        offered = _ray_custom_resources(group["rayStartParams"])
        assert set(pool.resources) <= set(offered), (role, pool.resources, offered)
        # A group must not offer the other pool's resources (pools stay on their own pods).
        other = getattr(config, "decode" if role == "prefill" else "prefill")
        assert not set(other.resources) & set(offered), role
        container = group["template"]["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        cpus = _k8s_cpu(limits["cpu"])
        per_pod = [offered[k] // v for k, v in pool.resources.items() if v > 0]
        if pool.num_gpus:  # a worker: tensor_parallel_size ranks of num_gpus each
            per_pod.append(int(gpus // pool.gpus_per_worker))
        workers_per_pod = min(per_pod) if per_pod else 1
        assert workers_per_pod >= 1, f"a {role} pod cannot hold one {role} worker"
        assert workers_per_pod * pool.num_cpus * pool.tensor_parallel_size <= cpus, (
            f"{role}: not enough CPUs per pod")
        # Every GPU of a pod is one some rank of its workers uses.
        assert gpus == workers_per_pod * pool.gpus_per_worker, (role, gpus, workers_per_pod)
        assert group["maxReplicas"] * workers_per_pod >= pool.max_replicas, (
            f"{role}: maxReplicas {group['maxReplicas']} x {workers_per_pod} workers per pod "
            f"< max_replicas {pool.max_replicas}")
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["minReplicas"] * workers_per_pod <= max(pool.min_replicas, 1), (
            f"{role}: minReplicas keeps more pods than the pool's min_replicas can use")
        args = " ".join(container["args"])
        assert "KUBERAY_GEN_RAY_START_CMD" in args, f"{role} pods must run Ray's start command"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert Path(config.model.path).parts[1] == "models" and "/models" in mounts
        assert "/dev/shm" in mounts
    head_container = head["template"]["spec"]["containers"][0]
    head_cmd = " ".join(head_container["command"] + head_container["args"])
    assert "splitserve serve" in head_cmd and "--ray-address auto" in head_cmd
    assert "--config /etc/splitserve/pool.yaml" in head_cmd
    assert "${KUBERAY_GEN_RAY_START_CMD/--block/}" in head_cmd, "Ray must start unblocked"
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert ports["grpc"] == config.router.grpc_port and ports["http"] == config.router.http_port
    mounts = {m["mountPath"]: m["name"] for m in head_container["volumeMounts"]}
    assert "/etc/splitserve" in mounts and "/models" in mounts


def test_kuberay_raycluster_holds_the_example_pools():
    (raycluster,) = _load_all(RAYCLUSTER)
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    _check_groups(raycluster, ClusterConfig.from_yaml(POOL_GPU))
    head_pod = raycluster["spec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head_pod["volumes"]}
    assert volumes["pool-config"]["configMap"]["name"] == "splitserve-pool"  # README's name


def test_kuberay_service_selects_the_head():
    (raycluster,) = _load_all(RAYCLUSTER)
    docs = {d["kind"]: d for d in _load_all(SERVICE)}
    service, monitor = docs["Service"], docs["ServiceMonitor"]
    config = ClusterConfig.from_yaml(POOL_GPU)
    assert service["spec"]["selector"] == {"ray.io/cluster": raycluster["metadata"]["name"],
                                           "ray.io/node-type": "head"}
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["targetPort"] == config.router.grpc_port == 50051
    assert ports["http"]["targetPort"] == config.router.http_port == 8000
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(config.router.http_port)
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_helm_values_groups_hold_the_pools():
    """The chart derives GPUs and custom resources from `pool:`; check the derived numbers."""
    values = _helm_values()
    config = ClusterConfig.model_validate(values["pool"])
    for role in ROLES:
        pool, group = getattr(config, role), values["workerGroups"][role]
        per_pod, tp = group["workersPerPod"], group["tensorParallelSize"]
        assert per_pod >= 1 and float(per_pod * tp * pool.num_gpus).is_integer()
        assert group["maxReplicas"] * per_pod >= pool.max_replicas, role
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], role
        assert per_pod * tp * pool.num_cpus <= _k8s_cpu(group["resources"]["limits"]["cpu"]), role
    # The chart's default deployment is the example's: TP=2 prefill, TP=1 decode.
    groups = values["workerGroups"]
    assert (groups["prefill"]["tensorParallelSize"], groups["decode"]["tensorParallelSize"]) == (
        ClusterConfig.from_yaml(POOL_GPU).prefill.tensor_parallel_size,
        ClusterConfig.from_yaml(POOL_GPU).decode.tensor_parallel_size)


def test_image_entrypoint_serves_the_mounted_config():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvidia/cuda:", text, re.M), "CUDA base image"
    assert '".[gpu]"' in text, "installs the project with the gpu extra"
    entrypoint = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    assert entrypoint, "no exec-form ENTRYPOINT"
    argv = json.loads(entrypoint.group(1))
    assert argv[-4:] == ["splitserve", "serve", "--config", "/etc/splitserve/pool.yaml"]
    for port in ("50051", "8000"):
        assert re.search(rf"^EXPOSE\b.*\b{port}\b", text, re.M)
    # Everything the Dockerfile COPYs from the context is let through by its .dockerignore.
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for src in re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", text, re.M):
        for item in src.split():
            item = item.rstrip("/")
            assert (ROOT / item).exists(), f"COPY {item}: not in the repository"
            assert any(item == a or item.startswith(a + "/") for a in allowed), (
                f"COPY {item} is excluded by Dockerfile.dockerignore")


# ---------------------------------------------------------------------------------------------
# With the real tools, when installed


def _promtool() -> str:
    """promtool's path; without it the test skips, except under CI=true where it fails."""
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not installed (Debian: apt-get install prometheus; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must run this test")
        pytest.skip(message)
    return path


def test_promtool_checks_and_unit_tests_the_rules():
    promtool = _promtool()
    for args in (["check", "rules", str(ALERTS)],
                 ["test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml")]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
