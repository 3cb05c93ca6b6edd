"""A simulator profile of our own CPU engine, and a simulation with the live cluster's TTFT.

Used by ``benchmarks/sim_fidelity.py`` (the simulator-vs-live fidelity check).

Three parts:

- ``measure_points``: times ``Engine.step`` offline (prefill steps of a few chunk sizes and
  contexts, decode steps of a few batch sizes and context lengths) and returns
  ``splitserve-sim-points/v1`` points for ``calibrate.fit_profile``. Needs torch.
- ``fit_cpu_profile``: a ``CostProfile`` fitted to such points (plus optional transfer
  points), starting from an all-zero base; pure (numpy only).
- ``LiveSemanticsSimulation``: the simulator with two terms the live 1P+1D cluster has and
  the plain simulator does not record:

  * the first token reaches the client only after the prefill worker has pushed the KV to
    the decode worker (``ClusterBackend._remote_prefill`` returns after the push), so TTFT
    is taken at the KV landing, not at prefill completion;
  * ``ttft_overhead_s``: a fixed per-request latency for what no cost model covers (router
    placement, the reserve / prefill / start RPCs, gRPC to the client), calibrated on an
    idle cluster, never on the run being predicted;
  * ``decode_step_overhead_s`` is not a term here: it is folded into the profile's
    ``decode_fixed_s`` by the caller (``with_overheads``).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence

import numpy as np

from cluster.simulator.calibrate import POINTS_FORMAT, fit_profile
from cluster.simulator.loop import _TRANSFER, Simulation
from cluster.simulator.profiles import CostProfile
from cluster.simulator.trace import TraceRequest

# ---- pure parts ------------------------------------------------------------------------------


def zero_profile(name: str, kv_bytes_per_token: int, kv_capacity_tokens: int) -> CostProfile:
    """A base whose every coefficient is replaced by a fit (transfer: free, if not fitted)."""
    return CostProfile(name=name, source="calibrated", kv_bytes_per_token=kv_bytes_per_token,
                       kv_capacity_tokens=kv_capacity_tokens, prefill_fixed_s=0.0,
                       prefill_per_token_s=0.0, prefill_per_attn_pair_s=0.0, decode_fixed_s=0.0,
                       decode_per_seq_s=0.0, decode_per_kv_byte_s=0.0,
                       transfer_bandwidth_bytes_per_s=1e18, transfer_latency_s=0.0)


def fit_cpu_profile(points: dict, name: str, kv_bytes_per_token: int,
                    kv_capacity_tokens: int) -> CostProfile:
    """``calibrate.fit_profile`` on ``points`` from a zero base. Transfer points that do not
    grow with bytes (a latency-dominated link) give latency = their median, bandwidth = inf."""
    base = zero_profile(name, kv_bytes_per_token, kv_capacity_tokens)
    pts = dict(points)
    transfer = pts.pop("transfer", None)
    prof = fit_profile(pts, base, name=name)
    if transfer:
        try:
            prof = fit_profile({"format": POINTS_FORMAT, "transfer": transfer}, prof, name=name)
        except ValueError:
            lat = statistics.median(p["time_s"] for p in transfer)
            prof = prof.with_(transfer_latency_s=lat, transfer_bandwidth_bytes_per_s=1e18)
    return prof


def fit_error(points: dict, prof: CostProfile) -> dict:
    """Median and max relative error of the fitted profile on its own points, per section."""
    out = {}
    for section, pred in (
        ("prefill", lambda p: prof.prefill_step_s(p["num_tokens"], p.get("context_tokens", 0))),
        ("decode", lambda p: prof.decode_step_s(p["batch_size"], p["kv_tokens"])),
    ):
        errs = [abs(pred(p) - p["time_s"]) / p["time_s"] for p in points.get(section) or []]
        if errs:
            out[section] = {"median_rel_err": float(np.median(errs)),
                            "max_rel_err": float(np.max(errs)), "points": len(errs)}
    return out


def with_overheads(prof: CostProfile, decode_step_overhead_s: float) -> CostProfile:
    """``prof`` with a per-decode-step overhead added to ``decode_fixed_s`` (the live decode
    worker's loop: output dispatch, streaming), clamped so it never goes below zero."""
    fixed = max(0.0, prof.decode_fixed_s + decode_step_overhead_s)
    return prof.with_(decode_fixed_s=fixed, name=prof.name + "+live-overheads")


def trace_from_requests(rows: Sequence[tuple[float, int, int]]) -> list[TraceRequest]:
    """Simulator trace from (arrival_s, prompt_tokens, output_tokens), sorted by arrival."""
    return sorted((TraceRequest(float(t), int(p), int(o)) for t, p, o in rows),
                  key=lambda r: r.arrival_s)


class LiveSemanticsSimulation(Simulation):
    """First token recorded when the KV lands on the decode worker, plus a fixed overhead
    (see the module doc). Requests prefilled locally keep the simulator's own first token
    (plus the overhead)."""

    def __init__(self, *args, ttft_overhead_s: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ttft_overhead_s = ttft_overhead_s

    def first_token(self, r, t: float) -> None:
        super().first_token(r, t + self.ttft_overhead_s)

    def _on_other(self, kind: int, payload: object, done: bool) -> bool:
        if kind == _TRANSFER:
            r = payload
            self.rec.first_token[r.idx] = self.now + self.ttft_overhead_s  # type: ignore[attr-defined]
        return super()._on_other(kind, payload, done)


def ttft_samples(sim: Simulation) -> np.ndarray:
    """Per-request TTFT of a finished simulation, seconds (NaN for refused ones)."""
    return sim.rec.first_token - sim.rec.arrival


# ---- measuring the engine (torch) ----------------------------------------------------------


def _engine(model_dir, engine_options: dict):
    from engine import Engine

    opts = dict(engine_options)
    opts.pop("num_threads", None)
    return Engine.from_pretrained(model_dir, load_tokenizer=False, **opts)


def _prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(n)]


def _neighbour_decode(model_dir, engine_options: dict, ready, stop) -> None:
    """A second process decoding a batch of 8 without pause: the decode worker that, in the
    live cluster, is busy most of the time next to the prefill worker on the same cores."""
    import torch

    from engine import SamplingParams

    torch.set_num_threads(engine_options.get("num_threads") or 1)
    eng = _engine(model_dir, engine_options)
    rng = random.Random(1)
    params = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
    ready.set()
    while not stop.is_set():
        while eng.scheduler.num_running + eng.scheduler.num_waiting < 8:
            eng.add_request(None, _prompt(rng, 256, eng.model_config.vocab_size), params)
        eng.step()


class busy_neighbour:
    """Context manager: ``_neighbour_decode`` in a spawned process while the block runs."""

    def __init__(self, model_dir, engine_options: dict) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.ready, self.stop = ctx.Event(), ctx.Event()
        self.proc = ctx.Process(target=_neighbour_decode, daemon=True,
                                args=(str(model_dir), dict(engine_options), self.ready, self.stop))

    def __enter__(self):
        self.proc.start()
        if not self.ready.wait(120):
            raise RuntimeError("the neighbour decode process did not start")
        time.sleep(1.0)  # let it reach steady decoding
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.terminate()


def measure_points(model_dir, engine_options: dict, *,  # noqa: C901 (one linear recipe)
                   prefill_lengths=(32, 128, 256, 512),
                   long_prompt: int = 1024, decode_batches=(1, 4, 8, 16),
                   decode_contexts=(64, 256, 512), reps: int = 3, decode_steps: int = 10,
                   seed: int = 0, prefill_neighbour: bool = False, log=print) -> dict:
    """Time ``Engine.step`` with the live workers' engine options (``num_threads`` sets
    torch's threads for this process). Prefill: one prompt of each length alone (one step,
    context 0), and a ``long_prompt`` that is chunked (later chunks have context). Decode:
    ``b`` sequences of prompt ``c`` each, prefilled, then ``decode_steps`` decode-only steps
    timed one by one (each step's KV tokens counted). Each point is the median of ``reps``.
    ``prefill_neighbour``: the prefill points are timed while ``busy_neighbour`` decodes in
    another process (the live prefill worker shares the cores with a busy decode worker)."""

    import torch

    from engine import SamplingParams

    threads = engine_options.get("num_threads")
    if threads:
        torch.set_num_threads(threads)
    eng = _engine(model_dir, engine_options)
    vocab = eng.model_config.vocab_size
    chunk = eng.scheduler_config.max_num_batched_tokens
    rng = random.Random(seed)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def drain():
        while eng.has_unfinished_requests():
            eng.step()

    # warm-up: first-call costs
    eng.add_request(None, _prompt(rng, 64, vocab), SamplingParams(max_tokens=4, temperature=0.0,
                                                                  ignore_eos=True))
    drain()
    def measure_prefill(tag: str) -> list[dict]:
        prefill: list[dict] = []
        for n in prefill_lengths:
            times = []
            for _ in range(reps):
                eng.add_request(None, _prompt(rng, n, vocab), one)
                t0 = time.perf_counter()
                eng.step()
                times.append(time.perf_counter() - t0)
                drain()
            prefill.append({"num_tokens": n, "context_tokens": 0,
                            "time_s": statistics.median(times)})
            log(f"  prefill{tag} n={n:4d} ctx=0: {prefill[-1]['time_s'] * 1e3:7.2f} ms")
        if long_prompt > chunk:
            per_ctx: dict[int, list[float]] = {}
            for _ in range(reps):
                eng.add_request(None, _prompt(rng, long_prompt, vocab), one)
                ctx = 0
                while ctx < long_prompt:
                    n = min(chunk, long_prompt - ctx)
                    t0 = time.perf_counter()
                    eng.step()
                    per_ctx.setdefault(ctx, []).append(time.perf_counter() - t0)
                    ctx += n
                drain()
            for ctx, times in sorted(per_ctx.items()):
                if ctx == 0:
                    continue
                n = min(chunk, long_prompt - ctx)
                prefill.append({"num_tokens": n, "context_tokens": ctx,
                                "time_s": statistics.median(times)})
                log(f"  prefill{tag} n={n:4d} ctx={ctx}: {prefill[-1]['time_s'] * 1e3:7.2f} ms")
        return prefill

    prefill_idle = measure_prefill(" (idle)")
    prefill = prefill_idle
    if prefill_neighbour:
        with busy_neighbour(model_dir, engine_options):
            prefill = measure_prefill(" (busy decode neighbour)")
    decode: list[dict] = []
    for c in decode_contexts:
        for b in decode_batches:
            params = SamplingParams(max_tokens=decode_steps + 2, temperature=0.0,
                                    ignore_eos=True)
            reqs = [eng.add_request(None, _prompt(rng, c, vocab), params) for _ in range(b)]
            while any(r.num_computed_tokens < r.num_prompt_tokens for r in reqs):
                eng.step()
            times = []
            kv = []
            for _ in range(decode_steps):
                k = sum(r.num_computed_tokens for r in reqs)
                t0 = time.perf_counter()
                eng.step()
                times.append(time.perf_counter() - t0)
                kv.append(k)
            drain()
            decode.append({"batch_size": b, "kv_tokens": int(statistics.median(kv)),
                           "time_s": statistics.median(times)})
            log(f"  decode B={b:2d} ctx={c:4d}: {decode[-1]['time_s'] * 1e3:7.2f} ms")
    kv_bytes_per_token = eng.bytes_per_block // eng.cache_config.block_size
    return {"format": POINTS_FORMAT, "prefill": prefill, "decode": decode,
            "prefill_idle": prefill_idle,
            "kv_bytes_per_token": kv_bytes_per_token,
            "kv_capacity_tokens": eng.num_blocks * eng.cache_config.block_size,
            "threads": torch.get_num_threads()}
