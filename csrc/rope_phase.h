// Exact RoPE phase: tile math shared by the CPU and CUDA kernels (host and device).
//
// A frequency f (radians per position) is given as a 64-bit fixed-point count of turns,
// r = round(f / 2pi * 2^64) mod 2^64. Then pos * r mod 2^64 is the fractional turn of pos * f
// with no rounding loss for any 32-bit position: the integer turns fall off the top of the word.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define RA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RA_HOST_DEVICE inline
#endif

namespace ringattn {

// 2pi / 2^32: converts a signed 32-bit fraction of a turn into radians.
constexpr float kRadiansPerTurnUnit = 1.46291807926715968e-09f;

// Angle of pos * f reduced to [-pi, pi), in fp32. Error <= 2.5e-7 rad for every uint32 position.
RA_HOST_DEVICE float rope_reduced_angle(uint32_t pos, uint64_t turns_fixed) {
  const uint64_t turns = static_cast<uint64_t>(pos) * turns_fixed;  // wraps mod 2^64 by design
  // Top 32 bits read as signed: the turn fraction t - round(t) in units of 2^-32 turns.
  const int32_t centred = static_cast<int32_t>(static_cast<uint32_t>(turns >> 32));
  return static_cast<float>(centred) * kRadiansPerTurnUnit;
}

}  // namespace ringattn
