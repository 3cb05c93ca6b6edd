"""Nothing of ours listens on every interface by default: the router, the decode workers' KV
TCPStore, and a local Ray (GCS, raylet, workers, agents, metrics export) all bind loopback."""

from __future__ import annotations

import asyncio

import httpx
import psutil  # the dev extra installs it: a missing one is a failure, not a skip
import pytest

WILDCARDS = ("0.0.0.0", "::", "")


def _listeners(procs) -> list[tuple[str, int, str]]:
    """(ip, port, process name) of every TCP listening socket of ``procs``."""
    out = []
    for proc in procs:
        try:
            conns = proc.net_connections("tcp")
            name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(c.laddr.ip, c.laddr.port, name) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def test_the_kv_store_listens_on_its_configured_host_only():
    from kv_transfer.base import TransferConfig
    from kv_transfer.torch_dist import StoreServer

    server = StoreServer(TransferConfig(host="127.0.0.1", connect_timeout_s=10),
                         lambda n, info: None)
    try:
        mine = [(ip, name) for ip, port, name in _listeners([psutil.Process()])
                if port == server.port]
    finally:
        server.close()
    assert [ip for ip, _ in mine] == ["127.0.0.1"]


def test_a_factory_gives_workers_the_cluster_address():
    from cluster.config import ClusterConfig
    from cluster.pools import WorkerFactory

    local = ClusterConfig.model_validate({"model": {"path": "m"}})
    assert WorkerFactory(local, "ray").transfer_config.host == "127.0.0.1"
    joined = local.with_overrides(**{"ray.address": "auto"})
    assert WorkerFactory(joined, "ray").transfer_config.host == ""  # each node's Ray IP
    pinned = joined.with_overrides(**{"ray.node_ip": "10.0.0.7"})
    assert WorkerFactory(pinned, "ray").transfer_config.host == "10.0.0.7"


@pytest.mark.ray
@pytest.mark.slow
def test_a_default_local_cluster_has_no_listener_on_every_interface(tmp_path):
    """A whole default `serve` (local Ray, KV over torch_dist, gRPC + HTTP): every listening
    socket of this process and its descendants (Ray's processes and the worker actors)."""
    import ray

    from app.server import start_server
    from cluster.config import ClusterConfig
    from engine.make_model import make_model

    model = make_model(tmp_path / "llama", "llama", "tiny", seed=0, progress=False)
    engine = {"block_size": 4, "max_num_batched_tokens": 64, "max_num_seqs": 4,
              "max_model_len": 128, "num_threads": 1}
    config = ClusterConfig.model_validate({
        "model": {"path": str(model), "device": "cpu"},
        "prefill": {"num_cpus": 0.5, "engine": engine},
        "decode": {"num_cpus": 0.5, "engine": engine},
        "scheduler": {"block_size": 4},
        "router": {"grpc_port": 0, "http_port": 0},
        "autoscaler": {"enabled": False},
        "ray": {"num_cpus": 2},
    })
    assert not ray.is_initialized()

    async def main():
        server = await start_server(config)
        try:  # a request crosses the loopback-bound KV store: serving works as before
            async with httpx.AsyncClient(timeout=60) as http:
                reply = await http.post(f"http://127.0.0.1:{server.http.port}/v1/completions",
                                        json={"model": "llama", "prompt": [5, 6, 7, 8, 9],
                                              "max_tokens": 4, "ignore_eos": True})
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 4
            me = psutil.Process()
            found = _listeners([me, *me.children(recursive=True)])
            ports = {server.grpc.port, server.http.port}
            return found, ports, ray.util.get_node_ip_address()
        finally:
            await server.stop()

    found, ports, node_ip = asyncio.run(asyncio.wait_for(main(), 150))
    assert node_ip == "127.0.0.1"
    assert ports <= {port for _, port, _ in found}  # the scan sees our own servers
    names = {name for _, _, name in found}
    assert {"gcs_server", "raylet"} <= names  # ... and Ray's
    assert any("DecodeWorker" in n for n in names), names  # ... and the decode actor's store
    exposed = [(ip, port, name) for ip, port, name in found if ip in WILDCARDS]
    assert exposed == []
