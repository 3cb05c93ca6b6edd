"""The RayService manifest (zero-downtime upgrades) and its readiness gate.

- deploy/kuberay/rayservice.yaml's rayClusterConfig is raycluster.yaml's spec plus exactly the
  documented differences (gate resource on the head, Serve proxy port, worker readiness), and
  its worker groups hold the example pools;
- serveConfigV2 runs the gate (deploy/kuberay/splitserve_gate.py) on the head, with its proxy
  on the head's `serve` port and off the router's ports;
- the gate itself, against a real HTTP server on loopback: it waits while /health is not 200
  and its health check fails while /health is not 200.
"""

from __future__ import annotations

import copy
import datetime
import importlib.util
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from cluster.config import ClusterConfig
from tests.test_deploy import POOL_GPU, RAYCLUSTER, _check_groups, _load_all, _ray_custom_resources

ROOT = Path(__file__).resolve().parents[1]
RAYSERVICE = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
GATE = ROOT / "deploy" / "kuberay" / "splitserve_gate.py"

# Ray Serve's own pydantic models warn on import; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.serve")


def _rayservice() -> dict:
    (doc,) = _load_all(RAYSERVICE)
    return doc


def _serve_config() -> dict:
    return yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])


def _head_container(spec: dict) -> dict:
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def _without_documented_differences(spec: dict) -> dict:
    """rayClusterConfig minus what the RayService adds on purpose (see its header)."""
    spec = copy.deepcopy(spec)
    head = spec["headGroupSpec"]
    del head["rayStartParams"]["resources"]
    del head["template"]["metadata"]["annotations"]["splitserve.io/pool-config"]
    container = _head_container(spec)
    container["ports"] = [p for p in container["ports"] if p["name"] != "serve"]
    for group in spec["workerGroupSpecs"]:
        del group["template"]["spec"]["containers"][0]["readinessProbe"]
    return spec


def test_rayservice_cluster_is_the_raycluster():
    (raycluster,) = _load_all(RAYCLUSTER)
    service = _rayservice()
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    cluster_spec = service["spec"]["rayClusterConfig"]
    assert _without_documented_differences(cluster_spec) == raycluster["spec"]
    # The KubeRay annotation that lets the head run the router reaches the RayClusters
    # (KubeRay copies a RayService's annotations onto them).
    assert service["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    as_cluster = {"metadata": service["metadata"], "spec": cluster_spec}
    _check_groups(as_cluster, ClusterConfig.from_yaml(POOL_GPU))


def test_rayservice_upgrades_with_a_new_cluster():
    spec = _rayservice()["spec"]
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    head_pod = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    # the old router keeps its streams until it is deleted, then drains
    assert spec["rayClusterDeletionDelaySeconds"] >= 60
    assert head_pod["terminationGracePeriodSeconds"] >= 60


def test_gate_runs_on_the_head_beside_the_router():
    spec = _rayservice()["spec"]["rayClusterConfig"]
    config = ClusterConfig.from_yaml(POOL_GPU)
    serve = _serve_config()
    (app,) = serve["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert GATE.name == f"{module}.py" and attr == "build"
    assert app["args"]["health_url"] == f"http://127.0.0.1:{config.router.http_port}/health"
    # Serve's proxy: on the head only, on the port KubeRay health-checks (named `serve`),
    # and not on a port the router (or Ray) already has.
    assert serve["proxy_location"] == "HeadOnly"
    ports = {p["name"]: p["containerPort"] for p in _head_container(spec)["ports"]}
    proxy_port = serve["http_options"]["port"]
    assert ports["serve"] == proxy_port
    assert list(ports.values()).count(proxy_port) == 1
    assert proxy_port not in (config.router.http_port, config.router.grpc_port)
    # The gate's resource: offered by the head, by no worker group.
    gate = _gate_module().build(app["args"])
    wanted = gate._bound_deployment.ray_actor_options["resources"]
    head = _ray_custom_resources(spec["headGroupSpec"]["rayStartParams"])
    assert all(head.get(name, 0) >= amount for name, amount in wanted.items())
    for group in spec["workerGroupSpecs"]:
        offered = _ray_custom_resources(group["rayStartParams"])
        assert not set(wanted) & set(offered), group["groupName"]


def test_workers_are_ready_without_a_serve_proxy():
    """KubeRay's default readiness probe of a RayService worker also checks a Serve proxy on
    the pod; with proxy_location HeadOnly there is none, so the workers set their own."""
    for group in _rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        probe = group["template"]["spec"]["containers"][0]["readinessProbe"]
        command = " ".join(probe["exec"]["command"])
        assert "local_raylet_healthz" in command and "-/healthz" not in command


# ---------------------------------------------------------------------------------------------
# The gate, against a real HTTP server


def _gate_module():
    spec = importlib.util.spec_from_file_location("splitserve_gate", GATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Health:
    """A /health endpoint on loopback whose status the test sets (TLS with a context)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.status = 503
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                body = b'{"status": "ok"}' if health.status == 200 else b'{"status": "starting"}'
                self.send_response(health.status if self.path == "/health" else 404)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass  # keep the test output clean

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/health"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def health():
    server = _Health()
    yield server
    server.close()


def test_gate_waits_for_the_router_then_follows_its_health(health):
    gate_cls = _gate_module().RouterGate
    built: list = []
    thread = threading.Thread(target=lambda: built.append(gate_cls(health.url, poll_s=0.02)))
    thread.start()
    time.sleep(0.3)
    assert not built, "the gate must not come up while /health answers 503"
    health.status = 200
    thread.join(timeout=5)
    assert built, "the gate did not come up once /health answered 200"
    gate = built[0]
    gate.check_health()  # healthy
    health.status = 503
    with pytest.raises(RuntimeError, match="not ready .*503"):
        gate.check_health()


def test_gate_health_check_fails_when_the_router_is_gone(health):
    module = _gate_module()
    health.status = 200
    gate = module.RouterGate(health.url, poll_s=0.02)
    health.close()
    with pytest.raises(RuntimeError, match="router not reachable"):
        gate.check_health()
    assert module.router_health(health.url, timeout_s=0.5)[0] == 0


def _self_signed(tmp_path: Path) -> ssl.SSLContext:
    """A server context with a certificate for the Service's name, not 127.0.0.1 (as the
    router's certificate would be)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "splitserve-head-svc")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


def test_gate_checks_a_router_serving_tls(tmp_path):
    """router.tls_cert set: /health is https, with a certificate that does not name
    127.0.0.1; the gate still reads its status."""
    server = _Health(tls=_self_signed(tmp_path))
    try:
        module = _gate_module()
        assert module.router_health(server.url)[0] == 503
        server.status = 200
        gate = module.RouterGate(server.url, poll_s=0.02)
        gate.check_health()
        # plain http against the TLS port is no answer, not a pass
        assert module.router_health(server.url.replace("https:", "http:"))[0] != 200
    finally:
        server.close()
