// CUDA emulation: compiles a .cu file (csrc/attn_cuda.cu, the file the GPU build compiles) as host
// C++ and runs its kernels lane by lane on the CPU. Force-included before the source:
//
//   g++ -std=c++17 -x c++ -DRINGATTN_CUDA_EMULATION -include csrc/emu/cuda_emu.h
//       -fsanitize=thread --param=tsan-instrument-func-entry-exit=0 -fno-strict-aliasing ...
//
// What it supplies, with the CUDA spelling the source uses:
// - qualifiers (__global__, __device__, __forceinline__, __shared__, __align__; __launch_bounds__ is
//   ignored: registers are not modelled) and threadIdx / blockIdx / blockDim / gridDim (per fiber);
// - __syncthreads() (a block barrier that checks every live thread reaches the same one),
//   __shfl_*_sync (warp collectives) and atomicAdd;
// - __half / __nv_bfloat16 (and the x2 pairs) with round-to-nearest-even conversions;
// - the runtime calls the host code makes (cudaFuncSetAttribute, cudaGetLastError, ...) and
//   RA_LAUNCH(kernel, grid, block, smem, stream)(args...), the source's spelling of
//   kernel<<<grid, block, smem, stream>>>(args...);
// - ::ringattn_emu::mma_sync(ptx, c, a, b), ldmatrix(ptx, regs, row), cp_async(ptx, dst, src, bytes),
//   cp_async_commit(ptx) and cp_async_wait(ptx, n) for the source's PTX `asm` sites (its #if hooks;
//   semantics and checks in cuda_emu_runtime.h/.cpp);
// - the dynamic shared memory: `extern __shared__ ... smem_raw[]` inside namespace ringattn (in
//   the unnamed namespace, where the kernels are) resolves to the static arena defined below, which
//   the checkers watch. Only that one dynamic array is supported: a static `__shared__ T x[N]`
//   would become per-thread (tests/test_cuda_emulation.py checks the source has none).
//
// Kernel bodies are compiled unchanged. The source's memory accesses are seen through GCC's
// ThreadSanitizer instrumentation hooks, implemented by cuda_emu_runtime.cpp (no TSan runtime).
#pragma once
#if !defined(RINGATTN_CUDA_EMULATION)
#error "cuda_emu.h is force-included only by the emulation build (-DRINGATTN_CUDA_EMULATION)"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_emu_runtime.h"

// Device code paths of shared host/device headers (attn_math.h's exp2f, logf, __uint_as_float).
#define __CUDA_ARCH__ 890

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

// ---- built-in types and variables --------------------------------------------------------------

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

namespace ringattn_emu {
inline uint3 as_uint3(Dim3 d) { return {d.x, d.y, d.z}; }
inline dim3 as_dim3(Dim3 d) { return {d.x, d.y, d.z}; }
}  // namespace ringattn_emu

#define threadIdx (::ringattn_emu::as_uint3(::ringattn_emu::thread_idx()))
#define blockIdx (::ringattn_emu::as_uint3(::ringattn_emu::block_idx()))
#define blockDim (::ringattn_emu::as_dim3(::ringattn_emu::block_dim()))
#define gridDim (::ringattn_emu::as_dim3(::ringattn_emu::grid_dim()))
#define warpSize 32

// ---- integer / float min and max of CUDA's math headers ----------------------------------------

#define RA_EMU_MINMAX(T)                        \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
RA_EMU_MINMAX(int)
RA_EMU_MINMAX(unsigned int)
RA_EMU_MINMAX(long)
RA_EMU_MINMAX(unsigned long)
RA_EMU_MINMAX(long long)
RA_EMU_MINMAX(unsigned long long)
#undef RA_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// ---- reinterpretation intrinsics ---------------------------------------------------------------

inline float __uint_as_float(unsigned int u) { return ::ringattn_emu::bits_f32(u); }
inline unsigned int __float_as_uint(float f) { return ::ringattn_emu::f32_bits(f); }
inline float __int_as_float(int i) { return ::ringattn_emu::bits_f32(static_cast<uint32_t>(i)); }
inline int __float_as_int(float f) { return static_cast<int>(::ringattn_emu::f32_bits(f)); }

// ---- fp16 / bf16 (cuda_fp16.h, cuda_bf16.h) ------------------------------------------------------

struct __half {
  unsigned short __x;
};
struct __half2 {
  __half x, y;  // x: low 16 bits of the 32-bit register
};
struct __nv_bfloat16 {
  unsigned short __x;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
static_assert(sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4, "packed pairs are one 32-bit register");

inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline float __half2float(__half h) { return ::ringattn_emu::f16_to_f32(h.__x); }
inline __half __float2half_rn(float f) { return {::ringattn_emu::f32_to_f16_rn(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __half2 __float2half2_rn(float f) { return {__float2half_rn(f), __float2half_rn(f)}; }

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline float __bfloat162float(__nv_bfloat16 h) { return ::ringattn_emu::bf16_to_f32(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {::ringattn_emu::f32_to_bf16_rn(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __nv_bfloat162 __float2bfloat162_rn(float f) { return {__float2bfloat16_rn(f), __float2bfloat16_rn(f)}; }

// ---- barriers, warp collectives, atomics ---------------------------------------------------------

#define __syncthreads() ::ringattn_emu::syncthreads(__FILE__, __LINE__)

namespace ringattn_emu {

inline int shfl_width(int width = 32) { return width; }

template <class T>
RA_EMU_NOINSTR T shfl_as(int mode, unsigned mask, T var, int arg, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable<T>::value && (sizeof(T) == 4 || sizeof(T) == 8),
                "shuffles move 32- or 64-bit values");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shfl_sync(mode, mask, bits, arg, width, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <class T>
RA_EMU_NOINSTR T atomic_add(T* address, T val) {
  note_atomic(address, sizeof(T));
  const T old = *address;
  T sum = old + val;
  if constexpr (std::is_same<T, float>::value) {
    // CUDA Programming Guide, "Floating-Point Standard": fp32 atomic adds on global memory flush
    // subnormal inputs and results to zero (FADD.F32.FTZ.RN); on shared memory they keep them.
    // The emulated kernels add atomically to global memory only.
    auto ftz = [](float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; };
    sum = ftz(ftz(old) + ftz(val));
  }
  *address = sum;
  return old;
}

}  // namespace ringattn_emu

// (mask, var, src_lane_or_delta_or_lane_mask[, width = warpSize]), as in CUDA.
#define __shfl_sync(mask, var, src, ...) \
  ::ringattn_emu::shfl_as(0, mask, var, src, ::ringattn_emu::shfl_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, var, delta, ...) \
  ::ringattn_emu::shfl_as(1, mask, var, delta, ::ringattn_emu::shfl_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, var, delta, ...) \
  ::ringattn_emu::shfl_as(2, mask, var, delta, ::ringattn_emu::shfl_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, var, lane_mask, ...) \
  ::ringattn_emu::shfl_as(3, mask, var, lane_mask, ::ringattn_emu::shfl_width(__VA_ARGS__), __FILE__, __LINE__)

inline float atomicAdd(float* address, float val) { return ::ringattn_emu::atomic_add(address, val); }
inline int atomicAdd(int* address, int val) { return ::ringattn_emu::atomic_add(address, val); }
inline unsigned int atomicAdd(unsigned int* address, unsigned int val) {
  return ::ringattn_emu::atomic_add(address, val);
}

// ---- runtime API ---------------------------------------------------------------------------------

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

inline const char* cudaGetErrorString(cudaError_t err) { return ::ringattn_emu::error_string(err); }
inline cudaError_t cudaGetLastError() { return static_cast<cudaError_t>(::ringattn_emu::get_last_error(true)); }
inline cudaError_t cudaPeekAtLastError() {
  return static_cast<cudaError_t>(::ringattn_emu::get_last_error(false));
}
template <class F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return static_cast<cudaError_t>(::ringattn_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value));
}

// ---- dynamic shared memory: the arena behind `extern __shared__ unsigned char smem_raw[]` --------

namespace ringattn_emu {
// Larger than any block may ask for (sm_90's 227 KB), so that an access a little past the launch's
// dynamic size is still inside the arena: reported as out of bounds, never touching other memory.
constexpr size_t kArenaBytes = 256 * 1024;
}  // namespace ringattn_emu

namespace ringattn {
namespace {
alignas(128) unsigned char smem_raw[::ringattn_emu::kArenaBytes];
}  // namespace
}  // namespace ringattn

// ---- launches ----------------------------------------------------------------------------------

namespace ringattn_emu {

template <class... Params>
struct Launcher {
  void (*kernel)(Params...);
  LaunchConfig cfg;

  // The arguments are converted to the kernel's parameter types once, into one parameter block
  // shared by all threads (read-only to them, as the parameter space is); each thread's call then
  // copies them into its own frame.
  template <class... Args>
  void operator()(Args&&... args) const {
    struct Frame {
      std::tuple<std::decay_t<Params>...> params;
      void (*kernel)(Params...);
    } frame{std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...), kernel};
    LaunchConfig c = cfg;
    c.params = &frame;
    c.params_bytes = sizeof frame;
    run_grid(c, &Launcher::thread_main<Frame>, &frame);
  }

  template <class Frame>
  static void thread_main(void* ctx) {
    Frame* f = static_cast<Frame*>(ctx);
    std::apply(f->kernel, f->params);
  }
};

template <class... Params>
Launcher<Params...> make_launcher(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                                  const char* site, int line) {
  LaunchConfig c;
  c.grid = {grid.x, grid.y, grid.z};
  c.block = {block.x, block.y, block.z};
  c.smem_bytes = smem;
  c.kernel = reinterpret_cast<const void*>(kernel);
  c.site = site;
  c.line = line;
  c.arena = ::ringattn::smem_raw;
  c.arena_bytes = sizeof ::ringattn::smem_raw;
  return {kernel, c};
}

}  // namespace ringattn_emu

#define RA_LAUNCH(kernel, grid, block, smem, stream) \
  ::ringattn_emu::make_launcher(kernel, grid, block, smem, stream, __PRETTY_FUNCTION__, __LINE__)
