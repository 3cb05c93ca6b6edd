"""CUDA graphs of decode-only steps (engine.cuda_graphs).

CPU: the bucket and padding logic, and the padded step a replay runs — the same static
buffers, filled the same way, run eagerly by the torch (and, interpreted, the Triton)
backend — against the unpadded eager step: same tokens, and no write outside the real
rows' slots and the scratch block. The engine's plumbing (enforce_eager, which sizes are
captured, the runner routing decode-only steps to the graphs) runs on CPU with a stand-in
that replays by running the padded step eagerly.
GPU (``gpu`` marker, skipped without CUDA): real capture and replay, graphs on vs off.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from types import SimpleNamespace

import pytest
import torch

from engine import Engine, SamplingParams
from engine.attention.registry import backend_class, select_backend
from engine.batch import ScheduledRequest
from engine.config import GraphConfig
from engine.cuda_graphs import (
    DecodeGraphs,
    DecodeInputs,
    bucket_for,
    capture_blocker,
    capture_sizes,
)
from engine.models.moe import MoeExperts
from engine.request import Request

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


# -- buckets -------------------------------------------------------------------------------
def test_capture_sizes_are_powers_of_two_to_8_then_multiples_of_8_and_the_cap():
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1) == [1]
    with pytest.raises(ValueError, match=">= 1"):
        capture_sizes(0)


def test_bucket_is_the_smallest_size_that_holds_the_rows():
    sizes = capture_sizes(20)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 20)] == [
        1, 2, 4, 4, 8, 8, 16, 16, 20, 20]
    assert bucket_for(21, sizes) is None  # larger than the cap: eager
    assert bucket_for(0, sizes) is None


# -- static inputs -------------------------------------------------------------------------
def _decoding(request_id: str, num_tokens: int, block_ids: list[int]) -> ScheduledRequest:
    """A decode of the last of ``num_tokens`` tokens (position num_tokens - 1)."""
    request = Request(request_id, list(range(100, 100 + num_tokens)), GREEDY)
    request.block_ids = block_ids
    return ScheduledRequest(request, 1, num_tokens - 1, True)


def test_fill_pads_to_the_bucket_with_rows_that_touch_only_the_scratch_block():
    bs, scratch = 4, 9
    inputs = DecodeInputs(max_batch=8, max_model_len=16, block_size=bs, scratch_block=scratch,
                          device=torch.device("cpu"))
    assert inputs.width == 4 and inputs.capacity == 16
    rows = [_decoding("a", 6, [3, 7]), _decoding("b", 1, [5]), _decoding("c", 9, [0, 1, 2])]
    assert inputs.fill(rows, 4)
    assert inputs.input_ids[:4].tolist() == [105, 100, 108, 0]
    assert inputs.positions[:4].tolist() == [5, 0, 8, 0]
    # position p of a table -> table[p // bs] * bs + p % bs; padding: the scratch's slot 0
    assert inputs.slot_mapping[:4].tolist() == [7 * bs + 1, 5 * bs, 2 * bs, scratch * bs]
    assert inputs.seq_lens[:4].tolist() == [6, 1, 9, 1]
    assert inputs.cu_seqlens_k[:5].tolist() == [0, 6, 7, 16, 17]
    assert inputs.block_tables[0, :2].tolist() == [3, 7]
    assert inputs.block_tables[2, :3].tolist() == [0, 1, 2]
    assert inputs.block_tables[3, 0].item() == scratch
    md = inputs.metadata(4)
    assert md.static_shapes and md.num_decodes == md.num_seqs == 4
    assert md.seq_lens_cpu == [16] * 4 and md.max_seq_len == 16  # upper bounds, not values
    assert md.block_tables.shape == (4, 4)
    assert md.seq_lens.data_ptr() == inputs.seq_lens.data_ptr()  # views of the buffers
    assert inputs.metadata(4) is not md  # a new object each time (plans are per object)


def test_fill_refuses_a_context_longer_than_the_table_width():
    inputs = DecodeInputs(4, max_model_len=8, block_size=4, scratch_block=5,
                          device=torch.device("cpu"))
    assert inputs.fill([_decoding("a", 8, [0, 1])], 1)
    assert not inputs.fill([_decoding("a", 9, [0, 1, 2])], 1)


def test_graph_config_is_validated_and_from_pretrained_passes_it(tiny_model_dir):
    with pytest.raises(ValueError, match="max_capture_batch"):
        GraphConfig(max_capture_batch=0)
    default = Engine.from_pretrained(tiny_model_dir("llama"), load_tokenizer=False, num_blocks=8)
    assert default.graph_config == GraphConfig(enforce_eager=False, max_capture_batch=None)
    eager = Engine.from_pretrained(tiny_model_dir("llama"), load_tokenizer=False, num_blocks=8,
                                   enforce_eager=True, max_capture_batch=4)
    assert eager.graph_config == GraphConfig(enforce_eager=True, max_capture_batch=4)
    # CPU: never graphs, whatever the config
    assert default.runner.decode_graphs is None and default._graph_sizes() == []


def test_which_sizes_a_cuda_engine_would_capture(tiny_model_dir, monkeypatch, caplog):
    """The decision, on CPU with the device read as CUDA: on by default, off with
    enforce_eager, capped by max_capture_batch and max_num_seqs, off (one log line) for a
    backend that cannot be captured."""
    def engine_as_cuda(**kw) -> Engine:
        engine = Engine.from_pretrained(tiny_model_dir("llama"), load_tokenizer=False,
                                        attention_backend="torch", num_blocks=8,
                                        max_num_seqs=20, **kw)
        monkeypatch.setattr(engine, "device", torch.device("cuda"))
        return engine

    assert engine_as_cuda()._graph_sizes() == [1, 2, 4, 8, 16, 20]
    assert engine_as_cuda(max_capture_batch=8)._graph_sizes() == [1, 2, 4, 8]
    assert engine_as_cuda(max_capture_batch=99)._graph_sizes() == [1, 2, 4, 8, 16, 20]
    assert engine_as_cuda(enforce_eager=True)._graph_sizes() == []
    engine = engine_as_cuda()
    monkeypatch.setattr(engine, "attn_backend",
                        SimpleNamespace(name="flash_attn", supports_cuda_graphs=False))
    with caplog.at_level(logging.INFO, logger="engine.llm_engine"):
        assert engine._graph_sizes() == []
    assert caplog.text.count("CUDA graphs off: the flash_attn attention backend does not "
                             "support capture; decode steps run eagerly") == 1


def test_capture_blockers():
    torch_backend = select_backend("torch", torch.device("cpu"), 16)
    dense = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    assert capture_blocker(dense, torch_backend) is None
    moe = torch.nn.ModuleList([torch.nn.Linear(4, 4), MoeExperts(4, 8, 16)])
    assert "mixture-of-experts" in capture_blocker(moe, torch_backend)
    cpu_paged = backend_class("cpu_paged")
    assert cpu_paged.supports_cuda_graphs is False  # inherits torch's forward, CPU only
    assert backend_class("flash_attn").supports_cuda_graphs is False
    assert backend_class("triton").supports_cuda_graphs is True


# -- the padded step vs the unpadded one ----------------------------------------------------
def _triton_ready() -> bool:
    """Triton runs here interpreted (CPU machine, TRITON_INTERPRET set before its import)."""
    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return False
    if "triton" in sys.modules:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(tl.zeros, InterpretedFunction)
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not _triton_ready(), reason="triton is not installed or not interpreted here"))]


def _decode_batch(engine: Engine, prompts: list[list[int]]):
    """Prefill ``prompts`` (one step, GREEDY) and return the next, decode-only batch."""
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY)
    engine.step()
    batch = engine.scheduler.schedule()
    assert batch.num_decodes == len(batch.scheduled) == len(prompts)
    return batch


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_step_gives_the_unpadded_tokens_and_writes_only_real_slots(tiny_model_dir,
                                                                         backend):
    """A replay's exact inputs (3 rows padded to bucket 4, tables padded to max_model_len's
    width), run eagerly: the tokens of the eager step, the same K/V in the real rows' new
    slots, the scratch block written, every other slot of the cache untouched."""
    bs = 16
    engine = Engine.from_pretrained(tiny_model_dir("llama"), load_tokenizer=False,
                                    attention_backend=backend, block_size=bs, num_blocks=12,
                                    max_model_len=96, max_num_seqs=4)
    batch = _decode_batch(engine, [[5 + i for i in range(n)] for n in (3, 17, 40)])
    n, kv = engine.num_blocks, engine.runner.kv_cache
    before = kv.clone()
    expected = engine.runner.execute(batch).sampled_token_ids
    eager_kv = kv.clone()

    full = torch.zeros((n + 1, *kv.shape[1:]), dtype=kv.dtype)  # + the scratch block
    full[:n] = before
    graphs = DecodeGraphs.build(engine.model, full, [1, 2, 4], 96, bs, scratch_block=n)
    assert graphs.inputs.width == 6
    with torch.inference_mode():
        assert graphs.inputs.fill(batch.scheduled, 4)
        hidden = graphs.run_eager(4)[:3]
        tokens = engine.model.compute_logits(hidden).argmax(-1).tolist()
    assert tokens == expected
    new_slots = [(e.request.block_ids[e.start // bs], e.start % bs) for e in batch.scheduled]
    touched = torch.zeros(n, bs, dtype=torch.bool)
    for block, offset in new_slots:
        touched[block, offset] = True
        assert not torch.equal(full[block, :, :, offset], before[block, :, :, offset])
        torch.testing.assert_close(full[block, :, :, offset], eager_kv[block, :, :, offset])
    untouched = ~touched[:, None, None, :, None, None].expand(full[:n].shape)
    assert torch.equal(full[:n][untouched], before[untouched])
    assert full[n, :, :, 0].abs().sum() > 0  # the padding row wrote its scratch slot
    assert full[n, :, :, 1:].abs().sum() == 0  # and nothing else there


class EagerReplays(DecodeGraphs):
    """The runner-facing DecodeGraphs with every bucket "captured": a replay runs the
    padded step eagerly (the CPU stand-in for graph.replay)."""

    def has(self, bucket: int) -> bool:
        return True

    def _replay(self, bucket: int) -> torch.Tensor:
        return self.run_eager(bucket)


def _with_stand_in_graphs(engine: Engine, sizes: list[int]) -> EagerReplays:
    """Give a CPU engine a cache with a scratch block and the stand-in graphs, as the
    engine does on CUDA (before any request: the cache starts zeroed either way)."""
    runner, n = engine.runner, engine.num_blocks
    full = torch.zeros((n + 1, *runner.kv_cache.shape[1:]), dtype=runner.kv_cache.dtype)
    runner.kv_cache = full[:n]
    runner.decode_graphs = EagerReplays.build(
        engine.model, full, sizes, engine.scheduler_config.max_model_len,
        engine.cache_config.block_size, scratch_block=n)
    return runner.decode_graphs


def test_engine_with_padded_replays_generates_the_eager_tokens(tiny_model_dir):
    """Whole requests: decode-only steps of 1..5 rows go through try_run (buckets 1, 2, 4
    and padding; 5 rows are past the cap and run eagerly); mixed steps stay eager.
    Greedy tokens equal the eager engine's."""
    prompts = [[7 + (i * 13 + j) % 200 for j in range(n)] for i, n in enumerate(
        (1, 4, 5, 16, 33))]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
              for m in (9, 3, 12, 6, 1)]

    def run(graphs: bool):
        engine = Engine.from_pretrained(tiny_model_dir("llama"), load_tokenizer=False,
                                        attention_backend="torch", block_size=4,
                                        num_blocks=64, max_model_len=64, max_num_seqs=8,
                                        max_num_batched_tokens=16)
        stand_in = _with_stand_in_graphs(engine, [1, 2, 4]) if graphs else None
        outs = engine.generate(prompts, params)
        engine.check_integrity()
        return [o.token_ids for o in outs], stand_in

    expected, _ = run(graphs=False)
    got, stand_in = run(graphs=True)
    assert got == expected
    assert stand_in.num_replays > 0


def test_a_step_past_the_largest_bucket_runs_eagerly(tiny_model_dir):
    engine = Engine.from_pretrained(tiny_model_dir("llama"), load_tokenizer=False,
                                    attention_backend="torch", block_size=4, num_blocks=32,
                                    max_model_len=32, max_num_seqs=4)
    stand_in = _with_stand_in_graphs(engine, [1, 2])
    batch = _decode_batch(engine, [[5, 6], [7, 8, 9]])  # 2 rows: bucket 2
    engine.scheduler.update(batch, engine.runner.execute(batch))
    assert stand_in.num_replays == 1
    engine.add_request("more", [1, 2, 3], GREEDY)
    engine.step()  # its prefill with the two decodes: a mixed step, eager
    assert stand_in.num_replays == 1
    three = engine.scheduler.schedule()
    assert len(three.scheduled) == three.num_decodes == 3
    engine.scheduler.update(three, engine.runner.execute(three))  # 3 rows > 2: eager
    assert stand_in.num_replays == 1


# -- GPU: real capture and replay ------------------------------------------------------------
@pytest.fixture
def _exact_fp32():
    # TF32 matmuls would let graphs-on and graphs-off differ by more than ties allow.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _gpu_backends() -> list:
    return ["torch", pytest.param("triton", marks=pytest.mark.skipif(
        importlib.util.find_spec("triton") is None, reason="triton is not installed"))]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_cuda_graphs_on_and_off_give_identical_greedy_tokens(tiny_model_dir, backend,
                                                             _exact_fp32, caplog):
    prompts = [[7 + (i * 13 + j) % 900 for j in range(n)] for i, n in enumerate(
        (1, 4, 5, 16, 33, 70, 2, 9, 120))]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
              for m in (20, 3, 12, 6, 1, 15, 9, 30, 8)]
    outs, engines = {}, {}
    for eager in (True, False):
        with caplog.at_level(logging.INFO, logger="engine.cuda_graphs"):
            engine = Engine.from_pretrained(
                tiny_model_dir("llama"), device="cuda", load_tokenizer=False,
                attention_backend=backend, block_size=16, max_num_seqs=16,
                max_model_len=256, kv_cache_memory_bytes=64 << 20, enforce_eager=eager)
        outs[eager] = [o.token_ids for o in engine.generate(prompts, params)]
        engines[eager] = engine
        engine.check_integrity()
    assert outs[False] == outs[True]
    assert engines[True].runner.decode_graphs is None
    graphs = engines[False].runner.decode_graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 16]
    assert graphs.num_replays > 0
    assert "CUDA graphs: 5 decode batch sizes (1, 2, 4, 8, 16) captured" in caplog.text


@pytest.mark.gpu
def test_cuda_graph_replays_leave_other_blocks_alone(tiny_model_dir):
    """A replay of a padded bucket writes only its real rows' slots and the scratch block:
    every other block of the cache is unchanged by a decode step."""
    engine = Engine.from_pretrained(tiny_model_dir("llama"), device="cuda",
                                    load_tokenizer=False, attention_backend="torch",
                                    block_size=16, max_num_seqs=8, max_model_len=128,
                                    kv_cache_memory_bytes=16 << 20)
    batch = _decode_batch(engine, [[5, 6, 7], [8] * 20, [9] * 33])  # 3 rows: bucket 4
    kv = engine.runner.kv_cache
    before = kv.clone()
    replays = engine.runner.decode_graphs.num_replays
    engine.runner.execute(batch)
    assert engine.runner.decode_graphs.num_replays == replays + 1
    written = {e.request.block_ids[e.start // 16] for e in batch.scheduled}
    others = [b for b in range(engine.num_blocks) if b not in written]
    assert torch.equal(kv[others], before[others])
