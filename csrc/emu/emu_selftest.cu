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

// ---- ldmatrix and cp.async (the forms attn_cuda.cu uses) ----------------------------------------

// Shared [32][16] uint16 matrix m[r][c] = 16 r + c (written by all, then a barrier). Lane l of warp w
// addresses row l % 8 of matrix l / 8 at m[l][8 w]. Block 0: out[8 t + 0..3] = ldmatrix .x4,
// out[8 t + 4..7] = .x4.trans; block 1: out[8 t + 0..1] = .x2.trans (register bits as stored).
__global__ void ldmatrix_kernel(float* out, int) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* m = reinterpret_cast<uint16_t*>(smem_raw);
  for (int i = 0; i < 8; ++i) m[threadIdx.x * 8 + i] = static_cast<uint16_t>(threadIdx.x * 8 + i);
  __syncthreads();
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint16_t* row = m + lane * 16 + 8 * warp;
  uint32_t* o = reinterpret_cast<uint32_t*>(out) + 8 * (threadIdx.x + blockIdx.x * blockDim.x);
  uint32_t r[4];
  if (blockIdx.x == 0) {
    ::ringattn_emu::ldmatrix("ldmatrix.sync.aligned.m8n8.x4.shared.b16", r, row);
    for (int i = 0; i < 4; ++i) o[i] = r[i];
    ::ringattn_emu::ldmatrix("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", r, row);
    for (int i = 0; i < 4; ++i) o[4 + i] = r[i];
  } else {
    ::ringattn_emu::ldmatrix("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16", r, row);
    o[0] = r[0];
    o[1] = r[1];
  }
}

// Warp 1 rewrites its rows while warp 0's ldmatrix reads them, no barrier between.
__global__ void ldmatrix_race_kernel(float*, int) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* m = reinterpret_cast<uint16_t*>(smem_raw);
  for (int i = 0; i < 8; ++i) m[threadIdx.x * 8 + i] = 0;
  __syncthreads();
  uint32_t r[4];
  if (threadIdx.x < 32) {
    ::ringattn_emu::ldmatrix("ldmatrix.sync.aligned.m8n8.x4.shared.b16", r, m + 256 + (threadIdx.x % 16) * 16);
  } else {
    for (int i = 0; i < 8; ++i) m[threadIdx.x * 8 + i] = 1;
  }
}

// A row address 4 bytes off the 16-byte grid.
__global__ void ldmatrix_misaligned_kernel(float*, int) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* m = reinterpret_cast<uint16_t*>(smem_raw);
  for (int i = 0; i < 8; ++i) m[threadIdx.x * 8 + i] = 0;
  __syncthreads();
  uint32_t r[4];
  ::ringattn_emu::ldmatrix("ldmatrix.sync.aligned.m8n8.x4.shared.b16", r, m + (threadIdx.x % 32) * 16 + 2);
}

// Thread t copies out[8 t .. 8 t + 3] (which it wrote) to shared bytes 16 t .. 16 t + 15 in group 1
// (odd threads: src-size 8, the rest zero-filled) and the same again to 16 (64 + t) in group 2.
// After wait_group 1 (group 1 complete, group 2 may still fly) it reads its own group-1 copy into
// out[8 t + 4..5]; after wait_group 0 and a barrier, its neighbour's group-2 copy into out[8 t + 6..7].
__global__ void cp_async_kernel(float* out, int) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const unsigned t = threadIdx.x, n = blockDim.x;
  float* o = out + 8 * (t + blockIdx.x * n);
  for (int i = 0; i < 4; ++i) o[i] = static_cast<float>(1000 * blockIdx.x + 10 * t + i + 1);
  const int bytes = t % 2 ? 8 : 16;
  ::ringattn_emu::cp_async("cp.async.cg.shared.global", s + 4 * t, o, bytes);
  ::ringattn_emu::cp_async_commit("cp.async.commit_group");
  ::ringattn_emu::cp_async("cp.async.cg.shared.global", s + 4 * (n + t), o, bytes);
  ::ringattn_emu::cp_async_commit("cp.async.commit_group");
  ::ringattn_emu::cp_async_wait("cp.async.wait_group", 1);
  o[4] = s[4 * t + 1];
  o[5] = s[4 * t + 3];
  ::ringattn_emu::cp_async_wait("cp.async.wait_group", 0);
  __syncthreads();
  const unsigned u = (t + 1) % n;
  o[6] = s[4 * (n + u) + 1];
  o[7] = s[4 * (n + u) + 3];
}

// Reads its own copy's destination before any wait_group: in flight (and still the old bytes).
__global__ void cp_async_early_read_kernel(float* out, int) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const unsigned t = threadIdx.x;
  float* o = out + 8 * (t + blockIdx.x * blockDim.x);
  for (int i = 0; i < 4; ++i) s[4 * t + i] = -1.0f, o[i] = 2.0f;
  ::ringattn_emu::cp_async("cp.async.cg.shared.global", s + 4 * t, o, 16);
  ::ringattn_emu::cp_async_commit("cp.async.commit_group");
  o[4] = s[4 * t];
  ::ringattn_emu::cp_async_wait("cp.async.wait_group", 0);
}

// wait_group 1 with two groups committed: the second group's destination is read while in flight.
__global__ void cp_async_wait_too_few_kernel(float* out, int) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const unsigned t = threadIdx.x, n = blockDim.x;
  float* o = out + 8 * (t + blockIdx.x * n);
  for (int i = 0; i < 4; ++i) o[i] = 2.0f;
  ::ringattn_emu::cp_async("cp.async.cg.shared.global", s + 4 * t, o, 16);
  ::ringattn_emu::cp_async_commit("cp.async.commit_group");
  ::ringattn_emu::cp_async("cp.async.cg.shared.global", s + 4 * (n + t), o, 16);
  ::ringattn_emu::cp_async_commit("cp.async.commit_group");
  ::ringattn_emu::cp_async_wait("cp.async.wait_group", 1);
  o[4] = s[4 * t] + s[4 * (n + t)];
  ::ringattn_emu::cp_async_wait("cp.async.wait_group", 0);
}

// Every thread waits for its own copy, then reads its neighbour's with no barrier in between.
__global__ void cp_async_no_barrier_kernel(float* out, int) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const unsigned t = threadIdx.x, n = blockDim.x;
  float* o = out + 8 * (t + blockIdx.x * n);
  for (int i = 0; i < 4; ++i) s[4 * t + i] = 0.0f, o[i] = 2.0f;
  __syncthreads();
  ::ringattn_emu::cp_async("cp.async.cg.shared.global", s + 4 * t, o, 16);
  ::ringattn_emu::cp_async_commit("cp.async.commit_group");
  ::ringattn_emu::cp_async_wait("cp.async.wait_group", 0);
  o[4] = s[4 * ((t + 1) % n)];
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
    {"ldmatrix", ldmatrix_kernel},
    {"ldmatrix_race", ldmatrix_race_kernel},
    {"ldmatrix_misaligned", ldmatrix_misaligned_kernel},
    {"cp_async", cp_async_kernel},
    {"cp_async_early_read", cp_async_early_read_kernel},
    {"cp_async_wait_too_few", cp_async_wait_too_few_kernel},
    {"cp_async_no_barrier", cp_async_no_barrier_kernel},
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
