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

``--transfer`` measures instead the KV resharding transfer between pools of different TP
sizes (``kv_transfer.reshard``), prefill TP=p -> decode TP=d for ``--transfer-cases`` (2to1,
1to2, 2to2): each rank is a process of its own (torch.multiprocessing, spawn) holding its
heads of a Llama-3.2-1B-shaped cache (16 layers x 8 KV heads x 64 dims, bf16, block 16;
``--kv-model`` llama-3-8b or llama-3-70b for their larger blocks), and every route of the
plan is a torch_dist pair channel over gloo on loopback. Timed from the prefill ranks'
``send`` (announced ``--lead-ms`` before, as the prefill worker does) until every decode
rank reported its request complete, against raw: one gloo send/recv of the same bytes per
route (a rank's routes posted from a thread each), over separate two-rank groups between the
same processes, the receives posted before the clock, the same idle gap before it; and
(head-major caches) against raw in ours's messages, "rawm": the same groups sending per
route the messages ours sends (a message per block for a slice of either side's heads, else
one per run of blocks contiguous in both caches), from and into the same blocks of the
caches. That is gloo's own cost of those messages: rawm/raw is the best ours/raw can be with
them, ours/rawm what ours adds. The triggers are alike: one small pipe message per sender
("go"), the request known to each side since before the clock. Alternating order, medians of
``--transfer-reps``, ratio raw/ours (1.0 = as fast as raw), for the request's blocks
scattered over the caches or contiguous (``--layouts``), with the ranks' caches laid out as
the engine's (head-major: every head range of a block is contiguous, so a route's head slice
moves straight from cache to cache) and, for comparison, token-major (contiguous, a token's
heads side by side, the layout before: a head slice is gathered on the sender or scattered
on the receiver) (``--cache-layouts``); every decode rank's blocks are checked against its
heads of the source. Beside the token-major rows, that copy timed alone, and the bound it
sets, raw / (raw + copy): on 2 cores the transfer keeps both busy, so the copy cannot
overlap it. Written to ``--transfer-out``.

The block layouts and the contenders take turns, each in every position in rotation, so that
all see the same phases of the run: measured one layout after the other, whichever ran first in a
process came out up to 0.25 lower or higher (1->2: 0.52-0.68 first, 0.76-0.90 second, or
the other way round after a change that made the ranks busy before), on the 2-core VM.

    python benchmarks/tensor_parallel.py --transfer
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # benchmarks/kv_transfer.py would shadow the kv_transfer package

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


# -- --transfer: KV resharding between TP sizes vs raw send/recv ------------------------------
# (layers, KV heads, head dim) of the models whose KV is moved (--kv-model); bf16, block 16:
# a block is 512 KiB for Llama-3.2-1B, 2 MiB for Llama-3-8B, 5 MiB for Llama-3-70B.
KV_MODELS = {"llama-3.2-1b": (16, 8, 64), "llama-3-8b": (32, 8, 128),
             "llama-3-70b": (80, 8, 128)}
KV_HEADS, BLOCK, KV_DTYPE = 8, 16, torch.bfloat16
CACHE_SEED = 1234


def full_kv(num_blocks: int, kv_model: str) -> torch.Tensor:
    """The model's whole KV cache, the same random bits in every process (seeded)."""
    gen = torch.Generator().manual_seed(CACHE_SEED)
    layers, heads, head_dim = KV_MODELS[kv_model]
    shape = (num_blocks, layers, 2, BLOCK, heads, head_dim)
    return torch.randint(-(2**15), 2**15, shape, dtype=torch.int16, generator=gen).view(KV_DTYPE)


def rank_cache(kv: torch.Tensor, cache_layout: str) -> torch.Tensor:
    """A rank's cache laid out as ``cache_layout`` says: as the engine's (head-major) or
    contiguous (token-major, the layout before head-major blocks)."""
    from engine.kv_layout import head_major

    return head_major(kv) if cache_layout == "head-major" else kv.contiguous()


def transfer_config():
    from kv_transfer import TransferConfig

    return TransferConfig(host="127.0.0.1", timeout_s=120)


def raw_pair(store, rank: int):
    """A standalone two-rank gloo group for the baseline, built like a pair channel's."""
    import datetime

    import torch.distributed as dist

    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    opts._timeout = datetime.timedelta(seconds=120)
    return dist.ProcessGroupGloo(store, rank, 2, opts)


def receiver_rank(rank: int, heads: tuple[int, int], num_blocks: int, cache_layout: str,
                  kv_model: str, conn) -> None:
    """Child: decode rank ``rank``'s cache, its KV receiver and the raw baseline's ends."""
    import threading

    import torch.distributed as dist

    from kv_transfer import blocks
    from kv_transfer.torch_dist import TorchDistReceiver

    torch.set_num_threads(1)
    lo, hi = heads
    kv = torch.zeros_like(full_kv(1, kv_model)[:, :, :, :, lo:hi]).expand(
        num_blocks, -1, -1, -1, -1, -1)
    kv = rank_cache(kv, cache_layout)
    receiver = TorchDistReceiver(transfer_config(), kv, name=f"decode-{rank}", heads=heads)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    conn.send((receiver.endpoint(), store.port))
    lock = threading.Lock()

    def reply(*msg) -> None:
        with lock:
            conn.send(msg)

    raw: dict[int, tuple] = {}  # route index -> (group, receive buffer, route's heads)
    while (msg := conn.recv())[0] != "stop":
        if msg[0] == "raw_groups":  # [(route index, bytes, heads)], in global route order
            for i, nbytes, route_heads in msg[1]:
                group = raw_pair(dist.PrefixStore(f"raw/{i}/", store), 1)
                raw[i] = (group, torch.empty(nbytes, dtype=torch.uint8), route_heads)
            reply("ready")
        elif msg[0] == "expect":
            _, rid, dst, parts = msg
            receiver.expect(rid, dst, lambda r, e: reply("done", None if e is None else str(e)),
                            parts=parts)
            reply("ready")
        elif msg[0] == "raw":  # route index -> its messages (see _raw_messages)
            works = [group.recv([m], 0, 0) for i, (group, buf, route_heads) in raw.items()
                     for m in _raw_messages(kv, buf, msg[1][i], route_heads, heads, 1)]
            reply("ready")
            for work in works:
                work.wait()
            reply("done", None)
        elif msg[0] == "clear":  # before the checked transfer: nothing earlier may pass it
            kv_blocks = blocks.block_index(msg[1], kv.device)
            kv.index_fill_(0, kv_blocks, 0)
            reply("ready")
        elif msg[0] == "check":
            _, src, dst = msg
            want = blocks.gather(full_kv(num_blocks, kv_model), src)[:, :, :, :, lo:hi]
            reply("check", torch.equal(blocks.gather(kv, dst).view(torch.int16),
                                       want.contiguous().view(torch.int16)))
    for channel in list(receiver._channels):  # the senders' CLOSE ends them
        channel.thread.join(timeout=30)
    receiver.close()


def sender_rank(rank: int, heads: tuple[int, int], num_blocks: int, cache_layout: str,
                kv_model: str, conn) -> None:
    """Child: prefill rank ``rank``'s cache, its KV sender and the raw baseline's ends."""
    import threading

    import torch.distributed as dist

    from kv_transfer.torch_dist import TorchDistSender

    torch.set_num_threads(1)
    lo, hi = heads
    kv = rank_cache(full_kv(num_blocks, kv_model)[:, :, :, :, lo:hi], cache_layout)
    sender = TorchDistSender(transfer_config(), kv, name=f"prefill-{rank}", heads=heads)
    raw: list[tuple] = []  # (route index, group, send buffer, heads, peer) per route
    handles: list = []
    while (msg := conn.recv())[0] != "stop":
        if msg[0] == "raw_groups":  # [(route index, host, port, bytes, heads, peer)], in order
            for i, host, port, nbytes, route_heads, peer in msg[1]:
                store = dist.TCPStore(host, port, is_master=False)
                group = raw_pair(dist.PrefixStore(f"raw/{i}/", store), 0)
                # written bytes (fresh pages read as one shared zero page)
                raw.append((i, group, torch.full((nbytes,), 7, dtype=torch.uint8),
                            route_heads, peer))
            conn.send(("ready",))
        elif msg[0] == "prepare":  # as the prefill worker: announced a step ahead
            _, rid, routes, src, dst = msg
            for peer, route_heads in routes:
                sender.announce(rid, peer, src, dst, heads=route_heads)
            conn.send(("ready",))
        elif msg[0] == "go":  # as small as raw's go: the request (rid, routes, src, dst)
            # is the one the last "prepare" announced
            with sender.deferred_writes():  # as the prefill worker sends a step's KV
                handles = [sender.send(rid, peer, src, dst_block_ids=dst, heads=route_heads)
                           for peer, route_heads in routes]
        elif msg[0] == "plan":  # the messages ours sends for these blocks, per route
            _, rid, src, dst = msg
            plan = {}
            for i, _, _, route_heads, peer in raw:
                header = sender._header(rid, peer, src, None, dst, route_heads)  # send()'s
                plan[i] = [(src[first], dst[first], count) for first, count in header.messages()]
            conn.send(("plan", plan))
        elif msg[0] == "raw_prep":  # route index -> its messages (see _raw_messages)
            parts = [(group, _raw_messages(kv, buf, msg[1][i], route_heads, heads, 0))
                     for i, group, buf, route_heads, _ in raw]
            conn.send(("ready",))
        elif msg[0] == "raw_go":
            # one thread per route (gloo writes in the posting thread until the socket is
            # full: posted from one thread, a second route started late), as ours writes
            posters = [threading.Thread(target=_raw_send, args=route) for route in parts[1:]]
            for poster in posters:
                poster.start()
            if parts:
                _raw_send(*parts[0])
            for poster in posters:
                poster.join()
        elif msg[0] == "results":
            errors = [str(h.error) for h in handles if h.wait(60) and h.error is not None]
            conn.send(("results", errors))
    sender.close()


def _raw_messages(kv, buf, spec, route_heads, heads, side: int) -> list[torch.Tensor]:
    """A route's raw messages on one side (0: sender, 1: receiver): ``buf`` whole if
    ``spec`` is None, else the messages ours sends (a sender's "plan"), as views into this
    rank's cache, so that raw moves them from and into the same memory."""
    if spec is None:
        return [buf]
    from kv_transfer import blocks

    views, lo = blocks.BlockViews(kv), heads[0]
    part = None if tuple(route_heads) == tuple(heads) else (route_heads[0] - lo,
                                                            route_heads[1] - lo)
    every_layer = (0, kv.shape[1])
    return [views(ids[side], every_layer, count, part) for *ids, count in spec]


def _raw_send(group, messages) -> None:
    works = [group.send([m], 1, 0) for m in messages]
    works[-1].wait()  # a pair's sends complete in order


def expect(conn, kind: str):
    msg = conn.recv()
    if msg[0] != kind:
        raise RuntimeError(f"benchmark: expected {kind!r} from a rank, got {msg}")
    if kind == "done" and msg[1] is not None:
        raise RuntimeError(f"benchmark: transfer failed: {msg[1]}")
    return msg


def bench_transfer(p: int, d: int, layouts: list[str], cache_layout: str, args) -> list[dict]:
    """Every layout of the request's blocks for one p -> d and cache layout, in fresh rank
    processes."""
    import torch.multiprocessing as mp

    from engine.parallel.shard import Shard
    from kv_transfer.reshard import parts_for, plan_routes, routes_from

    n = args.transfer_tokens // BLOCK
    num_blocks = 2 * n + 8
    src_heads = [Shard(r, p).kv_heads(KV_HEADS, KV_HEADS) for r in range(p)]
    dst_heads = [Shard(r, d).kv_heads(KV_HEADS, KV_HEADS) for r in range(d)]
    routes = plan_routes(src_heads, dst_heads)
    ctx = mp.get_context("spawn")
    rx, tx, procs = [], [], []
    for role, heads_of, out in ((receiver_rank, dst_heads, rx), (sender_rank, src_heads, tx)):
        for rank, heads in enumerate(heads_of):
            mine, theirs = ctx.Pipe()
            procs.append(ctx.Process(target=role, daemon=True,
                                     args=(rank, heads, num_blocks, cache_layout,
                                           args.kv_model, theirs)))
            procs[-1].start()
            out.append(mine)
    try:
        hello = [conn.recv() for conn in rx]
        layers, _, head_dim = KV_MODELS[args.kv_model]
        route_bytes = [n * layers * 2 * BLOCK * (r.heads[1] - r.heads[0]) * head_dim
                       * KV_DTYPE.itemsize for r in routes]
        for conn, _ in zip(rx, dst_heads, strict=True):  # groups joined in route order
            conn.send(("raw_groups", [(i, route_bytes[i], r.heads) for i, r in enumerate(routes)
                                      if rx[r.dst_rank] is conn]))
        for s, conn in enumerate(tx):
            conn.send(("raw_groups", [(i, "127.0.0.1", hello[r.dst_rank][1], route_bytes[i],
                                       r.heads, hello[r.dst_rank][0])
                                      for i, r in enumerate(routes) if r.src_rank == s]))
        for conn in rx + tx:
            expect(conn, "ready")
        per_src = [[(hello[r.dst_rank][0], r.heads) for r in routes_from(routes, s)]
                   for s in range(p)]
        parts = [parts_for(routes, r) for r in range(d)]
        ids = _block_ids(layouts, n, num_blocks)
        splits = {layout: {"raw": dict.fromkeys(range(len(routes)))} for layout in layouts}
        if cache_layout == "head-major":  # the messages ours sends (see the docstring)
            longest_rid = f"scattered-{args.transfer_warmup + args.transfer_reps}"
            for layout in layouts:
                splits[layout]["raw_msgs"] = {}
                for conn in tx:
                    conn.send(("plan", longest_rid, *ids[layout]))
                    splits[layout]["raw_msgs"].update(expect(conn, "plan")[1])
        rows = _bench_layouts(layouts, ids, splits, rx, tx, per_src, parts,
                              sum(route_bytes), p, d, args)
        for row in rows:
            row["cache"] = cache_layout
            row["relayout_ms"] = (0.0 if cache_layout == "head-major" else  # sent in place
                                  _relayout_ms(routes, src_heads, dst_heads, n, num_blocks,
                                               args.kv_model))
            raw_ms = row["raw_median_s"] * 1e3
            row["sequential_bound"] = raw_ms / (raw_ms + row["relayout_ms"])
        return rows
    finally:
        for conn in tx + rx:  # senders first: their CLOSE ends the receivers' channels
            conn.send(("stop",))
        for proc in procs:
            proc.join(timeout=60)


def _block_ids(layouts, n: int, num_blocks: int) -> dict[str, list[list[int]]]:
    """layout -> [source block ids, destination block ids] of the request."""
    gen = torch.Generator().manual_seed(n)
    ids = {}
    for layout in layouts:
        if layout == "scattered":
            ids[layout] = [torch.randperm(num_blocks, generator=gen)[:n].tolist()
                           for _ in range(2)]
        else:
            ids[layout] = [list(range(3, 3 + n)), list(range(n + 5, 2 * n + 5))]
    return ids


def _bench_layouts(layouts, ids, splits, rx, tx, per_src, parts, nbytes, p, d, args
                   ) -> list[dict]:
    contenders = {layout: ["ours", *splits[layout]] for layout in layouts}
    times = {layout: {which: [] for which in contenders[layout]} for layout in layouts}
    lead_s = args.lead_ms / 1e3
    # the first reps warm up (channels open, the sockets' buffers grow): untimed, alike
    # every (layout, contender) takes every position in turn (a rotation per rep)
    turns = [(layout, which) for layout in layouts for which in contenders[layout]]
    for rep in range(args.transfer_warmup + args.transfer_reps):
        k = rep % len(turns)
        for layout, which in turns[k:] + turns[:k]:
            src, dst = ids[layout]
            if which == "ours":
                elapsed = _time_ours(f"{layout}-{rep}", src, dst, rx, tx, per_src, parts,
                                     lead_s)
            else:
                elapsed = _time_raw(rx, tx, lead_s, splits[layout][which])
            if rep >= args.transfer_warmup:
                times[layout][which].append(elapsed)
    rows = []
    for layout in layouts:  # one more transfer each, checked (the layouts' blocks overlap)
        src, dst = ids[layout]
        for conn in rx:
            conn.send(("clear", dst))
        for conn in rx:
            expect(conn, "ready")
        _time_ours(f"{layout}-check", src, dst, rx, tx, per_src, parts, lead_s)
        for conn in tx:
            conn.send(("results",))
        errors = [e for conn in tx for e in expect(conn, "results")[1]]
        for conn in rx:
            conn.send(("check", src, dst))
        if errors or not all(expect(conn, "check")[1] for conn in rx):
            raise RuntimeError(f"benchmark: {p}->{d} {layout}: wrong KV landed or {errors}")
        ours, base = times[layout]["ours"], times[layout]["raw"]
        med_ours, med_raw = statistics.median(ours), statistics.median(base)
        row = {
            "p": p, "d": d, "layout": layout, "tokens": args.transfer_tokens, "bytes": nbytes,
            "ours_s": ours, "raw_s": base, "ours_median_s": med_ours, "raw_median_s": med_raw,
            "ours_GBps": nbytes / med_ours / 1e9, "raw_GBps": nbytes / med_raw / 1e9,
            "ratio": med_raw / med_ours}
        if "raw_msgs" in times[layout]:  # raw gloo in ours's messages: gloo's share
            med_msgs = statistics.median(times[layout]["raw_msgs"])
            row.update(raw_msgs_s=times[layout]["raw_msgs"], raw_msgs_median_s=med_msgs,
                       messages_per_route=max(map(len, splits[layout]["raw_msgs"].values())),
                       raw_msgs_over_raw=med_raw / med_msgs, ours_over_raw_msgs=med_msgs / med_ours)
        rows.append(row)
    return rows


def _relayout_ms(routes, src_heads, dst_heads, n: int, num_blocks: int, kv_model: str
                 ) -> float:
    """The copy a route's head slice needs in a token-major cache, where a block holds
    every head of a token side by side (``[L, 2, block, heads, dim]``): a slice of the
    sender's heads is gathered (1->2), a slice of the receiver's heads scattered (2->1).
    Timed here on one thread, as a rank copies, for every route, n contiguous blocks,
    median of 9: no transfer that reshards can beat raw + this on a host whose cores the
    transfer itself keeps busy."""
    from kv_transfer import blocks

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ids = list(range(n))
        cache = full_kv(num_blocks, kv_model)
        copies = []
        for r in routes:
            part = slice(*r.heads)
            staging = blocks.gather(cache, ids, heads=part)  # the route's payload
            if r.heads != src_heads[r.src_rank]:
                copies.append(lambda ids=ids, part=part, staging=staging: blocks.gather(
                    cache, ids, out=staging, heads=part))
            if r.heads != dst_heads[r.dst_rank]:
                copies.append(lambda ids=ids, part=part, staging=staging: blocks.scatter(
                    cache, ids, staging, heads=part))
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            for copy in copies:
                copy()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:]) * 1e3
    finally:
        torch.set_num_threads(threads)


def _time_ours(rid, src, dst, rx, tx, per_src, parts, lead_s: float) -> float:
    """One resharding transfer: from the senders' go until every decode rank has it all."""
    for conn, rank_parts in zip(rx, parts, strict=True):
        conn.send(("expect", rid, dst, rank_parts))
    for conn, routes in zip(tx, per_src, strict=True):
        conn.send(("prepare", rid, routes, src, dst))
    for conn in rx + tx:
        expect(conn, "ready")
    time.sleep(lead_s)  # the last prefill chunk's forward pass
    t0 = time.perf_counter()
    for conn in tx:
        conn.send(("go",))
    for conn in rx:
        expect(conn, "done")
    return time.perf_counter() - t0


def _time_raw(rx, tx, lead_s: float, splits: dict[int, list | None]) -> float:
    """The same bytes per pair (``splits``: route index -> None: one message between
    buffers, else the messages ours sends, between the caches), every receive posted
    ahead."""
    for conn in rx:
        conn.send(("raw", splits))
    for conn in tx:
        conn.send(("raw_prep", splits))
    for conn in rx + tx:
        expect(conn, "ready")
    time.sleep(lead_s)  # the same idle gap before the clock as ours
    t0 = time.perf_counter()
    for conn in tx:
        conn.send(("raw_go",))
    for conn in rx:
        expect(conn, "done")
    return time.perf_counter() - t0


def run_transfer(args) -> None:
    cases = [tuple(int(x) for x in case.split("to")) for case in args.transfer_cases]
    rows = [row for p, d in cases for cache in args.cache_layouts
            for row in bench_transfer(p, d, args.layouts, cache, args)]
    layers, heads, head_dim = KV_MODELS[args.kv_model]
    print(f"KV resharding transfer, gloo over loopback, {args.kv_model} KV ({layers} layers x "
          f"{heads} KV heads x {head_dim}, bf16, block {BLOCK}), "
          f"{args.transfer_tokens} tokens, median of {args.transfer_reps}")
    print(f"{'p->d':>5} {'cache':>11} {'layout':>10} {'MiB':>6} {'ours ms':>8} {'raw ms':>8} "
          f"{'ours GB/s':>9} {'raw GB/s':>9} {'ours/raw':>8} {'msgs':>5} {'rawm ms':>8} "
          f"{'rawm/raw':>8} {'ours/rawm':>9} {'copy ms':>8} {'bound':>6}")
    for r in rows:
        msgs = (f"{r['messages_per_route']:5d} {r['raw_msgs_median_s'] * 1e3:8.2f} "
                f"{r['raw_msgs_over_raw']:8.2f} {r['ours_over_raw_msgs']:9.2f}"
                if "raw_msgs_median_s" in r else f"{'-':>5} {'-':>8} {'-':>8} {'-':>9}")
        print(f"{r['p']}->{r['d']:<2} {r['cache']:>11} {r['layout']:>10} "
              f"{r['bytes'] / 2**20:6.1f} "
              f"{r['ours_median_s'] * 1e3:8.2f} {r['raw_median_s'] * 1e3:8.2f} "
              f"{r['ours_GBps']:9.2f} {r['raw_GBps']:9.2f} {r['ratio']:8.2f} {msgs} "
              f"{r['relayout_ms']:8.2f} {r['sequential_bound']:6.2f}")
    print("cache: the ranks' cache layout (head-major: the engine's, head slices sent in "
          "place; token-major: contiguous, as before); msgs: messages per route ours sends; "
          "rawm: raw gloo sending ours's messages (gloo's own cost of them: rawm/raw is the "
          "best ours/raw can be with those messages, ours/rawm what ours adds); copy ms: "
          "the head-slice gather/scatter a token-major cache needs (one thread); bound: "
          "raw / (raw + copy), the best ratio when the copy cannot overlap the transfer")
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average": os.getloadavg()},
              "args": {k: v for k, v in vars(args).items()
                       if k.startswith(("transfer", "lay", "lead", "kv_", "cache"))},
              "rows": rows}
    Path(args.transfer_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.transfer_out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.transfer_out}")


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
    ap.add_argument("--transfer", action="store_true",
                    help="measure the KV resharding transfer instead (see the docstring)")
    ap.add_argument("--transfer-cases", nargs="+", default=["2to1", "1to2", "2to2"],
                    help="prefill TP 'to' decode TP")
    ap.add_argument("--transfer-tokens", type=int, default=512)
    ap.add_argument("--transfer-reps", type=int, default=30)
    ap.add_argument("--kv-model", default="llama-3.2-1b", choices=sorted(KV_MODELS),
                    help="whose KV shape to move (a block: 512 KiB, 2 MiB, 5 MiB)")
    ap.add_argument("--transfer-warmup", type=int, default=5,
                    help="untimed reps first, of ours and raw alike")
    ap.add_argument("--layouts", nargs="+", default=["scattered", "contiguous"],
                    choices=["scattered", "contiguous"])
    ap.add_argument("--cache-layouts", nargs="+", default=["head-major", "token-major"],
                    choices=["head-major", "token-major"],
                    help="the ranks' cache layouts (head-major: the engine's)")
    ap.add_argument("--lead-ms", type=float, default=5.0,
                    help="announce this long before the send (as the prefill worker does)")
    ap.add_argument("--transfer-out", default="results/tensor_parallel_transfer.json")
    args = ap.parse_args()
    if args.transfer:
        run_transfer(args)
        return
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
