"""`splitserve bench`: load-generate against a splitserve server and report TTFT, ITL, TPOT,
E2E percentiles, throughput and goodput under SLOs (printed, and written as JSON).

    splitserve bench --grpc 127.0.0.1:50051 --rate 2 --num-requests 40
    splitserve bench --http http://127.0.0.1:8000/v1 --trace trace.csv --length-scale 0.125
    splitserve bench --launch --prefill 1 --decode 1          # start the cluster in-process
    splitserve bench --compare --compare-colocated 1 2        # 1P+1D vs colocated, same load
    splitserve bench --http http://other:8000/v1 --model-name m --rate inf --max-concurrency 8
                     --plot results/                            # any OpenAI endpoint, PNG

``--max-concurrency N`` caps requests in flight (with ``--rate inf``: N closed-loop users);
``--plot`` draws TTFT/ITL/E2E CDFs and throughput over time (matplotlib). For a launched
cluster the report also puts the client's inter-token gaps next to the decode workers' median
step time (``app.loadgen.delivery``).

The load generator itself is ``app.loadgen`` (also run by ``benchmarks/serving.py``).
"""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  splitserve bench --grpc 127.0.0.1:50051 --rate 2 --num-requests 40
  splitserve bench --http http://127.0.0.1:8000/v1 --trace trace.csv --length-scale 0.125
  splitserve bench --launch --prefill 1 --decode 1
  splitserve bench --compare --compare-colocated 1 2
  splitserve bench --http http://other:8000/v1 --model-name m --max-concurrency 8 --plot out/"""


def register(subparsers) -> None:
    from app.loadgen.cli import add_arguments

    p = subparsers.add_parser(
        "bench", help="load generator: latency percentiles, throughput, goodput",
        description="Load-generate against a splitserve server (or clusters it starts): "
                    "TTFT, ITL, TPOT, E2E percentiles, throughput, goodput; prints tables and "
                    "writes JSON (and, with --plot, a PNG). Works against any "
                    "OpenAI-compatible endpoint (--http).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from app.loadgen.cli import run as run_bench

    return run_bench(args)
