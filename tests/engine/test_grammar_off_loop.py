"""A structured-output spec is compiled on the worker's calling (RPC) thread, never on its
engine loop thread: compiling a new JSON schema takes 1-3 s, during which a compile on the
loop would stall every request the worker is running."""

from __future__ import annotations

import threading

import pytest

from decode_worker import DecodeWorker
from engine.sampling_params import SamplingParams
from engine.structured import StructuredSpec
from engine.structured.grammar import GrammarBackend
from kv_transfer.base import TransferConfig
from kv_transfer.loopback import LoopbackHub
from prefill_worker import PrefillWorker

OPTIONS = {"block_size": 4, "max_num_batched_tokens": 16, "load_tokenizer": False,
           "warmup": False}


def _schema(n: int) -> SamplingParams:
    spec = StructuredSpec.json_schema({"type": "object", "properties": {
        f"field{n}": {"type": "integer"}}, "required": [f"field{n}"]})
    return SamplingParams(max_tokens=4, temperature=0.0, structured=spec)


@pytest.mark.timeout(120)
def test_specs_compile_off_the_engine_thread(tiny_model_dir, monkeypatch):
    compiled_on: list[str] = []
    original = GrammarBackend.compile

    def recording(self, kind, spec):
        before = self.num_compiled
        out = original(self, kind, spec)
        if self.num_compiled > before:  # a real compile, not a cache hit
            compiled_on.append(threading.current_thread().name)
        return out

    monkeypatch.setattr(GrammarBackend, "compile", recording)
    config, hub = TransferConfig(backend="loopback", timeout_s=20), LoopbackHub()
    model = str(tiny_model_dir("llama"))
    p = PrefillWorker("p0", model, OPTIONS, config, hub=hub)
    d = DecodeWorker("d0", model, OPTIONS, config, hub=hub)
    try:
        loops = {w.host.call(lambda e: threading.current_thread().name) for w in (p, d)}
        prompt = list(range(5, 20))
        d.generate("local", prompt, _schema(1))  # colocated path
        dst = d.reserve("split", prompt, _schema(2))  # disaggregated: both sides
        p.prefill("split", prompt, _schema(2), d.endpoint(), dst, timeout_s=60)
        assert len(compiled_on) >= 2  # schemas 1 and 2 (schema 2 cached after the first)
        assert not set(compiled_on) & loops, (compiled_on, loops)
        d.abort("local")
        d.abort("split")
    finally:
        p.shutdown()
        d.shutdown()
