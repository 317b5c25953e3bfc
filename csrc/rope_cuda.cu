// CUDA kernel: exact-phase RoPE cos/sin table, one thread per (position, frequency).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "rope_cuda.h"
#include "rope_phase.h"

namespace ringattn {
namespace {

__global__ void rope_cos_sin_kernel(const int32_t* __restrict__ positions, int64_t n_positions,
                                    const uint64_t* __restrict__ turns_fixed, int64_t n_freqs,
                                    float attention_factor, float* __restrict__ cos_out,
                                    float* __restrict__ sin_out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_positions * n_freqs) return;
  const int64_t p = idx / n_freqs;
  const int64_t i = idx - p * n_freqs;
  float s, c;
  // Precise sincosf: the angle is already reduced to [-pi, pi), so this is cheap and accurate.
  sincosf(rope_reduced_angle(static_cast<uint32_t>(positions[p]), turns_fixed[i]), &s, &c);
  cos_out[idx] = c * attention_factor;
  sin_out[idx] = s * attention_factor;
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("ringattn CUDA error in ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

}  // namespace

int cuda_device_count(std::string* reason) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    if (reason) *reason = cudaGetErrorString(err);
    cudaGetLastError();  // reset the runtime's last error so later calls start clean
    return 0;
  }
  return count;
}

void rope_cos_sin_cuda(const int32_t* positions, int64_t n_positions, const uint64_t* turns_fixed,
                       int64_t n_freqs, float attention_factor, float* cos_out, float* sin_out,
                       uintptr_t stream) {
  const int64_t total = n_positions * n_freqs;
  if (total == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  rope_cos_sin_kernel<<<static_cast<unsigned>(blocks), kThreads, 0,
                        reinterpret_cast<cudaStream_t>(stream)>>>(
      positions, n_positions, turns_fixed, n_freqs, attention_factor, cos_out, sin_out);
  check(cudaGetLastError(), "rope_cos_sin_kernel launch");
}

}  // namespace ringattn
