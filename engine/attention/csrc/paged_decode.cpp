// Paged decode attention for CPU (float32): one query token per sequence, read straight
// from the block table (no gather, no padding), parallel over sequences.
//
//   q            [B, H, D]            float32, contiguous
//   k/v_cache    [N, bs, KVH, D]      float32; one layer of the block-major paged cache, so
//                                     the block stride is free, the rest contiguous
//   block_tables [B, max_blocks]      int32
//   seq_lens     [B]                  int32 (context length including the new token)
//   out          [B, H, D]
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32,
              "paged_decode takes float32");
  TORCH_CHECK(q.is_contiguous(), "paged_decode needs a contiguous query");
  for (const auto& c : {k_cache, v_cache}) {
    TORCH_CHECK(c.stride(3) == 1 && c.stride(2) == c.size(3) && c.stride(1) == c.size(2) * c.size(3),
                "paged_decode needs the rows inside a cache block contiguous");
  }
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2), G = H / KVH;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t k_block_stride = k_cache.stride(0), v_block_stride = v_cache.stride(0);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);

  // One task per sequence: all its KV heads together, so every cache line of a token's
  // K/V row (all heads) is used once it is loaded.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(H * D), denom(H);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t L = lens[b];
      const float* qb = qp + b * H * D;  // [H, D]; head h uses KV head h / G
      scores.resize(H * L);
      const int64_t row = KVH * D;  // floats per token in one block
      for (int64_t t = 0; t < L; ++t) {
        const int64_t blk = bt[b * max_blocks + t / bs];
        const float* krow = kp + blk * k_block_stride + (t % bs) * row;  // [KVH, D]
        for (int64_t h = 0; h < H; ++h) {
          const float* __restrict__ qr = qb + h * D;
          const float* __restrict__ kr = krow + (h / G) * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qr[d] * kr[d];
          scores[h * L + t] = s * sc;
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        float* sh = scores.data() + h * L;
        const float mx = *std::max_element(sh, sh + L);
        float sum = 0.f;
        // Vectorised expf (glibc's libmvec): scalar exp was most of the kernel's time.
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < L; ++t) {
          sh[t] = expf(sh[t] - mx);
          sum += sh[t];
        }
        denom[h] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t blk = bt[b * max_blocks + t / bs];
        const float* vrow = vp + blk * v_block_stride + (t % bs) * row;
        for (int64_t h = 0; h < H; ++h) {
          const float w = scores[h * L + t];
          const float* __restrict__ vr = vrow + (h / G) * D;
          float* __restrict__ ah = acc.data() + h * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ah[d] += w * vr[d];
        }
      }
      float* ob = op + b * H * D;
      for (int64_t h = 0; h < H; ++h) {
        const float inv = 1.f / denom[h];
        for (int64_t d = 0; d < D; ++d) ob[h * D + d] = acc[h * D + d] * inv;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention (CPU, float32)");
}
