#pragma once
#include <cstdint>

namespace ringattn {

// cos_out/sin_out: (n_positions, n_freqs) row-major fp32. Positions must be >= 0.
void rope_cos_sin_cpu(const int32_t* positions, int64_t n_positions, const uint64_t* turns_fixed,
                      int64_t n_freqs, float attention_factor, float* cos_out, float* sin_out);

}  // namespace ringattn
