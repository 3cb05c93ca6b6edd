"""The Helm chart, through Helm itself (helm-python-sdk: Helm v4's Go SDK as a bundled library,
in the dev extra; no binary, no network, no cluster).

- ``helm lint`` finds nothing above INFO;
- values.schema.json: the defaults meet it, and Helm refuses bad values with the key's path;
- both kinds render: RayCluster (+ Service) and RayService (KubeRay's head Service is the
  front door), and the worker groups of each hold the pool the ConfigMap carries;
- the RayService's cluster is the RayCluster plus the gate's few additions, and it agrees
  with the plain manifest deploy/kuberay/rayservice.yaml;
- the chart's own checks: whole GPUs per pod (``mul`` used to truncate num_gpus 0.5 to 0),
  replicas within bounds, enough pods for the pool's max_replicas.
"""

from __future__ import annotations

import copy
import json

import helm_python as helm
import jsonschema
import pytest
import yaml

from cluster.config import ClusterConfig
from tests.test_deploy import CHART, _check_groups, _load_all
from tests.test_deploy_rayservice import RAYSERVICE, _without_documented_differences

SCHEMA = CHART / "values.schema.json"
INFO = 1  # helm's support.InfoSev; WarningSev is 2, ErrorSev 4


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded


def _render(chart, values: dict | None = None) -> dict[str, dict]:
    """kind -> the one rendered object of that kind."""
    manifests = chart.render(values or {}, name="splitserve", namespace="serving")
    docs: dict[str, dict] = {}
    for path, text in manifests.items():
        if path.endswith(".yaml"):
            for doc in yaml.safe_load_all(text):
                if doc:
                    assert doc["kind"] not in docs, f"two {doc['kind']} objects"
                    docs[doc["kind"]] = doc
    return docs


def _pool(docs: dict) -> ClusterConfig:
    return ClusterConfig.model_validate(yaml.safe_load(docs["ConfigMap"]["data"]["pool.yaml"]))


def test_chart_lints_clean():
    result = helm.lint(str(CHART))
    assert result["errors"] == [], result
    assert all(m["severity"] <= INFO for m in result["messages"]), result["messages"]


def test_default_values_meet_the_schema(chart):
    jsonschema.Draft7Validator.check_schema(json.loads(SCHEMA.read_text()))
    chart.validate_schema({})
    chart.validate_schema({"kind": "RayService", "serviceMonitor": {"enabled": True}})


@pytest.mark.parametrize("values, where", [
    ({"kind": "Deployment"}, "/kind"),
    ({"serviceMonitr": {"enabled": True}}, "serviceMonitr"),  # a typo is not silently ignored
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"workerGroups": {"prefill": {"workersPerPod": 0}}}, "/workerGroups/prefill/workersPerPod"),
    ({"head": {"resources": {"limits": {"cpu": "eight"}}}}, "/head/resources/limits/cpu"),
    ({"pool": {"router": {"http_port": "eighty"}}}, "/pool/router/http_port"),
    ({"pool": {"decode": {"resources": {"splitserve_decode": 0.5}}}},
     "/pool/decode/resources/splitserve_decode"),
    ({"models": {"mountPath": "models"}}, "/models/mountPath"),
    ({"workerGroups": {"prefill": {"tensorParallelSize": 0}}},
     "/workerGroups/prefill/tensorParallelSize"),
])
def test_schema_refuses_bad_values(chart, values, where):
    with pytest.raises(helm.HelmValuesError) as refused:
        chart.validate_schema(values)
    assert where in str(refused.value)
    with pytest.raises(helm.HelmValuesError):  # helm install/template check it too
        chart.render(values, name="splitserve", namespace="serving")


def test_renders_a_raycluster_and_its_service(chart):
    docs = _render(chart, {"serviceMonitor": {"enabled": True}})
    assert set(docs) == {"RayCluster", "Service", "ConfigMap", "ServiceMonitor"}
    cluster, service = docs["RayCluster"], docs["Service"]
    _check_groups(cluster, _pool(docs))
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"],
                                           "ray.io/node-type": "head"}
    labels = service["metadata"]["labels"]
    selector = docs["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
    assert all(labels.get(k) == v for k, v in selector.items())


def test_renders_a_rayservice_behind_kuberays_head_service(chart):
    docs = _render(chart, {"kind": "RayService", "serviceMonitor": {"enabled": True}})
    # No Service of ours: it would select one cluster's head, and a RayService has two
    # during an upgrade. KubeRay's <name>-head-svc follows the serving one.
    assert set(docs) == {"RayService", "ConfigMap", "ServiceMonitor"}
    service = docs["RayService"]
    assert service["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    _check_groups({"metadata": service["metadata"], "spec": service["spec"]["rayClusterConfig"]},
                  _pool(docs))
    # The labels KubeRay gives the RayService's head Service
    # (ray-operator/controllers/ray/common/service.go, BuildHeadServiceForRayService).
    selector = docs["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
    assert selector == {"ray.io/originated-from-cr-name": service["metadata"]["name"],
                        "ray.io/node-type": "head"}


def _strip_checksum(spec: dict) -> dict:
    spec = copy.deepcopy(spec)
    del spec["headGroupSpec"]["template"]["metadata"]["annotations"]["splitserve.io/pool-config"]
    return spec


def test_rayservice_cluster_is_the_raycluster_plus_the_gate(chart):
    raycluster = _render(chart)["RayCluster"]["spec"]
    service = _render(chart, {"kind": "RayService"})["RayService"]["spec"]
    assert (_without_documented_differences(service["rayClusterConfig"])
            == _strip_checksum(raycluster))


def test_chart_rayservice_agrees_with_the_plain_manifest(chart):
    plain = copy.deepcopy(_load_all(RAYSERVICE)[0])  # the parsed file is shared: copy
    rendered = _render(chart, {"kind": "RayService"})["RayService"]
    for spec in (plain["spec"], rendered["spec"]):
        spec["serveConfigV2"] = yaml.safe_load(spec["serveConfigV2"])
    assert rendered["spec"]["serveConfigV2"] == plain["spec"]["serveConfigV2"]
    for key in ("upgradeStrategy", "rayClusterDeletionDelaySeconds"):
        assert rendered["spec"][key] == plain["spec"][key], key
    mine, theirs = rendered["spec"]["rayClusterConfig"], plain["spec"]["rayClusterConfig"]
    assert (mine["headGroupSpec"]["rayStartParams"]["resources"]
            == theirs["headGroupSpec"]["rayStartParams"]["resources"])
    ports = [{p["name"]: p["containerPort"] for p in
              spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
             for spec in (mine, theirs)]
    assert ports[0]["serve"] == ports[1]["serve"]
    for a, b in zip(mine["workerGroupSpecs"], theirs["workerGroupSpecs"], strict=True):
        probe_a = a["template"]["spec"]["containers"][0]["readinessProbe"]
        assert probe_a == b["template"]["spec"]["containers"][0]["readinessProbe"]


def test_a_changed_pool_config_changes_the_cluster_spec(chart):
    """KubeRay upgrades a RayService when rayClusterConfig changes; the pool config lives in
    a ConfigMap, so the chart puts its checksum on the head's template."""
    def checksum(values: dict) -> str:
        spec = _render(chart, values)["RayService"]["spec"]["rayClusterConfig"]
        return spec["headGroupSpec"]["template"]["metadata"]["annotations"][
            "splitserve.io/pool-config"]

    base = checksum({"kind": "RayService"})
    assert base == checksum({"kind": "RayService"})
    assert base != checksum({"kind": "RayService", "pool": {"slo": {"ttft_s": 1.0}}})


# ---------------------------------------------------------------------------------------------
# The chart's own checks (template `fail`s: a clear message at helm install, not a pod that
# never schedules)


def _decode_group(docs: dict) -> dict:
    groups = {g["groupName"]: g for g in docs["RayCluster"]["spec"]["workerGroupSpecs"]}
    return groups["decode"]


def test_fractional_gpus_per_worker_add_up_per_pod(chart):
    docs = _render(chart, {"pool": {"decode": {"num_gpus": 0.5}},
                           "workerGroups": {"decode": {"workersPerPod": 2, "minReplicas": 1}}})
    group = _decode_group(docs)
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == "1"
    assert "num-gpus" not in group["rayStartParams"]
    _check_groups(docs["RayCluster"], _pool(docs))


def _gpus_per_pod(docs: dict) -> dict[str, int]:
    return {g["groupName"]: int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                .get("nvidia.com/gpu", 0))
            for g in docs["RayCluster"]["spec"]["workerGroupSpecs"]}


def test_a_groups_tensor_parallel_size_sets_the_pool_and_the_gpus_per_pod(chart):
    docs = _render(chart)  # the defaults: a TP=2 prefill group, a TP=1 decode group
    pool = _pool(docs)
    assert (pool.prefill.tensor_parallel_size, pool.decode.tensor_parallel_size) == (2, 1)
    assert _gpus_per_pod(docs) == {"prefill": 2, "decode": 1}
    docs = _render(chart, {
        "pool": {"decode": {"max_replicas": 16, "engine": {"tensor_parallel_size": 4}}},
        "workerGroups": {"decode": {"tensorParallelSize": 4, "workersPerPod": 2,
                                    "minReplicas": 1, "replicas": 2, "maxReplicas": 8,
                                    "resources": {"limits": {"cpu": "32"}}}}})
    pool = _pool(docs)
    assert pool.decode.tensor_parallel_size == 4 and pool.decode.gpus_per_worker == 4
    assert _gpus_per_pod(docs) == {"prefill": 2, "decode": 8}  # 2 workers x 4 ranks
    _check_groups(docs["RayCluster"], pool)


@pytest.mark.parametrize("values, message", [
    ({"pool": {"decode": {"num_gpus": 0.5}}}, "0.5 GPUs per pod; make it a whole number"),
    ({"workerGroups": {"decode": {"minReplicas": 5}}},
     "need minReplicas <= replicas <= maxReplicas"),
    ({"workerGroups": {"decode": {"replicas": 2, "maxReplicas": 3}}}, "raise maxReplicas"),
    ({"kind": "RayService", "rayService": {"servePort": 8000}}, "is a router port"),
    ({"pool": {"prefill": {"engine": {"tensor_parallel_size": 4}}}},
     "pool.prefill.engine.tensor_parallel_size 4 disagrees with "
     "workerGroups.prefill.tensorParallelSize 2"),
    ({"pool": {"prefill": {"num_gpus": 0.5}}}, "each rank takes one whole GPU"),
    ({"kind": "RayService", "pool": {"router": {"tls_cert": "/tls/tls.crt",
                                                "tls_key": "/tls/tls.key",
                                                "tls_client_ca": "/tls/ca.crt"}}},
     "cannot present a client certificate"),
])
def test_chart_refuses_groups_that_cannot_hold_the_pool(chart, values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        chart.render(values, name="splitserve", namespace="serving")


def test_rayservice_follows_the_router_ports(chart):
    docs = _render(chart, {"kind": "RayService", "pool": {"router": {"http_port": 9000}},
                           "rayService": {"servePort": 9001}})
    spec = docs["RayService"]["spec"]
    serve = yaml.safe_load(spec["serveConfigV2"])
    assert serve["applications"][0]["args"]["health_url"] == "http://127.0.0.1:9000/health"
    tls = _render(chart, {"kind": "RayService", "pool": {"router": {
        "tls_cert": "/tls/tls.crt", "tls_key": "/tls/tls.key"}}})["RayService"]["spec"]
    assert (yaml.safe_load(tls["serveConfigV2"])["applications"][0]["args"]["health_url"]
            == "https://127.0.0.1:8000/health")
    assert serve["http_options"]["port"] == 9001
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert (ports["http"], ports["serve"]) == (9000, 9001)
    _check_groups({"metadata": docs["RayService"]["metadata"], "spec": spec["rayClusterConfig"]},
                  _pool(docs))
