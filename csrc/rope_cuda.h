#pragma once
#include <cstdint>
#include <string>

namespace ringattn {

// Number of visible CUDA devices; 0 with a reason when the runtime finds none.
int cuda_device_count(std::string* reason);

// Same contract as rope_cos_sin_cpu, all pointers on the current device, enqueued on `stream`
// (a cudaStream_t given as an integer; 0 is the legacy default stream). Throws std::runtime_error.
void rope_cos_sin_cuda(const int32_t* positions, int64_t n_positions, const uint64_t* turns_fixed,
                       int64_t n_freqs, float attention_factor, float* cos_out, float* sin_out,
                       uintptr_t stream);

}  // namespace ringattn
