"""The compiled fused CPU ops against the torch compositions they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import fused_ops as fused


@pytest.fixture(scope="module")
def ops():
    if fused.load() is None:
        pytest.skip("no C++ compiler/ninja here (or SPLITSERVE_FUSED_OPS=0): torch path only")
    return fused.load()


def _rows(t, n, seed):
    return torch.randn(t, n, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("t,n", [(1, 8), (37, 256), (300, 96)])
def test_add_rms_norm_matches_torch(ops, t, n):
    x, res, w = _rows(t, n, 0), _rows(t, n, 1), _rows(1, n, 2)[0]
    h = x + res
    want = F.rms_norm(h, (n,), w, 1e-5)
    got, got_res = fused.add_rms_norm(x.clone(), res.clone(), w, 1e-5)
    assert torch.equal(got_res, h)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("t,n", [(1, 8), (37, 256)])
def test_rms_norm_matches_torch_and_keeps_its_input(ops, t, n):
    x, w = _rows(t, n, 3), _rows(1, n, 4)[0]
    want = F.rms_norm(x, (n,), w, 1e-5)
    before = x.clone()
    got = fused.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(x, before)  # the residual stream reads it afterwards


@pytest.mark.parametrize("t,i", [(1, 8), (64, 768), (129, 40)])
def test_silu_and_mul_matches_torch(ops, t, i):
    gu = _rows(t, 2 * i, 3) * 10  # includes large |gate| (exp overflow / underflow)
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_and_mul(gu), F.silu(gate) * up,
                               atol=1e-6, rtol=1e-6)


def test_rotary_inplace_is_bit_identical_to_torch(ops):
    from engine.models.layers import RotaryEmbedding

    rope = RotaryEmbedding(32, 600, 10000.0, None)
    T, H, KVH, D = 50, 8, 2, 32
    qkv = _rows(T, (H + 2 * KVH) * D, 4)
    positions = torch.randint(0, 600, (T,), generator=torch.Generator().manual_seed(5))
    want = rope(positions, qkv[:, : (H + KVH) * D].view(T, H + KVH, D))
    got = qkv.clone()
    assert rope.rotate_inplace(positions, got, H + KVH)
    assert torch.equal(got[:, : (H + KVH) * D].view(T, H + KVH, D), want)
    assert torch.equal(got[:, (H + KVH) * D :], qkv[:, (H + KVH) * D :])  # v untouched


@pytest.mark.parametrize("n", [1, 5, 64])
def test_argmax_of_transposed_logits_matches_torch(ops, n):
    logits_t = _rows(4096, n, 6)  # the LM head's [V, n] layout
    logits_t[100, 0] = logits_t[200, 0] = logits_t[:, 0].max() + 1  # a tie: first one wins
    logits = logits_t.t()
    assert torch.equal(fused.argmax_last(logits), logits.contiguous().argmax(dim=-1))
    assert fused.argmax_last(logits)[0] == 100


def test_torch_fallback_off_cpu_float32():
    x, res, w = _rows(4, 16, 0).double(), _rows(4, 16, 1).double(), torch.ones(16)
    out, h = fused.add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(h, x + res) and out.dtype == torch.float64
    assert not fused.rotary_inplace(x, torch.zeros(4, dtype=torch.long), x, 1, 16)


@pytest.mark.parametrize("t", [1, 5, 64, 257])  # 257: over COLUMN_MLP_MAX_ROWS, row layout
def test_gated_mlp_on_transposed_activations_matches_the_row_layout(t):
    from engine.models.layers import GatedMLP

    torch.manual_seed(0)
    mlp = GatedMLP(32, 48, bias=False)
    x = _rows(t, 32, 3)
    want = mlp.down_proj(F.silu(x @ mlp.gate_up_proj.weight[:48].t())
                         * (x @ mlp.gate_up_proj.weight[48:].t()))
    got = mlp(x)
    assert got.shape == (t, 32) and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
