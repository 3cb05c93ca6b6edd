// Fused elementwise ops for the Llama layers on CPU (float32), each one pass over memory
// instead of the several ops (and dispatches) of the torch composition it replaces.
//
//   fused_add_rms_norm_(x, residual, w, eps)   residual += x; x = rms_norm(residual) * w
//       x, residual [T, N] contiguous, both updated in place; w [N]
//   silu_and_mul(gate_up) -> out               out = silu(gate) * up
//       gate_up [T, 2I] contiguous (gate | up), out [T, I]
//   rotary_(qk, positions, cos_sin, num_heads, head_dim)
//       rotate-half RoPE in place on the first num_heads * head_dim columns of each row of
//       qk [T, >= num_heads * head_dim] (row stride qk.stride(0)); cos_sin [P, head_dim]
//       (cos | sin halves), positions [T] int64
//   argmax_dim0(x) -> idx                      first index of each column's max
//       x [V, n] contiguous (the LM head's transposed logits), idx [n] int64
//
// Included by fused_ops.cpp (the Python bindings) and by the paged attention extension's
// decode_step. Both compile it without FMA contraction (-ffast-math only for the vectorised
// expf), so each product and sum is rounded as in the torch ops it replaces: rotary_ is
// bit-identical to the torch version; the norm's mean and silu's exp differ from torch's
// only in their reduction order / exp implementation (a few ulp).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace splitserve {

constexpr int64_t kGrain = 16;  // rows per parallel task: rows are short (hidden ~ 256..8k)

inline void check_f32_contiguous(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}

inline void fused_add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor w, double eps) {
  check_f32_contiguous(x, "x");
  check_f32_contiguous(residual, "residual");
  check_f32_contiguous(w, "w");
  TORCH_CHECK(x.sizes() == residual.sizes() && x.dim() == 2 && w.numel() == x.size(1),
              "fused_add_rms_norm_: x, residual [T, N] and w [N]");
  const int64_t T = x.size(0), N = x.size(1);
  float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* __restrict__ xr = xp + t * N;
      float* __restrict__ rr = rp + t * N;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < N; ++i) {
        const float h = rr[i] + xr[i];
        rr[i] = h;
        ss += h * h;
      }
      // Like torch: x * rsqrt(mean(x^2) + eps), then the weight.
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(N) + e);
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) xr[i] = wp[i] * (rr[i] * inv);
    }
  });
}

inline torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  check_f32_contiguous(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_and_mul: gate_up [T, 2I]");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = torch::empty({T, I}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* __restrict__ g = gp + t * 2 * I;
      const float* __restrict__ u = g + I;
      float* __restrict__ o = op + t * I;
      // exp's argument capped below float overflow: fast-math assumes no inf (silu of
      // gate < -88 is ~ -1e-36 here, -0 in torch).
#pragma omp simd
      for (int64_t i = 0; i < I; ++i)
        o[i] = g[i] / (1.f + std::exp(std::fmin(-g[i], 88.f))) * u[i];
    }
  });
  return out;
}

inline void rotary_(torch::Tensor qk, torch::Tensor positions, torch::Tensor cos_sin,
             int64_t num_heads, int64_t head_dim) {
  TORCH_CHECK(qk.device().is_cpu() && qk.scalar_type() == torch::kFloat32 && qk.dim() == 2 &&
                  qk.stride(1) == 1 && qk.size(1) >= num_heads * head_dim,
              "rotary_: qk [T, >= heads * head_dim] float32 with contiguous rows");
  check_f32_contiguous(cos_sin, "cos_sin");
  TORCH_CHECK(positions.scalar_type() == torch::kLong && positions.is_contiguous() &&
                  positions.numel() == qk.size(0) && cos_sin.size(1) == head_dim &&
                  head_dim % 2 == 0,
              "rotary_: positions [T] int64, cos_sin [P, head_dim]");
  const int64_t T = qk.size(0), row = qk.stride(0), half = head_dim / 2, P = cos_sin.size(0);
  float* xp = qk.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cs = cos_sin.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < P, "rotary_: position out of the table's range");
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* __restrict__ c = cs + pos[t] * head_dim;
      const float* __restrict__ s = c + half;
      for (int64_t h = 0; h < num_heads; ++h) {
        float* __restrict__ x1 = xp + t * row + h * head_dim;
        float* __restrict__ x2 = x1 + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = x1[i], b = x2[i];
          x1[i] = a * c[i] - b * s[i];
          x2[i] = b * c[i] + a * s[i];
        }
      }
    }
  });
}

inline torch::Tensor argmax_dim0(torch::Tensor x) {
  check_f32_contiguous(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(0) > 0, "argmax_dim0: x [V, n] with V > 0");
  const int64_t V = x.size(0), n = x.size(1);
  auto out = torch::empty({n}, x.options().dtype(torch::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  // Rows streamed once, a running max per column (strict >: the first max wins, as in
  // torch.argmax; logits are finite, NaN is not handled).
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    const int64_t w = end - begin;
    std::vector<float> best(xp + begin, xp + end);
    std::vector<int32_t> idx(w, 0);
    float* __restrict__ b = best.data();
    int32_t* __restrict__ id = idx.data();
    for (int64_t v = 1; v < V; ++v) {
      const float* __restrict__ row = xp + v * n + begin;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        const bool gt = row[j] > b[j];
        b[j] = gt ? row[j] : b[j];
        id[j] = gt ? static_cast<int32_t>(v) : id[j];
      }
    }
    for (int64_t j = 0; j < w; ++j) op[begin + j] = id[j];
  });
  return out;
}

}  // namespace splitserve
