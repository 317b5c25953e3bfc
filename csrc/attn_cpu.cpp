// CPU block attention, forward and backward, with fused RoPE (see attn_cpu.h for the contract).
//
// Each call first stages its operands once into fp32 scratch owned by the call (Q and K rotated;
// K also as packed transposed key tiles, so the score loops run over keys with unit stride), then
// runs flash-attention tiles over worker threads. Staging reads any (B, S, H) strides, so views need no copy, and rotates
// each (batch, token) row for all heads with one cos/sin table. The inner loops are written so the
// compiler vectorises them: every innermost loop runs over a contiguous, fixed-width run of floats.
//
// This file is compiled once per ISA variant (CMakeLists.txt): RINGATTN_CPU_NS names the variant's
// namespace and RINGATTN_CPU_VARIANT_NAME the variant, and the variant's -m flags decide what the
// compiler (and cpu_simd.h, by the predefined macros) emits. Everything this file and the project
// headers below define lives in that namespace. An inline function the compiler keeps out of line is
// emitted in every object that uses it and the linker keeps one copy; without the namespace, the
// AVX-512 variant's copy of a helper could serve the generic kernels on a CPU without AVX-512.
#include "attn_cpu.h"  // AttnParams, View, CpuVariant: the types every variant shares with the dispatcher

// Standard and intrinsic headers at global scope first: the project headers include them again inside
// the variant's namespace, where their include guards make that a no-op.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#ifndef RINGATTN_CPU_NS  // a plain compile of this file is the generic variant
#define RINGATTN_CPU_NS ringattn_cpu_generic
#define RINGATTN_CPU_VARIANT_NAME "generic"
#endif

namespace RINGATTN_CPU_NS {
namespace ringattn {
using ::ringattn::AttnParams;
using ::ringattn::CpuVariant;
using ::ringattn::View;

// The standard library's templates are instantiated in every object that uses them and merged the same
// way, so std::vector<float>'s members compiled for AVX-512 could serve the generic kernels too. Within
// this file `std::vector` names a vector over an allocator of this variant's own, which makes every
// vector member this variant's own function; `std::` finds everything else in ::std.
template <class T>
struct VariantAllocator : ::std::allocator<T> {
  template <class U>
  struct rebind {
    using other = VariantAllocator<U>;
  };
  VariantAllocator() = default;
  template <class U>
  VariantAllocator(const VariantAllocator<U>&) noexcept {}
};
namespace std {
using namespace ::std;
template <class T>
using vector = ::std::vector<T, VariantAllocator<T>>;
}  // namespace std
}  // namespace ringattn

#include "attn_math.h"
#include "cpu_simd.h"

namespace ringattn {
namespace {

constexpr int kBlockQ = 64;  // query rows per tile
constexpr int kBlockK = 64;  // key columns per tile

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs fn(i) for i in [0, n) on up to `threads` threads (the caller is one of them). Exception-safe:
// every started thread is joined (a joinable std::thread destroyed during unwinding aborts the
// process), the first exception is rethrown in the caller, and if the system refuses more threads
// the ones already running finish the work.
template <class F>
void parallel_for(int64_t n, int threads, const F& fn) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  if (workers == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&]() {
    try {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next.store(n);  // the other workers stop taking items
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  try {
    for (int64_t t = 1; t < workers; ++t) pool.emplace_back(work);
  } catch (const std::system_error&) {
    // fewer threads than asked for: the caller and the threads already started do the rest
  }
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

// IEEE half -> float, exact (subnormals, infinities and NaN payloads included).
float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  return bits_to_float(sign | float_to_bits(static_cast<float>(mantissa) * 5.9604644775390625e-8f));  // m * 2^-24
}

// float -> IEEE half, rounded to nearest even as F16C's vcvtps2ph (and torch) round; NaN stays NaN.
uint16_t float_to_half(float f) {
  const uint32_t x = float_to_bits(f), ax = x & 0x7fffffffu;
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00u | ((ax >> 13) & 0x3ffu) : 0x7c00u);
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // 65520 and above round to infinity
  if (ax >= 0x38800000u) {  // a normal half: rebias the exponent, round the 13 dropped bits (ties to even)
    return sign | static_cast<uint16_t>((ax + 0xfffu + ((ax >> 13) & 1u) - 0x38000000u) >> 13);
  }
  // Subnormal or zero: adding 0.5 leaves float ulps of 2^-24, the half's subnormal step, so the
  // float addition does the rounding; 0x400 (a carry into the exponent) is the smallest normal.
  return sign | static_cast<uint16_t>(float_to_bits(bits_to_float(ax) + 0.5f) - 0x3f000000u);
}

// One (B, S, H) row of n elements of `dtype` to fp32, and back. fp16 converts with F16C in the variants
// that have it (8 lanes at a time), in software elsewhere.
void load_row(const View& view, int dtype, int64_t b, int64_t s, int64_t h, int64_t n, float* dst) {
  const int64_t offset = b * view.sb + s * view.ss + h * view.sh;
  if (dtype == kBFloat16) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(view.ptr) + offset;
    for (int64_t d = 0; d < n; ++d) dst[d] = bf16_to_float(src[d]);
  } else if (dtype == kFloat16) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(view.ptr) + offset;
    int64_t d = 0;
#ifdef __F16C__
    for (; d + 8 <= n; d += 8) {
      _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d))));
    }
#endif
    for (; d < n; ++d) dst[d] = half_to_float(src[d]);
  } else {
    const float* src = reinterpret_cast<const float*>(view.ptr) + offset;
    for (int64_t d = 0; d < n; ++d) dst[d] = src[d];
  }
}

void store_row(const View& view, int dtype, int64_t b, int64_t s, int64_t h, int64_t n, const float* src) {
  const int64_t offset = b * view.sb + s * view.ss + h * view.sh;
  if (dtype == kBFloat16) {
    uint16_t* dst = reinterpret_cast<uint16_t*>(view.ptr) + offset;
    for (int64_t d = 0; d < n; ++d) dst[d] = float_to_bf16(src[d]);
  } else if (dtype == kFloat16) {
    uint16_t* dst = reinterpret_cast<uint16_t*>(view.ptr) + offset;
    int64_t d = 0;
#ifdef __F16C__
    for (; d + 8 <= n; d += 8) {
      const __m128i half = _mm256_cvtps_ph(_mm256_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d), half);
    }
#endif
    for (; d < n; ++d) dst[d] = float_to_half(src[d]);
  } else {
    float* dst = reinterpret_cast<float*>(view.ptr) + offset;
    for (int64_t d = 0; d < n; ++d) dst[d] = src[d];
  }
}

// The products and exp2 run in the explicit SIMD micro-kernels of cpu_simd.h (one set per ISA level).
void exp2_inplace(float* x, int n) { simd::exp2_inplace(x, n); }

// s[r][j] = sum_d a[r][d] * bt[d][j] for r < rows, j < kBlockK; a has rows of `lda`, bt rows of `ldb`.
void matmul_abt(const float* a, int64_t lda, int rows, const float* bt, int64_t ldb, int64_t depth, float* s) {
  simd::gemm<simd::Mode::kStore>(s, kBlockK, rows, kBlockK, a, lda, 1, static_cast<int>(depth), bt, ldb);
}

// s[r][j] = sum_d a[r][d] * b[j][d] for r < rows, j < kBlockK, each a blocked dot product (dP = dO V^T,
// whose difference dP - delta cancels to ~0 in easy rows). Rows past `rows` read a's padding: callers
// give a with at least round_up(rows, 4) rows.
static_assert(simd::kDotRows <= 4 && kBlockK % simd::kDotCols == 0, "dout is staged with 3 padding rows");
void matmul_abt_dot(const float* a, int64_t lda, int rows, const float* b, int64_t ldb, int64_t depth, float* s) {
  simd::matmul_abt_dot(a, lda, rows, b, ldb, kBlockK, static_cast<int>(depth), s, kBlockK);
}

// acc[r][d] += sum_t w(r, t) * x[t][d] for r < rows, t < inner, d < width, where
// w(r, t) = w[r * w_rs + t * w_cs]; acc rows have stride lda, x rows stride ldx.
void accumulate_wx(float* acc, int64_t lda, int rows, const float* w, int64_t w_rs, int64_t w_cs,
                   int inner, const float* x, int64_t ldx, int64_t width) {
  simd::gemm<simd::Mode::kAccumulate>(acc, lda, rows, width, w, w_rs, w_cs, inner, x, ldx);
}

// dst[r][d] += sum_t w(r, t) * x[t][d] (rows x D, all rows of stride D): the product is summed from
// zero and then added, so sums over many tiles are blocked, not one long fp32 chain.
void add_product(float* dst, int rows, int64_t D, const float* w, int64_t w_rs, int64_t w_cs, int inner,
                 const float* x) {
  simd::gemm<simd::Mode::kAddAfter>(dst, D, rows, D, w, w_rs, w_cs, inner, x, D);
}

// Per-tile summary of the indices and documents of a run of rows: for query tiles the aligned
// indices of the rows inside a document (the others see nothing), for key tiles every row's index.
struct TileInfo {
  int64_t lo, hi;            // smallest and largest index
  int64_t min_doc, max_doc;  // over rows inside a document; min_doc > max_doc when none is
  bool single_doc;           // every row lies in the same document
};

TileInfo tile_info(const int64_t* index, const int64_t* doc, int64_t begin, int64_t end, bool in_doc_only) {
  TileInfo t{INT64_MAX, INT64_MIN, INT64_MAX, INT64_MIN, true};
  for (int64_t i = begin; i < end; ++i) {
    if (!in_doc_only || doc[i] >= 0) {
      t.lo = std::min(t.lo, index[i]);
      t.hi = std::max(t.hi, index[i]);
    }
    if (doc[i] < 0) {
      t.single_doc = false;
      continue;
    }
    t.min_doc = std::min(t.min_doc, doc[i]);
    t.max_doc = std::max(t.max_doc, doc[i]);
  }
  t.single_doc = t.single_doc && t.min_doc == t.max_doc;
  return t;
}

enum class TileMask { kSkip, kFull, kPartial };

// The mask of a (query tile, key tile) pair: nothing visible, everything, or per element.
TileMask classify(const TileInfo& q, const TileInfo& k, const AttnParams& p) {
  const int64_t left = p.window_left, right = p.window_right;
  if (q.min_doc > q.max_doc || k.min_doc > k.max_doc) return TileMask::kSkip;
  if (q.max_doc < k.min_doc || k.max_doc < q.min_doc) return TileMask::kSkip;
  if (p.causal && q.hi < k.lo) return TileMask::kSkip;
  if (left >= 0 && k.hi < q.lo - left) return TileMask::kSkip;
  if (right >= 0 && k.lo > q.hi + right) return TileMask::kSkip;
  const bool docs_full = q.single_doc && k.single_doc && q.min_doc == k.min_doc;
  const bool causal_full = !p.causal || q.lo >= k.hi;
  const bool window_full = (left < 0 || k.lo >= q.hi - left) && (right < 0 || k.hi <= q.lo + right);
  return docs_full && causal_full && window_full ? TileMask::kFull : TileMask::kPartial;
}

// Operands staged in fp32, heads-major so each (batch, head) is one contiguous matrix.
struct Staged {
  int64_t B, Sq, Sk, Hq, Hkv, D, G, Skp;  // Skp: Sk rounded up to whole key tiles (zero padded)
  std::vector<float> q;   // (B, Hq, Sq, D), rotated
  std::vector<float> dout;  // (B, Hq, Sq, D), backward only
  std::vector<float> k;   // (B, Hkv, Skp, D) rotated, backward only
  std::vector<float> kt;  // (B, Hkv, Skp / kBlockK, D, kBlockK) rotated, one packed block per key tile
  std::vector<float> v;   // (B, Hkv, Skp, D)
  std::vector<int64_t> q_aligned, k_index, q_doc, k_doc;  // k_* padded: padding rows have doc -2
  std::vector<TileInfo> q_tiles, k_tiles;
};

void check_params(const AttnParams& p) {
  auto require = [](bool ok, const char* what) {  // append: libstdc++'s own copy, not one compiled here
    if (!ok) throw std::invalid_argument(std::string("ringattn cpu attention: ").append(what));
  };
  require(p.batch >= 0 && p.seqlen_q >= 0 && p.seqlen_k >= 0, "sizes must be >= 0");
  require(p.heads_kv > 0 && p.heads_q % p.heads_kv == 0, "heads_q must be a multiple of heads_kv > 0");
  require(p.head_dim > 0, "head_dim must be > 0");
  require(p.dtype == kFloat32 || p.dtype == kBFloat16 || p.dtype == kFloat16, "dtype must be fp32, bf16 or fp16");
  require(p.q_stride >= 1 && p.k_stride >= 1 && p.q_start >= 0 && p.k_start >= 0,
          "spans need start >= 0 and stride >= 1");
  require(p.cu_seqlens == 0 || p.n_cu >= 1, "cu_seqlens needs at least one entry");
  require(p.k_cu_seqlens == 0 || p.cu_seqlens != 0, "k_cu_seqlens needs cu_seqlens");
  require(p.window_left >= -1 && p.window_right >= -1, "window sides must be >= -1");
  require(p.softcap >= 0.0f, "softcap must be >= 0");
  require(p.dropout_p >= 0.0 && p.dropout_p < 1.0, "dropout_p must be in [0, 1)");
  if (p.rope_mode != kRopeNone) {
    require(p.rope_mode == kRopeExact || p.rope_mode == kRopeHf, "rope_mode must be 0, 1 or 2");
    require(p.rotary_dim >= 2 && p.rotary_dim % 2 == 0 && p.rotary_dim <= p.head_dim,
            "rotary_dim must be even, >= 2 and <= head_dim");
    // An empty side has no rows to rotate, and its (empty) positions tensor may have no address.
    const bool q_rows = p.batch > 0 && p.seqlen_q > 0, k_rows = p.batch > 0 && p.seqlen_k > 0;
    require(p.rope_freqs != 0 && (p.q_positions != 0 || !q_rows) && (p.k_positions != 0 || !k_rows),
            "rope needs freqs and positions");
  }
}

// cos/sin tables of one position, attention factor included.
void rope_table(const AttnParams& p, bool for_k, uint32_t pos, float* c, float* s) {
  const uintptr_t address = for_k && p.k_rope_freqs != 0 ? p.k_rope_freqs : p.rope_freqs;
  const void* freqs = reinterpret_cast<const void*>(address);
  for (int i = 0; i < p.rotary_dim / 2; ++i) {
    const float angle = rope_angle(p.rope_mode, pos, freqs, i);
    c[i] = std::cos(angle) * p.attention_factor;
    s[i] = std::sin(angle) * p.attention_factor;
  }
}

void rotate_row(const AttnParams& p, float* x, const float* c, const float* s, float sign) {
  for (int i = 0; i < p.rotary_dim / 2; ++i) {
    int a, b;
    rope_pair(i, p.rotary_dim, p.interleaved, &a, &b);
    rope_rotate(x[a], x[b], c[i], sign * s[i], &x[a], &x[b]);
  }
}

uint32_t position(uintptr_t positions, int64_t sb, int64_t b, int64_t s) {
  return static_cast<uint32_t>(reinterpret_cast<const int32_t*>(positions)[b * sb + s]);
}

// Stages q (and dout when backward) and k, v.
Staged stage(const AttnParams& p, bool backward) {
  Staged st;
  st.B = p.batch, st.Sq = p.seqlen_q, st.Sk = p.seqlen_k, st.Hq = p.heads_q, st.Hkv = p.heads_kv;
  st.D = p.head_dim, st.G = p.heads_q / p.heads_kv, st.Skp = ceil_div(p.seqlen_k, kBlockK) * kBlockK;
  const int64_t B = st.B, Sq = st.Sq, Sk = st.Sk, Hq = st.Hq, Hkv = st.Hkv, D = st.D, Skp = st.Skp;
  const auto* cu = reinterpret_cast<const int64_t*>(p.cu_seqlens);
  const auto* k_cu = reinterpret_cast<const int64_t*>(p.k_cu_seqlens);

  st.q_aligned.resize(Sq);
  st.q_doc.resize(Sq);
  for (int64_t i = 0; i < Sq; ++i) {
    const int64_t index = p.q_start + p.q_stride * i;
    st.q_doc[i] = document_id(index, cu, p.n_cu);
    st.q_aligned[i] = aligned_index(index, st.q_doc[i], cu, k_cu);
  }
  st.k_doc.assign(Skp, -2);
  st.k_index.resize(Skp);
  for (int64_t j = 0; j < Skp; ++j) {  // padding rows get an index too (ALiBi reads it before the mask)
    st.k_index[j] = p.k_start + p.k_stride * j;
    if (j < Sk) st.k_doc[j] = document_id(st.k_index[j], k_cu != nullptr ? k_cu : cu, p.n_cu);
  }
  for (int64_t i = 0; i < Sq; i += kBlockQ) {
    st.q_tiles.push_back(tile_info(st.q_aligned.data(), st.q_doc.data(), i, std::min(Sq, i + kBlockQ), true));
  }
  for (int64_t j = 0; j < Sk; j += kBlockK) {
    st.k_tiles.push_back(tile_info(st.k_index.data(), st.k_doc.data(), j, std::min(Sk, j + kBlockK), false));
    if (j + kBlockK > Sk) st.k_tiles.back().single_doc = false;  // padding columns need the mask
  }

  st.q.resize(B * Hq * Sq * D);
  if (backward) {
    st.dout.assign(B * Hq * Sq * D + 3 * D, 0.0f);  // + 3 rows: matmul_abt_dot reads rows in fours
    st.k.assign(B * Hkv * Skp * D, 0.0f);
  }
  st.v.assign(B * Hkv * Skp * D, 0.0f);
  st.kt.assign(B * Hkv * D * Skp, 0.0f);

  const bool rope = p.rope_mode != kRopeNone;
  parallel_for(B * Sq, p.num_threads, [&](int64_t row) {
    const int64_t b = row / Sq, s = row % Sq;
    std::vector<float> c(p.rotary_dim / 2), sn(p.rotary_dim / 2);
    if (rope) rope_table(p, false, position(p.q_positions, p.q_positions_sb, b, s), c.data(), sn.data());
    for (int64_t h = 0; h < Hq; ++h) {
      float* dst = st.q.data() + ((b * Hq + h) * Sq + s) * D;
      load_row(p.q, p.dtype, b, s, h, D, dst);
      if (rope) rotate_row(p, dst, c.data(), sn.data(), 1.0f);
      if (backward) load_row(p.dout, p.dtype, b, s, h, D, st.dout.data() + ((b * Hq + h) * Sq + s) * D);
    }
  });
  parallel_for(B * Sk, p.num_threads, [&](int64_t row) {
    const int64_t b = row / Sk, s = row % Sk;
    std::vector<float> c(p.rotary_dim / 2), sn(p.rotary_dim / 2), kr(D), vr(D);
    if (rope) rope_table(p, true, position(p.k_positions, p.k_positions_sb, b, s), c.data(), sn.data());
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t bh = b * Hkv + h;
      load_row(p.k, p.dtype, b, s, h, D, kr.data());
      if (rope) rotate_row(p, kr.data(), c.data(), sn.data(), 1.0f);
      load_row(p.v, p.dtype, b, s, h, D, vr.data());
      // Packed tiles: a tile's D x kBlockK block is contiguous (a plain (D, Skp) layout puts the
      // rows of one tile Skp * 4 bytes apart, which maps them onto a few L1 sets).
      const int64_t packed = (bh * Skp + s / kBlockK * kBlockK) * D + s % kBlockK;
      for (int64_t d = 0; d < D; ++d) st.kt[packed + d * kBlockK] = kr[d];
      if (backward) std::copy(kr.begin(), kr.end(), st.k.data() + (bh * Skp + s) * D);
      std::copy(vr.begin(), vr.end(), st.v.data() + (bh * Skp + s) * D);
    }
  });
  return st;
}

// Sets masked scores of a partially visible tile to `masked`.
template <bool kWindow>
void mask_tile(const Staged& st, const AttnParams& p, int64_t q0, int rows, int64_t k0, float* s, float masked) {
  for (int i = 0; i < rows; ++i) {
    const int64_t a = st.q_aligned[q0 + i], qd = st.q_doc[q0 + i];
    for (int j = 0; j < kBlockK; ++j) {
      const int64_t k = st.k_index[k0 + j];
      bool ok = visible(a, k, qd, st.k_doc[k0 + j], p.causal);
      if (kWindow) ok = ok && in_window(a, k, p.window_left, p.window_right);
      if (!ok) s[i * kBlockK + j] = masked;
    }
  }
}

void apply_mask(const Staged& st, const AttnParams& p, int64_t q0, int rows, int64_t k0, float* s, float masked) {
  if (p.window_left >= 0 || p.window_right >= 0) {
    mask_tile<true>(st, p, q0, rows, k0, s, masked);
  } else {
    mask_tile<false>(st, p, q0, rows, k0, s, masked);
  }
}

// Whether scores go through score_mod (softcap, ALiBi); decided once per call.
bool has_score_mod(const AttnParams& p) { return p.softcap > 0.0f || p.alibi_slopes != 0; }

// ALiBi slope of (batch b, query head h); 0 without ALiBi.
float alibi_slope(const AttnParams& p, int64_t b, int64_t h) {
  if (p.alibi_slopes == 0) return 0.0f;
  return reinterpret_cast<const float*>(p.alibi_slopes)[b * p.alibi_sb + h];
}

// Scaled scores of a tile -> score_mod, in place; grad (when not null) gets d(score)/d(scaled score).
void mod_scores(const Staged& st, const AttnParams& p, float slope, int64_t q0, int rows, int64_t k0, float* s,
                float* grad) {
  const float inv_softcap = p.softcap > 0.0f ? 1.0f / p.softcap : 0.0f;
  for (int i = 0; i < rows; ++i) {
    const int64_t a = st.q_aligned[q0 + i];
    for (int j = 0; j < kBlockK; ++j) {
      float g;
      float& x = s[i * kBlockK + j];
      x = score_mod(x, p.softcap, inv_softcap, slope, a, st.k_index[k0 + j], &g);
      if (grad != nullptr) grad[i * kBlockK + j] = g;
    }
  }
}

// Dropout's factor of each of n keys of one query row: `kept` where the mask keeps the probability,
// 0 where it drops it (dropout_keep per element: the counter takes the keys' and the query's global
// indices, so every tile, thread count and the backward draw the same mask).
void dropout_factors(const Dropout& d, const int64_t* k_index, int n, int64_t q_index, uint32_t bh, float kept,
                     float* z) {
  for (int j = 0; j < n; ++j) z[j] = dropout_keep(d, k_index[j], q_index, bh) ? kept : 0.0f;
}

const int64_t* key_boundaries(const AttnParams& p) {
  return reinterpret_cast<const int64_t*>(p.k_cu_seqlens != 0 ? p.k_cu_seqlens : p.cu_seqlens);
}

// Key tiles [*begin, *end) a query tile may see (key_index_range over the span of keys).
void key_tile_range(const Staged& st, const AttnParams& p, const TileInfo& q, int64_t* begin, int64_t* end) {
  *begin = *end = 0;
  if (q.min_doc > q.max_doc) return;
  int64_t lo, hi, r0, r1;
  key_index_range(q.lo, q.hi, q.min_doc, q.max_doc, p.cu_seqlens ? key_boundaries(p) : nullptr, p.causal,
                  p.window_left, p.window_right, &lo, &hi);
  span_rows(lo, hi, p.k_start, p.k_stride, st.Sk, &r0, &r1);
  if (r0 < r1) {
    *begin = r0 / kBlockK;
    *end = ceil_div(r1, kBlockK);
  }
}

// Query tiles [*begin, *end) that may see a key tile (query_index_range over the span of queries).
void query_tile_range(const Staged& st, const AttnParams& p, const TileInfo& k, int64_t* begin, int64_t* end) {
  *begin = *end = 0;
  if (k.min_doc > k.max_doc) return;
  int64_t lo, hi, r0, r1;
  const auto* cu = reinterpret_cast<const int64_t*>(p.cu_seqlens);
  query_index_range(k.lo, k.hi, k.min_doc, k.max_doc, cu, reinterpret_cast<const int64_t*>(p.k_cu_seqlens),
                    p.causal, p.window_left, p.window_right, &lo, &hi);
  span_rows(lo, hi, p.q_start, p.q_stride, st.Sq, &r0, &r1);
  if (r0 < r1) {
    *begin = r0 / kBlockQ;
    *end = ceil_div(r1, kBlockQ);
  }
}

// ---- bf16 operands for vdpbf16ps (cpu_simd.h; the AVX512_BF16 variant with bf16 inputs) ----------------
// bf16 copies of the staged operands, packed in pairs along each product's reduction dimension: 2x the
// fp32 FMA throughput with the same fp32 accumulation. Only operands that are bf16 already go to bf16
// (the inputs as given; P and dS round to bf16 for their products, as GPU flash attention does): with
// RoPE, rotated Q and K are not bf16 and their products (Q K^T, dS^T Q, dS K) stay fp32, since rounding
// them would add an error the inputs' dtype does not have. Words are uint32_t bf16 pairs; Dp is D rounded
// up to even (the pad is 0).
struct Bf16Staged {
  bool on = false;  // P V, dO V^T and P^T dO in bf16
  bool qk = false;  // also Q K^T, dS^T Q and dS K (no RoPE)
  int64_t Dw = 0, Sqe = 0;  // Dw = Dp / 2 words per row along D; Sqe = Sq rounded up to even
  std::vector<uint32_t> q;     // (B, Hq, Sq, Dw): QK^T's A
  std::vector<uint32_t> kt;    // (B, Hkv, Skp / kBlockK, Dw, kBlockK): QK^T's B, one block per key tile
  std::vector<uint32_t> v;     // (B, Hkv, Skp / 2, D), pairs of keys: P V's B (forward)
  std::vector<uint32_t> dout;  // (B, Hq, Sq + 3, Dw): dO V^T's A (backward, and below; + 3 rows of padding)
  std::vector<uint32_t> vr;    // (B, Hkv, Skp, Dw): dO V^T's B
  std::vector<uint32_t> k;     // (B, Hkv, Skp / 2, D), pairs of keys: dS K's B
  std::vector<uint32_t> q2;    // (B, Hq, Sqe / 2, D), pairs of queries: dS^T Q's B
  std::vector<uint32_t> dout2; // (B, Hq, Sqe / 2, D), pairs of queries: P^T dO's B
};

// Key tiles of a (B, Hkv, Skp, D) fp32 matrix as (Dw, kBlockK) words per tile: pairs along D. `src` holds
// each tile as (kBlockK, D) rows, or already transposed as (D, kBlockK) (Staged::kt).
void pack_key_tiles(const std::vector<float>& src, bool transposed, int64_t n_mats, int64_t Skp, int64_t D,
                    int64_t Dw, std::vector<uint32_t>& dst, int threads) {
  dst.assign(n_mats * Skp * Dw, 0u);
  parallel_for(n_mats * (Skp / kBlockK), threads, [&](int64_t tile) {
    const float* x = src.data() + tile * kBlockK * D;
    std::vector<float> t(transposed ? 0 : D * kBlockK);
    if (!transposed) {
      for (int j = 0; j < kBlockK; ++j) {
        for (int64_t d = 0; d < D; ++d) t[d * kBlockK + j] = x[j * D + d];
      }
      x = t.data();
    }
    simd::to_bf16_row_pairs(x, kBlockK, static_cast<int>(D), kBlockK, dst.data() + tile * Dw * kBlockK, kBlockK);
  });
}

// (n_mats, rows, D) fp32 -> (n_mats, rows_e / 2, D) words, pairs of rows (rows_e: rows rounded up to even).
void pack_row_pairs(const float* src, int64_t n_mats, int64_t rows, int64_t D, std::vector<uint32_t>& dst,
                    int threads) {
  const int64_t half = (rows + 1) / 2, chunk = 32;  // 64 rows per item
  dst.assign(n_mats * half * D, 0u);
  parallel_for(n_mats * ceil_div(half, chunk), threads, [&](int64_t item) {
    const int64_t m = item / ceil_div(half, chunk), p0 = item % ceil_div(half, chunk) * chunk;
    const int n = static_cast<int>(std::min<int64_t>(2 * chunk, rows - 2 * p0));
    simd::to_bf16_row_pairs(src + (m * rows + 2 * p0) * D, D, n, static_cast<int>(D),
                            dst.data() + (m * half + p0) * D, D);
  });
}

// (n, D) fp32 rows -> (n + pad, Dw) words, pairs along D (pad rows of 0).
void pack_rows(const float* src, int64_t n, int64_t D, int64_t Dw, std::vector<uint32_t>& dst, int threads,
               int64_t pad = 0) {
  dst.assign((n + pad) * Dw, 0u);
  const int64_t chunk = 256;
  parallel_for(ceil_div(n, chunk), threads, [&](int64_t item) {
    const int64_t r0 = item * chunk;
    const int rows = static_cast<int>(std::min(chunk, n - r0));
    simd::to_bf16_rows(src + r0 * D, D, rows, static_cast<int>(D), reinterpret_cast<uint16_t*>(dst.data() + r0 * Dw),
                       2 * Dw);
  });
}

Bf16Staged stage_bf16(const Staged& st, const AttnParams& p, bool backward) {
  Bf16Staged b;
  b.on = simd::kHasBf16Dot && p.dtype == kBFloat16;
  b.qk = b.on && p.rope_mode == kRopeNone;
  if (!b.on) return b;
  b.Dw = (st.D + 1) / 2;
  b.Sqe = st.Sq + st.Sq % 2;
  const int64_t nq = st.B * st.Hq, nk = st.B * st.Hkv;
  if (b.qk) {
    pack_rows(st.q.data(), nq * st.Sq, st.D, b.Dw, b.q, p.num_threads);
    pack_key_tiles(st.kt, true, nk, st.Skp, st.D, b.Dw, b.kt, p.num_threads);
  }
  if (!backward) {
    pack_row_pairs(st.v.data(), nk, st.Skp, st.D, b.v, p.num_threads);
    return b;
  }
  pack_rows(st.dout.data(), nq * st.Sq, st.D, b.Dw, b.dout, p.num_threads, 3);  // dot rows come in fours
  pack_rows(st.v.data(), nk * st.Skp, st.D, b.Dw, b.vr, p.num_threads);
  pack_row_pairs(st.dout.data(), nq, st.Sq, st.D, b.dout2, p.num_threads);
  if (b.qk) {
    pack_row_pairs(st.k.data(), nk, st.Skp, st.D, b.k, p.num_threads);
    pack_row_pairs(st.q.data(), nq, st.Sq, st.D, b.q2, p.num_threads);
  }
  return b;
}
// S (rows x kBlockK) = A B^T of `rows` rows of a (Dw words each) and one key tile of bt (matmul_abt's twin).
void matmul_abt_bf16(const Bf16Staged& b, const uint32_t* a, int rows, const uint32_t* bt, float* s) {
  const int pairs = static_cast<int>(b.Dw);
  simd::gemm_bf16<simd::Mode::kStore>(s, kBlockK, rows, kBlockK, a, b.Dw, 1, pairs, bt, kBlockK);
}

// acc (rows x D) += W X over one key tile: W (rows x kBlockK fp32) rounded to bf16 into w16, X as pairs of
// keys (x2: the tile's first pair row) (accumulate_wx's twin; add_product's with kAddAfter).
template <simd::Mode M>
void add_wx_bf16(float* acc, int rows, int64_t D, const float* w, const uint32_t* x2, uint32_t* w16) {
  simd::to_bf16_rows(w, kBlockK, rows, kBlockK, reinterpret_cast<uint16_t*>(w16), kBlockK);
  simd::gemm_bf16<M>(acc, D, rows, D, w16, kBlockK / 2, 1, kBlockK / 2, x2, D);
}

// dst (kBlockK x D) += W^T X: W (rows x kBlockK fp32, rows of one query tile) rounded to bf16 into w16 as
// pairs of rows, X as pairs of the same queries (x2: the tile's first pair row) (add_product's twin).
void add_wtx_bf16(float* dst, int rows, int64_t D, const float* w, const uint32_t* x2, uint32_t* w16) {
  simd::to_bf16_row_pairs(w, kBlockK, rows, kBlockK, w16, kBlockK);
  simd::gemm_bf16<simd::Mode::kAddAfter>(dst, D, kBlockK, D, w16, 1, kBlockK, (rows + 1) / 2, x2, D);
}
// ---- end of the bf16 operands ------------------------------------------------------------------------------

}  // namespace

void attn_forward_cpu(const AttnParams& p) {
  check_params(p);
  if (p.out_dtype != kFloat32 && p.out_dtype != kBFloat16 && p.out_dtype != kFloat16) {
    throw std::invalid_argument("ringattn cpu attention: out_dtype must be fp32, bf16 or fp16");
  }
  const Staged st = stage(p, false);
  const Bf16Staged b16 = stage_bf16(st, p, false);
  const int64_t B = st.B, Sq = st.Sq, Hq = st.Hq, Hkv = st.Hkv, D = st.D, G = st.G, Skp = st.Skp;
  const int64_t n_qt = static_cast<int64_t>(st.q_tiles.size());
  const bool score_mod_on = has_score_mod(p);
  const Dropout drop = make_dropout(p.dropout_p, p.dropout_seed, p.dropout_offset);
  float* lse_out = reinterpret_cast<float*>(p.lse);

  parallel_for(B * Hq * n_qt, p.num_threads, [&](int64_t item) {
    const int64_t qt = item % n_qt, bh = item / n_qt, b = bh / Hq, h = bh % Hq;
    const int64_t q0 = qt * kBlockQ;
    const int rows = static_cast<int>(std::min<int64_t>(kBlockQ, Sq - q0));
    const float* q = st.q.data() + (bh * Sq + q0) * D;
    const int64_t bkv = b * Hkv + h / G;
    const float* kt = st.kt.data() + bkv * D * Skp;
    const float* v = st.v.data() + bkv * Skp * D;

    std::vector<float> acc(rows * D, 0.0f), s(kBlockQ * kBlockK);
    std::vector<float> m(rows, -RA_INF), l(rows, 0.0f);
    std::vector<float> z(drop.on ? kBlockK : 0);  // dropout's factors of one row
    std::vector<uint32_t> w16(b16.on ? kBlockQ * kBlockK / 2 : 0);  // P in bf16
    const float slope = alibi_slope(p, b, h);
    int64_t t_begin, t_end;  // key tiles outside the causal range, window and documents are never visited
    key_tile_range(st, p, st.q_tiles[qt], &t_begin, &t_end);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const TileMask kind = classify(st.q_tiles[qt], st.k_tiles[t], p);
      if (kind == TileMask::kSkip) continue;
      const int64_t k0 = t * kBlockK;
      // Scores as the backward computes them (same kernel, same staging), so exp(s - lse) there
      // reproduces these weights.
      if (b16.qk) {
        matmul_abt_bf16(b16, b16.q.data() + (bh * Sq + q0) * b16.Dw, rows, b16.kt.data() + (bkv * Skp + k0) * b16.Dw,
                        s.data());
      } else {
        matmul_abt(q, D, rows, kt + k0 * D, kBlockK, D, s.data());
      }
      for (int i = 0; i < rows * kBlockK; ++i) s[i] *= p.softmax_scale;
      if (score_mod_on) mod_scores(st, p, slope, q0, rows, k0, s.data(), nullptr);
      if (kind == TileMask::kPartial) apply_mask(st, p, q0, rows, k0, s.data(), -RA_INF);
      for (int i = 0; i < rows; ++i) {
        float* si = s.data() + i * kBlockK;
        float m_new = simd::row_max(si, kBlockK, m[i]);  // NaN scores skipped, as std::max does
        // std::max drops NaN. A NaN score (NaN in q or in a visible key) with a finite maximum
        // makes exp and the sums below NaN; with no finite one the row would look empty, so look
        // for a NaN before taking it for empty: NaN in, NaN out, as in the reference.
        if (m_new == -RA_INF) {
          for (int j = 0; j < kBlockK; ++j) m_new = si[j] != si[j] ? si[j] : m_new;
        }
        if (m_new == -RA_INF) {  // nothing visible yet: this tile adds zeros
          std::fill(si, si + kBlockK, 0.0f);
          continue;
        }
        const float alpha = online_rescale(m[i], m_new);
        const float sum = simd::exp_shift_sum(si, kBlockK, m_new, kLog2e);
        l[i] = l[i] * alpha + sum;  // the lse sums the probabilities before dropout
        m[i] = m_new;
        if (drop.on) {  // P V takes only the kept probabilities (scaled by 1 / (1 - p) at the end)
          dropout_factors(drop, st.k_index.data() + k0, kBlockK, p.q_start + p.q_stride * (q0 + i),
                          static_cast<uint32_t>(bh), 1.0f, z.data());
          for (int j = 0; j < kBlockK; ++j) si[j] *= z[j];
        }
        if (alpha != 1.0f) {
          for (int64_t d = 0; d < D; ++d) acc[i * D + d] *= alpha;
        }
      }
      if (b16.on) {
        add_wx_bf16<simd::Mode::kAccumulate>(acc.data(), rows, D, s.data(), b16.v.data() + (bkv * Skp + k0) / 2 * D,
                                             w16.data());
      } else {
        accumulate_wx(acc.data(), D, rows, s.data(), kBlockK, 1, kBlockK, v + k0 * D, D, D);
      }
    }
    for (int i = 0; i < rows; ++i) {
      float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
      if (drop.on) inv *= drop.scale;
      for (int64_t d = 0; d < D; ++d) acc[i * D + d] *= inv;
      store_row(p.out, p.out_dtype, b, q0 + i, h, D, acc.data() + i * D);
      lse_out[bh * Sq + q0 + i] = finish_lse(m[i], l[i]);
    }
  });
}

void attn_backward_cpu(const AttnParams& p) {
  check_params(p);
  if (p.grad_dtype != kFloat32 && p.grad_dtype != kBFloat16 && p.grad_dtype != kFloat16) {
    throw std::invalid_argument("ringattn cpu attention: grad_dtype must be fp32, bf16 or fp16");
  }
  const Staged st = stage(p, true);
  const Bf16Staged b16 = stage_bf16(st, p, true);
  const int64_t B = st.B, Sq = st.Sq, Sk = st.Sk, Hq = st.Hq, Hkv = st.Hkv, D = st.D, G = st.G;
  const int64_t Skp = st.Skp;
  const int64_t n_kt = static_cast<int64_t>(st.k_tiles.size());
  const float scale = p.softmax_scale;
  const bool rope = p.rope_mode != kRopeNone;
  const bool score_mod_on = has_score_mod(p);
  const Dropout drop = make_dropout(p.dropout_p, p.dropout_seed, p.dropout_offset);

  std::vector<float> lse(B * Hq * Sq);
  const float* lse_in = reinterpret_cast<const float*>(p.lse);
  const float* delta = reinterpret_cast<const float*>(p.delta);
  for (int64_t i = 0; i < B * Hq * Sq; ++i) lse[i] = backward_lse(lse_in[i]);

  // Work items: (batch, kv head, query-head group, key chunk), about two per thread so the atomic
  // counter can balance them. A kv head's G query heads are split into groups first, then its key
  // tiles into chunks, only as far as the threads need items: a group costs a partial dK and dV (2 Sk D
  // floats per kv head), a chunk a partial dQ (G Sq D, larger under GQA). Partials are summed in a fixed
  // order at the end (deterministic, no atomics), so the scratch grows with the parallelism the
  // problem's heads lack, not with the thread count.
  const int64_t want = 2 * static_cast<int64_t>(std::max(1, p.num_threads));
  int64_t groups = 1;
  while (B * Hkv * groups < want && groups < G) {
    ++groups;
    while (G % groups != 0) ++groups;  // groups of equal size
  }
  const int64_t per_chunk = std::max<int64_t>(1, B * Hkv * groups);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(n_kt, ceil_div(want, per_chunk)));
  std::vector<float> dq_acc(chunks * B * Hq * Sq * D, 0.0f);
  std::vector<float> dk_part(groups > 1 ? groups * B * Hkv * Sk * D : 0), dv_part(dk_part.size());

  parallel_for(B * Hkv * groups * chunks, p.num_threads, [&](int64_t item) {
    const int64_t c = item % chunks, grp = item / chunks % groups, bkv = item / (chunks * groups);
    const int64_t b = bkv / Hkv, hk = bkv % Hkv;
    const int64_t t_begin = n_kt * c / chunks, t_end = n_kt * (c + 1) / chunks;
    const float* kt = st.kt.data() + bkv * D * Skp;
    const float* v = st.v.data() + bkv * Skp * D;
    const float* kr = st.k.data() + bkv * Skp * D;
    std::vector<float> dk(kBlockK * D), dv(kBlockK * D), pr(kBlockQ * kBlockK), ds(kBlockQ * kBlockK);
    std::vector<float> dscore(score_mod_on ? kBlockQ * kBlockK : 0);  // d(score)/d(scaled score)
    // dropout: Z / (1 - p) per element (0 where dropped) and the dropped probabilities P Z / (1 - p)
    std::vector<float> zt(drop.on ? kBlockQ * kBlockK : 0), pz(drop.on ? kBlockQ * kBlockK : 0);
    std::vector<float> cs(p.rotary_dim / 2), sn(p.rotary_dim / 2);
    std::vector<uint32_t> w16(b16.on ? kBlockQ * kBlockK / 2 : 0);  // P or dS in bf16
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t k0 = t * kBlockK;
      std::fill(dk.begin(), dk.end(), 0.0f);
      std::fill(dv.begin(), dv.end(), 0.0f);
      int64_t qt_begin, qt_end;  // query tiles that cannot see this key tile are never visited
      query_tile_range(st, p, st.k_tiles[t], &qt_begin, &qt_end);
      for (int64_t g = G * grp / groups; g < G * (grp + 1) / groups; ++g) {
        const int64_t bh = b * Hq + hk * G + g;
        const float slope = alibi_slope(p, b, hk * G + g);
        for (int64_t qt = qt_begin; qt < qt_end; ++qt) {
          const TileMask kind = classify(st.q_tiles[qt], st.k_tiles[t], p);
          if (kind == TileMask::kSkip) continue;
          const int64_t q0 = qt * kBlockQ;
          const int rows = static_cast<int>(std::min<int64_t>(kBlockQ, Sq - q0));
          const float* q = st.q.data() + (bh * Sq + q0) * D;
          const float* dout = st.dout.data() + (bh * Sq + q0) * D;
          // P = exp(score - lse), score = S * scale (then score_mod)
          const int64_t q_words = (bh * Sq + q0) * b16.Dw, tile_words = (bkv * Skp + k0) * b16.Dw;
          const int64_t q_pairs = (bh * b16.Sqe + q0) / 2 * D, k_pairs = (bkv * Skp + k0) / 2 * D;
          if (b16.qk) {
            matmul_abt_bf16(b16, b16.q.data() + q_words, rows, b16.kt.data() + tile_words, pr.data());
          } else {
            matmul_abt(q, D, rows, kt + k0 * D, kBlockK, D, pr.data());
          }
          if (score_mod_on) {
            for (int i = 0; i < rows * kBlockK; ++i) pr[i] *= scale;
            mod_scores(st, p, slope, q0, rows, k0, pr.data(), dscore.data());
          }
          const float s_scale = score_mod_on ? 1.0f : scale;
          for (int i = 0; i < rows; ++i) {
            float* pi = pr.data() + i * kBlockK;
            const float row_lse = lse[bh * Sq + q0 + i];
            for (int j = 0; j < kBlockK; ++j) pi[j] = (pi[j] * s_scale - row_lse) * kLog2e;
            exp2_inplace(pi, kBlockK);
          }
          if (kind == TileMask::kPartial) apply_mask(st, p, q0, rows, k0, pr.data(), 0.0f);
          if (drop.on) {  // the forward's mask, regenerated
            for (int i = 0; i < rows; ++i) {
              float* zi = zt.data() + i * kBlockK;
              dropout_factors(drop, st.k_index.data() + k0, kBlockK, p.q_start + p.q_stride * (q0 + i),
                              static_cast<uint32_t>(bh), drop.scale, zi);
              for (int j = 0; j < kBlockK; ++j) pz[i * kBlockK + j] = pr[i * kBlockK + j] * zi[j];
            }
          }
          // Each product goes to a zeroed tile first and is then added to its running sum, so
          // sums over many query tiles, heads or key tiles are blocked, not one long fp32 chain.
          // dV += P^T dO (with dropout, (P Z / (1 - p))^T dO)
          const float* pw = drop.on ? pz.data() : pr.data();
          if (b16.on) {
            add_wtx_bf16(dv.data(), rows, D, pw, b16.dout2.data() + q_pairs, w16.data());
          } else {
            add_product(dv.data(), kBlockK, D, pw, 1, kBlockK, rows, dout);
          }
          // dS = P * (dO V^T - delta) * scale (with dropout, dO V^T Z / (1 - p) in place of dO V^T)
          if (b16.on) {  // as blocked dot products, like matmul_abt_dot (dP - delta cancels)
            simd::matmul_abt_dot_bf16(b16.dout.data() + q_words, b16.Dw, rows, b16.vr.data() + tile_words, b16.Dw,
                                      kBlockK, static_cast<int>(b16.Dw), ds.data(), kBlockK);
          } else {
            matmul_abt_dot(dout, D, rows, v + k0 * D, D, D, ds.data());
          }
          for (int i = 0; i < rows; ++i) {
            const float row_delta = delta[bh * Sq + q0 + i];
            float* dsi = ds.data() + i * kBlockK;
            const float* pi = pr.data() + i * kBlockK;
            if (drop.on) {
              const float* zi = zt.data() + i * kBlockK;
              for (int j = 0; j < kBlockK; ++j) dsi[j] *= zi[j];
            }
            for (int j = 0; j < kBlockK; ++j) dsi[j] = pi[j] * (dsi[j] - row_delta) * scale;
            if (score_mod_on) {  // through softcap's tanh (ALiBi's bias has derivative 1)
              const float* gi = dscore.data() + i * kBlockK;
              for (int j = 0; j < kBlockK; ++j) dsi[j] *= gi[j];
            }
          }
          // dK += dS^T Q, dQ += dS K (rotated coordinates)
          float* dq = dq_acc.data() + ((c * B * Hq + bh) * Sq + q0) * D;
          if (b16.qk) {
            add_wtx_bf16(dk.data(), rows, D, ds.data(), b16.q2.data() + q_pairs, w16.data());
            add_wx_bf16<simd::Mode::kAddAfter>(dq, rows, D, ds.data(), b16.k.data() + k_pairs, w16.data());
          } else {
            add_product(dk.data(), kBlockK, D, ds.data(), 1, kBlockK, rows, q);
            add_product(dq, rows, D, ds.data(), kBlockK, 1, kBlockK, kr + k0 * D);
          }
        }
      }
      const int64_t valid = std::min<int64_t>(kBlockK, Sk - k0);
      if (groups > 1) {  // this group's share: summed over the groups, rotated and stored below
        const int64_t at = ((grp * B * Hkv + bkv) * Sk + k0) * D;
        std::copy(dk.begin(), dk.begin() + valid * D, dk_part.begin() + at);
        std::copy(dv.begin(), dv.begin() + valid * D, dv_part.begin() + at);
        continue;
      }
      for (int64_t j = 0; j < valid; ++j) {
        float* dkj = dk.data() + j * D;
        if (rope) {
          rope_table(p, true, position(p.k_positions, p.k_positions_sb, b, k0 + j), cs.data(), sn.data());
          rotate_row(p, dkj, cs.data(), sn.data(), -1.0f);
        }
        store_row(p.dk, p.grad_dtype, b, k0 + j, hk, D, dkj);
        store_row(p.dv, p.grad_dtype, b, k0 + j, hk, D, dv.data() + j * D);
      }
    }
  });

  if (groups > 1) {
    parallel_for(B * Sk, p.num_threads, [&](int64_t row) {
      const int64_t b = row / Sk, s = row % Sk;
      std::vector<float> cs(p.rotary_dim / 2), sn(p.rotary_dim / 2), dk(D), dv(D);
      if (rope) rope_table(p, true, position(p.k_positions, p.k_positions_sb, b, s), cs.data(), sn.data());
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        std::fill(dk.begin(), dk.end(), 0.0f);
        std::fill(dv.begin(), dv.end(), 0.0f);
        for (int64_t grp = 0; grp < groups; ++grp) {
          const int64_t at = ((grp * B * Hkv + b * Hkv + hk) * Sk + s) * D;
          for (int64_t d = 0; d < D; ++d) dk[d] += dk_part[at + d];
          for (int64_t d = 0; d < D; ++d) dv[d] += dv_part[at + d];
        }
        if (rope) rotate_row(p, dk.data(), cs.data(), sn.data(), -1.0f);
        store_row(p.dk, p.grad_dtype, b, s, hk, D, dk.data());
        store_row(p.dv, p.grad_dtype, b, s, hk, D, dv.data());
      }
    });
  }

  parallel_for(B * Sq, p.num_threads, [&](int64_t row) {
    const int64_t b = row / Sq, s = row % Sq;
    std::vector<float> cs(p.rotary_dim / 2), sn(p.rotary_dim / 2), sum(D);
    if (rope) rope_table(p, false, position(p.q_positions, p.q_positions_sb, b, s), cs.data(), sn.data());
    for (int64_t h = 0; h < Hq; ++h) {
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (int64_t c = 0; c < chunks; ++c) {
        const float* part = dq_acc.data() + ((c * B * Hq + b * Hq + h) * Sq + s) * D;
        for (int64_t d = 0; d < D; ++d) sum[d] += part[d];
      }
      if (rope) rotate_row(p, sum.data(), cs.data(), sn.data(), -1.0f);
      store_row(p.dq, p.grad_dtype, b, s, h, D, sum.data());
    }
  });
}

// What this variant's flags enabled, from the compiler's predefined macros: `isa` names the vector
// extensions (reports), `needs` every feature the code may use (checked before it runs; cpuinfo names).
#ifdef __SSE4_2__
#define RA_SSE42 " sse4_2"
#else
#define RA_SSE42 ""
#endif
#ifdef __POPCNT__
#define RA_POPCNT " popcnt"
#else
#define RA_POPCNT ""
#endif
#ifdef __AVX__
#define RA_AVX " avx"
#else
#define RA_AVX ""
#endif
#ifdef __AVX2__
#define RA_AVX2 " avx2"
#else
#define RA_AVX2 ""
#endif
#ifdef __FMA__
#define RA_FMA " fma"
#else
#define RA_FMA ""
#endif
#ifdef __F16C__
#define RA_F16C " f16c"
#else
#define RA_F16C ""
#endif
#ifdef __BMI__
#define RA_BMI " bmi1"
#else
#define RA_BMI ""
#endif
#ifdef __BMI2__
#define RA_BMI2 " bmi2"
#else
#define RA_BMI2 ""
#endif
#ifdef __LZCNT__
#define RA_LZCNT " abm"
#else
#define RA_LZCNT ""
#endif
#ifdef __MOVBE__
#define RA_MOVBE " movbe"
#else
#define RA_MOVBE ""
#endif
#ifdef __AVX512F__
#define RA_AVX512F " avx512f"
#else
#define RA_AVX512F ""
#endif
#ifdef __AVX512CD__
#define RA_AVX512CD " avx512cd"
#else
#define RA_AVX512CD ""
#endif
#ifdef __AVX512BW__
#define RA_AVX512BW " avx512bw"
#else
#define RA_AVX512BW ""
#endif
#ifdef __AVX512DQ__
#define RA_AVX512DQ " avx512dq"
#else
#define RA_AVX512DQ ""
#endif
#ifdef __AVX512VL__
#define RA_AVX512VL " avx512vl"
#else
#define RA_AVX512VL ""
#endif
#ifdef __AVX512VNNI__
#define RA_AVX512VNNI " avx512_vnni"
#else
#define RA_AVX512VNNI ""
#endif
#ifdef __AVX512BF16__
#define RA_AVX512BF16 " avx512_bf16"
#else
#define RA_AVX512BF16 ""
#endif
#ifdef __AVX512FP16__
#define RA_AVX512FP16 " avx512_fp16"
#else
#define RA_AVX512FP16 ""
#endif
#ifdef __ARM_NEON
#define RA_NEON " asimd"
#else
#define RA_NEON ""
#endif
#ifdef __ARM_FEATURE_SVE
#define RA_SVE " sve"
#else
#define RA_SVE ""
#endif
#define RA_VECTOR_ISA                                                                                          \
  RA_SSE42 RA_AVX RA_AVX2 RA_FMA RA_F16C RA_AVX512F RA_AVX512CD RA_AVX512BW RA_AVX512DQ RA_AVX512VL RA_AVX512VNNI \
      RA_AVX512BF16 RA_AVX512FP16 RA_NEON RA_SVE

CpuVariant variant() {
  // x86 features beyond the vector ones are checked too (the compiler may emit BMI, LZCNT, MOVBE); the
  // Arm ones are not: off x86 only the generic variant is built.
  return {RINGATTN_CPU_VARIANT_NAME, RA_VECTOR_ISA,
          RA_SSE42 RA_POPCNT RA_AVX RA_AVX2 RA_FMA RA_F16C RA_BMI RA_BMI2 RA_LZCNT RA_MOVBE RA_AVX512F RA_AVX512CD
              RA_AVX512BW RA_AVX512DQ RA_AVX512VL RA_AVX512VNNI RA_AVX512BF16 RA_AVX512FP16,
          &attn_forward_cpu, &attn_backward_cpu};
}

}  // namespace ringattn
}  // namespace RINGATTN_CPU_NS
