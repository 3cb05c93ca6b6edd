"""An abort that reaches the prefill worker before the prefill call it was sent after (a
threaded Ray actor runs calls concurrently, so the later one can run first): the call is
refused at once, instead of running the whole prefill and shipping KV nobody expects."""

from __future__ import annotations

import pytest

from decode_worker import DecodeWorker
from engine.sampling_params import SamplingParams
from kv_transfer.base import TransferConfig
from kv_transfer.loopback import LoopbackHub
from prefill_worker import PrefillWorker
from prefill_worker.worker import PrefillFailed

OPTIONS = {"block_size": 4, "max_num_batched_tokens": 16, "load_tokenizer": False,
           "warmup": False}
PARAMS = SamplingParams(max_tokens=4, temperature=0.0)


@pytest.mark.timeout(120)
def test_a_prefill_its_abort_overtook_is_refused_unrun(tiny_model_dir):
    config, hub = TransferConfig(backend="loopback", timeout_s=20), LoopbackHub()
    model = str(tiny_model_dir("llama"))
    p = PrefillWorker("p0", model, OPTIONS, config, hub=hub)
    d = DecodeWorker("d0", model, OPTIONS, config, hub=hub)
    try:
        ran: list[str] = []
        call = p.host.call
        p.host.call = lambda fn, *args: (ran.append(getattr(fn, "__name__", "?")),
                                        call(fn, *args))[1]
        prompt = list(range(5, 40))
        dst = d.reserve("late", prompt, PARAMS)
        assert p.abort("late") is False  # nothing there yet: its prefill is still coming
        d.abort("late")
        ran.clear()
        with pytest.raises(PrefillFailed, match="aborted"):
            p.prefill("late", prompt, PARAMS, d.endpoint(), dst, timeout_s=60)
        assert "_add_prefill" not in ran  # the engine never saw it
        # The refusal used the abort up: the id served again (a client may reuse its ids).
        for rid in ("late", "late"):  # the second: aborted after its prefill, then reused
            dst = d.reserve(rid, prompt, PARAMS)
            result = p.prefill(rid, prompt, PARAMS, d.endpoint(), dst, timeout_s=60)
            assert result.first_token >= 0
            p.abort(rid)  # seen: nothing is remembered against the id
            d.abort(rid)
    finally:
        p.shutdown()
        d.shutdown()
