"""`splitserve demo`: a local 1 prefill + 1 decode cluster on this machine, a small generated
model, a handful of concurrent requests streamed over gRPC, and a latency table.

Everything it needs is made on the spot: the model is generated once (random weights of a
real architecture, cached under ~/.cache/splitserve/models) and Ray starts locally. The
weights are random, so the generated text is gibberish: the demo shows the serving path
(prefill on one worker, KV cache shipped to the decode worker, tokens streamed back) and
its latencies, not a model's answers. Pass --model DIR to serve a real checkpoint instead.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "Disaggregated serving splits prefill and decode because",
    "Les modèles de langage",
    "A short poem about the sea:",
]


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="local 1P+1D cluster, a few streamed requests",
                              description=" ".join(__doc__.split("\n\n")[0].split()),
                              epilog=" ".join(__doc__.split("\n\n")[1].split()))
    p.add_argument("--arch", default="llama", help="architecture of the generated model")
    p.add_argument("--preset", default="small", help="size preset of the generated model")
    p.add_argument("--model", help="use this checkpoint instead of generating one")
    p.add_argument("--requests", type=int, default=6, help="concurrent requests")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens generated per request")
    p.add_argument("--kv-backend", choices=["torch_dist", "ray"], default="torch_dist",
                   help="how the KV cache travels from the prefill to the decode worker")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from engine.cpu_kernels_build import prebuild_for_cli
    from engine.make_model import ensure_model

    model = args.model or str(ensure_model(args.arch, args.preset, seed=0, progress=True))
    print(f"model: {model}", flush=True)
    if not args.model:
        print(f"note: this {args.arch} ({args.preset}) model has RANDOM weights, so its text "
              "is gibberish. The demo shows disaggregated serving at work: each prompt is "
              "prefilled on the prefill worker, its KV cache is shipped to the decode worker "
              "(over " + args.kv_backend + "), and the tokens stream back over gRPC; the table "
              "at the end gives each request's time to first token, inter-token latency and "
              "end-to-end time.", flush=True)
    prebuild_for_cli("cpu")  # the demo's workers run on CPU
    return asyncio.run(_demo(model, args))


def _config(model: str, kv_backend: str):
    from cluster.config import ClusterConfig

    engine = {"block_size": 16, "max_num_batched_tokens": 512, "max_num_seqs": 32,
              "max_model_len": 2048, "num_threads": 1}
    return ClusterConfig.model_validate({
        "model": {"path": model, "device": "cpu"},
        "prefill": {"replicas": 1, "num_cpus": 1, "engine": engine},
        "decode": {"replicas": 1, "num_cpus": 1, "engine": engine},
        "transfer": {"backend": kv_backend},
        "router": {"grpc_port": 0, "http_port": 0},
        "autoscaler": {"enabled": False},  # the demo's 1P+1D is fixed, as `serve` pools are
        "ray": {"num_cpus": 4},
    })


async def _demo(model: str, args: argparse.Namespace) -> int:
    from app.commands.startup_report import report_workers, wait_ticker
    from app.server import start_server
    from router.client import AsyncSplitServeClient

    t0 = time.perf_counter()
    config = _config(model, args.kv_backend)
    async with wait_ticker(config):
        server = await start_server(config)
    await report_workers(server.cluster, time.perf_counter() - t0)
    print(f"1 prefill + 1 decode worker (KV over {args.kv_backend}); endpoints:", flush=True)
    for name, url in server.endpoints().items():
        print(f"  {name:8s} {url}", flush=True)
    try:
        client = AsyncSplitServeClient(server.endpoints()["grpc"])
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
        rows = await asyncio.gather(*(_one(client, i, p, args.max_tokens)
                                      for i, p in enumerate(prompts)))
        await client.close()
    finally:
        await server.stop()
    _table(rows)
    return 0 if all(r["ok"] for r in rows) else 1


async def _one(client, i: int, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    stamps, text, final = [], [], None
    async for chunk in client.stream(prompt, max_tokens=max_tokens, temperature=0.8, seed=i,
                                     ignore_eos=True):
        if chunk.token_ids:
            stamps.append(time.perf_counter())
        text.append(chunk.text)
        final = chunk
    itl = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    line = "".join(text).replace("\n", " ")
    print(f"[{i}] {prompt!r} -> {line[:70]!r}", flush=True)
    return {
        "ok": final is not None and final.finish_reason in ("length", "stop"),
        "ttft_ms": (stamps[0] - start) * 1e3 if stamps else float("nan"),
        "itl_ms": statistics.median(itl) * 1e3 if itl else float("nan"),
        "tokens": final.usage.completion_tokens if final is not None and final.usage else 0,
        "e2e_s": time.perf_counter() - start,
        "finish": final.finish_reason if final is not None else "none",
    }


def _table(rows: list[dict]) -> None:
    print(f"\n{'req':>3} {'TTFT ms':>9} {'ITL p50 ms':>11} {'tokens':>7} {'E2E s':>7} finish",
          file=sys.stdout)
    for i, r in enumerate(rows):
        print(f"{i:>3} {r['ttft_ms']:>9.1f} {r['itl_ms']:>11.1f} {r['tokens']:>7} "
              f"{r['e2e_s']:>7.2f} {r['finish']}")
