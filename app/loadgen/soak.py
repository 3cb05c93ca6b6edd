"""Soak: many requests through a real local cluster while workers are killed, clients cancel
and disconnect, and a few hostile requests are mixed in; then every request is accounted
for and nothing may be left behind.

    summary = await run_soak(config, SoakPlan(num_requests=2000))

Each request ends in exactly one outcome:
  finished   a final chunk with finish_reason length (greedy ones must also equal what one
             undisturbed engine gives, token for token)
  cancelled  the client went away on purpose (a gRPC cancel or an HTTP disconnect mid-stream)
  rejected   a hostile request refused with a 4xx / client-error status naming the problem
  errored    anything else that ended with a clear status (counted, listed)
  missing    no outcome within the request's time bound (a hang): must be 0
At the end the pools must be back to their size, every worker's blocks free and no request
left in the router or the cluster backend ("leaks": must be 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx

from engine.errors import InvalidRequestError, SplitServeError

OUTCOMES = ("finished", "cancelled", "rejected", "errored", "missing")


@dataclass(frozen=True)
class SoakPlan:
    num_requests: int = 2000
    concurrency: int = 24
    seed: int = 0
    max_tokens: tuple[int, int] = (4, 48)
    prompt_len: tuple[int, int] = (4, 120)
    cancel_fraction: float = 0.1  # client cancels / disconnects mid-stream
    hostile_fraction: float = 0.02  # invalid requests that must be refused cleanly
    kill_prefill_at: float | None = 0.35  # fraction of requests sent when P is killed
    kill_decode_at: float | None = 0.65
    request_timeout_s: float = 120.0  # past this a request counts as missing (a hang)
    settle_timeout_s: float = 120.0  # for pools and blocks to come back after the run


@dataclass
class SoakSummary:
    outcomes: dict[str, int]
    mismatched: int  # finished greedy requests whose tokens differ from the engine's
    leaked_blocks: dict[str, int]  # worker -> blocks still in use after the run
    router_entries: int  # requests the router still tracks after the run
    backend_entries: int  # requests the cluster backend still tracks after the run
    pool_sizes: dict[str, int]
    migrations: dict[str, int]
    killed: list[str]
    errors: list[str] = field(default_factory=list)  # the first few "errored" messages
    seconds: float = 0.0

    def ok(self) -> bool:
        return (self.outcomes.get("missing", 0) == 0 and self.mismatched == 0
                and not any(self.leaked_blocks.values()) and self.router_entries == 0
                and self.backend_entries == 0)


@dataclass
class _Spec:
    index: int
    kind: str  # "grpc" | "http" | "hostile"
    prompt: list[int]
    max_tokens: int
    cancel_after: int | None  # tokens after which the client leaves
    hostile: dict | None = None


def _specs(plan: SoakPlan, vocab: int) -> list[_Spec]:
    rng = random.Random(plan.seed)
    specs = []
    for i in range(plan.num_requests):
        prompt = [rng.randrange(5, vocab - 1) for _ in range(rng.randint(*plan.prompt_len))]
        max_tokens = rng.randint(*plan.max_tokens)
        if rng.random() < plan.hostile_fraction:
            specs.append(_Spec(i, "hostile", prompt, max_tokens, None,
                               _hostile(rng, prompt, vocab)))
            continue
        cancel = rng.randint(1, max_tokens) if rng.random() < plan.cancel_fraction else None
        specs.append(_Spec(i, rng.choice(("grpc", "http")), prompt, max_tokens, cancel))
    return specs


def _hostile(rng: random.Random, prompt: list[int], vocab: int) -> dict:
    """An HTTP /v1/completions body a client should never be able to hurt others with."""
    body = {"prompt": prompt, "max_tokens": 4}
    kind = rng.choice(("long_id", "surrogate", "vocab", "max_tokens", "type"))
    if kind == "long_id":
        body["request_id"] = "x" * 600
    elif kind == "surrogate":
        body["prompt"] = "hello \ud800 world"
    elif kind == "vocab":
        body["prompt"] = prompt[:3] + [vocab]
    elif kind == "max_tokens":
        body["max_tokens"] = -5
    else:
        body["temperature"] = "hot"
    return body


class _Run:
    def __init__(self, server, plan: SoakPlan, expected: dict[int, list[int]]) -> None:
        from router.client import AsyncSplitServeClient

        self.server, self.plan, self.expected = server, plan, expected
        endpoints = server.endpoints()
        self.grpc = AsyncSplitServeClient(endpoints["grpc"])
        self.http = httpx.AsyncClient(base_url=endpoints["http"], timeout=plan.request_timeout_s)
        self.outcomes: Counter[str] = Counter()
        self.mismatched = 0
        self.errors: list[str] = []

    async def close(self) -> None:
        await self.grpc.close()
        await self.http.aclose()

    async def one(self, spec: _Spec) -> None:
        try:
            outcome = await asyncio.wait_for(self._send(spec), self.plan.request_timeout_s)
        except asyncio.TimeoutError:
            outcome = "missing"
        except InvalidRequestError as exc:
            outcome = "rejected" if spec.kind == "hostile" else self._error(spec, exc)
        except (SplitServeError, httpx.HTTPError) as exc:
            outcome = self._error(spec, exc)
        self.outcomes[outcome] += 1

    def _error(self, spec: _Spec, exc: BaseException) -> str:
        if len(self.errors) < 20:
            self.errors.append(f"#{spec.index} {spec.kind}: {type(exc).__name__}: {exc}")
        return "errored"

    async def _send(self, spec: _Spec) -> str:
        if spec.kind == "hostile":
            return await self._hostile(spec)
        stream = self._grpc_stream(spec) if spec.kind == "grpc" else self._http_stream(spec)
        tokens: list[int] = []
        finish = None
        async with _closing(stream):
            async for new_ids, last in stream:
                tokens.extend(new_ids)
                finish = last
                if spec.cancel_after is not None and len(tokens) >= spec.cancel_after:
                    return "cancelled"  # leaving the stream cancels / disconnects
        if finish != "length":
            return self._error(spec, RuntimeError(f"finish_reason {finish!r}"))
        if spec.kind == "grpc" and tokens != self.expected[spec.index]:
            self.mismatched += 1
        return "finished"

    async def _grpc_stream(self, spec: _Spec):
        async for chunk in self.grpc.stream(spec.prompt, max_tokens=spec.max_tokens,
                                            temperature=0.0, ignore_eos=True):
            yield chunk.token_ids, chunk.finish_reason

    async def _http_stream(self, spec: _Spec):
        body = {"model": self.server.service.config.model_name, "prompt": spec.prompt,
                "max_tokens": spec.max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True}
        async with self.http.stream("POST", "/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                raise SplitServeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
            finish = None
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                finish = choice.get("finish_reason") or finish
                yield [0] * bool(choice.get("text")), finish  # a token count for cancels

    async def _hostile(self, spec: _Spec) -> str:
        body = {"model": self.server.service.config.model_name, **spec.hostile}
        # json.dumps escapes a lone surrogate as \ud800: valid JSON that httpx's own
        # encoder refuses to produce.
        resp = await self.http.post("/completions", content=json.dumps(body),
                                    headers={"content-type": "application/json"})
        if 400 <= resp.status_code < 500 and "error" in resp.json():
            return "rejected"
        return self._error(spec, RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}"))


class _closing:
    """``async with`` that closes an async generator (so leaving early cancels the call)."""

    def __init__(self, agen) -> None:
        self.agen = agen

    async def __aenter__(self):
        return self.agen

    async def __aexit__(self, *exc) -> None:
        await self.agen.aclose()


def worker_pid(cluster, worker_id: str) -> int:
    import ray

    actor = cluster.factory._objects[worker_id]
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def kill_9(cluster, role: str) -> str:
    """kill -9 the process of one worker of ``role``; returns its id."""
    victim = next(w for w, h in cluster.backend.workers.items() if h.role == role)
    os.kill(worker_pid(cluster, victim), signal.SIGKILL)
    return victim


async def run_soak(server, plan: SoakPlan, expected_tokens) -> SoakSummary:
    """Drive ``plan`` against a started ``RunningServer`` (Ray mode). ``expected_tokens``
    maps a list of (prompt, max_tokens) to the engine's greedy outputs."""
    cluster = server.cluster
    vocab = server.service.tokenizer.vocab_size
    specs = _specs(plan, vocab)
    expected = dict(zip([s.index for s in specs if s.kind == "grpc"], expected_tokens(
        [(s.prompt, s.max_tokens) for s in specs if s.kind == "grpc"]), strict=True))
    sizes = {role: cluster.replicas(role) for role in cluster.roles}
    run = _Run(server, plan, expected)
    kills = sorted((at, role) for at, role in ((plan.kill_prefill_at, "prefill"),
                                               (plan.kill_decode_at, "decode"))
                   if at is not None)
    killed: list[str] = []
    started = time.monotonic()
    slots = asyncio.Semaphore(plan.concurrency)
    reached = {at: asyncio.Event() for at, _ in kills}

    async def limited(spec: _Spec) -> None:
        async with slots:
            for at, event in reached.items():
                if spec.index >= at * plan.num_requests:
                    event.set()
            await run.one(spec)

    async def killer() -> None:  # kills off the request tasks (a Ray call finds the pid)
        for at, role in kills:
            await reached[at].wait()
            killed.append(await asyncio.to_thread(kill_9, cluster, role))

    killing = asyncio.create_task(killer())
    try:
        await asyncio.gather(*(limited(s) for s in specs))
        await asyncio.wait_for(killing, 60)
    finally:
        killing.cancel()
        await run.close()
    leaked, router_entries, backend_entries = await _settle(server, sizes, plan)
    return SoakSummary(
        outcomes={k: run.outcomes.get(k, 0) for k in OUTCOMES}, mismatched=run.mismatched,
        leaked_blocks=leaked, router_entries=router_entries, backend_entries=backend_entries,
        pool_sizes={role: cluster.replicas(role) for role in cluster.roles},
        migrations=dict(cluster.backend.migrations), killed=killed, errors=run.errors,
        seconds=time.monotonic() - started)


async def _settle(server, sizes: dict[str, int], plan: SoakPlan):
    """Wait (bounded) for the pools to be back to size and every block free; then report
    what is still held."""
    cluster, backend = server.cluster, server.cluster.backend
    deadline = time.monotonic() + plan.settle_timeout_s
    while True:
        used = await _used_blocks(backend)
        back = all(cluster.replicas(role) == n for role, n in sizes.items())
        idle = server.service.num_inflight == 0 and backend.stats()["in_flight"] == 0
        if (back and idle and not any(used.values())) or time.monotonic() > deadline:
            return used, server.service.num_inflight, backend.stats()["in_flight"]
        await asyncio.sleep(0.2)


async def _used_blocks(backend) -> dict[str, int]:
    used = {}
    for wid, handle in list(backend.workers.items()):
        stats = await handle.call("stats", False)
        used[wid] = stats.total_blocks - stats.free_blocks
    return used


def summary_json(summary: SoakSummary) -> str:
    return json.dumps(asdict(summary) | {"ok": summary.ok()}, indent=2)
