"""The Triton attention kernels vs the torch reference backend, run on CPU tensors by Triton's
interpreter (``TRITON_INTERPRET=1``), and the whole engine on them vs transformers; compiled on
CUDA by the ``gpu`` tests.

With triton 3.x the interpreter must be on *before ``triton`` is imported*: ``@triton.jit``
reads ``TRITON_INTERPRET`` when it decorates, and triton.language's own helpers (``tl.zeros``,
``tl.sum``, ...) are jit functions decorated at triton's import. Nothing imports triton at
collection time here; the ``interpreted`` fixture sets the variable, then imports it. So one
process runs triton either interpreted (CPU machines: these tests) or compiled (CUDA
machines: the gpu tests), and each kind skips, saying why, when the process is in the
other mode. Shapes stay small: every program instance runs as Python in the interpreter.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import random
import sys

import pytest
import torch

from engine.attention.metadata import split_slots
from engine.attention.registry import select_backend
from engine.attention.torch_ref import TorchAttentionBackend, write_kv_cache
from engine.kv_layout import head_major
from tests.engine.paged_helpers import build_metadata, random_block_tables, slots_for

if importlib.util.find_spec("triton") is None:  # an optional dependency (dev and gpu extras)
    pytest.skip("triton is not installed", allow_module_level=True)


def _triton_interpreted() -> bool | None:
    """None: triton not imported yet; else whether it was imported in interpreter mode."""
    if "triton" not in sys.modules:
        return None
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


@pytest.fixture(scope="module")
def interpreted():
    """The kernels module, in interpreter mode; the environment is restored after (triton
    itself stays interpreted in this process: nothing else runs triton on a CPU machine)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine checks the compiled kernels instead (the gpu tests)")
    if _triton_interpreted() is False:
        pytest.skip("triton was imported in compiled mode earlier in this process; its "
                    "interpreter must be on before the import: run this module on its own")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module("engine.attention.triton_kernels")
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(module._decode_kernel, InterpretedFunction)
        yield module
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


@pytest.fixture(autouse=True)
def _triton_mode(request):
    """Interpreted kernels for every test but the gpu ones (compiled)."""
    if request.node.get_closest_marker("gpu") is None:
        request.getfixturevalue("interpreted")
    elif _triton_interpreted():
        pytest.skip("triton runs interpreted in this process (the CPU tests ran first): run "
                    "the gpu tests on their own (pytest -m gpu)")


def _triton(**kw):
    from engine.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(**kw)


def run_both(block_size, cached, new, dims, seed=0, dtype=torch.float32, device="cpu",
             reference=None, cache_dtype=None, kv_scales=(1.0, 1.0), **triton_kw):
    """One step on a random paged cache with the triton and the reference (default: torch)
    backends, same inputs; ``cache_dtype``: an fp8 cache with these scales. -> (triton out,
    reference out, triton cache, reference cache, the triton backend)."""
    H, KVH, D = dims
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(cached, new, strict=True)]
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 4
    tables = random_block_tables([-(-s // block_size) for s in seq_lens], num_blocks,
                                 random.Random(seed))
    # Garbage everywhere (finite): padded and stale slots must be masked, not read as zero.
    # laid out as the engine's (head-major: see engine.kv_layout)
    kv = head_major(torch.randn(num_blocks, 2, 2, block_size, KVH, D, generator=gen).to(
        device, cache_dtype or dtype))
    k_cache, v_cache = kv[:, 1, 0], kv[:, 1, 1]  # one layer's strided views
    for table, c in zip(tables, cached, strict=True):  # the cached prefixes
        if c:
            slots = split_slots(torch.tensor(slots_for(table, 0, c, block_size)), block_size)
            slots = tuple(t.to(device) for t in slots)
            write_kv_cache(torch.randn(c, KVH, D, generator=gen).to(device, dtype),
                           torch.randn(c, KVH, D, generator=gen).to(device, dtype),
                           k_cache, v_cache, slots, kv_scales)
    T = sum(new)
    q, k, v = (torch.randn(T, n, D, generator=gen).to(device, dtype) for n in (H, KVH, KVH))
    backend = _triton(**triton_kw)
    reference = reference or TorchAttentionBackend()
    for b in (backend, reference):
        b.set_kv_scales(*kv_scales)
    kv_ref = kv.clone()
    out = backend.forward(q, k, v, k_cache, v_cache,
                          build_metadata(tables, cached, new, block_size, device), D**-0.5)
    ref = reference.forward(
        q, k, v, kv_ref[:, 1, 0], kv_ref[:, 1, 1],
        build_metadata(tables, cached, new, block_size, device), D**-0.5)
    return out, ref, kv, kv_ref, backend


FP32 = {"atol": 2e-5, "rtol": 2e-5}

# (block_size, (H, KVH, D)): block sizes 16 and 32, GQA ratios 1, 4, 8, head_dim 32 and 64
SHAPES = [(16, (2, 2, 32)), (32, (8, 2, 64)), (16, (8, 1, 64)), (32, (4, 1, 32))]


@pytest.mark.parametrize("block_size,dims", SHAPES)
def test_decode_matches_torch_reference(block_size, dims):
    # Ragged contexts, one spanning ~10 blocks, one ending on a block boundary.
    cached = [5, 10 * block_size - 3, 2 * block_size - 1, 40]
    out, ref, kv, kv_ref, _ = run_both(block_size, cached, [1] * 4, dims, seed=block_size)
    torch.testing.assert_close(out, ref, **FP32)
    assert torch.equal(kv, kv_ref)  # the KV write kernel stored exactly what torch did


@pytest.mark.parametrize("block_size,dims", SHAPES[:2])
def test_split_k_decode_matches_torch_reference(block_size, dims):
    cached = [8 * block_size + 5, 3, 60]
    out, ref, _, _, backend = run_both(block_size, cached, [1] * 3, dims, seed=1,
                                       num_sms=64, split_tokens=32, block_n=16)
    assert backend._plan.decode_splits > 1  # the split-K launch and its reduction ran
    torch.testing.assert_close(out, ref, **FP32)


@pytest.mark.parametrize("block_size,dims", SHAPES)
def test_prefill_and_mixed_batches_match_torch_reference(block_size, dims):
    # Decodes, then chunks: fresh, after a cached prefix (not block aligned), one token.
    cached = [33, 2 * block_size, 0, block_size + 7, 9]
    new = [1, 1, 37, 20, 1]
    out, ref, kv, kv_ref, backend = run_both(block_size, cached, new, dims, seed=2)
    assert backend._plan.decode_splits == 1 and backend._plan.prefill_tiles is not None
    torch.testing.assert_close(out, ref, **FP32)
    assert torch.equal(kv, kv_ref)


def test_prefill_only_chunks_across_many_blocks_with_small_key_tiles():
    # key tiles (16) smaller than a block (32): tiles read parts of one block
    out, ref, kv, kv_ref, _ = run_both(32, [0, 150], [70, 12], (4, 1, 32), seed=3, block_n=16)
    torch.testing.assert_close(out, ref, **FP32)
    assert torch.equal(kv, kv_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_torch_reference(dtype):
    out, ref, _, _, _ = run_both(16, [20, 0], [1, 19], (4, 2, 32), seed=4, dtype=dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_cache_matches_torch_reference(cache_dtype):
    """Same bytes written as torch's quantisation (saturation and subnormals included: the
    scales put K/V / scale over ~1e-3 .. 1e3), same attention to fp32 tolerance: decodes,
    split-K decodes and chunks after a cached prefix."""
    for cached, new, kw in (([40, 100], [1, 1], {"num_sms": 64, "split_tokens": 32}),
                            ([33, 0, 17], [1, 21, 9], {})):
        for scales in ((1.0, 1.0), (1e-3, 30.0)):
            out, ref, kv, kv_ref, _ = run_both(16, cached, new, (4, 1, 32), seed=5,
                                               cache_dtype=cache_dtype, kv_scales=scales, **kw)
            assert torch.equal(kv.view(torch.uint8), kv_ref.view(torch.uint8))
            torch.testing.assert_close(out, ref, **FP32)


def test_write_kv_kernel_skips_negative_slots(interpreted):
    kv = torch.zeros(4, 2, 2, 16, 2, 32)
    key, value = torch.randn(3, 2, 32), torch.randn(3, 2, 32)
    slots = torch.tensor([17, -1, 63])
    interpreted.write_kv(key, value, kv[:, 1, 0], kv[:, 1, 1], slots)
    assert torch.equal(kv[1, 1, 0, 1], key[0]) and torch.equal(kv[3, 1, 1, 15], value[2])
    assert kv.count_nonzero() == 2 * 2 * 2 * 32  # two tokens' K and V, nothing else


def test_registry_offers_triton_by_name_but_never_by_auto_on_cpu():
    cpu = torch.device("cpu")
    assert type(select_backend("triton", cpu, 16)).__name__ == "TritonAttentionBackend"
    assert type(select_backend("auto", cpu, 16)).__name__ != "TritonAttentionBackend"
    with pytest.raises(ValueError, match=r"power-of-two block_size >= 16 \(got 8\)"):
        select_backend("triton", cpu, 8)


def test_auto_on_cuda_prefers_flash_attn_then_triton_then_torch(monkeypatch):
    """Capability order on a CUDA device (availability faked: no GPU here)."""
    from engine.attention.flash_attn import FlashAttentionBackend
    from engine.attention.triton_backend import TritonAttentionBackend

    cuda = torch.device("cuda")
    monkeypatch.setattr(TritonAttentionBackend, "is_available", classmethod(lambda c, d: True))
    monkeypatch.setattr(FlashAttentionBackend, "is_available", classmethod(lambda c, d: True))
    monkeypatch.setattr(FlashAttentionBackend, "__init__", lambda self: None)
    assert type(select_backend("auto", cuda, 16)) is TritonAttentionBackend
    assert type(select_backend("auto", cuda, 256)) is FlashAttentionBackend
    assert type(select_backend("auto", cuda, 256, "fp8_e4m3")) is TritonAttentionBackend
    assert type(select_backend("auto", cuda, 8)) is TorchAttentionBackend  # < 16: torch
    monkeypatch.setattr(TritonAttentionBackend, "is_available", classmethod(lambda c, d: False))
    assert type(select_backend("auto", cuda, 16)) is TorchAttentionBackend


@pytest.mark.slow
def test_kernels_compile_for_hopper_and_ampere_without_a_gpu():
    """The interpreter runs kernels as Python; this compiles them (Triton IR -> PTX -> cubin,
    ptxas from the wheel) in a fresh process in compiled mode. ~1 min on 2 cores the first
    time, seconds once Triton's cache holds the kernels."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for arch in ("90", "80"):
        run = subprocess.run([sys.executable, "-m", "engine.attention.triton_compile_check",
                              "--arch", arch, "--quick"], env=env, capture_output=True,
                             text=True, timeout=280)
        assert run.returncode == 0, run.stdout + run.stderr[-2000:]
        assert run.stdout.count("ok ") == 9, run.stdout


def test_without_triton_cpu_selection_is_unchanged_and_triton_refused_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # as if not installed
    cpu = torch.device("cpu")
    assert type(select_backend(None, cpu, 16)).__name__ in ("CpuPagedAttentionBackend",
                                                           "TorchAttentionBackend")
    with pytest.raises(ValueError, match="'triton' is not available on cpu.*triton package"):
        select_backend("triton", cpu, 16)


def test_engine_on_triton_is_token_exact_against_transformers(tiny_model_dir):
    """qwen3 tiny (head_dim 32, GQA 2): chunked prefill (chunks after a cached prefix, mixed
    steps), decodes and a prefix-cache hit, all through the interpreted kernels."""
    from transformers import AutoModelForCausalLM

    from engine import Engine, SamplingParams

    model_dir = tiny_model_dir("qwen3")
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 1000) for _ in range(n)] for n in (3, 17, 40)]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = []
    for p in prompts:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    engine = Engine.from_pretrained(model_dir, block_size=16, max_num_batched_tokens=24,
                                    attention_backend="triton", load_tokenizer=False)
    assert engine.attn_backend.name == "triton"
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for _ in range(2):  # the second pass hits the prefix cache
        outs = engine.generate(prompts, params)
        assert [o.token_ids for o in outs] == expected
    assert sum(o.num_cached_tokens for o in outs) > 0
    engine.check_integrity()


# -- compiled on a GPU (skipped without CUDA) --------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,dims", [(16, (8, 1, 128)), (32, (32, 8, 128)),
                                             (16, (4, 2, 64))])
def test_cuda_kernels_match_torch_reference(dtype, block_size, dims):
    tol = FP32 if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for cached, new, kw in (([700, 5, 2000], [1, 1, 1], {"split_tokens": 128}),
                            ([33, 0, 300, 64], [1, 300, 129, 1], {})):
        out, ref, kv, kv_ref, _ = run_both(block_size, cached, new, dims, dtype=dtype,
                                           device="cuda", **kw)
        torch.testing.assert_close(out.float(), ref.float(), **tol)
        assert torch.equal(kv, kv_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cuda_engine_on_triton_matches_transformers(tiny_model_dir, arch, monkeypatch):
    from transformers import AutoModelForCausalLM

    from engine import Engine, SamplingParams

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 exact
    model_dir = tiny_model_dir(arch)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 1000) for _ in range(n)] for n in (1, 5, 16, 33, 64)]
    expected = []
    for p in prompts:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=10,
                              min_new_tokens=10, do_sample=False, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    engine = Engine.from_pretrained(model_dir, device="cuda", block_size=16,
                                    max_num_batched_tokens=24, attention_backend="triton",
                                    load_tokenizer=False, kv_cache_memory_bytes=64 << 20)
    outs = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0,
                                                   ignore_eos=True))
    assert [o.token_ids for o in outs] == expected


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_cuda_fp8_cache_matches_torch_reference(cache_dtype):
    if (cache_dtype == torch.float8_e4m3fn
            and torch.cuda.get_device_capability() < (8, 9)):
        with pytest.raises(ValueError, match="compute capability 8.9"):
            run_both(16, [40], [1], (8, 1, 128), device="cuda", cache_dtype=cache_dtype)
        return
    for cached, new in (([700, 5, 2000], [1, 1, 1]), ([33, 0, 300], [1, 300, 129])):
        out, ref, kv, kv_ref, _ = run_both(16, cached, new, (8, 1, 128), dtype=torch.bfloat16,
                                           device="cuda", cache_dtype=cache_dtype,
                                           kv_scales=(0.5, 2.0), split_tokens=128)
        assert torch.equal(kv.view(torch.uint8), kv_ref.view(torch.uint8))
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_cuda_triton_matches_flash_attn():
    pytest.importorskip("flash_attn")
    from engine.attention.flash_attn import FlashAttentionBackend

    cached, new = [300, 511, 0, 256], [1, 1, 200, 40]
    out, ref, *_ = run_both(256, cached, new, (8, 2, 128), dtype=torch.bfloat16,
                            device="cuda", reference=FlashAttentionBackend())
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
