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

RA_HOST_DEVICE bool visible(int64_t q_index, int64_t k_index, int64_t q_doc, int64_t k_doc, bool causal) {
  return (!causal || q_index >= k_index) && q_doc == k_doc && q_doc >= 0;
}

// ---- online softmax and merge ----------------------------------------------------------------

// max(a, b) that propagates NaN (std::max and fmaxf drop it): a NaN score or query must make its row
// NaN, as in the fp64 reference, not look like a masked (empty) row.
RA_HOST_DEVICE float max_nan(float a, float b) { return (b > a || b != b) ? b : a; }

// Softmax weight exp(s - m) of a score given the row's running max (natural units). The difference
// is taken first, so a score equal to the max gives exactly 1; s = -inf (masked) gives 0.
RA_HOST_DEVICE float softmax_weight(float s, float m) {
#if defined(__CUDA_ARCH__)
  return exp2f((s - m) * kLog2e);
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
