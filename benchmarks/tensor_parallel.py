"""Tensor parallelism on this machine: per-step time split into compute and communication,
TP=1 vs TP=2 (two local processes over gloo), prefill steps and decode-only steps.

Each configuration builds a fresh engine, runs ``warmup()``, then serves ``--batch``
requests of ``--prompt-len`` tokens and ``--decode-steps`` output tokens (greedy): the
prompts run as prefill steps of ``--max-num-batched-tokens`` tokens, then the batch decodes.
Every step's wall time is measured on rank 0 and split into the seconds rank 0 spent
inside each collective (``TPComm.seconds``: all-reduce — two per layer plus one for the
vocab-parallel embedding —, the logits gather, the step broadcast; waiting for the slower
rank counts there) and the rest ("compute": scheduling, inputs, the layers, sampling).
Medians per step kind are printed and written to JSON.

Configurations: ``tp1`` (today's engine, all cores: decode-only steps run the compiled CPU
``decode_step``), ``tp1-1thread`` (the same on one core: one rank's share of the cores,
no communication), ``tp1-layers-1thread`` (one core, the Python layers: the path every TP
rank takes, since ``decode_step`` has no all-reduce between layers; the compiled
paged-attention kernels and fused ops still run per rank), ``tp2`` (one core per rank).
On a machine shared with other work, multi-threaded configurations also measure the
contention (OpenMP threads waiting for descheduled siblings): compare one-core numbers.

What two cores can and cannot show: TP=2 here gives each rank one core where TP=1 gives
its one process both, so the arithmetic is the same and TP cannot be faster; what this
measures is the price of TP — the all-reduce latency over loopback gloo, the per-step
message, rank synchronisation and the layer fallback — at a size where each is visible.
What TP buys on real hardware (the weights and KV split over N devices' memory, N devices'
bandwidth per decode step, NCCL all-reduces of ~10-30 us over NVLink) needs N devices.

    python benchmarks/tensor_parallel.py --preset small
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

KINDS = ("all_reduce", "gather", "broadcast")


def run_config(model_dir: Path, name: str, args) -> dict:
    from engine import Engine, SamplingParams

    tp = 2 if name == "tp2" else 1
    threads = torch.get_num_threads()
    if name.endswith("-1thread"):
        torch.set_num_threads(1)
    engine = Engine.from_pretrained(
        model_dir, dtype="float32", device="cpu", block_size=16, load_tokenizer=False,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.batch,
        tensor_parallel_size=tp)
    try:
        if name.startswith("tp1-layers"):  # as under TP: no compiled whole-step decode
            engine.model.model._decode_step_checked = True
            engine.model.model._decode_step = None
        engine.warmup()
        comm = getattr(engine.runner, "comm", None)
        vocab = engine.model_config.vocab_size
        params = SamplingParams(max_tokens=args.decode_steps + 1, temperature=0.0,
                                ignore_eos=True)
        for i in range(args.batch):
            engine.add_request(f"b{i}", [(i * 7 + j) % (vocab - 10) + 10
                                         for j in range(args.prompt_len)], params)
        steps = _run_steps(engine, comm)
    finally:
        engine.close()
        used = torch.get_num_threads() if tp == 1 else _threads(tp)
        torch.set_num_threads(threads)
    return {"tensor_parallel_size": tp, "threads_per_rank": used, **_summary(steps)}


def _run_steps(engine, comm) -> list[dict]:
    if comm is not None:
        comm.count_time = True
    steps = []
    while engine.has_unfinished_requests():
        before = dict(comm.seconds) if comm is not None else None
        calls = comm.calls["all_reduce"] if comm is not None else 0
        t0 = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t0
        batch = engine.last_batch
        step = {"kind": "decode" if batch.num_decodes == len(batch.scheduled) else "prefill",
                "tokens": batch.num_batched_tokens, "wall": wall}
        for kind in KINDS:
            step[kind] = comm.seconds[kind] - before[kind] if comm is not None else 0.0
        step["compute"] = wall - sum(step[k] for k in KINDS)
        step["all_reduces"] = comm.calls["all_reduce"] - calls if comm is not None else 0
        steps.append(step)
    return steps


def _summary(steps: list[dict]) -> dict:
    out = {}
    for kind in ("prefill", "decode"):
        chosen = [s for s in steps if s["kind"] == kind]
        if chosen:
            out[kind] = {"steps": len(chosen),
                         "tokens_per_step": statistics.median(s["tokens"] for s in chosen),
                         "all_reduces_per_step": statistics.median(s["all_reduces"]
                                                                   for s in chosen),
                         **{f"{k}_ms": 1e3 * statistics.median(s[k] for s in chosen)
                            for k in ("wall", "compute", *KINDS)}}
    return out


def _threads(tp: int) -> int:
    return max(1, torch.get_num_threads() // tp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model dir (default: generated --arch/--preset)")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=48)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--configs", nargs="+",
                    default=["tp1", "tp1-1thread", "tp1-layers-1thread", "tp2"])
    ap.add_argument("--out", default="results/tensor_parallel.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else None
        if model_dir is None:
            from engine.make_model import make_model

            model_dir = make_model(Path(tmp) / "ckpt", args.arch, args.preset, seed=0,
                                   progress=False)
        results = {name: run_config(model_dir, name, args) for name in args.configs}
    report = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform(),
                          "load_average": os.getloadavg()},
              "model": args.model or f"{args.arch}/{args.preset}", "batch": args.batch,
              "prompt_len": args.prompt_len, "decode_steps": args.decode_steps,
              "results": results}
    _print(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def _print(results: dict) -> None:
    head = (f"{'config':<18} {'step':<8} {'wall ms':>8} {'compute':>8} {'allreduce':>9} "
            f"{'gather':>7} {'bcast':>6}")
    print(head)
    for name, res in results.items():
        for kind in ("prefill", "decode"):
            r = res.get(kind)
            if r:
                print(f"{name:<18} {kind:<8} {r['wall_ms']:8.2f} {r['compute_ms']:8.2f} "
                      f"{r['all_reduce_ms']:9.2f} {r['gather_ms']:7.2f} "
                      f"{r['broadcast_ms']:6.2f}")


if __name__ == "__main__":
    main()
