// Paged attention for CPU (float32), reading K/V straight through the block table (no
// gather, no padding): paged_decode (one query token per sequence, parallel over sequences)
// and, further down, paged_prefill (prefill chunks, flash style, causal), write_kv (the new
// tokens' K/V into their slots) and decode_step (a whole decode-only Llama step).
//
// paged_decode:
//   q            [B, H, D]            float32, each row's heads contiguous (row stride free)
//   k/v_cache    [N, bs, KVH, D]      float32; one layer of the block-major paged cache:
//                                     block, token and head strides free, each row of D
//                                     contiguous (the engine's cache is head-major: a KV
//                                     head's tokens of a block are adjacent)
//   block_tables [B, max_blocks]      int32
//   seq_lens     [B]                  int32 (context length including the new token)
//   out          [B, H, D]
//
// With AVX2+FMA and head_dim 32/64/128 (the models we serve), a vectorised path per KV head
// scores 8 tokens at a time for the query heads sharing it, with software prefetch of the
// scattered blocks; 1.7-2.1x the plain loop on the dev VM. Otherwise the plain loop below.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "../../csrc/fused_ops.h"  // the decode step below runs the Llama layer's fused ops

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>
// s[0..L) <- exp(s - max(s)) in place; returns their sum (the softmax denominator).
// Vectorised expf (glibc's libmvec): scalar exp was most of the first kernel's time.
static inline float exp_shifted(float* s, int64_t L) {
  const float mx = *std::max_element(s, s + L);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < L; ++t) {
    s[t] = expf(s[t] - mx);
    sum += s[t];
  }
  return sum;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPLITSERVE_AVX2 1
#endif

#ifdef SPLITSERVE_AVX2
// [sum(a[0]), ..., sum(a[7])]: eight horizontal sums at once (one per dot product would cost
// ~5 shuffles each; at head_dim 32 those shuffles were most of the kernel). In 128-bit
// halves: Zen 1 splits every 256-bit op in two and its vperm2f128 is slow (-5% kernel time
// against the 256-bit hadd/permute version there).
static inline __m256 sum8(const __m256* a) {
  __m128 h[8];
  for (int i = 0; i < 8; ++i)
    h[i] = _mm_add_ps(_mm256_castps256_ps128(a[i]), _mm256_extractf128_ps(a[i], 1));
  const __m128 s01 = _mm_hadd_ps(h[0], h[1]), s23 = _mm_hadd_ps(h[2], h[3]);
  const __m128 s45 = _mm_hadd_ps(h[4], h[5]), s67 = _mm_hadd_ps(h[6], h[7]);
  return _mm256_set_m128(_mm_hadd_ps(s45, s67), _mm_hadd_ps(s01, s23));
}

// One sequence, head_dim D (a multiple of 8): per KV head, the G query heads that share it
// score 8 tokens at a time, then softmax, then P @ V with the G accumulators in registers.
constexpr int64_t PREFETCH_TOKENS = 32;  // K rows this far ahead (two blocks of 16)

template <int D>
static void decode_seq_avx2(const float* qb, const float* kp, const float* vp,
                            int64_t k_block_stride, int64_t v_block_stride, int64_t row,
                            int64_t hs, const int32_t* table, int64_t L, int64_t bs,
                            int64_t KVH, int64_t G, float sc, std::vector<float>& scores,
                            float* ob) {
  constexpr int V = D / 8;  // vectors per row (row: the token stride, hs: the head stride)
  scores.resize(G * (L + 8));
  for (int64_t g = 0; g < KVH; ++g) {
    const float* qg = qb + g * G * D;  // heads g*G .. g*G+G-1 use KV head g
    for (int64_t t0 = 0; t0 < L; t0 += 8) {
      if (t0 + PREFETCH_TOKENS < L) {  // blocks are scattered: the prefetcher cannot guess
        const int64_t t = t0 + PREFETCH_TOKENS;
        const char* p = reinterpret_cast<const char*>(
            kp + table[t / bs] * k_block_stride + (t % bs) * row + g * hs);
        for (int i = 0; i < 8; ++i)
          for (int c = 0; c < D * 4; c += 64) _mm_prefetch(p + i * row * 4 + c, _MM_HINT_T0);
      }
      const float* krow[8];
      if (bs % 8 == 0 && t0 + 8 <= L) {  // the 8 tokens share a block: one table lookup
        const float* base = kp + table[t0 / bs] * k_block_stride + (t0 % bs) * row + g * hs;
        for (int i = 0; i < 8; ++i) krow[i] = base + i * row;
      } else {
        for (int i = 0; i < 8; ++i) {
          const int64_t t = std::min(t0 + i, L - 1);  // past the end: a real row, unused
          krow[i] = kp + table[t / bs] * k_block_stride + (t % bs) * row + g * hs;
        }
      }
      for (int64_t h = 0; h < G; ++h) {
        __m256 q[V];
        for (int j = 0; j < V; ++j) q[j] = _mm256_loadu_ps(qg + h * D + 8 * j);
        __m256 acc[8];
        for (int i = 0; i < 8; ++i) {
          __m256 a = _mm256_mul_ps(q[0], _mm256_loadu_ps(krow[i]));
          for (int j = 1; j < V; ++j) a = _mm256_fmadd_ps(q[j], _mm256_loadu_ps(krow[i] + 8 * j), a);
          acc[i] = a;
        }
        _mm256_storeu_ps(scores.data() + h * (L + 8) + t0,
                         _mm256_mul_ps(sum8(acc), _mm256_set1_ps(sc)));
      }
    }
    float denom[64];
    for (int64_t h = 0; h < G; ++h) denom[h] = exp_shifted(scores.data() + h * (L + 8), L);
    for (int64_t h0 = 0; h0 < G; h0 += 2) {  // two heads at a time: 2 * V accumulators
      const int64_t nh = std::min<int64_t>(2, G - h0);
      __m256 acc[2][V];
      for (int r = 0; r < 2; ++r)
        for (int j = 0; j < V; ++j) acc[r][j] = _mm256_setzero_ps();
      const float* p0 = scores.data() + h0 * (L + 8);
      const float* p1 = scores.data() + (h0 + nh - 1) * (L + 8);
      for (int64_t t = 0, blk = 0; t < L; ++blk) {  // block by block: no division per token
        const float* vb = vp + table[blk] * v_block_stride + g * hs;
        if (t + bs < L) {  // the next block's rows for this head, ahead of use
          const char* p = reinterpret_cast<const char*>(
              vp + table[blk + 1] * v_block_stride + g * hs);
          for (int64_t o = 0; o < bs; ++o)
            for (int c = 0; c < D * 4; c += 64) _mm_prefetch(p + o * row * 4 + c, _MM_HINT_T0);
        }
        for (int64_t o = 0, n = std::min(bs, L - t); o < n; ++o, ++t) {
          const float* vr = vb + o * row;
          const __m256 w0 = _mm256_set1_ps(p0[t]), w1 = _mm256_set1_ps(p1[t]);
          for (int j = 0; j < V; ++j) {
            const __m256 x = _mm256_loadu_ps(vr + 8 * j);
            acc[0][j] = _mm256_fmadd_ps(w0, x, acc[0][j]);
            acc[1][j] = _mm256_fmadd_ps(w1, x, acc[1][j]);
          }
        }
      }
      for (int r = 0; r < nh; ++r) {
        const __m256 inv = _mm256_set1_ps(1.f / denom[h0 + r]);
        float* o = ob + (g * G + h0 + r) * D;
        for (int j = 0; j < V; ++j) _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(acc[r][j], inv));
      }
    }
  }
}
#endif

// One layer's K and V caches [N, bs, KVH, D]: each row of D contiguous, the token and head
// strides free (token-major or head-major blocks) but the same for K and V.
static void check_cache_rows(const torch::Tensor& k, const torch::Tensor& v, const char* fn) {
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes() && k.stride(3) == 1 && v.stride(3) == 1 &&
                  k.stride(1) == v.stride(1) && k.stride(2) == v.stride(2),
              fn, " needs K and V caches [N, bs, KVH, D] with contiguous rows and equal strides");
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32,
              "paged_decode takes float32");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "paged_decode needs each query row's heads contiguous");
  for (const auto& t : {block_tables, seq_lens})
    TORCH_CHECK(t.scalar_type() == torch::kInt32 && t.stride(-1) == 1,
                "paged_decode takes int32 block tables and lengths");
  check_cache_rows(k_cache, v_cache, "paged_decode");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2), G = H / KVH;
  const int64_t max_blocks = block_tables.stride(0);  // a row's stride (rows may be a slice)
  const int64_t k_block_stride = k_cache.stride(0), v_block_stride = v_cache.stride(0);
  const int64_t row = k_cache.stride(1), hs = k_cache.stride(2);  // token, head strides
  auto out = torch::empty({B, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);

  // One task per sequence, all its KV heads together.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(H * D), denom(H);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t L = lens[b];
      const float* qb = qp + b * q.stride(0);  // [H, D]; head h uses KV head h / G
#ifdef SPLITSERVE_AVX2
      if (G <= 64 && (D == 32 || D == 64 || D == 128)) {
        const int32_t* table = bt + b * max_blocks;
        auto* fn = D == 32 ? decode_seq_avx2<32> : D == 64 ? decode_seq_avx2<64>
                                                            : decode_seq_avx2<128>;
        fn(qb, kp, vp, k_block_stride, v_block_stride, row, hs, table, L, bs, KVH, G, sc,
           scores, op + b * H * D);
        continue;
      }
#endif
      scores.resize(H * L);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t blk = bt[b * max_blocks + t / bs];
        const float* krow = kp + blk * k_block_stride + (t % bs) * row;  // head h / G at hs
        for (int64_t h = 0; h < H; ++h) {
          const float* __restrict__ qr = qb + h * D;
          const float* __restrict__ kr = krow + (h / G) * hs;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qr[d] * kr[d];
          scores[h * L + t] = s * sc;
        }
      }
      for (int64_t h = 0; h < H; ++h) denom[h] = exp_shifted(scores.data() + h * L, L);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t blk = bt[b * max_blocks + t / bs];
        const float* vrow = vp + blk * v_block_stride + (t % bs) * row;
        for (int64_t h = 0; h < H; ++h) {
          const float w = scores[h * L + t];
          const float* __restrict__ vr = vrow + (h / G) * hs;
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

// ---------------------------------------------------------------------------------------
// Paged prefill attention (float32, AVX2+FMA): the queries of prefill chunks against their
// whole context (cached prefix + the chunk itself, already written to the cache), read
// straight through the block table, causal from each query's absolute position. Flash
// style: per (sequence, KV head, tile of query positions) an online softmax over tiles of up
// to 64 keys (whole blocks), stopping at the tile's last visible key (no work above the
// diagonal). Scores come from a transposed copy of each key tile (8 keys per vector, no
// horizontal sums).
//
//   q            [T, H, D] rows of the batch (row stride free), chunks are rows cu_q[s]..
//   k/v_cache    [N, bs, KVH, D] one layer of the block-major cache (strides as above)
//   block_tables [S, max_blocks] int32, seq_lens [S] int32, cu_q [S + 1] int32
//   seqs [first, S) are the prefill chunks; returns out [cu_q[S] - cu_q[first], H, D]
#ifdef SPLITSERVE_AVX2
// exp(x) for x <= 0 (scores minus their running max), Cephes-style: 2^n * p(r), rel. error
// ~1e-7; below -87 it flushes to 0.
static inline __m256 exp_neg(__m256 x_in) {
  const __m256 x = _mm256_max_ps(x_in, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                       _mm256_set1_epi32(127)), 23);
  const __m256 in_range = _mm256_cmp_ps(x_in, _mm256_set1_ps(-87.f), _CMP_GE_OQ);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), in_range);  // masked: 0
}

static inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr int64_t QTILE = 16;        // query positions per work item
constexpr int64_t MAX_ROWS = 256;    // QTILE * heads per KV head
constexpr int64_t MAX_KBLOCK = 64;   // key block size (a multiple of 8)

// One work item: query positions [i0, i1) of one chunk (absolute positions pos0 + i) for
// the G heads sharing KV head g. Rows are (position, head) pairs: r = (i - i0) * G + hh.
// A thread's scratch for prefill_tile (heap: too big for an OpenMP thread's stack).
struct PrefillScratch {
  float* base;
  explicit PrefillScratch(int64_t D)
      : base(static_cast<float*>(std::aligned_alloc(
            32, sizeof(float) * (2 * MAX_ROWS * D + D * MAX_KBLOCK + MAX_ROWS * MAX_KBLOCK +
                                 2 * MAX_ROWS)))) {
    TORCH_CHECK(base != nullptr, "paged_prefill: out of memory for scratch");
  }
  ~PrefillScratch() { std::free(base); }
};

template <int D>
static void prefill_tile(const float* q, int64_t q_row_stride, const float* kp,
                         const float* vp, int64_t k_block_stride, int64_t v_block_stride,
                         int64_t row, int64_t hs, const int32_t* table, int64_t bs,
                         int64_t KVH, int64_t G, int64_t g, int64_t pos0, int64_t i0, int64_t i1,
                         float sc, float* out, int64_t H, float* scratch) {
  constexpr int V = D / 8;
  const int64_t R = (i1 - i0) * G;
  auto qs = reinterpret_cast<float (*)[D]>(scratch);                      // [MAX_ROWS][D]
  auto o = reinterpret_cast<float (*)[D]>(scratch + MAX_ROWS * D);        // [MAX_ROWS][D]
  auto kt = reinterpret_cast<float (*)[MAX_KBLOCK]>(scratch + 2 * MAX_ROWS * D);  // [D][..]
  auto s = reinterpret_cast<float (*)[MAX_KBLOCK]>(scratch + 2 * MAX_ROWS * D + D * MAX_KBLOCK);
  float* m = scratch + 2 * MAX_ROWS * D + D * MAX_KBLOCK + MAX_ROWS * MAX_KBLOCK;
  float* l = m + MAX_ROWS;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = i0 + r / G, h = g * G + r % G;
    const float* src = q + i * q_row_stride + h * D;
    for (int j = 0; j < V; ++j)
      _mm256_store_ps(qs[r] + 8 * j, _mm256_mul_ps(_mm256_loadu_ps(src + 8 * j), _mm256_set1_ps(sc)));
    for (int j = 0; j < V; ++j) _mm256_store_ps(o[r] + 8 * j, _mm256_setzero_ps());
    m[r] = -1e30f, l[r] = 0.f;
  }
  const int64_t last_key = pos0 + i1 - 1;  // the tile's last query sees keys 0..last_key
  // Keys go by tiles of up to MAX_KBLOCK (whole blocks): the softmax bookkeeping per row
  // (max, exp, sums, rescaling) is paid per tile, not per block.
  const int64_t tile = MAX_KBLOCK / bs * bs;
  const float* vrows[MAX_KBLOCK];
  for (int64_t t0 = 0; t0 <= last_key; t0 += tile) {
    const int64_t n = std::min(tile, last_key + 1 - t0), nv = (n + 7) / 8;
    for (int64_t t = 0; t < nv * 8; ++t) {  // transpose K (keys past n: real rows, masked)
      const int64_t blk = table[(t0 + t) / bs], off = (t0 + t) % bs;
      const float* kr = kp + blk * k_block_stride + off * row + g * hs;
      vrows[t] = vp + blk * v_block_stride + off * row + g * hs;
      for (int64_t d = 0; d < D; ++d) kt[d][t] = kr[d];
    }
    // scores, 4 rows at a time: s[r][0..n) = sum_d qs[r][d] * kt[d][0..n)
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const int64_t nr = std::min<int64_t>(4, R - r0);
      for (int64_t c = 0; c < nv; c += 2) {
        const int64_t nc = std::min<int64_t>(2, nv - c);
        __m256 acc[4][2];
        for (int a = 0; a < 4; ++a) acc[a][0] = acc[a][1] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; ++d) {
          const __m256 k0 = _mm256_load_ps(kt[d] + 8 * c);
          const __m256 k1 = nc > 1 ? _mm256_load_ps(kt[d] + 8 * c + 8) : k0;
          for (int a = 0; a < 4; ++a) {
            const __m256 qv = _mm256_broadcast_ss(&qs[r0 + std::min<int64_t>(a, nr - 1)][d]);
            acc[a][0] = _mm256_fmadd_ps(qv, k0, acc[a][0]);
            acc[a][1] = _mm256_fmadd_ps(qv, k1, acc[a][1]);
          }
        }
        for (int a = 0; a < nr; ++a) {
          _mm256_store_ps(s[r0 + a] + 8 * c, acc[a][0]);
          if (nc > 1) _mm256_store_ps(s[r0 + a] + 8 * c + 8, acc[a][1]);
        }
      }
    }
    // causal mask and online softmax per row; weights replace the scores in s
    for (int64_t r = 0; r < R; ++r) {
      const int64_t visible = std::min(n, pos0 + i0 + r / G - t0 + 1);  // keys t0.. visible
      for (int64_t t = std::max<int64_t>(visible, 0); t < nv * 8; ++t) s[r][t] = -1e30f;
      __m256 mx8 = _mm256_load_ps(s[r]);
      for (int64_t c = 1; c < nv; ++c) mx8 = _mm256_max_ps(mx8, _mm256_load_ps(s[r] + 8 * c));
      const float mx = std::max(m[r], hmax8(mx8));
      const __m256 mxv = _mm256_set1_ps(mx);
      __m256 sum8 = _mm256_setzero_ps();
      for (int64_t c = 0; c < nv; ++c) {
        const __m256 p = exp_neg(_mm256_sub_ps(_mm256_load_ps(s[r] + 8 * c), mxv));
        _mm256_store_ps(s[r] + 8 * c, p);
        sum8 = _mm256_add_ps(sum8, p);
      }
      const float corr = expf(m[r] - mx);
      l[r] = l[r] * corr + hsum8(sum8);
      m[r] = mx;
      if (corr != 1.f) {
        const __m256 cv = _mm256_set1_ps(corr);
        for (int j = 0; j < V; ++j)
          _mm256_store_ps(o[r] + 8 * j, _mm256_mul_ps(_mm256_load_ps(o[r] + 8 * j), cv));
      }
    }
    // o[r] += sum_t w[r][t] * V[t], two rows and 32 dims at a time in registers
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      constexpr int W = D < 32 ? D / 8 : 4;
      for (int64_t r0 = 0; r0 < R; r0 += 2) {
        const int64_t r1 = std::min(r0 + 1, R - 1);
        __m256 a0[W], a1[W];
        for (int j = 0; j < W; ++j) {
          a0[j] = _mm256_load_ps(o[r0] + d0 + 8 * j);
          a1[j] = _mm256_load_ps(o[r1] + d0 + 8 * j);
        }
        for (int64_t t = 0; t < n; ++t) {
          const float* vr = vrows[t] + d0;
          const __m256 w0 = _mm256_broadcast_ss(&s[r0][t]), w1 = _mm256_broadcast_ss(&s[r1][t]);
          for (int j = 0; j < W; ++j) {
            const __m256 x = _mm256_loadu_ps(vr + 8 * j);
            a0[j] = _mm256_fmadd_ps(w0, x, a0[j]);
            a1[j] = _mm256_fmadd_ps(w1, x, a1[j]);
          }
        }
        for (int j = 0; j < W; ++j) _mm256_store_ps(o[r1] + d0 + 8 * j, a1[j]);
        for (int j = 0; j < W; ++j) _mm256_store_ps(o[r0] + d0 + 8 * j, a0[j]);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = i0 + r / G, h = g * G + r % G;
    const __m256 inv = _mm256_set1_ps(1.f / l[r]);
    for (int j = 0; j < V; ++j)
      _mm256_storeu_ps(out + (i * H + h) * D + 8 * j, _mm256_mul_ps(_mm256_load_ps(o[r] + 8 * j), inv));
  }
}
#endif

bool prefill_supported(int64_t H, int64_t KVH, int64_t D, int64_t bs) {
#ifdef SPLITSERVE_AVX2
  return (D == 32 || D == 64 || D == 128) && bs % 8 == 0 && bs <= MAX_KBLOCK && H % KVH == 0 &&
         QTILE * (H / KVH) <= MAX_ROWS;
#else
  return false;
#endif
}

torch::Tensor paged_prefill(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor seq_lens,
                            torch::Tensor cu_q, int64_t first, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32,
              "paged_prefill takes float32");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "paged_prefill needs each query row's heads contiguous");
  check_cache_rows(k_cache, v_cache, "paged_prefill");
  for (const auto& t : {block_tables, seq_lens, cu_q}) {
    TORCH_CHECK(t.scalar_type() == torch::kInt32 && t.is_contiguous(),
                "paged_prefill takes contiguous int32 block tables, lengths and offsets");
  }
  const int64_t H = q.size(1), D = q.size(2), bs = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(prefill_supported(H, KVH, D, bs), "paged_prefill: unsupported shape or no AVX2");
  const int64_t S = seq_lens.size(0), G = H / KVH, max_blocks = block_tables.size(1);
  const int32_t* cq = cu_q.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int64_t row0 = cq[first];
  auto out = torch::empty({cq[S] - row0, H, D}, q.options());
#ifdef SPLITSERVE_AVX2
  struct Item { int64_t s, g, i0, i1; };
  std::vector<Item> items;
  for (int64_t s = first; s < S; ++s) {
    const int64_t n = cq[s + 1] - cq[s];
    for (int64_t i0 = 0; i0 < n; i0 += QTILE)
      for (int64_t g = 0; g < KVH; ++g) items.push_back({s, g, i0, std::min(n, i0 + QTILE)});
  }
  // Most work first (a tile's cost grows with its position): dynamic scheduling then ends
  // with small items on both threads.
  std::sort(items.begin(), items.end(), [&](const Item& a, const Item& b) {
    return lens[a.s] - (cq[a.s + 1] - cq[a.s]) + a.i1 > lens[b.s] - (cq[b.s + 1] - cq[b.s]) + b.i1;
  });
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t qs = q.stride(0), kbs = k_cache.stride(0), vbs = v_cache.stride(0);
  const int64_t row = k_cache.stride(1), hs = k_cache.stride(2);
  const float sc = static_cast<float>(scale);
  auto* fn = D == 32 ? prefill_tile<32> : D == 64 ? prefill_tile<64> : prefill_tile<128>;
  const int64_t num_items = static_cast<int64_t>(items.size());
#pragma omp parallel num_threads(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items)))
  {
    PrefillScratch scratch(D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < num_items; ++w) {
      const Item it = items[w];
      const int64_t n = cq[it.s + 1] - cq[it.s], pos0 = lens[it.s] - n;
      fn(qp + cq[it.s] * qs, qs, kp, vp, kbs, vbs, row, hs, bt + it.s * max_blocks, bs, KVH,
         G, it.g, pos0, it.i0, it.i1, sc, op + (cq[it.s] - row0) * H * D, H, scratch.base);
    }
  }
#endif
  return out;
}

// The new tokens' K and V into their cache slots: one row copy per token and tensor, or per
// token, head and tensor in a head-major cache (index_put_ with (block, offset) indices: 8.7x
// the time at 32 rows, 2.2x at 512 rows in a micro-benchmark on the dev VM).
//   key/value [T, KVH, D] float32 (row stride free); k/v_cache [N, bs, KVH, D] (strides as
//   paged_decode's); block/offset [T] int64
void write_kv(torch::Tensor key, torch::Tensor value, torch::Tensor k_cache,
              torch::Tensor v_cache, torch::Tensor block, torch::Tensor offset) {
  const int64_t T = key.size(0), KVH = k_cache.size(2), D = k_cache.size(3), N = k_cache.size(0);
  const int64_t bs = k_cache.size(1);
  for (const auto& t : {key, value})
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.stride(-1) == 1 &&
                    t.stride(-2) == D && t.size(-1) == D && t.size(-2) == KVH,
                "write_kv: float32 [T, KVH, D] keys and values with contiguous rows");
  TORCH_CHECK(k_cache.scalar_type() == torch::kFloat32, "write_kv: float32 caches");
  check_cache_rows(k_cache, v_cache, "write_kv");
  TORCH_CHECK(value.size(0) == T && block.numel() == T && offset.numel() == T &&
                  block.scalar_type() == torch::kInt64 && offset.scalar_type() == torch::kInt64 &&
                  block.is_contiguous() && offset.is_contiguous(),
              "write_kv: one int64 (block, offset) per token");
  const float* kp = key.data_ptr<float>();
  const float* vp = value.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t* bp = block.data_ptr<int64_t>();
  const int64_t* op = offset.data_ptr<int64_t>();
  const int64_t ks = key.stride(0), vs = value.stride(0);
  const int64_t kbs = k_cache.stride(0), vbs = v_cache.stride(0);
  const int64_t ts = k_cache.stride(1), hs = k_cache.stride(2);
  // a token's heads adjacent in the cache (token-major): one copy of KVH * D per token
  const int64_t run = hs == D ? KVH * D : D, runs = hs == D ? 1 : KVH;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(bp[t] >= 0 && bp[t] < N && op[t] >= 0 && op[t] < bs, "write_kv: slot out of range");
    float* kd = kc + bp[t] * kbs + op[t] * ts;
    float* vd = vc + bp[t] * vbs + op[t] * ts;
    for (int64_t h = 0; h < runs; ++h) {
      std::copy(kp + t * ks + h * D, kp + t * ks + h * D + run, kd + h * hs);
      std::copy(vp + t * vs + h * D, vp + t * vs + h * D + run, vd + h * hs);
    }
  }
}

// ---------------------------------------------------------------------------------------
// A whole decode-only step of a Llama-family model (no biases, no q/k norm) after the
// embedding: every layer, then the final norm. The same ops as the Python layers, in the
// same order (the residual add fused into each norm, the MLP on transposed activations up
// to column_mlp_max_rows rows), without the ~30 Python-level dispatches per layer that cost
// more than a small decode batch's arithmetic on CPU (~1.4 ms of a 4-row step here).
//   x [B, hidden] (embeddings; consumed), positions [B] int64, cos_sin [P, D]
//   layer_weights: per layer input_norm, qkv [(H + 2 KVH) D, hidden], o, post_norm,
//   gate_up [2 I, hidden], down [hidden, I]; kv_cache [N, L, 2, bs, KVH, D] (any strides
//   with contiguous rows of D: the engine's is a head-major view)
//   block/offset [B] int64 (the new tokens' slots), block_tables [B, M], seq_lens [B] int32
torch::Tensor decode_step(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_sin,
                          std::vector<torch::Tensor> layer_weights, torch::Tensor final_norm,
                          torch::Tensor kv_cache, torch::Tensor block, torch::Tensor offset,
                          torch::Tensor block_tables, torch::Tensor seq_lens, int64_t H,
                          int64_t KVH, int64_t D, double eps, double scale,
                          int64_t column_mlp_max_rows) {
  using namespace splitserve;
  const int64_t L = kv_cache.size(1), B = x.size(0);
  TORCH_CHECK(static_cast<int64_t>(layer_weights.size()) == 6 * L,
              "decode_step: six weights per layer");
  torch::Tensor residual;
  for (int64_t i = 0; i < L; ++i) {
    const torch::Tensor* w = layer_weights.data() + 6 * i;
    if (i == 0) {  // rms_norm as the fused add-norm with a zero addend (see fused_ops.py)
      residual = x;
      x = torch::zeros_like(residual);
    }
    fused_add_rms_norm_(x, residual, w[0], eps);
    auto qkv = at::linear(x, w[1]);
    rotary_(qkv, positions, cos_sin, H + KVH, D);
    auto layer = kv_cache.select(1, i);
    auto k_cache = layer.select(1, 0), v_cache = layer.select(1, 1);
    auto q = qkv.narrow(1, 0, H * D).view({B, H, D});
    write_kv(qkv.narrow(1, H * D, KVH * D).view({B, KVH, D}),
             qkv.narrow(1, (H + KVH) * D, KVH * D).view({B, KVH, D}), k_cache, v_cache, block,
             offset);
    auto attn = paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale);
    x = at::linear(attn.view({B, H * D}), w[2]);
    fused_add_rms_norm_(x, residual, w[3], eps);
    const int64_t inter = w[5].size(1);
    if (B <= column_mlp_max_rows) {  // as GatedMLP._forward_columns
      auto gate_up_t = at::mm(w[4], x.t());
      auto act_t = silu_and_mul(gate_up_t.view({1, -1})).view({inter, B});
      x = at::mm(w[5], act_t).t().contiguous();
    } else {
      x = at::linear(silu_and_mul(at::linear(x, w[4])), w[5]);
    }
  }
  fused_add_rms_norm_(x, residual, final_norm, eps);
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention (CPU, float32)");
  m.def("paged_prefill", &paged_prefill, "paged prefill attention (CPU, float32, AVX2)");
  m.def("prefill_supported", &prefill_supported, "whether paged_prefill takes these shapes");
  m.def("write_kv", &write_kv, "new tokens' K/V into their (block, offset) cache slots");
  m.def("decode_step", &decode_step, "every layer of a Llama decode-only step, then the norm");
}
