// The runtime behind the CUDA emulation (csrc/emu/cuda_emu.h): host C++ only, no CUDA headers.
//
// A launch runs its grid block after block; each thread of a block is a fiber with its own stack,
// and the fibers of a block switch only at __syncthreads and at warp collectives (shuffles, mma),
// so a kernel runs lane by lane, deterministically, on one OS thread. Shared and global memory
// accesses of the kernel's translation unit reach the checkers through the compiler's
// ThreadSanitizer instrumentation hooks (__tsan_read4(addr), ...), which this runtime implements
// itself (no TSan runtime is linked). See cuda_emu_runtime.cpp for the checkers' rules.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

// Emulator code that runs inside a kernel's fibers but is not the kernel's own: never instrumented,
// so its memory accesses (fragment gathering, atomics, thread indices) are not checked as the kernel's.
#define RA_EMU_NOINSTR __attribute__((no_sanitize("thread"), noinline))

namespace ringattn_emu {

struct Dim3 {
  unsigned x, y, z;
};

// One kernel launch: grid, block, dynamic shared memory and where its memory lives.
struct LaunchConfig {
  Dim3 grid{1, 1, 1}, block{1, 1, 1};
  size_t smem_bytes = 0;              // dynamic shared memory asked for at the launch
  const void* kernel = nullptr;       // identity for cudaFuncSetAttribute
  const char* site = "";              // the launching function (__PRETTY_FUNCTION__)
  int line = 0;                       // and line
  unsigned char* arena = nullptr;     // the translation unit's extern __shared__ array
  size_t arena_bytes = 0;
  const void* params = nullptr;       // the kernel's parameter block (read-only to the kernel)
  size_t params_bytes = 0;
};

// Runs thread_main(ctx) as every thread of every block; returns a cudaError_t value (0: success).
int run_grid(const LaunchConfig& cfg, void (*thread_main)(void*), void* ctx);

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
int set_max_dynamic_smem(const void* kernel, int bytes);
int get_last_error(bool reset);
const char* error_string(int err);

// Built-in variables of the running thread.
Dim3 thread_idx();
Dim3 block_idx();
Dim3 block_dim();
Dim3 grid_dim();

// __syncthreads() at file:line.
void syncthreads(const char* file, int line);

// Warp shuffles: every lane of `mask` must arrive (same mode, mask and call site); returns the source
// lane's 64-bit payload. mode: 0 idx, 1 up, 2 down, 3 xor (the PTX shfl.sync modes).
uint64_t shfl_sync(int mode, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line);

// A tensor-core instruction, named by its PTX text (only the m16n8k16 row.col f32 bf16/f16 forms):
// gathers the 32 lanes' fragments at a warp barrier, computes D = A B + C in fp32, scatters D.
// Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type". The
// products are exact; they are added to C in k order with fp32 round-to-nearest, a model of the
// tensor core's accumulation, not a bit-exact one (its internal order and rounding are unspecified).
void mma_sync(const char* ptx, float c[4], const uint32_t a[4], const uint32_t b[2],
              const char* file = __builtin_FILE(), int line = __builtin_LINE());

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16, named by its PTX text: `row` is this lane's
// row address (lane 8 m + r: row r of matrix m, 16 bytes, 16-byte aligned); regs[m] receives the
// lane's part of matrix m by the ISA's table (runtime: complete_ldmatrix).
void ldmatrix(const char* ptx, uint32_t* regs, const void* row, const char* file = __builtin_FILE(),
              int line = __builtin_LINE());

// cp.async.cg.shared.global [dst], [src], 16, src_bytes (the rest zero-filled), cp.async.commit_group
// and cp.async.wait_group n, each named by its PTX text: a copy's bytes land in `dst` only at the
// wait that completes its group (the runtime's overview says what the checkers report).
void cp_async(const char* ptx, void* dst, const void* src, int src_bytes, const char* file = __builtin_FILE(),
              int line = __builtin_LINE());
void cp_async_commit(const char* ptx);
void cp_async_wait(const char* ptx, int pending);

// Atomic read-modify-write of `bytes` at addr by the running thread (bounds-checked, recorded as
// atomic: atomics never race with each other).
void note_atomic(const void* addr, size_t bytes);

// ---- checker state and report (driver / tests) -------------------------------------------------

// Global buffers the kernels may touch: once any is registered, a global access outside all of
// them (and outside the thread's stack, shared memory and the parameter block) is out of bounds.
void register_buffer(const void* ptr, size_t bytes, const char* name);
void clear_buffers();
// Launches only check their configuration (grid, block, shared memory) and run no block.
void set_dry_run(bool on);
void reset_report();
// JSON: {"counts": {category: n}, "messages": [...], "launches": [...]}.
size_t report_json(char* buf, size_t len);
size_t total_errors();

// Test hook: run one warp (32 fibers) through mma_sync with the given per-lane fragments.
int mma_warp_test(const char* ptx, const uint32_t* a, const uint32_t* b, float* c);

// ---- numeric conversions (round to nearest even, as cvt.rn) ------------------------------------

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// cvt.rn.bf16.f32: round to nearest even; NaN gives the canonical NaN 0x7fff.
inline uint16_t f32_to_bf16_rn(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return sign ? -mag : mag;
  }
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

// cvt.rn.f16.f32: round to nearest even, overflow to inf, subnormals kept; NaN gives 0x7fff.
inline uint16_t f32_to_f16_rn(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 (incl. inf) rounds to inf
  if (a >= 0x38800000u) {  // normal half (>= 2^-14): rebias the exponent by 112, round at bit 13
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13));
  }
  // Subnormal half: units of 2^-24. |f| < 2^-14 has exponent <= 112; shift its 24-bit significand.
  const uint32_t exp = a >> 23;
  if (exp < 102) return sign;  // below half the smallest subnormal (2^-25): rounds to zero
  const uint32_t sig = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - exp;  // value = sig * 2^(exp - 150) = (sig >> shift) units of 2^-24
  const uint32_t q = sig >> shift, rem = sig & ((1u << shift) - 1u), half = 1u << (shift - 1);
  const uint32_t rounded = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
  return static_cast<uint16_t>(sign | rounded);  // 1024 carries into the smallest normal exactly
}

}  // namespace ringattn_emu
