"""Every Kubernetes object under deploy/ against its schema, strictly (unknown fields are
errors), for Kubernetes 1.25 (the chart's kubeVersion floor) and the newest version the
``kubernetes-validate`` package ships:

- RayCluster and RayService (plain manifests and both Helm kinds) against KubeRay's schema,
  deploy/kuberay/crd/ray.io_v1.schema.json, whose embedded Kubernetes types (pod templates,
  Services, ...) resolve to Kubernetes' own definitions;
- Services, ConfigMaps, the models claim and Job against Kubernetes' schemas;
- and the validator really refuses: a misspelt field at KubeRay's level and deep in a pod
  template, a bad enum, a missing required field.
"""

from __future__ import annotations

import copy
import functools
import json

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

from tests.test_deploy import CHART, DEPLOY, RAYCLUSTER, SERVICE, _load_all
from tests.test_deploy_models import MODELS
from tests.test_deploy_rayservice import RAYSERVICE

SCHEMA = DEPLOY / "kuberay" / "crd" / "ray.io_v1.schema.json"
VERSIONS = ("1.25.0", kv.latest_version())


@functools.cache
def _registry(version: str) -> Registry:
    """KubeRay's schema and Kubernetes' strict definitions of that version."""
    definitions = kv.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    return Registry().with_resources([
        (definitions["$id"], Resource.from_contents(definitions)),
        (_schema()["$id"], Resource.from_contents(_schema())),
    ])


@functools.cache
def _schema() -> dict:
    return json.loads(SCHEMA.read_text())


@functools.cache
def _validator(version: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(_schema(), registry=_registry(version))


def _errors(doc: dict, version: str) -> list[str]:
    errors = sorted(_validator(version).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors]


@functools.cache
def _rendered() -> dict[str, list[dict]]:
    """Helm kind -> every object the chart renders (ServiceMonitor on)."""
    import helm_python as helm

    out: dict[str, list[dict]] = {}
    with helm.Chart.load(str(CHART)) as chart:
        for kind in ("RayCluster", "RayService"):
            manifests = chart.render({"kind": kind, "serviceMonitor": {"enabled": True}},
                                     name="splitserve", namespace="serving")
            out[kind] = [doc for path, text in manifests.items() if path.endswith(".yaml")
                         for doc in yaml.safe_load_all(text) if doc]
    return out


def _ray_objects() -> list[tuple[str, dict]]:
    objects = [("raycluster.yaml", _load_all(RAYCLUSTER)[0]),
               ("rayservice.yaml", _load_all(RAYSERVICE)[0])]
    for kind, docs in _rendered().items():
        objects += [(f"helm kind={kind}", d) for d in docs if d["apiVersion"] == "ray.io/v1"]
    assert {d["kind"] for _, d in objects} == {"RayCluster", "RayService"}
    return objects


def _core_objects() -> list[tuple[str, dict]]:
    objects = [(f"service.yaml {d['kind']}", d) for d in _load_all(SERVICE)]
    objects += [(f"models.yaml {d['kind']}", d) for d in _load_all(MODELS)]
    for kind, docs in _rendered().items():
        objects += [(f"helm kind={kind} {d['kind']}", d) for d in docs]
    # Kubernetes' schemas know its own kinds; CRDs (ray.io, the Prometheus Operator's
    # ServiceMonitor) are checked elsewhere or not at all.
    return [(where, d) for where, d in objects
            if d["apiVersion"] in ("v1", "batch/v1")]


def test_schema_is_well_formed_and_every_reference_resolves():
    schema = _schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    refs: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            refs.extend(v for k, v in node.items() if k == "$ref")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    for version in VERSIONS:
        resolver = _registry(version).resolver(base_uri=schema["$id"])
        for ref in set(refs):
            assert resolver.lookup(ref).contents, (version, ref)


@pytest.mark.parametrize("version", VERSIONS)
def test_ray_objects_meet_kuberays_schema(version):
    problems = {where: _errors(doc, version) for where, doc in _ray_objects()}
    assert not any(problems.values()), problems


@pytest.mark.parametrize("version", VERSIONS)
def test_core_objects_meet_kubernetes_schemas(version):
    objects = _core_objects()
    assert {d["kind"] for _, d in objects} >= {"Service", "ConfigMap", "PersistentVolumeClaim",
                                                "Job"}
    for where, doc in objects:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{where} (Kubernetes {version}): {err}")


def _mutated(path, mutate) -> dict:
    doc = copy.deepcopy(_load_all(path)[0])
    mutate(doc)
    return doc


def _worker_container(spec: dict) -> dict:
    return spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("path, mutate, expected", [
    (RAYCLUSTER, lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplica=3),
     "spec.workerGroupSpecs.0: Additional properties are not allowed ('maxReplica'"),
    (RAYCLUSTER, lambda d: _worker_container(d["spec"]).update(volumeMount=[]),
     "spec.workerGroupSpecs.0.template.spec.containers.0: Additional properties"),
    (RAYCLUSTER, lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"),
     "spec.autoscalerOptions.upscalingMode: 'Fast' is not one of"),
    (RAYCLUSTER, lambda d: d["spec"]["workerGroupSpecs"][1].pop("groupName"),
     "spec.workerGroupSpecs.1: 'groupName' is a required property"),
    (RAYSERVICE, lambda d: d["spec"].update(rayClusterDeletionDelaySeconds=-1),
     "spec.rayClusterDeletionDelaySeconds: -1 is less than the minimum of 0"),
    (RAYSERVICE, lambda d: d["spec"].pop("rayClusterConfig"),
     "spec: 'rayClusterConfig' is a required property"),
    (RAYSERVICE, lambda d: _worker_container(d["spec"]["rayClusterConfig"])["ports"][0].update(
        containerPort="8080"), "containers.0.ports.0.containerPort: '8080' is not of type"),
])
def test_schema_refuses_what_kuberay_would(path, mutate, expected):
    errors = _errors(_mutated(path, mutate), VERSIONS[0])
    assert any(expected in e for e in errors), errors
