// Positive controls of the CUDA emulation: small kernels, compiled exactly as attn_cuda.cu is
// (force-included cuda_emu.h, instrumented), each with one planted defect that one checker must
// report, and a clean kernel whose shuffles, barriers and atomics must give the CUDA results.
// Driven by tests/test_cuda_emulation.py through ra_emu_selftest(name, out, n).
#include <cstring>

namespace ringattn {
namespace {

// Every thread: shared-memory exchange across a barrier, the four shuffles, an atomic.
// out[8 t + 0..5]: neighbour's value, xor 1, up 1, down 1, idx 3, xor 8 in groups of 8; out[n - 1]: atomics.
__global__ void clean_kernel(float* out, int n) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x + blockIdx.x * blockDim.x;
  const float x = static_cast<float>(t);
  s[threadIdx.x] = x;
  __syncthreads();
  float* o = out + 8 * t;
  o[0] = s[(threadIdx.x + 1) % blockDim.x];
  o[1] = __shfl_xor_sync(0xffffffffu, x, 1);
  o[2] = __shfl_up_sync(0xffffffffu, x, 1);
  o[3] = __shfl_down_sync(0xffffffffu, x, 1);
  o[4] = __shfl_sync(0xffffffffu, x, 3);
  o[5] = __shfl_xor_sync(0xffffffffu, x, 8, 8);
  atomicAdd(out + n - 1, 1.0f);
}

// Reads a neighbour's element without a barrier after the writes.
__global__ void race_kernel(float* out, int) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  s[threadIdx.x] = 1.0f;
  out[threadIdx.x + blockIdx.x * blockDim.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// A loop that reloads a tile: the barrier after the load is there, the one before it is not, so
// the next iteration's writes race with this iteration's reads (write after read).
__global__ void war_kernel(float* out, int) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  float acc = 0.0f;
  for (int it = 0; it < 2; ++it) {
    s[threadIdx.x] = static_cast<float>(it);
    __syncthreads();
    acc += s[(threadIdx.x + 1) % blockDim.x];
  }
  out[threadIdx.x + blockIdx.x * blockDim.x] = acc;
}

__global__ void uninitialized_kernel(float* out, int) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  __syncthreads();
  out[threadIdx.x + blockIdx.x * blockDim.x] = s[threadIdx.x];
}

// One element past the launch's dynamic shared memory (blockDim floats).
__global__ void shared_oob_kernel(float*, int) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  s[threadIdx.x + 1] = 1.0f;
}

__global__ void misaligned_kernel(float* out, int) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw + 2);
  s[0] = 1.0f;
  out[0] = s[0];
}

// Half the block returns before a barrier the other half waits at.
__global__ void exited_barrier_kernel(float* out, int) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x + blockIdx.x * blockDim.x] = 1.0f;
}

// The two warps wait at different barriers.
__global__ void divergent_barrier_kernel(float* out, int) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x + blockIdx.x * blockDim.x] = 1.0f;
}

// Lane 0 exits before a full-warp shuffle.
__global__ void shuffle_deadlock_kernel(float* out, int) {
  if (threadIdx.x % 32 == 0) return;
  out[threadIdx.x + blockIdx.x * blockDim.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Writes one element past the registered buffer.
__global__ void global_oob_kernel(float* out, int n) {
  if (threadIdx.x == 0 && blockIdx.x == 1) out[n] = 1.0f;
}

// Every thread writes out[0]; out[1] only by atomics (which do not race).
__global__ void global_race_kernel(float* out, int) {
  out[0] = static_cast<float>(threadIdx.x);
  atomicAdd(out + 1, 1.0f);
}

struct Entry {
  const char* name;
  void (*kernel)(float*, int);
};
const Entry kEntries[] = {
    {"clean", clean_kernel},
    {"race", race_kernel},
    {"war", war_kernel},
    {"uninitialized", uninitialized_kernel},
    {"shared_oob", shared_oob_kernel},
    {"misaligned", misaligned_kernel},
    {"exited_barrier", exited_barrier_kernel},
    {"divergent_barrier", divergent_barrier_kernel},
    {"shuffle_deadlock", shuffle_deadlock_kernel},
    {"global_oob", global_oob_kernel},
    {"global_race", global_race_kernel},
};

}  // namespace
}  // namespace ringattn

// Launches kernel `name` on 2 blocks of 64 threads with 64 floats of dynamic shared memory (or with
// `smem` bytes and grid `grid_y` for the launch-configuration checks); returns cudaGetLastError().
extern "C" __attribute__((visibility("default"))) int ra_emu_selftest(const char* name, float* out, int n,
                                                                       unsigned smem, unsigned grid_y) {
  for (const auto& e : ringattn::kEntries) {
    if (std::strcmp(e.name, name) != 0) continue;
    RA_LAUNCH(e.kernel, dim3(2, grid_y), 64, smem, nullptr)(out, n);
    return cudaGetLastError();
  }
  return -1;
}
