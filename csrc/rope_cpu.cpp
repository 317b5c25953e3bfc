// CPU kernel: exact-phase RoPE cos/sin table for a list of positions.
#include "rope_cpu.h"

#include <cmath>

#include "rope_phase.h"

namespace ringattn {

void rope_cos_sin_cpu(const int32_t* positions, int64_t n_positions, const uint64_t* turns_fixed,
                      int64_t n_freqs, float attention_factor, float* cos_out, float* sin_out) {
  for (int64_t p = 0; p < n_positions; ++p) {
    const uint32_t pos = static_cast<uint32_t>(positions[p]);
    float* cos_row = cos_out + p * n_freqs;
    float* sin_row = sin_out + p * n_freqs;
    for (int64_t i = 0; i < n_freqs; ++i) {
      const float angle = rope_reduced_angle(pos, turns_fixed[i]);
      cos_row[i] = std::cos(angle) * attention_factor;
      sin_row[i] = std::sin(angle) * attention_factor;
    }
  }
}

}  // namespace ringattn
