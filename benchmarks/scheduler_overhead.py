"""CPU time of one scheduler step (schedule + update) with N running decode requests.

No model: the runner's output is faked, so this measures only the scheduler's bookkeeping
(goal: under 1 ms with 256 running requests). Prints a table and writes JSON.

    python benchmarks/scheduler_overhead.py --running 256 --out results/scheduler_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from engine.batch import ModelRunnerOutput
from engine.block_pool import BlockPool
from engine.config import SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def build(num_running: int, prompt_len: int, block_size: int) -> Scheduler:
    max_tokens = 100_000
    blocks_per_req = (prompt_len + 2000) // block_size + 2
    pool = BlockPool(num_running * blocks_per_req, enable_prefix_caching=True)
    config = SchedulerConfig(max_num_batched_tokens=max(8192, num_running * prompt_len),
                             max_num_seqs=num_running, max_model_len=1 << 20)
    sched = Scheduler(config, KVCacheManager(pool, block_size))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i in range(num_running):
        prompt = [(i * 7919 + j) % 30000 for j in range(prompt_len)]
        sched.add_request(Request(f"r{i}", prompt, params, (2,)))
    batch = sched.schedule()  # the prefill step: everyone is running afterwards
    sched.update(batch, ModelRunnerOutput([5] * batch.num_samples))
    assert sched.num_running == num_running
    return sched


def measure(sched: Scheduler, steps: int) -> list[float]:
    times = []
    for step in range(steps):
        t0 = time.process_time_ns()
        batch = sched.schedule()
        sched.update(batch, ModelRunnerOutput([5 + step % 100] * batch.num_samples))
        times.append((time.process_time_ns() - t0) / 1e6)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--running", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--out", default="results/scheduler_overhead.json")
    args = ap.parse_args()
    sched = build(args.running, args.prompt_len, args.block_size)
    times = measure(sched, args.steps)
    sched.kv.pool.check_integrity()
    ordered = sorted(times)
    result = {
        "running_requests": args.running,
        "steps": args.steps,
        "block_size": args.block_size,
        "cpu_ms_per_step_median": statistics.median(times),
        "cpu_ms_per_step_p99": ordered[int(0.99 * (len(ordered) - 1))],
        "cpu_ms_per_step_mean": statistics.fmean(times),
        "goal_ms": 1.0,
    }
    print(f"scheduler step with {args.running} running requests (CPU time, {args.steps} steps)")
    print(f"  median {result['cpu_ms_per_step_median']:.3f} ms   p99 "
          f"{result['cpu_ms_per_step_p99']:.3f} ms   mean {result['cpu_ms_per_step_mean']:.3f} ms")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
