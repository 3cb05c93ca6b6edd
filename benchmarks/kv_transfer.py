"""KV transfer bandwidth: our torch_dist path vs a raw torch.distributed send/recv.

Two processes (this one sends, a spawned child receives), measured side by side in one run,
on the KV caches of real model shapes (bf16, block size 16), for prompts of 512, 2048 and
8192 tokens whose blocks are scattered over each cache (the worst case: one message per
block) or lie in one contiguous range on each side (``--layouts``):

  - ``llama-3-8b``: 32 layers x 8 KV heads x 128 dims, 128 KiB per token, a 2 MiB message
    per block (a 512-token prompt is 64 MiB);
  - ``llama-3.2-1b``: 16 layers x 8 KV heads x 64 dims, 32 KiB per token, a 512 KiB
    message per block (a 512-token prompt is 16 MiB: where per-message costs show most).

What is timed:

  - ours: ``TorchDistSender.send`` (given the reserved ids, as the prefill worker gives
    them) → header + one message per block, or per run of blocks contiguous in both caches,
    sent straight from the source blocks of the (block-major) cache and received straight
    into the reserved blocks → ``on_done`` on the receiver; timed from ``send()`` until the
    child reports ``on_done``. Two paths (``--paths``):
      - ``announced``, what the prefill worker does: ``announce()`` when the prompt's last
        chunk is scheduled, so the receiver posts its receives while that chunk is computed;
        here the announcement goes out ``--lead-ms`` before the clock starts (standing in for
        that forward pass);
      - ``plain``: no announcement (the receiver posts its receives when the header lands).
  - raw: one ``send``/``recv`` of a preallocated contiguous buffer of the same byte count
    over a separate two-rank group between the same processes (no block bookkeeping, no
    header); timed from the send until the child reports the receive done. Its receive is
    posted before the clock starts, and (announced path) the clock starts after the same
    ``--lead-ms`` as ours.

Each size: one warm-up of each, then ``--reps`` repetitions of both, in alternating order
(``--small-reps`` for payloads up to 64 MiB: they take milliseconds, and on a shared 2-core
host their medians need more samples to settle); medians, GB/s and the ratio ours/raw are
printed and written to JSON. Received KV is checked against what was
sent once per size. Each model runs in a fresh receiver process (the 8B caches for 8192
tokens take ~2 GiB per side).

    python benchmarks/kv_transfer.py                      # gloo, CPU caches, both models
    python benchmarks/kv_transfer.py --models llama-3.2-1b --tokens 512 --reps 20
    python benchmarks/kv_transfer.py --device cuda        # NCCL with 2+ GPUs (one per side);
                                                          # with 1 GPU: CUDA caches, gloo wire
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # this script is named like the package it measures: import the package

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kv_transfer import TransferConfig, blocks
from kv_transfer.torch_dist import TorchDistReceiver, TorchDistSender

BLOCK_SIZE, DTYPE = 16, torch.bfloat16
SMALL_BYTES = 64 << 20  # payloads up to this size get --small-reps repetitions
# name -> (layers, KV heads, head_dim), from the models' config.json
MODELS = {"llama-3-8b": (32, 8, 128), "llama-3.2-1b": (16, 8, 64)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument(
        "--layouts",
        nargs="+",
        default=["scattered", "contiguous"],
        choices=["scattered", "contiguous"],
        help="where a request's blocks lie in each cache: random ids (the worst case, one "
        "message per block) or one contiguous range per side (one message)",
    )
    p.add_argument("--paths", nargs="+", default=["announced", "plain"],
                   choices=["announced", "plain"])
    p.add_argument("--lead-ms", type=float, default=5.0,
                   help="announced path: announce this long before the send (the last "
                   "prefill chunk's forward pass)")
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--small-reps", type=int, default=30,
                   help="repetitions for payloads up to 64 MiB (at least --reps)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--wire", default="auto", choices=["auto", "gloo", "nccl"])
    p.add_argument("--inflight-messages", type=int, default=32, help="block receives in flight")
    p.add_argument("--out", default="results/kv_transfer.json")
    return p.parse_args()


def cache(args: argparse.Namespace, model: str, device: str, fill: bool) -> torch.Tensor:
    layers, kv_heads, head_dim = MODELS[model]
    num_blocks = 2 * max(args.tokens) // BLOCK_SIZE + 8
    shape = (num_blocks, layers, 2, BLOCK_SIZE, kv_heads, head_dim)
    if not fill:
        return torch.zeros(shape, dtype=DTYPE, device=device)
    # Random bit patterns (cheap for GBs; checked bitwise, so NaN patterns do no harm).
    return torch.randint(-(2**15), 2**15, shape, dtype=torch.int16, device=device).view(DTYPE)


def checksum(kv: torch.Tensor, block_ids: list[int]) -> int:
    """An exact checksum of blocks' bits."""
    return int(blocks.gather(kv, block_ids).view(torch.int16).sum(dtype=torch.int64))


def config(args: argparse.Namespace) -> TransferConfig:
    return TransferConfig(
        host="127.0.0.1",
        timeout_s=120,
        wire=args.wire,
        inflight_messages=args.inflight_messages,
    )


def raw_group(store: dist.Store, rank: int, wire: str) -> dist.ProcessGroup:
    """A standalone two-rank group for the baseline, built the same way as ours."""
    timeout = datetime.timedelta(seconds=120)
    if wire == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(dist.PrefixStore("raw/", store), rank, 2, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    opts._timeout = timeout
    return dist.ProcessGroupGloo(dist.PrefixStore("raw/", store), rank, 2, opts)


def wire_of(args: argparse.Namespace) -> str:
    """The wire both paths use: NCCL needs CUDA and one GPU per side."""
    if args.wire != "auto":
        return args.wire
    return "nccl" if args.device == "cuda" and torch.cuda.device_count() >= 2 else "gloo"


def device_of(args: argparse.Namespace, rank: int) -> str:
    if args.device == "cpu":
        return "cpu"
    return f"cuda:{min(rank, torch.cuda.device_count() - 1)}"


def receiver_main(args: argparse.Namespace, model: str, inbox, outbox) -> None:
    """Child: a TorchDistReceiver plus the raw baseline's receiving end."""
    device = device_of(args, 1)
    if args.device == "cuda":
        torch.cuda.set_device(device)
    kv = cache(args, model, device, fill=False)
    receiver = TorchDistReceiver(config(args), kv, name="bench-decode")
    raw_store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    outbox.send(("hello", receiver.endpoint(), raw_store.port))
    wire = wire_of(args)
    raw = raw_group(raw_store, 1, wire)
    raw_buf = torch.empty(
        kv[: max(args.tokens) // BLOCK_SIZE].numel() * 2,
        dtype=torch.uint8,
        device=device if wire == "nccl" else "cpu",
    )
    lock = threading.Lock()

    def reply(*msg) -> None:
        with lock:
            outbox.send(msg)

    while (msg := inbox.recv())[0] != "stop":
        if msg[0] == "expect":
            _, rid, dst = msg
            receiver.expect(rid, dst, lambda r, e: reply("done", r, None if e is None else str(e)))
            reply("ready")
        elif msg[0] == "raw":
            work = raw.recv([raw_buf[: msg[1]]], 0, 0)
            reply("ready")
            work.wait()
            if raw_buf.is_cuda:
                torch.cuda.synchronize()
            reply("done", "raw", None)
        elif msg[0] == "check":
            reply("check", checksum(kv, msg[1]))
    receiver.close()


def expect_msg(inbox, kind: str):
    msg = inbox.recv()
    if msg[0] != kind:
        raise RuntimeError(f"benchmark: expected {kind!r} from the receiver, got {msg}")
    if kind == "done" and msg[2] is not None:
        raise RuntimeError(f"benchmark: transfer failed: {msg[2]}")
    return msg


def time_ours(sender, endpoint, outbox, inbox, rid: str, src, dst, lead_s: float | None
              ) -> float:
    outbox.send(("expect", rid, dst))
    expect_msg(inbox, "ready")
    if lead_s is not None:  # as the prefill worker: announced when the prefill starts
        if not sender.announce(rid, endpoint, src, dst):
            raise RuntimeError("benchmark: the announcement was refused")
        time.sleep(lead_s)  # the last chunk's forward pass, during which the receives get posted
    t0 = time.perf_counter()
    handle = sender.send(rid, endpoint, src, dst_block_ids=dst)  # as the prefill worker does
    expect_msg(inbox, "done")
    elapsed = time.perf_counter() - t0
    handle.result(timeout=60)
    return elapsed


def time_raw(raw, buf: torch.Tensor, outbox, inbox, lead_s: float | None) -> float:
    outbox.send(("raw", buf.numel()))
    expect_msg(inbox, "ready")
    if lead_s is not None:  # the same idle gap before the clock as ours (see bench_size)
        time.sleep(lead_s)
    t0 = time.perf_counter()
    raw.send([buf], 1, 0).wait()
    expect_msg(inbox, "done")
    return time.perf_counter() - t0


def block_ids(layout: str, n: int, num_blocks: int, gen: torch.Generator) -> list[int]:
    """``n`` distinct ids: scattered over the cache, or one contiguous range at a random
    offset (a fresh pool, or a request whose blocks were allocated together)."""
    if layout == "scattered":
        return torch.randperm(num_blocks, generator=gen)[:n].tolist()
    first = int(torch.randint(0, num_blocks - n + 1, (1,), generator=gen))
    return list(range(first, first + n))


def bench_size(args, model, path, layout, tokens, sender, endpoint, raw, raw_buf, kv, outbox,
               inbox) -> dict:
    n = tokens // BLOCK_SIZE
    gen = torch.Generator().manual_seed(tokens)
    src = block_ids(layout, n, kv.shape[0], gen)
    dst = block_ids(layout, n, kv.shape[0], gen)
    nbytes = kv[:n].numel() * kv.element_size()
    buf = raw_buf[:nbytes]
    ours, base = [], []
    reps = max(args.reps, args.small_reps) if nbytes <= SMALL_BYTES else args.reps
    lead_s = args.lead_ms / 1e3 if path == "announced" else None
    for rep in range(reps + 1):  # rep 0 is the warm-up
        rid = f"{path}-{layout}-{tokens}-{rep}"
        # Alternate which goes first: neither always follows the other. Both start after
        # the same gap: a transfer right after 5 ms idle was 4-7% slower than one without
        # (raw vs raw, paired), which had biased the ratio against ours.
        for which in (("raw", "ours") if rep % 2 else ("ours", "raw")):
            if which == "ours":
                t_ours = time_ours(sender, endpoint, outbox, inbox, rid, src, dst, lead_s)
            else:
                t_raw = time_raw(raw, buf, outbox, inbox, lead_s)
        if rep:
            ours.append(t_ours)
            base.append(t_raw)
    outbox.send(("check", dst))
    got, want = expect_msg(inbox, "check")[1], checksum(kv, src)
    if got != want:
        raise RuntimeError(f"benchmark: received KV differs (checksum {got} != {want})")
    med_ours, med_raw = statistics.median(ours), statistics.median(base)
    return {
        "model": model,
        "path": path,
        "layout": layout,
        "tokens": tokens,
        "blocks": n,
        "bytes": nbytes,
        "ours_s": ours,
        "raw_s": base,
        "ours_median_s": med_ours,
        "raw_median_s": med_raw,
        "ours_GBps": nbytes / med_ours / 1e9,
        "raw_GBps": nbytes / med_raw / 1e9,
        "ratio": med_raw / med_ours,
    }


def main() -> None:
    args = parse_args()
    rows = [row for model in args.models for row in bench_model(args, model)]
    report(args, rows)


def bench_model(args: argparse.Namespace, model: str) -> list[dict]:
    """Every size for one model shape, against a fresh receiver process."""
    ctx = mp.get_context("spawn")
    to_child, child_in = ctx.Pipe()
    child_out, from_child = ctx.Pipe()
    child = ctx.Process(
        target=receiver_main, args=(args, model, child_in, child_out), daemon=True
    )
    child.start()
    device = device_of(args, 0)
    kv = cache(args, model, device, fill=True)
    sender = TorchDistSender(config(args), kv, name="bench-prefill")
    _, endpoint, raw_port = expect_msg(from_child, "hello")
    wire = wire_of(args)
    raw = raw_group(dist.TCPStore("127.0.0.1", raw_port, is_master=False), 0, wire)
    raw_buf = kv[: max(args.tokens) // BLOCK_SIZE].clone().view(-1).view(torch.uint8)
    if wire != "nccl":
        raw_buf = raw_buf.cpu()
    rows = [
        bench_size(args, model, path, layout, t, sender, endpoint, raw, raw_buf, kv, to_child,
                   from_child)
        for path in args.paths
        for layout in args.layouts
        for t in args.tokens
    ]
    sender.close()  # its CLOSE message ends the child's receiving thread first
    to_child.send(("stop",))
    child.join(timeout=60)
    return rows


def report(args: argparse.Namespace, rows: list[dict]) -> None:
    print(
        f"KV transfer, {args.device} caches, {wire_of(args)} wire, bf16, block 16, "
        f"inflight {args.inflight_messages}, median of {args.reps} "
        f"({max(args.reps, args.small_reps)} up to {SMALL_BYTES >> 20} MiB)"
    )
    print(
        f"{'model':>13} {'path':>9} {'blocks':>10} {'tokens':>7} {'MiB':>8} {'ours ms':>9} "
        f"{'raw ms':>9} "
        f"{'ours GB/s':>10} {'raw GB/s':>9} {'ours/raw':>9}"
    )
    for r in rows:
        print(
            f"{r['model']:>13} {r['path']:>9} {r['layout']:>10} {r['tokens']:>7} "
            f"{r['bytes'] / 2**20:>8.1f} "
            f"{r['ours_median_s'] * 1e3:>9.1f} "
            f"{r['raw_median_s'] * 1e3:>9.1f} {r['ours_GBps']:>10.2f} {r['raw_GBps']:>9.2f} "
            f"{r['ratio']:>9.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "args": vars(args),
        "wire": wire_of(args),
        "torch": torch.__version__,
        "host": platform.node(),
        "cpus": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
