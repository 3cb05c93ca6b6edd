"""`splitserve serve`: a disaggregated cluster and its router, until Ctrl-C / SIGTERM.

    splitserve serve --model DIR [--config FILE] [--prefill N] [--decode M] [--autoscale]
                     [--grpc-port 50051] [--http-port 8000] [--kv-backend torch_dist|ray]
                     [--ray-address ADDR] [--colocated]
                     [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]]

Pools are fixed at their sizes unless autoscaling is asked for: ``--autoscale``, or
``autoscaler.enabled`` set explicitly in the config file.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face checkpoint directory (overrides model.path)")
    p.add_argument("--config", help="pool config YAML (see deploy/examples/pool.yaml)")
    p.add_argument("--prefill", type=int, help="prefill workers to start")
    p.add_argument("--decode", type=int, help="decode workers to start")
    p.add_argument("--autoscale", action="store_true", default=None,
                   help="let the autoscaler resize the pools (default: fixed pools, unless "
                   "the config file sets autoscaler.enabled)")
    p.add_argument("--colocated", action="store_true", default=None,
                   help="baseline: decode workers prefill themselves, no prefill pool")
    p.add_argument("--kv-backend", choices=["torch_dist", "ray"], help="KV transfer backend")
    p.add_argument("--ray-address", help="join an existing Ray cluster (default: start one)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="worker device")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--host", help="address the servers bind to")
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--http-port", type=int)
    p.add_argument("--tls-cert", help="serve gRPC and HTTP over TLS with this PEM certificate")
    p.add_argument("--tls-key", help="the PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this PEM CA "
                   "(mutual TLS)")
    p.add_argument("--api-key", help="require this bearer token (default: $SPLITSERVE_API_KEY "
                   "or router.api_key; keep it in a Secret, not the config file)")


def load_config(args: argparse.Namespace):
    from cluster.config import ClusterConfig

    base = ClusterConfig.from_yaml(args.config) if args.config else ClusterConfig()
    over = {
        "model.path": args.model, "model.device": args.device, "model.dtype": args.dtype,
        "colocated": args.colocated, "transfer.backend": args.kv_backend,
        "ray.address": args.ray_address, "router.host": args.host,
        "router.grpc_port": args.grpc_port, "router.http_port": args.http_port,
        "router.api_key": getattr(args, "api_key", None) or os.environ.get("SPLITSERVE_API_KEY"),
        "router.tls_cert": getattr(args, "tls_cert", None),
        "router.tls_key": getattr(args, "tls_key", None),
        "router.tls_client_ca": getattr(args, "tls_client_ca", None),
        "autoscaler.enabled": _autoscaling_wanted(args),
    }
    for role in ("prefill", "decode"):
        n = getattr(args, role)
        if n is not None:
            pool = getattr(base, role)
            over[f"{role}.replicas"] = n
            over[f"{role}.min_replicas"] = min(pool.min_replicas, n)
            over[f"{role}.max_replicas"] = max(pool.max_replicas, n)
    return base.with_overrides(**over)


def _autoscaling_wanted(args: argparse.Namespace) -> bool | None:
    """``--autoscale`` turns the autoscaler on; else the config decides, and a config that
    does not write ``autoscaler.enabled`` keeps fixed pools (``ClusterConfig``)."""
    return True if getattr(args, "autoscale", None) else None


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run a cluster and its gRPC + HTTP router",
                              description=__doc__.splitlines()[0])
    add_cluster_flags(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args)
    except ValueError as exc:
        print(f"splitserve serve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if not config.model.path:
        print("splitserve serve: no model: pass --model DIR (or model.path in --config)",
              file=sys.stderr)
        return 2
    from cluster.pools import WorkerStartTimeout
    from router.config import PortInUseError, TLSConfig

    rc = config.router
    try:  # the files exist: checked now, not after the workers have loaded
        if rc.tls_cert:
            TLSConfig(rc.tls_cert, rc.tls_key, rc.tls_client_ca)
    except ValueError as exc:
        print(f"splitserve serve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(config))
    except (PortInUseError, WorkerStartTimeout) as exc:
        print(f"splitserve serve: {exc}", file=sys.stderr)
        return 1


async def _serve(config) -> int:
    from engine.cpu_kernels_build import prebuild_for_cli
    from router.server import check_ports_free, start_server

    check_ports_free(config)  # a taken port is told at once, not after a kernel build
    if not config.ray.address:  # local workers share this machine's kernel cache
        prebuild_for_cli(config.model.device)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await start_server(config)
    pools = ", ".join(f"{r}={server.cluster.replicas(r)}" for r in server.cluster.roles)
    print(f"splitserve ready ({pools}, kv={config.transfer.backend})", flush=True)
    for name, url in server.endpoints().items():
        print(f"  {name:8s} {url}", flush=True)
    await stop.wait()
    print("shutting down...", flush=True)
    await server.stop()
    return 0
