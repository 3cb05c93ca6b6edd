"""`splitserve generate`: stream one completion from a running server to stdout (gRPC).

    splitserve generate --address 127.0.0.1:50051 --max-tokens 32 --temperature 0 "Hello"

Text goes to stdout as it arrives; with --stats, token counts and the timing breakdown go
to stderr at the end. Exit codes: 0 done, 1 the request failed, 2 server unreachable,
130 interrupted (the request is aborted on the server).
"""

from __future__ import annotations

import argparse
import os
import sys

_SAMPLING_FLAGS = (  # (flag, SamplingParams field, type)
    ("--max-tokens", "max_tokens", int),
    ("--temperature", "temperature", float),
    ("--top-p", "top_p", float),
    ("--top-k", "top_k", int),
    ("--min-p", "min_p", float),
    ("--seed", "seed", int),
    ("--presence-penalty", "presence_penalty", float),
    ("--frequency-penalty", "frequency_penalty", float),
    ("--repetition-penalty", "repetition_penalty", float),
    ("--min-tokens", "min_tokens", int),
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="stream one completion from a running server",
        description="Send one prompt to a splitserve server over gRPC and stream the "
                    "completion to stdout.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--address", default="127.0.0.1:50051",
                   help="the server's gRPC HOST:PORT (default %(default)s)")
    p.add_argument("--model", default="", help="model name (default: the server's default)")
    p.add_argument("--api-key", default=None,
                   help="API key, when the server wants one (default: $SPLITSERVE_API_KEY)")
    for flag, dest, kind in _SAMPLING_FLAGS:
        p.add_argument(flag, dest=dest, type=kind, default=None, help=f"SamplingParams.{dest}")
    p.add_argument("--stop", action="append", default=None,
                   help="stop string (repeat for several)")
    p.add_argument("--ignore-eos", action="store_true", default=None,
                   help="keep generating past end-of-sequence")
    p.add_argument("--timeout", type=float, default=None,
                   help="request deadline in seconds (the server aborts the request after it)")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="seconds to wait for the server to accept the connection")
    p.add_argument("--stats", action="store_true",
                   help="print token counts and the timing breakdown to stderr")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from engine.errors import SplitServeError
    from router.client import SplitServeClient

    sampling = {dest: getattr(args, dest) for _, dest, _ in _SAMPLING_FLAGS}
    sampling.update(stop=args.stop, ignore_eos=args.ignore_eos)
    sampling = {k: v for k, v in sampling.items() if v is not None}
    api_key = args.api_key or os.environ.get("SPLITSERVE_API_KEY") or None
    with SplitServeClient(args.address, model=args.model, api_key=api_key) as client:
        try:
            client.wait_ready(args.connect_timeout)
        except SplitServeError:
            print(f"error: cannot reach a splitserve server at {args.address} (is `splitserve "
                  "serve` running there? check --address)", file=sys.stderr)
            return 2
        try:
            final = _stream_to_stdout(client, args.prompt, args.timeout, sampling)
        except KeyboardInterrupt:
            print("\ninterrupted; the request was aborted", file=sys.stderr)
            return 130
        except SplitServeError as exc:
            print(f"\nerror: {exc.code}: {exc}", file=sys.stderr)
            return 1
    if args.stats and final is not None:
        _print_stats(final)
    return 0


def _stream_to_stdout(client, prompt: str, timeout: float | None, sampling: dict):
    final = None
    for chunk in client.stream(prompt, timeout=timeout, **sampling):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        if chunk.finish_reason is not None:
            final = chunk
    sys.stdout.write("\n")
    return final


def _print_stats(final) -> None:
    from cluster.backend import MIGRATION_COUNT

    usage = final.usage
    print(f"finish_reason={final.finish_reason} prompt_tokens={usage.prompt_tokens} "
          f"completion_tokens={usage.completion_tokens} cached_tokens={usage.cached_tokens}",
          file=sys.stderr)
    timing = dict(final.timing or {})
    migrations = int(timing.pop(MIGRATION_COUNT, 0))
    if not migrations:
        timing.pop("migration", None)  # 0 ms of no migration says nothing
    line = " ".join(f"{k}={v * 1000:.1f}ms" for k, v in timing.items())
    print(f"timing: {line}" + (f" migrations={migrations}" if migrations else ""),
          file=sys.stderr)
