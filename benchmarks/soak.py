"""Soak: thousands of requests through a local 1P+1D Ray cluster (KV over gloo) while the
prefill and the decode worker are each killed with SIGKILL midway, clients cancel and
disconnect, and hostile requests are mixed in. Prints every request's outcome and what was
left behind (blocks, router and backend entries), writes results/soak.json, and exits 1
unless every request is accounted for and nothing leaked.

    python benchmarks/soak.py                       # 2,000 requests, tiny random model
    python benchmarks/soak.py --num-requests 300 --preset small
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

# Python puts this folder first on sys.path, where benchmarks/kv_transfer.py would shadow the
# kv_transfer package that the cluster imports: look modules up from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from app.loadgen.soak import SoakPlan, run_soak, summary_json  # noqa: E402
from cluster.config import ClusterConfig  # noqa: E402
from engine import Engine, SamplingParams  # noqa: E402

ENGINE = {"block_size": 16, "max_num_batched_tokens": 512, "max_num_seqs": 64,
          "max_model_len": 1024, "num_threads": 1}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--num-requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--preset", default="tiny", help="make-model preset of the llama model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/soak.json")
    return p.parse_args(argv)


def _config(model_dir: Path) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "model": {"path": str(model_dir), "device": "cpu", "name": "soak"},
        "prefill": {"num_cpus": 0.5, "engine": ENGINE},
        "decode": {"num_cpus": 0.5, "engine": ENGINE},
        "transfer": {"backend": "torch_dist", "timeout_s": 20},
        "scheduler": {"block_size": 16},
        "router": {"grpc_port": 0, "http_port": 0, "max_inflight_requests": 256},
        "autoscaler": {"enabled": False},
        "ray": {"num_cpus": 4}})


async def _main(args: argparse.Namespace, model_dir: Path) -> int:
    from app.server import start_server

    engine = Engine.from_pretrained(model_dir, block_size=16)

    def expected_tokens(items):
        longest = max(n for _, n in items)
        params = SamplingParams(max_tokens=longest, temperature=0.0, ignore_eos=True)
        outs = engine.generate([p for p, _ in items], params)
        return [o.token_ids[:n] for o, (_, n) in zip(outs, items, strict=True)]

    server = await start_server(_config(model_dir))
    try:
        plan = SoakPlan(num_requests=args.num_requests, concurrency=args.concurrency,
                        seed=args.seed)
        summary = await run_soak(server, plan, expected_tokens)
    finally:
        await server.stop()
    text = summary_json(summary)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0 if summary.ok() and summary.outcomes["errored"] == 0 else 1


def main(argv=None) -> int:
    import ray

    from engine.make_model import make_model

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp) / "llama", "llama", args.preset, seed=0,
                               progress=False)
        try:
            return asyncio.run(_main(args, model_dir))
        finally:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
