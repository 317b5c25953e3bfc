// Tile math shared by the CPU and CUDA attention kernels (host and device): RoPE angles and
// rotation, masks by global index, the online-softmax update and the guarded merge.
//
// Scores, maxima and lse are in natural units (scale included); exponentials are evaluated as
// exp2((s - m) * log2(e)) after the subtraction, so the forward's lse and the backward's
// exp(s - lse) agree to rounding. Empty rows keep m = -inf and l = 0.
#pragma once
#include <cstdint>
#include <cstring>

#include "rope_phase.h"

#include <cmath>

// +inf as a constant usable in host and device code alike.
#define RA_INF __builtin_huge_valf()

namespace ringattn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum RopeMode : int { kRopeNone = 0, kRopeExact = 1, kRopeHf = 2 };

RA_HOST_DEVICE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

RA_HOST_DEVICE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// bf16 is the top half of an fp32: widening is exact.
RA_HOST_DEVICE float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, NaN stays NaN (a plain carry could turn a NaN payload into inf).
RA_HOST_DEVICE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// ---- RoPE -----------------------------------------------------------------------------------

// Angle of frequency i at `pos`. Exact: 64-bit fixed-point turns (see rope_phase.h).
// hf: transformers' fp32 product pos.float() * inv_freq (one rounding, never contracted).
RA_HOST_DEVICE float rope_angle(int mode, uint32_t pos, const void* freqs, int i) {
  if (mode == kRopeExact) return rope_reduced_angle(pos, static_cast<const uint64_t*>(freqs)[i]);
  return static_cast<float>(pos) * static_cast<const float*>(freqs)[i];
}

// Turn fraction of frequency i at `pos`, centred, in units of 2^-32 turn (the CUDA kernels' form:
// sincos_turns below needs no large-argument path). Exact: as rope_reduced_angle. hf: the fp32
// angle a = pos * inv_freq (as rope_angle) is mant * 2^e with a 24-bit mant; its turns are
// mant * 2^(64+e) / 2pi * 2^-64, so bits 32..63 of mant * W mod 2^64, W = floor(2^(64+e) / 2pi)
// mod 2^64 (a 64-bit window of 1/2pi's binary fraction), exact to mant * 2^-64 < 2^-40 turn.
RA_HOST_DEVICE int32_t rope_turns(int mode, uint32_t pos, const void* freqs, int i) {
  if (mode == kRopeExact) {
    const uint64_t turns = static_cast<uint64_t>(pos) * static_cast<const uint64_t*>(freqs)[i];
    return static_cast<int32_t>(static_cast<uint32_t>(turns >> 32));
  }
  // 1/2pi = 0.b1 b2 b3 ... in binary: bits 1..192, most significant first.
  constexpr uint64_t kInv2Pi[3] = {0x28be60db9391054aull, 0x7f09d5f47d4d3770ull, 0x36d8a5664f10e410ull};
  const float angle = static_cast<float>(pos) * static_cast<const float*>(freqs)[i];
  const uint32_t u = float_to_bits(angle);  // pos >= 0, inv_freq >= 0: no sign; inf/NaN: below
  const int biased = static_cast<int>(u >> 23);
  if (biased >= 255) return 0;  // inf / NaN inv_freq: undefined in transformers too
  if (biased == 0) return 0;    // 0 or subnormal: under 2^-126 rad, 0 turns at 2^-32 resolution
  const uint64_t mant = (u & 0x7fffffu) | 0x800000u;
  const int e = biased - 150;  // in [-149, 104]
  // W = bits e+1 .. e+64 of the fraction (bits at or before the point are 0).
  uint64_t w;
  if (e <= -64) {
    w = 0;
  } else if (e < 0) {
    w = kInv2Pi[0] >> -e;
  } else if (e == 0) {
    w = kInv2Pi[0];
  } else if (e < 64) {
    w = (kInv2Pi[0] << e) | (kInv2Pi[1] >> (64 - e));
  } else if (e == 64) {
    w = kInv2Pi[1];
  } else {
    w = (kInv2Pi[1] << (e - 64)) | (kInv2Pi[2] >> (128 - e));
  }
  return static_cast<int32_t>(static_cast<uint32_t>((mant * w) >> 32));
}

// scale * sin and scale * cos of 2pi * turns / 2^32: reduced to the nearest quarter turn in integers
// (wrapping, exact), then polynomials on [-pi/4, pi/4] (the Triton kernels' sincos_turns: error
// 1.8e-9 / 1e-10 in exact arithmetic, below fp32 rounding); quarter q maps (s, c) to (s, c), (c, -s),
// (-s, -c), (-c, s). No library range reduction, so no local-memory stack frame on the GPU.
RA_HOST_DEVICE void sincos_turns(int32_t turns, float scale, float* sn, float* cs) {
  const uint32_t u = static_cast<uint32_t>(turns);
  const uint32_t quarter = (u + 0x20000000u) >> 30;
  const int32_t rest = static_cast<int32_t>(u - (quarter << 30));  // [-2^29, 2^29)
  const float a = static_cast<float>(rest) * kRadiansPerTurnUnit, a2 = a * a;
  const float s = a * (scale + a2 * (scale * -0.16666650668891864f +
                                     a2 * (scale * 0.008331978644987928f + a2 * (scale * -0.00019495634288856732f))));
  const float c =
      scale + a2 * (scale * -0.5f + a2 * (scale * 0.04166664686593338f +
                                          a2 * (scale * -0.0013887367494029561f + a2 * (scale * 2.4438449363473717e-05f))));
  const bool odd = quarter & 1u;
  *sn = bits_to_float(float_to_bits(odd ? c : s) ^ ((quarter & 2u) << 30));
  *cs = bits_to_float(float_to_bits(odd ? s : c) ^ (((quarter + 1u) & 2u) << 30));
}

// Feature indices of rotation pair i among the first `rotary_dim` features.
RA_HOST_DEVICE void rope_pair(int i, int rotary_dim, bool interleaved, int* a, int* b) {
  if (interleaved) {
    *a = 2 * i;
    *b = 2 * i + 1;
  } else {
    *a = i;
    *b = i + rotary_dim / 2;
  }
}

// (x_a, x_b) -> (x_a c - x_b s, x_b c + x_a s). The transpose (RoPE backward) passes -s.
RA_HOST_DEVICE void rope_rotate(float xa, float xb, float c, float s, float* ya, float* yb) {
  *ya = xa * c - xb * s;
  *yb = xb * c + xa * s;
}

// ---- masks by global token index -----------------------------------------------------------

// Document id of a global index from cu_seqlens (n_cu entries); -1 outside every document.
RA_HOST_DEVICE int64_t document_id(int64_t index, const int64_t* cu, int64_t n_cu) {
  if (cu == nullptr) return 0;
  if (n_cu < 2 || index < cu[0] || index >= cu[n_cu - 1]) return -1;
  int64_t lo = 0, hi = n_cu - 1;  // invariant: cu[lo] <= index < cu[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (cu[mid] <= index) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Queries are compared with keys through their ALIGNED index a: the global index, shifted per
// document by k_cu[d + 1] - cu[d + 1] when the keys have their own boundaries k_cu (flash-attn
// varlen's bottom-right alignment: a document's last query lines up with its last key). Causal,
// the window and ALiBi all use a. Index arithmetic is int64 and overflows for no index, boundary
// or window side below 2^62 (the driver clamps window sides there).
RA_HOST_DEVICE int64_t aligned_index(int64_t q_index, int64_t q_doc, const int64_t* cu, const int64_t* k_cu) {
  if (cu == nullptr || k_cu == nullptr || q_doc < 0) return q_index;
  return q_index + (k_cu[q_doc + 1] - cu[q_doc + 1]);
}

// Same document (inside one) and, when causal, k <= a.
RA_HOST_DEVICE bool visible(int64_t a, int64_t k_index, int64_t q_doc, int64_t k_doc, bool causal) {
  return (!causal || a >= k_index) && q_doc == k_doc && q_doc >= 0;
}

// Sliding window (left, right), -1 = unbounded on that side: a - left <= k <= a + right.
RA_HOST_DEVICE bool in_window(int64_t a, int64_t k_index, int64_t left, int64_t right) {
  return (left < 0 || k_index >= a - left) && (right < 0 || k_index <= a + right);
}

// Score of a pair from its scaled dot product s: softcap * tanh(s / softcap) when softcap > 0
// (inv_softcap = 1 / softcap), then ALiBi's -slope * |a - k| (slope 0: none). *dscore gets the
// derivative of the score w.r.t. s (1 - tanh^2 with softcap, else 1), which the backward's dS needs.
RA_HOST_DEVICE float score_mod(float s, float softcap, float inv_softcap, float slope, int64_t a, int64_t k_index,
                               float* dscore) {
  float grad = 1.0f;
  if (softcap > 0.0f) {
#if defined(__CUDA_ARCH__)
    const float th = tanhf(s * inv_softcap);
#else
    const float th = std::tanh(s * inv_softcap);
#endif
    s = softcap * th;
    grad = 1.0f - th * th;
  }
  if (slope != 0.0f) {
    const int64_t d = a - k_index;
    s -= slope * static_cast<float>(d < 0 ? -d : d);
  }
  *dscore = grad;
  return s;
}

// ---- attention dropout (ringattn.dropout is the spec) ----------------------------------------

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;  // Philox4x32 round multipliers
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;  // key schedule (Weyl) increments

// Philox4x32-10 (Salmon et al., SC'11, Random123's constants) of counter c, in place, with key
// (k0, k1). Each multiply is one widening 32 x 32 -> 64-bit product that yields both halves (one
// IMAD.WIDE.U32 on the GPU, where a mul.hi and a mul.lo would take two).
RA_HOST_DEVICE void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c[2];
    const uint32_t c1 = c[1], c3 = c[3];
    c[0] = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    c[1] = static_cast<uint32_t>(p1);
    c[2] = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c[3] = static_cast<uint32_t>(p0);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// One call's dropout: the Philox key words, the counter's last word, the integer threshold of the
// keep test and the scale of kept probabilities. `on` is false for p = 0 (then nothing is drawn).
struct Dropout {
  uint32_t key0 = 0, key1 = 0, offset = 0;
  uint32_t threshold = 0;  // kept when the top 24 bits u24 of the draw satisfy u24 >= threshold
  float scale = 1.0f;      // 1 / (1 - p)
  bool on = false;
};

// From AttnParams' dropout_p (in [0, 1)), dropout_seed and dropout_offset (host side). The spec keeps
// an element when u24 * 2^-24 >= p; p * 2^24 is exact in a double, so that is u24 >= ceil(p * 2^24),
// an integer test with no rounding of p.
inline Dropout make_dropout(double p, int64_t seed, int64_t offset) {
  Dropout d;
  if (!(p > 0.0)) return d;
  const uint64_t s = static_cast<uint64_t>(seed);
  d.key0 = static_cast<uint32_t>(s);
  d.key1 = static_cast<uint32_t>(s >> 32);
  d.offset = static_cast<uint32_t>(static_cast<uint64_t>(offset));
  d.threshold = static_cast<uint32_t>(std::ceil(p * 16777216.0));
  d.scale = static_cast<float>(1.0 / (1.0 - p));
  d.on = true;
  return d;
}

// Whether dropout keeps the probability of (query q_index, key k_index) of row bh = batch * Hq +
// query head: Philox4x32-10 word 0 of counter (k_index, q_index, bh, offset), global token indices
// (mod 2^32, as the spec's words).
RA_HOST_DEVICE bool dropout_keep(const Dropout& d, int64_t k_index, int64_t q_index, uint32_t bh) {
  uint32_t c[4] = {static_cast<uint32_t>(k_index), static_cast<uint32_t>(q_index), bh, d.offset};
  philox4x32_10(c, d.key0, d.key1);
  return (c[0] >> 8) >= d.threshold;
}

// ---- ranges of rows that can see each other (loop bounds) -------------------------------------

constexpr int64_t kIndexMin = -(int64_t{1} << 62), kIndexMax = int64_t{1} << 62;  // "unbounded"

RA_HOST_DEVICE int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
RA_HOST_DEVICE int64_t imax(int64_t a, int64_t b) { return a < b ? b : a; }

// Key indices [*lo, *hi] that queries with aligned indices in [a_min, a_max] and documents
// [d_min, d_max] may see. k_cu: the keys' boundaries (k_cu_seqlens, or cu_seqlens), null without
// documents. Empty when *lo > *hi.
RA_HOST_DEVICE void key_index_range(int64_t a_min, int64_t a_max, int64_t d_min, int64_t d_max, const int64_t* k_cu,
                                    bool causal, int64_t left, int64_t right, int64_t* lo, int64_t* hi) {
  int64_t l = kIndexMin, h = kIndexMax;
  if (causal) h = a_max;
  if (right >= 0) h = imin(h, a_max + right);
  if (left >= 0) l = a_min - left;
  if (k_cu != nullptr) {
    l = imax(l, k_cu[d_min]);
    h = imin(h, k_cu[d_max + 1] - 1);
  }
  *lo = l;
  *hi = h;
}

// Query indices [*lo, *hi] that may see keys with indices in [k_first, k_last] whose documents
// (by the keys' boundaries) are [d_min, d_max]. cu: the queries' boundaries, k_cu: the keys' own
// (null: cu's); both null without documents. A query of document d has a = q + shift(d), so the
// first and last documents bound the range; queries of the documents between lie inside it.
RA_HOST_DEVICE void query_index_range(int64_t k_first, int64_t k_last, int64_t d_min, int64_t d_max,
                                      const int64_t* cu, const int64_t* k_cu, bool causal, int64_t left,
                                      int64_t right, int64_t* lo, int64_t* hi) {
  const bool bounded_lo = causal || right >= 0, bounded_hi = left >= 0;
  int64_t a_lo = kIndexMin, a_hi = kIndexMax;  // bounds of the aligned index
  if (causal) a_lo = k_first;
  if (right >= 0) a_lo = imax(a_lo, k_first - right);
  if (left >= 0) a_hi = k_last + left;
  if (cu == nullptr) {
    *lo = a_lo;
    *hi = a_hi;
    return;
  }
  const int64_t shift_first = k_cu != nullptr ? k_cu[d_min + 1] - cu[d_min + 1] : 0;
  const int64_t shift_last = k_cu != nullptr ? k_cu[d_max + 1] - cu[d_max + 1] : 0;
  int64_t l = bounded_lo ? imax(cu[d_min], a_lo - shift_first) : cu[d_min];
  int64_t h = bounded_hi ? imin(cu[d_max + 1] - 1, a_hi - shift_last) : cu[d_max + 1] - 1;
  if (d_max > d_min) {
    l = imin(l, cu[d_min + 1]);
    h = imax(h, cu[d_max] - 1);
  }
  *lo = l;
  *hi = h;
}

// Rows [*begin, *end) of a span of n rows (row r has index start + stride * r, start >= 0,
// stride >= 1) whose indices lie in [lo, hi].
RA_HOST_DEVICE void span_rows(int64_t lo, int64_t hi, int64_t start, int64_t stride, int64_t n, int64_t* begin,
                              int64_t* end) {
  if (hi < lo || hi < start || n <= 0) {
    *begin = *end = 0;
    return;
  }
  int64_t b = 0;
  if (lo > start) {
    b = (lo - start) / stride;
    if (b * stride < lo - start) ++b;
  }
  const int64_t e = imin(n, (hi - start) / stride + 1);
  *begin = imin(b, e);
  *end = e;
}

// ---- online softmax and merge ----------------------------------------------------------------

// max(a, b) that propagates NaN (std::max and fmaxf drop it): a NaN score or query must make its row
// NaN, as in the fp64 reference, not look like a masked (empty) row.
// On the GPU one max.NaN (sm_80+) instead of two compares and a select per score.
RA_HOST_DEVICE float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && !defined(RINGATTN_CUDA_EMULATION)
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
#else
  return (b > a || b != b) ? b : a;
#endif
}

// Softmax weight exp(s - m) of a score given the row's running max (natural units). The difference
// is taken first, so a score equal to the max gives exactly 1; s = -inf (masked) gives 0.
// On the GPU one ex2.approx.ftz (exp2f adds a rescale of arguments below -126 to every score: a
// compare and two predicated multiplies): a weight below 2^-126 (of the row max's 1) flushes to 0,
// which the CPU emulation of the kernels reproduces.
RA_HOST_DEVICE float softmax_weight(float s, float m) {
#if defined(__CUDA_ARCH__) && !defined(RINGATTN_CUDA_EMULATION)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"((s - m) * kLog2e));
  return y;
#elif defined(__CUDA_ARCH__)
  const float y = exp2f((s - m) * kLog2e);
  return y < 1.17549435e-38f ? 0.0f : y;  // ftz: no subnormal result
#else
  return std::exp2((s - m) * kLog2e);
#endif
}

// Factor that rescales the running sums when the running max moves from m_old to m_new.
// -inf -> -inf (nothing seen yet) gives 1 so the zero accumulators stay zero, never NaN.
RA_HOST_DEVICE float online_rescale(float m_old, float m_new) {
  if (m_new == -RA_INF) return 1.0f;
  return softmax_weight(m_old, m_new);
}

// lse of a finished row from its max and sum of weights; -inf for an empty row, NaN for a NaN row.
RA_HOST_DEVICE float finish_lse(float m, float l) {
  if (m != m || l != l) return m + l;  // NaN
  if (!(l > 0.0f)) return -RA_INF;
#if defined(__CUDA_ARCH__)
  return m + logf(l);
#else
  return m + std::log(l);
#endif
}

// The backward's stand-in for a row's lse: +inf for an empty row (-inf), so that
// softmax_weight(s, lse) is exactly 0 there instead of exp(s + inf).
RA_HOST_DEVICE float backward_lse(float lse) { return lse == -RA_INF ? RA_INF : lse; }

// Stable merge of two partials (natural log): returns l and sets the weights w1, w2 with
// o = w1 o1 + w2 o2. -inf with x gives x; -inf with -inf gives (-inf, 0, 0), never NaN; NaN with
// anything gives (NaN, NaN, NaN).
RA_HOST_DEVICE float merge_lse(float l1, float l2, float* w1, float* w2) {
  if (l1 != l1 || l2 != l2) {
    *w1 = *w2 = l1 + l2;  // NaN
    return l1 + l2;
  }
  const float m = l1 > l2 ? l1 : l2;
  if (m == -RA_INF) {
    *w1 = 0.0f;
    *w2 = 0.0f;
    return -RA_INF;
  }
#if defined(__CUDA_ARCH__)
  const float e1 = expf(l1 - m), e2 = expf(l2 - m);
  const float l = m + logf(e1 + e2);
#else
  const float e1 = std::exp(l1 - m), e2 = std::exp(l2 - m);
  const float l = m + std::log(e1 + e2);
#endif
  *w1 = e1 / (e1 + e2);
  *w2 = e2 / (e1 + e2);
  return l;
}

}  // namespace ringattn
