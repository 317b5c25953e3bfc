// Explicit SIMD micro-kernels of the CPU attention (attn_cpu.cpp), one set per ISA level, picked at
// compile time by the compiler's predefined macros: AVX-512 (__AVX512F__, 32 zmm), AVX2 + FMA (16 ymm)
// and a portable fallback (GCC/Clang vector extension, 4 lanes). Register blocks per level were chosen
// from a profile of the real tile shapes (64 query rows x 64 keys x head dim 128; see docs/design.md).
//
// fp32 math only: every product accumulates in fp32, in the order documented per kernel.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace ringattn {
namespace simd {

// ---------------------------------------------------------------------------------------------------------
// One vector of fp32 lanes and the few operations the kernels need.
#if defined(__AVX512F__)
constexpr const char* kIsa = "avx512";
constexpr int kLanes = 16;
using Vec = __m512;
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vset1(float x) { return _mm512_set1_ps(x); }
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
// Register blocks of the broadcast-FMA product: kRows x kCols vectors of accumulators. 8 x 2 (16 zmm)
// measured best on Zen 4 (6 x 4, 12 x 2, 14 x 2 slower), and 8 divides the 64-row tiles.
constexpr int kRows = 8, kCols = 2;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* kIsa = "avx2";
constexpr int kLanes = 8;
using Vec = __m256;
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vset1(float x) { return _mm256_set1_ps(x); }
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
// 4 x 3 = 12 ymm accumulators + 3 loaded B vectors + 1 broadcast fill the 16 ymm registers (measured
// 5-15% faster than 6 x 2, 3 x 4 spills).
constexpr int kRows = 4, kCols = 3;
#else
constexpr const char* kIsa = "generic";
constexpr int kLanes = 4;  // 128-bit vectors: SSE2 on any x86-64, NEON on Arm
typedef float Vec __attribute__((vector_size(16)));
inline Vec vload(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }
inline Vec vset1(float x) { return Vec{} + x; }
inline Vec vzero() { return Vec{}; }
inline Vec vfma(Vec a, Vec b, Vec c) { return a * b + c; }
inline Vec vadd(Vec a, Vec b) { return a + b; }
constexpr int kRows = 3, kCols = 4;  // measured best of 4 x 2, 6 x 2, 4 x 3, 3 x 4, 2 x 4 (SSE2)
#endif

// ---------------------------------------------------------------------------------------------------------
// Broadcast-FMA product c[i][j] (op)= sum_t a[i * a_rs + t * a_cs] * b[t * ldb + j]: each B row of a
// block is loaded once for R rows, each A element broadcast once for C vectors. Every (i, j) sums its
// terms in t order in one fp32 chain.
enum class Mode {
  kStore,       // c = product
  kAccumulate,  // c = c + a0 b0 + a1 b1 + ... (the chain starts from c)
  kAddAfter,    // c = c + (a0 b0 + a1 b1 + ...) (the product is summed from zero, then added)
};

template <int R, int C, Mode M>
inline void gemm_block(float* c, int64_t ldc, const float* a, int64_t a_rs, int64_t a_cs, int depth, const float* b,
                       int64_t ldb) {
  Vec acc[R][C];
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < C; ++j) acc[i][j] = M == Mode::kAccumulate ? vload(c + i * ldc + j * kLanes) : vzero();
  }
  for (int t = 0; t < depth; ++t) {
    const float* brow = b + t * ldb;
    Vec bv[C];
    for (int j = 0; j < C; ++j) bv[j] = vload(brow + j * kLanes);
    for (int i = 0; i < R; ++i) {
      const Vec ai = vset1(a[i * a_rs + t * a_cs]);
      for (int j = 0; j < C; ++j) acc[i][j] = vfma(ai, bv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < C; ++j) {
      float* dst = c + i * ldc + j * kLanes;
      vstore(dst, M == Mode::kAddAfter ? vadd(vload(dst), acc[i][j]) : acc[i][j]);
    }
  }
}

// Columns narrower than one vector, one at a time (odd head dims only).
template <Mode M>
inline void gemm_scalar(float* c, int64_t ldc, int rows, int cols, const float* a, int64_t a_rs, int64_t a_cs,
                        int depth, const float* b, int64_t ldb) {
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < cols; ++j) {
      float s = M == Mode::kAccumulate ? c[i * ldc + j] : 0.0f;
      for (int t = 0; t < depth; ++t) s += a[i * a_rs + t * a_cs] * b[t * ldb + j];
      c[i * ldc + j] = M == Mode::kAddAfter ? c[i * ldc + j] + s : s;
    }
  }
}

// All rows of one column block of C vectors: full register blocks, then one block of the leftover rows.
template <int C, Mode M, int R = kRows - 1>
inline void gemm_tail_rows(int rows, float* c, int64_t ldc, const float* a, int64_t a_rs, int64_t a_cs, int depth,
                           const float* b, int64_t ldb) {
  if constexpr (R >= 1) {
    if (rows == R) return gemm_block<R, C, M>(c, ldc, a, a_rs, a_cs, depth, b, ldb);
    gemm_tail_rows<C, M, R - 1>(rows, c, ldc, a, a_rs, a_cs, depth, b, ldb);
  }
}

template <int C, Mode M>
inline void gemm_rows(float* c, int64_t ldc, int rows, const float* a, int64_t a_rs, int64_t a_cs, int depth,
                      const float* b, int64_t ldb) {
  int r = 0;
  for (; r + kRows <= rows; r += kRows) {
    gemm_block<kRows, C, M>(c + r * ldc, ldc, a + r * a_rs, a_rs, a_cs, depth, b, ldb);
  }
  if (r < rows) gemm_tail_rows<C, M>(rows - r, c + r * ldc, ldc, a + r * a_rs, a_rs, a_cs, depth, b, ldb);
}

template <Mode M, int C = kCols - 1>
inline void gemm_tail_cols(int n, float* c, int64_t ldc, int rows, const float* a, int64_t a_rs, int64_t a_cs,
                           int depth, const float* b, int64_t ldb) {
  if constexpr (C >= 1) {
    if (n == C) return gemm_rows<C, M>(c, ldc, rows, a, a_rs, a_cs, depth, b, ldb);
    gemm_tail_cols<M, C - 1>(n, c, ldc, rows, a, a_rs, a_cs, depth, b, ldb);
  }
}

// c[i][j] (op)= sum_t a[i * a_rs + t * a_cs] * b[t * ldb + j] for i < rows, j < cols, t < depth.
template <Mode M>
inline void gemm(float* c, int64_t ldc, int rows, int64_t cols, const float* a, int64_t a_rs, int64_t a_cs,
                 int depth, const float* b, int64_t ldb) {
  int64_t j = 0;
  for (; j + kCols * kLanes <= cols; j += kCols * kLanes) {
    gemm_rows<kCols, M>(c + j, ldc, rows, a, a_rs, a_cs, depth, b + j, ldb);
  }
  if (j + kLanes <= cols) {  // the leftover whole vectors in one block
    const int n = static_cast<int>((cols - j) / kLanes);
    gemm_tail_cols<M>(n, c + j, ldc, rows, a, a_rs, a_cs, depth, b + j, ldb);
    j += n * kLanes;
  }
  if (j < cols) gemm_scalar<M>(c + j, ldc, rows, static_cast<int>(cols - j), a, a_rs, a_cs, depth, b + j, ldb);
}

// ---------------------------------------------------------------------------------------------------------
// bf16 products with vdpbf16ps (AVX512_BF16): operands are bf16 pairs packed in one 32-bit word along the
// reduction dimension; each instruction adds a[2p] b[2p] + a[2p+1] b[2p+1] to 16 fp32 lanes.
// c[i][j] (op)= sum_p pair(a[i * a_rs + p * a_ps]) . pair(b[p * ldb + j]) for i < rows, j < cols,
// p < pairs (a, b and their strides in 32-bit words; bf16 products are exact in fp32, the sums fp32).
#if defined(__AVX512BF16__)
constexpr bool kHasBf16Dot = true;
constexpr int kBf16Rows = 4, kBf16Cols = 4;  // 16 zmm accumulators; measured 3-8% faster than 8 x 2, 6 x 4, 12 x 2

template <int R, int C, Mode M>
inline void gemm_bf16_block(float* c, int64_t ldc, const uint32_t* a, int64_t a_rs, int64_t a_ps, int pairs,
                            const uint32_t* b, int64_t ldb) {
  __m512 acc[R][C];
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < C; ++j) acc[i][j] = M == Mode::kAccumulate ? _mm512_loadu_ps(c + i * ldc + j * 16) : vzero();
  }
  for (int p = 0; p < pairs; ++p) {
    const uint32_t* brow = b + p * ldb;
    __m512bh bv[C];
    for (int j = 0; j < C; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(brow + j * 16);
    for (int i = 0; i < R; ++i) {
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i * a_rs + p * a_ps]));
      for (int j = 0; j < C; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], ai, bv[j]);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < C; ++j) {
      float* dst = c + i * ldc + j * 16;
      _mm512_storeu_ps(dst, M == Mode::kAddAfter ? _mm512_add_ps(_mm512_loadu_ps(dst), acc[i][j]) : acc[i][j]);
    }
  }
}

template <int C, Mode M, int R = kBf16Rows - 1>
inline void gemm_bf16_tail_rows(int rows, float* c, int64_t ldc, const uint32_t* a, int64_t a_rs, int64_t a_ps,
                                int pairs, const uint32_t* b, int64_t ldb) {
  if constexpr (R >= 1) {
    if (rows == R) return gemm_bf16_block<R, C, M>(c, ldc, a, a_rs, a_ps, pairs, b, ldb);
    gemm_bf16_tail_rows<C, M, R - 1>(rows, c, ldc, a, a_rs, a_ps, pairs, b, ldb);
  }
}

template <int C, Mode M>
inline void gemm_bf16_rows(float* c, int64_t ldc, int rows, const uint32_t* a, int64_t a_rs, int64_t a_ps, int pairs,
                           const uint32_t* b, int64_t ldb) {
  int r = 0;
  for (; r + kBf16Rows <= rows; r += kBf16Rows) {
    gemm_bf16_block<kBf16Rows, C, M>(c + r * ldc, ldc, a + r * a_rs, a_rs, a_ps, pairs, b, ldb);
  }
  if (r < rows) gemm_bf16_tail_rows<C, M>(rows - r, c + r * ldc, ldc, a + r * a_rs, a_rs, a_ps, pairs, b, ldb);
}
#else
constexpr bool kHasBf16Dot = false;
#endif

inline float bf16_bits_to_float(uint32_t h) {
  const uint32_t bits = h << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Columns narrower than one vector (and every column where vdpbf16ps is missing), one at a time, in the
// same order: each pair's two products, then the running sum.
template <Mode M>
inline void gemm_bf16_scalar(float* c, int64_t ldc, int rows, int cols, const uint32_t* a, int64_t a_rs,
                             int64_t a_ps, int pairs, const uint32_t* b, int64_t ldb) {
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < cols; ++j) {
      float s = M == Mode::kAccumulate ? c[i * ldc + j] : 0.0f;
      for (int p = 0; p < pairs; ++p) {
        const uint32_t x = a[i * a_rs + p * a_ps], y = b[p * ldb + j];
        s += bf16_bits_to_float(x & 0xFFFF) * bf16_bits_to_float(y & 0xFFFF) +
             bf16_bits_to_float(x >> 16) * bf16_bits_to_float(y >> 16);
      }
      c[i * ldc + j] = M == Mode::kAddAfter ? c[i * ldc + j] + s : s;
    }
  }
}

template <Mode M>
inline void gemm_bf16(float* c, int64_t ldc, int rows, int64_t cols, const uint32_t* a, int64_t a_rs, int64_t a_ps,
                      int pairs, const uint32_t* b, int64_t ldb) {
  int64_t j = 0;
#if defined(__AVX512BF16__)
  for (; j + kBf16Cols * 16 <= cols; j += kBf16Cols * 16) {
    gemm_bf16_rows<kBf16Cols, M>(c + j, ldc, rows, a, a_rs, a_ps, pairs, b + j, ldb);
  }
  for (; j + 16 <= cols; j += 16) gemm_bf16_rows<1, M>(c + j, ldc, rows, a, a_rs, a_ps, pairs, b + j, ldb);
#endif
  if (j < cols) gemm_bf16_scalar<M>(c + j, ldc, rows, static_cast<int>(cols - j), a, a_rs, a_ps, pairs, b + j, ldb);
}

// fp32 -> bf16, round to nearest even (NaN stays NaN), as vcvtneps2bf16 does.
inline uint32_t bf16_round(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// dst[i][j] = bf16(src[i][j]) for i < rows, j < cols (dst rows of ldd bf16).
inline void to_bf16_rows(const float* src, int64_t lds, int rows, int cols, uint16_t* dst, int64_t ldd) {
  for (int i = 0; i < rows; ++i) {
    int j = 0;
#if defined(__AVX512BF16__)
    for (; j + 16 <= cols; j += 16) {
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i * lds + j));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i * ldd + j), (__m256i)h);
    }
#endif
    for (; j < cols; ++j) dst[i * ldd + j] = static_cast<uint16_t>(bf16_round(src[i * lds + j]));
  }
}

// Pairs of rows: dst[p][j] = bf16(src[2p][j]) | bf16(src[2p + 1][j]) << 16 for p < ceil(rows / 2), j < cols;
// a row past `rows` reads as 0 (dst rows of ldd words). The layout vdpbf16ps takes for a reduction over rows.
inline void to_bf16_row_pairs(const float* src, int64_t lds, int rows, int cols, uint32_t* dst, int64_t ldd) {
  for (int p = 0; 2 * p < rows; ++p) {
    const float* lo = src + 2 * p * lds;
    const bool has_hi = 2 * p + 1 < rows;
    int j = 0;
#if defined(__AVX512BF16__)
    for (; j + 16 <= cols; j += 16) {
      const __m512 hi_f = has_hi ? _mm512_loadu_ps(lo + lds + j) : _mm512_setzero_ps();
      const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(lo + j)));
      const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi_f));
      _mm512_storeu_si512(dst + p * ldd + j, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
    }
#endif
    for (; j < cols; ++j) dst[p * ldd + j] = bf16_round(lo[j]) | (has_hi ? bf16_round(lo[lds + j]) << 16 : 0u);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Dot-product blocks for dP = dO V^T: each (row, column) pair is summed in kLanes independent lanes
// along the depth and the lanes are then reduced pairwise, so its rounding error is that of a blocked
// dot product rather than of one length-D chain (dP - delta cancels to ~0 in easy rows, where a chain's
// error would dominate). The kDotRows x kDotCols accumulators (kLanes of them) reduce into one vector.
// Profiled (bench/cpu_simd_profile.cpp): AVX-512 4 x 4 at ~100 GFLOP/s, AVX2 2 x 4 at ~65 (4 x 2: ~40).
// Vec is a GCC vector type in every variant (the intrinsic types are), so __builtin_shufflevector works on it.
#if defined(__AVX512F__)
constexpr int kDotRows = 4, kDotCols = 4;  // 16 zmm accumulators reduce into one vector of 16 sums
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kDotRows = 2, kDotCols = 4;  // 8 ymm accumulators + 6 loaded (16 would spill)
#else
constexpr int kDotRows = 2, kDotCols = 2;
#endif
static_assert(kDotRows * kDotCols == kLanes, "the dot block reduces into one vector");

// out[k] = sum of the lanes of v[k]: each stage adds the two halves of every vector's partials,
// packing two vectors' results into one register.
inline Vec transpose_sum(const Vec (&v)[kLanes]) {
#if defined(__AVX512F__)
  Vec w[8], x[4], y[2];
  for (int k = 0; k < 8; ++k) {
    w[k] = __builtin_shufflevector(v[2 * k], v[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * k], v[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                   30, 31);
  }
  for (int k = 0; k < 4; ++k) {
    x[k] = __builtin_shufflevector(w[2 * k], w[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(w[2 * k], w[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int k = 0; k < 2; ++k) {
    y[k] = __builtin_shufflevector(x[2 * k], x[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(x[2 * k], x[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(y[0], y[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(y[0], y[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#elif defined(__AVX2__) && defined(__FMA__)
  Vec w[4], x[2];
  for (int k = 0; k < 4; ++k) {
    w[k] = __builtin_shufflevector(v[2 * k], v[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(v[2 * k], v[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  }
  for (int k = 0; k < 2; ++k) {
    x[k] = __builtin_shufflevector(w[2 * k], w[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(w[2 * k], w[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  }
  return __builtin_shufflevector(x[0], x[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(x[0], x[1], 1, 3, 5, 7, 9, 11, 13, 15);
#else
  const Vec w0 = __builtin_shufflevector(v[0], v[1], 0, 1, 4, 5) + __builtin_shufflevector(v[0], v[1], 2, 3, 6, 7);
  const Vec w1 = __builtin_shufflevector(v[2], v[3], 0, 1, 4, 5) + __builtin_shufflevector(v[2], v[3], 2, 3, 6, 7);
  return __builtin_shufflevector(w0, w1, 0, 2, 4, 6) + __builtin_shufflevector(w0, w1, 1, 3, 5, 7);
#endif
}

// s[i][j] = sum_d a[i * lda + d] * b[j * ldb + d] for i < kDotRows, j < kDotCols (s rows of lds).
// Lane sets per pair: the generic variant's 4-lane vectors take 4 sets, so every variant's per-lane chains
// are at most as long as 16 lanes' (the sets are summed pairwise before the reduction).
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
constexpr int kDotSplit = 1;
#else
constexpr int kDotSplit = 4;
#endif
constexpr int kDotStep = kLanes * kDotSplit;  // depth per step

inline void dot_block_steps(Vec (&acc)[kDotSplit][kDotRows * kDotCols], const float* a, int64_t lda, const float* b,
                            int64_t ldb, int depth) {
  constexpr int R = kDotRows, C = kDotCols;
  for (int d = 0; d + kDotStep <= depth; d += kDotStep) {
    for (int k = 0; k < kDotSplit; ++k) {
      Vec av[R], bv[C];
      for (int i = 0; i < R; ++i) av[i] = vload(a + i * lda + d + k * kLanes);
      for (int j = 0; j < C; ++j) bv[j] = vload(b + j * ldb + d + k * kLanes);
      for (int i = 0; i < R; ++i) {
        for (int j = 0; j < C; ++j) acc[k][i * C + j] = vfma(av[i], bv[j], acc[k][i * C + j]);
      }
    }
  }
}

inline void dot_block(const float* a, int64_t lda, const float* b, int64_t ldb, int depth, float* s, int64_t lds) {
  constexpr int R = kDotRows, C = kDotCols;
  Vec acc[kDotSplit][R * C];
  for (auto& set : acc) {
    for (auto& x : set) x = vzero();
  }
  dot_block_steps(acc, a, lda, b, ldb, depth);
  const int d = depth / kDotStep * kDotStep;
  if (d < depth) {  // the last depth % kDotStep terms, zero padded
    float pad[R + C][kDotStep] = {};
    for (int i = 0; i < R; ++i) std::copy(a + i * lda + d, a + i * lda + depth, pad[i]);
    for (int j = 0; j < C; ++j) std::copy(b + j * ldb + d, b + j * ldb + depth, pad[R + j]);
    dot_block_steps(acc, pad[0], kDotStep, pad[R], kDotStep, kDotStep);
  }
  for (int w = kDotSplit; w > 1; w /= 2) {
    for (int k = 0; k < w / 2; ++k) {
      for (int x = 0; x < R * C; ++x) acc[k][x] = vadd(acc[k][x], acc[k + w / 2][x]);
    }
  }
  const Vec sums = transpose_sum(acc[0]);
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < C; ++j) s[i * lds + j] = sums[i * C + j];
  }
}

// s[i][j] = sum_d a[i][d] * b[j][d] for i < rows, j < cols (a multiple of kDotCols), with dot_block's
// accuracy. Rows past `rows` read a's padding: callers give a with rows rounded up to kDotRows (the
// results of those rows land in s's padding rows, so s has them too).
inline void matmul_abt_dot(const float* a, int64_t lda, int rows, const float* b, int64_t ldb, int cols, int depth,
                           float* s, int64_t lds) {
  for (int r = 0; r < rows; r += kDotRows) {
    for (int j = 0; j < cols; j += kDotCols) dot_block(a + r * lda, lda, b + j * ldb, ldb, depth, s + r * lds + j, lds);
  }
}

#if defined(__AVX512BF16__)
// dot_block over bf16 pairs (a, b rows of `words` 32-bit words, strides in words): s[i][j] = sum_d a[i][d]
// b[j][d], 16 lanes each summing its pairs (two exact products per step) and then reduced as dot_block
// does: the same chain length per lane as the fp32 dot_block, so the same accuracy for dP - delta.
inline void dot_block_bf16(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int words, float* s,
                           int64_t lds) {
  constexpr int R = kDotRows, C = kDotCols;
  static_assert(R * C == 16, "one zmm of sums");
  Vec acc[R * C];
  for (auto& x : acc) x = vzero();
  for (int w = 0; w < words; w += 16) {
    const int n = std::min(16, words - w);
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    __m512bh av[R], bv[C];
    for (int i = 0; i < R; ++i) av[i] = (__m512bh)_mm512_maskz_loadu_epi32(m, a + i * lda + w);
    for (int j = 0; j < C; ++j) bv[j] = (__m512bh)_mm512_maskz_loadu_epi32(m, b + j * ldb + w);
    for (int i = 0; i < R; ++i) {
      for (int j = 0; j < C; ++j) acc[i * C + j] = _mm512_dpbf16_ps(acc[i * C + j], av[i], bv[j]);
    }
  }
  const Vec sums = transpose_sum(acc);
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < C; ++j) s[i * lds + j] = sums[i * C + j];
  }
}

// matmul_abt_dot over bf16 pairs (rows past `rows` read a's padding, as there).
inline void matmul_abt_dot_bf16(const uint32_t* a, int64_t lda, int rows, const uint32_t* b, int64_t ldb, int cols,
                                int words, float* s, int64_t lds) {
  for (int r = 0; r < rows; r += kDotRows) {
    for (int j = 0; j < cols; j += kDotCols) {
      dot_block_bf16(a + r * lda, lda, b + j * ldb, ldb, words, s + r * lds + j, lds);
    }
  }
}
#else
// Without vdpbf16ps (the kernels then take the fp32 path; this keeps the variant complete): pair by pair.
inline void matmul_abt_dot_bf16(const uint32_t* a, int64_t lda, int rows, const uint32_t* b, int64_t ldb, int cols,
                                int words, float* s, int64_t lds) {
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < cols; ++j) {
      float sum = 0.0f;
      for (int w = 0; w < words; ++w) {
        const uint32_t x = a[i * lda + w], y = b[j * ldb + w];
        sum += bf16_bits_to_float(x & 0xFFFF) * bf16_bits_to_float(y & 0xFFFF) +
               bf16_bits_to_float(x >> 16) * bf16_bits_to_float(y >> 16);
      }
      s[i * lds + j] = sum;
    }
  }
}
#endif

// ---------------------------------------------------------------------------------------------------------
// In place 2^x for a run of floats; x < -126 (including -inf) gives exactly 0 and NaN stays NaN.
// Range-reduced to |f| <= 1/2 and a degree-7 Taylor polynomial: relative error below 1e-7.
constexpr float kLn2f = 0.693147180559945309f;

inline float exp2_one(float x) {
  const float xi = std::min(std::max(x, -127.0f), 127.0f);  // NaN stays NaN (so do f and poly)
  // round to nearest even by the 1.5 * 2^23 trick (|xi| <= 127; a libm call without SSE4.1)
  const float k = (xi + 12582912.0f) - 12582912.0f;
  const float f = (xi - k) * kLn2f;
  float poly = 1.0f / 5040.0f;
  poly = poly * f + 1.0f / 720.0f;
  poly = poly * f + 1.0f / 120.0f;
  poly = poly * f + 1.0f / 24.0f;
  poly = poly * f + 1.0f / 6.0f;
  poly = poly * f + 0.5f;
  poly = poly * f + 1.0f;
  poly = poly * f + 1.0f;
  const float k_int = k == k ? k : 0.0f;  // converting NaN to int is undefined
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(k_int) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return x < -126.0f ? 0.0f : poly * two_k;
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// exp2_one on one vector (the same steps; the polynomial's FMAs are fused).
inline Vec exp2_vec(Vec x) {
#if defined(__AVX512F__)
  // The maskz forms with a full mask: the plain ones pass _mm512_undefined_ps, which GCC 12 reports as
  // maybe-uninitialized under -Wall.
  constexpr __mmask16 all = 0xFFFF;
  const Vec xi = _mm512_maskz_min_ps(all, vset1(127.0f), _mm512_maskz_max_ps(all, vset1(-127.0f), x));  // NaN stays
  const Vec k = _mm512_maskz_roundscale_ps(all, xi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec f = _mm512_mul_ps(_mm512_sub_ps(xi, k), vset1(kLn2f));
#else
  const Vec xi = _mm256_min_ps(vset1(127.0f), _mm256_max_ps(vset1(-127.0f), x));
  const Vec k = _mm256_round_ps(xi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec f = _mm256_mul_ps(_mm256_sub_ps(xi, k), vset1(kLn2f));
#endif
  Vec poly = vset1(1.0f / 5040.0f);
  poly = vfma(poly, f, vset1(1.0f / 720.0f));
  poly = vfma(poly, f, vset1(1.0f / 120.0f));
  poly = vfma(poly, f, vset1(1.0f / 24.0f));
  poly = vfma(poly, f, vset1(1.0f / 6.0f));
  poly = vfma(poly, f, vset1(0.5f));
  poly = vfma(poly, f, vset1(1.0f));
  poly = vfma(poly, f, vset1(1.0f));
#if defined(__AVX512F__)
  // NaN converts to INT_MIN: two_k is then some finite power (or 0) and poly (NaN) makes the result NaN
  const __m512i biased = _mm512_add_epi32(_mm512_maskz_cvtps_epi32(all, k), _mm512_set1_epi32(127));
  const __m512i e = _mm512_maskz_slli_epi32(all, biased, 23);
  const Vec y = _mm512_mul_ps(poly, _mm512_castsi512_ps(e));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, vset1(-126.0f), _CMP_LT_OQ), y, vzero());
#else
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  const Vec y = _mm256_mul_ps(poly, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, vset1(-126.0f), _CMP_LT_OQ), y);
#endif
}
#endif

inline void exp2_inplace(float* x, int n) {
  int i = 0;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  for (; i + kLanes <= n; i += kLanes) vstore(x + i, exp2_vec(vload(x + i)));
#endif
  for (; i < n; ++i) x[i] = exp2_one(x[i]);
}

// Softmax row helpers of the forward: one pass each instead of scalar chains (a chain of 64 dependent
// max or add operations per row costs about as much as the row's share of a product).

// The maximum of init and x[0..n), NaN elements skipped (as std::max(m, x) skips a NaN x).
inline float row_max(const float* x, int n, float init) {
  int i = 0;
  float m = init;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  if (n >= kLanes) {
    Vec acc = vset1(init);
    for (; i + kLanes <= n; i += kLanes) {
#if defined(__AVX512F__)
      acc = _mm512_max_ps(vload(x + i), acc);  // (x > acc) ? x : acc: a NaN x keeps acc
#else
      acc = _mm256_max_ps(vload(x + i), acc);
#endif
    }
    alignas(64) float lanes[kLanes];
    vstore(lanes, acc);
    for (float v : lanes) m = std::max(m, v);
  }
#endif
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// x[j] = 2^((x[j] - m) * log2e) in place (exp2_inplace's function); returns their sum, summed in lanes.
inline float exp_shift_sum(float* x, int n, float m, float log2e) {
  int i = 0;
  float sum = 0.0f;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  if (n >= kLanes) {
    Vec acc = vzero();
    const Vec mv = vset1(m), l2 = vset1(log2e);
    for (; i + kLanes <= n; i += kLanes) {
#if defined(__AVX512F__)
      const Vec e = exp2_vec(_mm512_mul_ps(_mm512_sub_ps(vload(x + i), mv), l2));
#else
      const Vec e = exp2_vec(_mm256_mul_ps(_mm256_sub_ps(vload(x + i), mv), l2));
#endif
      vstore(x + i, e);
      acc = vadd(acc, e);
    }
    alignas(64) float lanes[kLanes];
    vstore(lanes, acc);
    for (float v : lanes) sum += v;
  }
#endif
  for (; i < n; ++i) {
    x[i] = exp2_one((x[i] - m) * log2e);
    sum += x[i];
  }
  return sum;
}

}  // namespace simd
}  // namespace ringattn
