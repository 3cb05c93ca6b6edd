"""fp8 KV caches across the disaggregated path: a real PrefillWorker ships fp8 blocks (raw
bytes; gloo has no fp8 type) to a real DecodeWorker, whose greedy tokens equal a colocated
fp8 engine's; pools of different cache dtypes are refused with what to change, that request
fails at once on both sides, and the next request between matching pools still lands."""

from __future__ import annotations

import time

import pytest
import torch

from decode_worker.worker import DecodeWorker
from engine import Engine, SamplingParams
from kv_transfer import TransferConfig
from kv_transfer.loopback import LoopbackHub
from prefill_worker.worker import PrefillWorker

ENGINE = {"block_size": 4, "max_num_batched_tokens": 64, "max_num_seqs": 8,
          "max_model_len": 256, "device": "cpu", "warmup": False}
FP8 = {**ENGINE, "kv_cache_dtype": "fp8_e4m3"}
PROMPTS = [[(7 * i + 3 * j) % 390 + 5 for j in range(9 + 5 * i)] for i in range(3)]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
# connect_timeout_s well above 5 s: see kv_transfer.torch_dist.tcp_store
CONFIGS = {"loopback": TransferConfig(backend="loopback", timeout_s=10.0),
           "torch_dist": TransferConfig(host="127.0.0.1", timeout_s=10.0,
                                        connect_timeout_s=20.0)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.make_model import make_model

    return make_model(tmp_path_factory.mktemp("m") / "llama", "llama", "tiny", seed=0,
                      progress=False)


@pytest.fixture(scope="module")
def colocated_fp8(model_dir):
    options = {k: v for k, v in FP8.items() if k != "warmup"}
    engine = Engine.from_pretrained(model_dir, load_tokenizer=False, **options)
    assert engine.runner.kv_cache.dtype == torch.float8_e4m3fn
    return [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]


@pytest.fixture(params=list(CONFIGS))
def workers(request, model_dir):
    """make(prefill options, decode options) -> (prefill, decode) on one backend."""
    config = CONFIGS[request.param]
    hub = LoopbackHub() if config.backend == "loopback" else None
    extra = {"hub": hub} if hub is not None else {}
    made: list = []

    def make(prefill_options, decode_options):
        n = len(made)
        prefill = PrefillWorker(f"prefill-{n}", str(model_dir), prefill_options, config, **extra)
        made.append(prefill)
        decode = DecodeWorker(f"decode-{n}", str(model_dir), decode_options, config, **extra)
        made.append(decode)
        return prefill, decode

    yield make
    for worker in made:  # prefill first: its channels close before the receivers
        worker.shutdown()
    if hub is not None:
        hub.close()


def disaggregated(prefill, decode, rid: str, prompt: list[int], timeout: float = 30.0):
    """One request through prefill -> KV transfer -> decode; (tokens, error or None)."""
    dst = decode.reserve(rid, prompt, GREEDY)
    assert dst is not None
    first = prefill.prefill(rid, prompt, GREEDY, decode.endpoint(), dst, timeout_s=timeout)
    tokens = [first.first_token]
    decode.start(rid, first.first_token)  # False if the request already failed there
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for delta in decode.get_outputs(timeout_s=1.0):
            if delta.request_id != rid:
                continue
            tokens.extend(delta.new_token_ids)
            if delta.finish_reason is not None:
                return tokens, delta.error
    raise AssertionError(f"request {rid} did not finish within {timeout} s")


def test_fp8_blocks_ship_and_decode_like_a_colocated_fp8_engine(workers, colocated_fp8):
    prefill, decode = workers(FP8, FP8)
    for worker in (prefill, decode):
        assert worker.host.engine.runner.kv_cache.dtype == torch.float8_e4m3fn
    for i, prompt in enumerate(PROMPTS):
        tokens, error = disaggregated(prefill, decode, f"r{i}", prompt)
        assert error is None
        assert tokens == colocated_fp8[i]
    assert prefill.num_transfers_failed == 0


def test_fp8_prefill_and_auto_decode_are_refused_clearly(workers, colocated_fp8):
    prefill, decode = workers(FP8, ENGINE)
    t0 = time.monotonic()
    tokens, error = disaggregated(prefill, decode, "mixed", PROMPTS[0])
    assert time.monotonic() - t0 < 5.0  # at once, not after the 10 s KV deadline
    assert error is not None and "prefill and decode pools must use the same kv_cache_dtype" \
        in error and "float8_e4m3fn" in error and "float32" in error
    assert decode.free_blocks() == decode.host.engine.pool.num_blocks  # nothing held
    # Matching pools beside them keep serving.
    prefill_ok, decode_ok = workers(FP8, FP8)
    tokens, error = disaggregated(prefill_ok, decode_ok, "after", PROMPTS[1])
    assert error is None and tokens == colocated_fp8[1]
