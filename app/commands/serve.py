"""`splitserve serve`: a disaggregated cluster and its router, until Ctrl-C / SIGTERM.

    splitserve serve --model DIR [--config FILE] [--prefill N] [--decode M] [--autoscale]
                     [--prefill-tp N] [--decode-tp M] [--tensor-parallel-size N]
                     [--served-model-name NAME] [--max-model-len N] [--dtype DTYPE]
                     [--block-size N] [--max-num-seqs N] [--max-num-batched-tokens N]
                     [--gpu-memory-utilization F] [--[no-]enable-prefix-caching]
                     [--grpc-port 50051] [--http-port 8000] [--kv-backend torch_dist|ray]
                     [--ray-address ADDR] [--colocated] [--api-key KEY]
                     [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]]

Precedence: a flag given on the command line wins over the --config YAML, which wins over
the built-in defaults. Engine flags (--max-model-len ... --enable-prefix-caching) set both
pools' ``engine`` sections; per-pool values go in the YAML, or for tensor parallelism
--prefill-tp / --decode-tp, which win over --tensor-parallel-size. Pools are fixed at their sizes
unless autoscaling is asked for: ``--autoscale``, or ``autoscaler.enabled`` set explicitly in
the config file.

Before Ray starts, the config, the ports and the model directory are checked: a problem is
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

ENGINE_FLAGS = ("max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens",
                "gpu_memory_utilization", "enable_prefix_caching", "enforce_eager",
                "kv_cache_dtype")


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face checkpoint directory (overrides model.path)")
    p.add_argument("--config", help="pool config YAML (see deploy/examples/pool.yaml); flags "
                   "override it")
    p.add_argument("--prefill", type=int, help="prefill workers to start")
    p.add_argument("--decode", type=int, help="decode workers to start")
    p.add_argument("--prefill-tp", type=int, metavar="N", help="tensor-parallel size of each "
                   "prefill worker: N ranks, one GPU each, on one node "
                   "(prefill.engine.tensor_parallel_size)")
    p.add_argument("--decode-tp", type=int, metavar="M", help="tensor-parallel size of each "
                   "decode (or colocated) worker (decode.engine.tensor_parallel_size)")
    p.add_argument("--autoscale", action="store_true", default=None,
                   help="let the autoscaler resize the pools (default: fixed pools, unless "
                   "the config file sets autoscaler.enabled)")
    p.add_argument("--colocated", action="store_true", default=None,
                   help="baseline: decode workers prefill themselves, no prefill pool")
    p.add_argument("--kv-backend", choices=["torch_dist", "ray"], help="KV transfer backend")
    p.add_argument("--ray-address", help="join an existing Ray cluster (default: start one)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="worker device")
    p.add_argument("--host", help="address the servers bind to")
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--http-port", type=int)
    p.add_argument("--tls-cert", help="serve gRPC and HTTP over TLS with this PEM certificate")
    p.add_argument("--tls-key", help="the PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this PEM CA "
                   "(mutual TLS)")
    p.add_argument("--api-key", help="require this bearer token on /v1/*, /tokenize, "
                   "/detokenize, /version (default: $SPLITSERVE_API_KEY or router.api_key; "
                   "keep it in a Secret, not the config file)")
    add_model_flags(p)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """vLLM's names for the model and engine settings (both pools)."""
    g = p.add_argument_group("model and engine (vLLM's flag names; both pools)")
    g.add_argument("--served-model-name", metavar="NAME", help="the name clients pass as "
                   "`model` (model.name; default: the model folder's name)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="weights and KV cache dtype (model.dtype)")
    g.add_argument("--max-model-len", type=int, metavar="N", help="longest prompt + output "
                   "in tokens (engine.max_model_len; capped by the model's own context)")
    g.add_argument("--block-size", type=int, metavar="N", help="tokens per KV block "
                   "(engine.block_size and scheduler.block_size)")
    g.add_argument("--max-num-seqs", type=int, metavar="N", help="most requests in a "
                   "worker's running batch (engine.max_num_seqs)")
    g.add_argument("--max-num-batched-tokens", type=int, metavar="N", help="token budget of "
                   "one engine step, the chunked-prefill chunk (engine.max_num_batched_tokens)")
    g.add_argument("--gpu-memory-utilization", type=float, metavar="F", help="share of each "
                   "GPU a CUDA worker may fill with weights and KV cache, 0 < F <= 1 "
                   "(engine.gpu_memory_utilization). CUDA workers only: refused with "
                   "--device cpu, where engine.kv_cache_memory_bytes sizes the KV cache")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, metavar="N", help="GPUs each "
                   "worker splits the model over (engine.tensor_parallel_size of both "
                   "pools; --prefill-tp / --decode-tp set one pool)")
    g.add_argument("--kv-cache-dtype", choices=["auto", "fp8_e4m3", "fp8_e5m2"],
                   help="KV cache element type (engine.kv_cache_dtype): fp8 halves the KV "
                   "bytes per token, so twice the blocks and half the bytes on the wire")
    g.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA "
                   "graphs: every decode step runs eagerly (engine.enforce_eager; CUDA "
                   "workers capture decode graphs by default)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=None, help="reuse the KV of shared prompt prefixes "
                   "(engine.enable_prefix_caching; default on)")


def load_config(args: argparse.Namespace):
    from cluster.config import ClusterConfig

    base = ClusterConfig.from_yaml(args.config) if args.config else ClusterConfig()
    colocated = args.colocated if args.colocated is not None else base.colocated
    moot = [flag for flag, value in (("--prefill", args.prefill),
                                     ("--prefill-tp", getattr(args, "prefill_tp", None)),
                                     ("--kv-backend", args.kv_backend)) if value is not None]
    if colocated and moot:
        raise ValueError(f"{', '.join(moot)} would change nothing with colocated workers (one "
                         "pool of decode workers that prefill themselves, no KV transfer); "
                         "drop them, or --decode / --decode-tp to size that pool")
    over = {
        "model.path": args.model, "model.device": args.device, "model.dtype": args.dtype,
        "model.name": getattr(args, "served_model_name", None),
        "colocated": args.colocated, "transfer.backend": args.kv_backend,
        "ray.address": args.ray_address, "router.host": args.host,
        "router.grpc_port": args.grpc_port, "router.http_port": args.http_port,
        "router.api_key": getattr(args, "api_key", None) or os.environ.get("SPLITSERVE_API_KEY"),
        "router.tls_cert": getattr(args, "tls_cert", None),
        "router.tls_key": getattr(args, "tls_key", None),
        "router.tls_client_ca": getattr(args, "tls_client_ca", None),
        "autoscaler.enabled": _autoscaling_wanted(args),
        "scheduler.block_size": getattr(args, "block_size", None),
    }
    for role in ("prefill", "decode"):
        for name in ENGINE_FLAGS:
            over[f"{role}.engine.{name}"] = getattr(args, name, None)
        tp = getattr(args, f"{role}_tp", None)
        over[f"{role}.engine.tensor_parallel_size"] = (
            tp if tp is not None else getattr(args, "tensor_parallel_size", None))
        n = getattr(args, role)
        if n is not None:
            over.update(base.pool_size_overrides(role, n))
    return base.with_overrides(**over)


def _autoscaling_wanted(args: argparse.Namespace) -> bool | None:
    """``--autoscale`` turns the autoscaler on; else the config decides, and a config that
    does not write ``autoscaler.enabled`` keeps fixed pools (``ClusterConfig``)."""
    return True if getattr(args, "autoscale", None) else None


def register(subparsers) -> None:
    paragraphs = __doc__.split("\n\n")  # title, synopsis, then the notes below --help
    p = subparsers.add_parser("serve", help="run a cluster and its gRPC + HTTP router",
                              description=paragraphs[0],
                              epilog="\n\n".join(paragraphs[2:]).strip(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cluster_flags(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _checked_config(args)
    if config is None:
        return 2
    from cluster.pools import WorkerCannotBePlaced, WorkerStartTimeout
    from router.config import PortInUseError

    try:
        return asyncio.run(_serve(config))
    except (PortInUseError, WorkerStartTimeout, WorkerCannotBePlaced) as exc:
        print(f"splitserve serve: {exc}", file=sys.stderr)
        return 1


def _checked_config(args: argparse.Namespace):
    """The config, or None after printing one line saying what is wrong (before Ray)."""
    from app.commands.preflight import PreflightError, check_all, config_error_line
    from router.config import PortInUseError, TLSConfig

    try:
        config = load_config(args)
    except ValueError as exc:  # pydantic's ValidationError is one
        print(f"splitserve serve: invalid configuration: {config_error_line(exc)}",
              file=sys.stderr)
        return None
    rc = config.router
    try:
        if rc.tls_cert:  # the files exist: checked now, not after the workers have loaded
            TLSConfig(rc.tls_cert, rc.tls_key, rc.tls_client_ca)
        check_all(config, gpu_memory_flag=getattr(args, "gpu_memory_utilization", None)
                  is not None)
        config.check_tensor_parallel()
    except (PreflightError, PortInUseError) as exc:
        print(f"splitserve serve: {exc}", file=sys.stderr)
        return None
    except ValueError as exc:
        print(f"splitserve serve: invalid configuration: {exc}", file=sys.stderr)
        return None
    return config


async def _serve(config) -> int:
    from app.commands.startup_report import report_workers, wait_ticker
    from app.server import check_ports_free, start_server
    from engine.cpu_kernels_build import prebuild_for_cli

    check_ports_free(config)  # again: the kernel build below may take a while
    if not config.ray.address:  # local workers share this machine's kernel cache
        prebuild_for_cli(config.model.device)

    signals = _Signals()
    t0 = time.perf_counter()
    starting = asyncio.ensure_future(start_server(config))
    async with wait_ticker(config):
        # a signal during start-up stops it (start_server's clean-up stops what started)
        await asyncio.wait([starting, asyncio.ensure_future(signals.first.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        print("stopping before the server was ready (signal again to exit at once)...",
              flush=True)
        starting.cancel()
        await asyncio.wait([starting, asyncio.ensure_future(signals.second.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # a second signal: the clean-up itself may be what hangs
            os._exit(128 + signals.received[-1])
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return 128 + signals.received[0]
    server = starting.result()
    signals.install()  # again: ray.init put its own handler in for SIGTERM
    await report_workers(server.cluster, time.perf_counter() - t0)
    pools = ", ".join(f"{r}={server.cluster.replicas(r)}" for r in server.cluster.roles)
    print(f"splitserve ready ({pools}, kv={config.transfer.backend}, model "
          f"{server.service.config.model_name!r})", flush=True)
    for name, url in server.endpoints().items():
        print(f"  {name:8s} {url}", flush=True)
    await signals.first.wait()
    drain_s = config.router.drain_timeout_s
    print(f"shutting down: {server.service.num_inflight} request(s) in flight get up to "
          f"{drain_s:g} s to finish (signal again to abort them now)...", flush=True)
    await server.stop(drain_s, give_up=signals.second)
    return 0


class _Signals:
    """SIGINT / SIGTERM: the first asks for a graceful stop, the second for a quick one
    (requests in flight aborted at once; during start-up, exit at once), a third exits at
    once, whatever the shutdown is waiting for."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.first, self.second = asyncio.Event(), asyncio.Event()
        self.install()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on, sig)

    def _on(self, sig: int) -> None:
        self.received.append(sig)
        if self.second.is_set():
            os._exit(128 + sig)
        (self.second if self.first.is_set() else self.first).set()
