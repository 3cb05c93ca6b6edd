"""Serving benchmark: TTFT, ITL, TPOT and E2E percentiles, throughput and goodput under SLOs,
against a running server or against clusters this script starts itself.

    # the same workload against 1 prefill + 1 decode worker, then 1 colocated worker
    python benchmarks/serving.py --compare --num-requests 40 --rate 2 \
        --prompt-len-range 64 512 --output-len-range 16 64
    # a running server (splitserve serve ...)
    python benchmarks/serving.py --grpc 127.0.0.1:50051 --rate 2 --label mine
    # token delivery at 8 closed-loop users: client ITL vs decode step time, side by side
    python benchmarks/serving.py --launch --api http --rate inf --max-concurrency 8 \
        --num-requests 32 --prompt-len-range 64 256 --output-len-range 64 128 --plot results

Open-loop Poisson arrivals (fixed --seed), random token-id prompts, greedy with ignore_eos so
output lengths are exact. Prints the tables and writes results/serving_<label>.json (and a
PNG with --plot). For launched clusters it prints the client-side ITL p50 next to the decode
workers' median step time and the share of gaps under 10 % of a step (app/loadgen/
delivery.py). Same code and flags as `splitserve bench` (app/loadgen).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Python puts this folder first on sys.path, where benchmarks/kv_transfer.py would shadow the
# kv_transfer package that the cluster imports: look modules up from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from app.loadgen.cli import add_arguments, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
