"""Ray Serve readiness gate for splitserve under a KubeRay RayService.

A RayService upgrades with zero downtime: on a change of its cluster spec KubeRay starts a
second RayCluster, waits until *every Ray Serve application on it is RUNNING*, points the
head Service (``<name>-head-svc``) at the new head, and deletes the old cluster. It knows
nothing of splitserve's router, which is not a Ray Serve application, and it refuses to call a
cluster with no Serve application ready at all.

This one-replica application stands in for the router: it runs on the head (the only node
offering the ``splitserve_router`` resource, see deploy/kuberay/rayservice.yaml) and is
healthy exactly while the router on the same pod answers ``GET /health`` with 200, i.e. once
its prefill and decode workers are ready. So:

1. the constructor waits until ``/health`` is 200 (Serve shows the app DEPLOYING meanwhile,
   and KubeRay keeps the traffic on the old cluster);
2. ``check_health`` (every ``health_check_period_s``) raises while ``/health`` is not 200;
   after three failures in a row Serve marks the app UNHEALTHY and restarts the replica,
   which waits again in (1);
3. a GET on the Serve proxy (``<name>-serve-svc``, port ``serve``) answers with the router's
   own ``/health`` reply, for humans.

The image copies this file onto the Python path (deploy/docker/Dockerfile). Checked under
real Ray Serve 2.60 (by hand, a fake /health on loopback): DEPLOYING while it answers 503,
RUNNING within a second of 200, UNHEALTHY about 30 s after it turns 503, RUNNING again after.
"""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request

from ray import serve

# Where the router on this pod answers /health (router.http_port of the pool config).
DEFAULT_HEALTH_URL = "http://127.0.0.1:8000/health"


def _tls_context(url: str) -> ssl.SSLContext | None:
    """For an https URL (router.tls_cert set): the router on this very pod is asked whether
    it answers, not who it is — its certificate names the Service, not 127.0.0.1 — so, like
    Kubernetes' HTTPS probes, no verification. (Mutual TLS, router.tls_client_ca, would also
    want a client certificate: not supported, the gate then never turns ready.)"""
    if not url.startswith("https:"):
        return None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def router_health(url: str, timeout_s: float = 2.0) -> tuple[int, str]:
    """(HTTP status, body) of the router's /health; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s,  # noqa: S310 (loopback)
                                    context=_tls_context(url)) as response:
            return response.status, response.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as err:  # 503 while workers are starting
        return err.code, err.read(4096).decode("utf-8", "replace")
    except OSError as err:  # not listening yet, timed out, or a TLS handshake refused
        return 0, f"router not reachable: {err.__class__.__name__}"


class RouterGate:
    """Healthy while the router on this pod is (see the module docstring)."""

    def __init__(self, health_url: str = DEFAULT_HEALTH_URL, poll_s: float = 2.0) -> None:
        self.health_url = health_url
        # Block until the router is ready: the app stays DEPLOYING, so no switch happens.
        while router_health(health_url)[0] != 200:
            time.sleep(poll_s)

    def check_health(self) -> None:
        status, body = router_health(self.health_url)
        if status != 200:
            raise RuntimeError(f"splitserve router not ready (/health -> {status}): {body}")

    async def __call__(self, request) -> str:
        return router_health(self.health_url)[1]


def build(args: dict) -> serve.Application:
    """Serve's application builder (``import_path: splitserve_gate:build``); ``args`` come
    from serveConfigV2: ``health_url`` (default: the router on 127.0.0.1:8000; https:// when
    the router serves TLS)."""
    deployment = serve.deployment(
        RouterGate,
        name="RouterGate",
        num_replicas=1,
        # On the head, next to the router; no CPU taken from it.
        ray_actor_options={"num_cpus": 0, "resources": {"splitserve_router": 1}},
        health_check_period_s=10,
        health_check_timeout_s=10,
    )
    return deployment.bind(args.get("health_url", DEFAULT_HEALTH_URL))
