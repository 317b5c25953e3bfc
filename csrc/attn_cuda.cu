// CUDA block attention on tensor cores (mma.sync m16n8k16, bf16/fp16 in, fp32 accumulate).
//
// Forward: one CTA per (64 query rows, batch * query head); each warp owns 16 query rows and keeps
// its output tile, online-softmax state and (head dim <= 128) Q's fragments in registers. K and V
// tiles stream through two shared-memory stages by cp.async (the next tile's copy in flight during
// the current tile's math); Q is rotated once at load, K once for the whole call by a rotate_rows
// pass into the rope_work workspace (no rotation per query tile). Fragments come from the padded
// (conflict-free) shared rows by ldmatrix. Backward: one CTA per (key tile, batch * kv
// head, column split); each warp owns 16 keys and keeps their dK, dV columns in registers while it
// walks every query tile of every head of its group (GQA reduced in the kernel), their Q and dO
// tiles streaming through cp.async stages; K is rotated as it loads (once per CTA), Q once for the
// call by rotate_rows (no rotation per key tile). RoPE's angles
// are integer turns (attn_math.h: rope_turns, sincos_turns; no sincosf stack frame). dQ goes to an fp32
// workspace with atomics (deterministic: from its own pass over each query tile's keys,
// attn_backward_dq_kernel), dK to an fp32 workspace, and a finishing kernel applies RoPE's transpose
// and writes the gradients in the caller's dtype and strides.
//
// Variants (template flags): plain; EXTRA (sliding window, softcap, ALiBi); EXTRA + DROPOUT
// (attention dropout, attn_math.h's Philox per element from global indices, regenerated in the
// backward). The plain and EXTRA kernels never read the Dropout argument: their code is the same
// with or without the dropout variant (ptxas: same registers, no spills).
//
// Shared memory per CTA (bf16/fp16, rows padded by 8 elements against bank conflicts): forward
// (FwdTiles) 19,968 / 28,160 / 36,352 / 68,864 B at head-dim tiles 64 / 96 / 128 / 256 (at least two
// CTAs per sm_89 SM up to 128); backward (BwdTiles) 44,544 / 46,848 / 77,312 / 88,960 B; deterministic
// dQ pass (DqTiles) 19,968 / 28,160 / 36,352 / 85,760 B: within sm_89's 101,376 B. Head dims 66..96
// run in the 96-column tile, not padded to 128.
#if !defined(RINGATTN_CUDA_EMULATION)  // the CPU emulation (csrc/emu/cuda_emu.h) supplies these
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define RA_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "attn_cuda.h"
#include "attn_math.h"

namespace ringattn {
namespace {

constexpr int kPad = 8;  // elements of padding per shared-memory row
constexpr size_t kMaxSmemSm89 = 101376;  // opt-in shared memory per block on sm_89 (99 KB)

// ---- element conversions (inputs are 16-bit bit patterns) ----------------------------------

template <int DT>
__device__ __forceinline__ float to_float(uint16_t bits) {
  if constexpr (DT == kBFloat16) {
    return bf16_to_float(bits);
  } else {
    return __half2float(__ushort_as_half(bits));
  }
}

// Hardware round-to-nearest conversions (cvt.rn.bf16.f32 / cvt.rn.f16.f32).
template <int DT>
__device__ __forceinline__ uint16_t to_bits(float x) {
  if constexpr (DT == kBFloat16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  } else {
    return __half_as_ushort(__float2half_rn(x));
  }
}

template <int DT>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (DT == kBFloat16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// ---- tensor-core fragments (PTX ISA, mma.m16n8k16 layouts) -----------------------------------
// g = lane / 4, t = lane % 4. A 16x16: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..).
// B 16x8: b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g). C 16x8: c0,c1 (g, 2t..), c2,c3 (g+8, 2t..).

template <int DT>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  if constexpr (DT == kBFloat16) {
#if defined(RINGATTN_CUDA_EMULATION)
    ::ringattn_emu::mma_sync("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", c, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  } else {
#if defined(RINGATTN_CUDA_EMULATION)
    ::ringattn_emu::mma_sync("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", c, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
}

// ---- fragment loads: ldmatrix from padded shared rows ------------------------------------------
// ldmatrix.m8n8 (PTX ISA): lane 8 j + r addresses row r of 8x8 matrix j (16 bytes); register j of lane
// (g, t) receives that matrix's row g, elements 2t and 2t + 1 (.trans: column g, rows 2t and 2t + 1).
// Rows are padded by 8 elements (kPad): a row pitch of an odd number of 16-byte units puts the 8 rows
// of a matrix in 8 distinct 4-bank groups, so each matrix is one conflict-free shared access.

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const uint16_t* row) {
#if defined(RINGATTN_CUDA_EMULATION)
  ::ringattn_emu::ldmatrix("ldmatrix.sync.aligned.m8n8.x4.shared.b16", r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(row))));
#endif
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const uint16_t* row) {
#if defined(RINGATTN_CUDA_EMULATION)
  ::ringattn_emu::ldmatrix("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(row))));
#endif
}

__device__ __forceinline__ void ldsm_x2_t(uint32_t r[2], const uint16_t* row) {
#if defined(RINGATTN_CUDA_EMULATION)
  ::ringattn_emu::ldmatrix("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16", r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(row))));
#endif
}

// A tile at (m0, k0) of a row-major [m][k] shared matrix: a0..a3 are the 8x8 blocks at (m0, k0),
// (m0 + 8, k0), (m0, k0 + 8), (m0 + 8, k0 + 8).
__device__ __forceinline__ void load_a(uint32_t a[4], const uint16_t* s, int ld, int m0, int k0) {
  const int j = (threadIdx.x & 31) >> 3, r = threadIdx.x & 7;
  ldsm_x4(a, s + (m0 + r + 8 * (j & 1)) * ld + k0 + 8 * (j >> 1));
}

// A tile at (m0, k0) of a matrix stored transposed, [k][m]: the same blocks, each transposed.
__device__ __forceinline__ void load_a_t(uint32_t a[4], const uint16_t* s, int ld, int m0, int k0) {
  const int j = (threadIdx.x & 31) >> 3, r = threadIdx.x & 7;
  ldsm_x4_t(a, s + (k0 + r + 8 * (j >> 1)) * ld + m0 + 8 * (j & 1));
}

// Two B tiles, columns n0 .. n0 + 7 (b[0], b[1]) and n0 + 8 .. n0 + 15 (b[2], b[3]), at k0 of a
// matrix stored as [n][k] (e.g. K rows for S = Q K^T): blocks (n0, k0), (n0, k0 + 8), (n0 + 8, ...).
__device__ __forceinline__ void load_b_nk2(uint32_t b[4], const uint16_t* s, int ld, int k0, int n0) {
  const int j = (threadIdx.x & 31) >> 3, r = threadIdx.x & 7;
  ldsm_x4(b, s + (n0 + r + 8 * (j >> 1)) * ld + k0 + 8 * (j & 1));
}

// Two B tiles (as load_b_nk2) of a matrix stored as [k][n] (e.g. V rows for O = P V): the blocks at
// (k0, n0), (k0 + 8, n0), (k0, n0 + 8), (k0 + 8, n0 + 8), transposed.
__device__ __forceinline__ void load_b_kn2(uint32_t b[4], const uint16_t* s, int ld, int k0, int n0) {
  const int j = (threadIdx.x & 31) >> 3, r = threadIdx.x & 7;
  ldsm_x4_t(b, s + (k0 + r + 8 * (j & 1)) * ld + n0 + 8 * (j >> 1));
}

// One B tile at (k0, n0) of a [k][n] matrix: blocks (k0, n0), (k0 + 8, n0), transposed (lanes
// 16..31 give addresses ldmatrix .x2 does not use; theirs repeat lanes 0..15's).
__device__ __forceinline__ void load_b_kn(uint32_t b[2], const uint16_t* s, int ld, int k0, int n0) {
  const int j = (threadIdx.x & 15) >> 3, r = threadIdx.x & 7;
  ldsm_x2_t(b, s + (k0 + r + 8 * j) * ld + n0);
}

// Accumulator pair of 16x8 tiles (keys 2kk*8 .. 2kk*8+15) repacked as the A operand of the next mma.
template <int DT>
__device__ __forceinline__ void acc_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
  a[0] = pack2<DT>(c0[0], c0[1]);
  a[1] = pack2<DT>(c0[2], c0[3]);
  a[2] = pack2<DT>(c1[0], c1[1]);
  a[3] = pack2<DT>(c1[2], c1[3]);
}

// ---- tile loads with fused RoPE ---------------------------------------------------------------

struct RowSide {  // one operand's rows: global index and RoPE position of row i
  int64_t start, stride;
  const int32_t* positions;
  int64_t positions_sb;
  const void* freqs;
  const int64_t* cu;        // this side's document boundaries (null: none)
  const int64_t* align_cu;  // queries: the keys' own boundaries, to align by (null: no shift)
};

// Features (*ea, *eb) of pair i of a row: RoPE's pair (attn_math.h) for i < half_rot, else the
// next two pass-through features.
__device__ __forceinline__ void pair_features(int i, int half_rot, const AttnParams& p, int* ea, int* eb) {
  if (i < half_rot) {
    rope_pair(i, p.rotary_dim, p.interleaved, ea, eb);
  } else {
    *ea = 2 * half_rot + 2 * (i - half_rot);
    *eb = *ea + 1;
  }
}

// RoPE of rotary pair i of row `row` of batch b (its position from `side`), scaled by the attention
// factor; sign -1 applies the transpose (the gradients' way back). Angles as integer turns
// (attn_math.h: rope_turns, sincos_turns): no sincosf, whose large-argument path needs a stack frame.
__device__ __forceinline__ void rope_pair_apply(float* xa, float* xb, int i, int64_t b, int64_t row,
                                                const AttnParams& p, const RowSide& side, float sign) {
  const uint32_t pos = static_cast<uint32_t>(side.positions[b * side.positions_sb + row]);
  float sn, cs;
  sincos_turns(rope_turns(p.rope_mode, pos, side.freqs, i), p.attention_factor, &sn, &cs);
  rope_rotate(*xa, *xb, cs, sign * sn, xa, xb);
}

// Rows [row0, row0 + rows) of (b, h) from a (B, S, H, D) view into shared [rows][ld], rotated when
// `rotate`, zero-filled past S and past D (up to DMAX). Work item = one feature pair of one row.
template <int DT, int DMAX>
__device__ void load_rows(uint16_t* s, int ld, const View& view, int64_t b, int64_t h, int64_t row0, int rows,
                          int64_t S, int D, const AttnParams& p, const RowSide& side, bool rotate) {
  const uint16_t* base = reinterpret_cast<const uint16_t*>(view.ptr);
  const int half_rot = rotate ? p.rotary_dim / 2 : 0;
  for (int item = threadIdx.x; item < rows * (DMAX / 2); item += blockDim.x) {
    const int r = item / (DMAX / 2), i = item % (DMAX / 2);
    const int64_t row = row0 + r;
    int ea, eb;
    pair_features(i, half_rot, p, &ea, &eb);
    float xa = 0.0f, xb = 0.0f;
    if (row < S && eb < D) {
      const uint16_t* src = base + b * view.sb + row * view.ss + h * view.sh;
      xa = to_float<DT>(src[ea]);
      xb = to_float<DT>(src[eb]);
      if (i < half_rot) rope_pair_apply(&xa, &xb, i, b, row, p, side, 1.0f);
    }
    s[r * ld + ea] = to_bits<DT>(xa);
    s[r * ld + eb] = to_bits<DT>(xb);
  }
}

// ---- asynchronous tile copies (cp.async, 16 bytes, L2 only) ----------------------------------------

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
#if defined(RINGATTN_CUDA_EMULATION)
  ::ringattn_emu::cp_async("cp.async.cg.shared.global", dst, src, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src), "r"(src_bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(RINGATTN_CUDA_EMULATION)
  ::ringattn_emu::cp_async_commit("cp.async.commit_group");
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's committed groups are in flight (the older ones landed).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(RINGATTN_CUDA_EMULATION)
  ::ringattn_emu::cp_async_wait("cp.async.wait_group", N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Whether rows of a (B, S, H, D) view can be copied in 16-byte pieces: 8-element aligned address,
// strides and head dim (otherwise issue_rows copies element by element).
__device__ __forceinline__ bool rows_vectorizable(const View& v, int D) {
  return v.ptr % 16 == 0 && v.sb % 8 == 0 && v.ss % 8 == 0 && v.sh % 8 == 0 && D % 8 == 0;
}

// ROWS rows from row0 of (b, h), as they are (no RoPE), into shared [ROWS][ld], zero past S and past
// D (up to DMAX), by THREADS threads: by cp.async when VEC (the bytes land at the wait_group that
// completes the group the caller commits), else by plain loads and stores (visible at the next
// barrier). The sweeps pick VEC once per launch (rows_vectorizable), outside their loops, so the
// aligned sweep carries no element-wise code. Where a pass of THREADS pieces is whole rows (DMAX 64,
// 128, 256), a thread's 16-byte pieces share one column and step THREADS / (DMAX / 8) rows: one base
// address, then constant offsets. Otherwise (DMAX 96: 12 pieces a row, 128 threads) piece j of a
// thread is item threadIdx.x + j THREADS of the row-major tile, with its own row and column.
template <int DMAX, int ROWS, int THREADS, bool VEC>
__device__ __forceinline__ void issue_rows(uint16_t* s, int ld, const View& view, int64_t b, int64_t h, int64_t row0,
                                           int64_t S, int D) {
  constexpr int PIECES = DMAX / 8, ITEMS = ROWS * PIECES;
  static_assert(ITEMS % THREADS == 0, "whole passes: every thread copies ITEMS / THREADS pieces");
  const uint16_t* base = reinterpret_cast<const uint16_t*>(view.ptr);
  if constexpr (VEC && THREADS % PIECES != 0) {
    const uint16_t* src = base + b * view.sb + row0 * view.ss + h * view.sh;
    const int64_t rows_in = S - row0;
#pragma unroll
    for (int j = 0; j < ITEMS / THREADS; ++j) {
      const int item = static_cast<int>(threadIdx.x) + j * THREADS, r = item / PIECES, c = item % PIECES * 8;
      const bool in = r < rows_in && c < D;  // D % 8 == 0: a piece is wholly inside or outside
      cp_async16(s + r * ld + c, in ? src + r * view.ss + c : base, in ? 16 : 0);
    }
  } else if constexpr (VEC) {
    constexpr int STEP = THREADS / PIECES;
    const int r = static_cast<int>(threadIdx.x) / PIECES, c = static_cast<int>(threadIdx.x) % PIECES * 8;
    const uint16_t* src = base + b * view.sb + (row0 + r) * view.ss + h * view.sh + c;
    uint16_t* dst = s + r * ld + c;
    const int64_t rows_in = c < D ? S - row0 - r : 0;  // D % 8 == 0: a piece is wholly inside or outside
#pragma unroll
    for (int j = 0; j < ITEMS / THREADS; ++j) {
      const bool in = j * STEP < rows_in;
      cp_async16(dst + j * STEP * ld, in ? src + j * STEP * view.ss : base, in ? 16 : 0);
    }
  } else {
#pragma unroll 1
    for (int item = threadIdx.x; item < ITEMS; item += THREADS) {
      const int r = item / PIECES, c = item % PIECES * 8;
      const int64_t row = row0 + r;
      const uint16_t* src = base + b * view.sb + row * view.ss + h * view.sh + c;
      for (int e = 0; e < 8; ++e) s[r * ld + c + e] = row < S && c + e < D ? src[e] : uint16_t{0};
    }
  }
}

// Index and document of rows [row0, row0 + rows) into shared arrays (rows past S: doc -2). Query
// rows get their aligned index (attn_math.h), key rows their global index.
__device__ void load_row_meta(int64_t* index, int64_t* doc, int64_t row0, int rows, int64_t S,
                              const RowSide& side, const AttnParams& p) {
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    const int64_t row = row0 + r;
    const int64_t global = side.start + side.stride * row;
    doc[r] = row < S ? document_id(global, side.cu, p.n_cu) : -2;
    index[r] = aligned_index(global, doc[r], side.cu, side.align_cu);
  }
}

// Smallest and largest index, and documents, of the rows of a tile that lie inside a document
// (*d_max < 0 when no row does). Each warp reduces all ROWS shared entries itself (lane l reads rows
// l, l + 32, ...; then butterfly shuffles), so every thread gets the result without a barrier.
template <int ROWS>
__device__ void tile_range(const int64_t* index, const int64_t* doc, int64_t* lo, int64_t* hi, int64_t* d_min,
                           int64_t* d_max) {
  int64_t l = kIndexMax, h = kIndexMin, dl = kIndexMax, dh = -1;
#pragma unroll
  for (int r = threadIdx.x & 31; r < ROWS; r += 32) {
    const int64_t d = doc[r];
    if (d < 0) continue;
    l = imin(l, index[r]);
    h = imax(h, index[r]);
    dl = imin(dl, d);
    dh = imax(dh, d);
  }
#pragma unroll
  for (int lanes = 1; lanes < 32; lanes *= 2) {
    l = imin(l, __shfl_xor_sync(0xffffffffu, l, lanes));
    h = imax(h, __shfl_xor_sync(0xffffffffu, h, lanes));
    dl = imin(dl, __shfl_xor_sync(0xffffffffu, dl, lanes));
    dh = imax(dh, __shfl_xor_sync(0xffffffffu, dh, lanes));
  }
  *lo = l, *hi = h, *d_min = dl, *d_max = dh;
}

RowSide q_side(const AttnParams& p) {
  const auto* cu = reinterpret_cast<const int64_t*>(p.cu_seqlens);
  return {p.q_start, p.q_stride, reinterpret_cast<const int32_t*>(p.q_positions), p.q_positions_sb,
          reinterpret_cast<const void*>(p.rope_freqs), cu, reinterpret_cast<const int64_t*>(p.k_cu_seqlens)};
}

RowSide k_side(const AttnParams& p) {
  const uintptr_t freqs = p.k_rope_freqs ? p.k_rope_freqs : p.rope_freqs;
  const uintptr_t cu = p.k_cu_seqlens ? p.k_cu_seqlens : p.cu_seqlens;
  return {p.k_start, p.k_stride, reinterpret_cast<const int32_t*>(p.k_positions), p.k_positions_sb,
          reinterpret_cast<const void*>(freqs), reinterpret_cast<const int64_t*>(cu), nullptr};
}

// Whether a call needs the kernels' EXTRA variant (sliding window, softcap, ALiBi): the plain one
// keeps today's instructions and registers.
bool needs_extra(const AttnParams& p) {
  return p.window_left >= 0 || p.window_right >= 0 || p.softcap > 0.0f || p.alibi_slopes != 0;
}

// Whether a call needs the DROPOUT variant (EXTRA with dropout's mask: the EXTRA features then
// follow their parameters at run time, and the plain and EXTRA kernels draw no random numbers).
bool needs_dropout(const AttnParams& p) { return p.dropout_p > 0.0; }

// ---- forward ----------------------------------------------------------------------------------

// K/V tiles go through kStages shared buffers (cp.async: the next tile's copy is in flight during
// the current tile's math). Up to head dim 128, Q's A fragments stay in registers for the whole
// sweep and its tile is staged in the K/V buffers (before the first K/V copy), so that several CTAs
// fit an sm_89 SM (100 KB): D 64: 19,968 B (4 by shared memory, 3 by its 142 registers), D 96:
// 28,160 B (3 for the plain kernel, 12 warps: kMinBlocks), D 128: 36,352 B (2, 8 warps). Head dim 256 keeps Q in shared
// memory (its fragments would need 64 more registers) with 16-key tiles: 68,864 B. One key tile's
// index and document (masked tiles only).
template <int DMAX>
struct FwdTiles {
  static constexpr int kBlockQ = 64, kWarps = 4, kStages = 2;
  static constexpr int kBlockK = DMAX <= 128 ? 32 : 16;
  // CTAs per SM the plain kernel's registers must allow (__launch_bounds__): at D 96, 3 holds it to
  // 168 registers (unbounded: 178, 2 CTAs) with no spill and no added instruction. EXTRA stays at 1:
  // held to 168 it issues 5 % more per key tile (MODELED, docs/cuda_kernels.md), and it is issue-bound.
  static constexpr int kMinBlocks = DMAX == 96 ? 3 : 1;
  static constexpr bool kQInRegs = DMAX <= 128;
  static constexpr int kLd = DMAX + kPad;
  static constexpr int kQRows = kQInRegs ? 0 : kBlockQ;  // Q's own shared rows
  static constexpr size_t kMeta = 2 * (kBlockQ + kBlockK) * sizeof(int64_t);  // index, document: Q, a key tile
  static constexpr size_t kSmem = kMeta + (kQRows + kStages * 2 * kBlockK) * kLd * sizeof(uint16_t);
  static_assert(kQInRegs ? kStages * 2 * kBlockK >= kBlockQ : true, "Q's tile is staged in the K/V buffers");
  static_assert(kSmem <= kMaxSmemSm89, "forward tiles exceed sm_89's shared memory per block");
};

// EXTRA: sliding window, softcap and ALiBi (attn_math.h: in_window, score_mod); false: none of them.
// DROPOUT (only with EXTRA): attention dropout by `drop` (attn_math.h: dropout_keep), which the
// other variants never read. The lse sums the probabilities before dropout; P V only the kept ones.
template <int DT, int DMAX, bool EXTRA, bool DROPOUT>
__global__ void __launch_bounds__(128, EXTRA ? 1 : FwdTiles<DMAX>::kMinBlocks)
    attn_forward_kernel(const AttnParams p, RowSide qs, RowSide ks, Dropout drop) {
  static_assert(EXTRA || !DROPOUT, "the DROPOUT variant is an EXTRA one");
  using Tiles = FwdTiles<DMAX>;
  constexpr int BQ = Tiles::kBlockQ, BK = Tiles::kBlockK, LD = Tiles::kLd, NT = BK / 8, DT8 = DMAX / 8;
  static_assert(NT % 2 == 0 && DT8 % 2 == 0, "B fragments load two 8-column tiles at a time");
  constexpr int STAGES = Tiles::kStages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* q_index = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* q_doc = q_index + BQ;
  int64_t* k_index = q_doc + BQ;  // [BK]: the current masked tile's
  int64_t* k_doc = k_index + BK;
  uint16_t* q_s = reinterpret_cast<uint16_t*>(k_doc + BK);
  uint16_t* kv_s = q_s + Tiles::kQRows * LD;  // stage i: K rows at kv_s + 2 i BK LD, then V rows

  const int D = static_cast<int>(p.head_dim);
  // grid.x enumerates (batch * head, query tile) with tiles fastest: a head's tiles share its K/V in L2
  const unsigned n_tiles = static_cast<unsigned>((p.seqlen_q + BQ - 1) / BQ);  // grid_x: < 2^31 blocks
  const int64_t q0 = static_cast<int64_t>(blockIdx.x % n_tiles) * BQ;
  const int64_t bh = blockIdx.x / n_tiles, b = bh / p.heads_q, h = bh % p.heads_q;
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const bool rope = p.rope_mode != kRopeNone;

  load_rows<DT, DMAX>(q_s, LD, p.q, b, h, q0, BQ, p.seqlen_q, D, p, qs, rope);
  load_row_meta(q_index, q_doc, q0, BQ, p.seqlen_q, qs, p);
  __syncthreads();
  uint32_t qf[Tiles::kQInRegs ? DMAX / 16 : 1][4];
  if constexpr (Tiles::kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < DMAX / 16; ++kk) load_a(qf[kk], q_s, LD, warp * 16, kk * 16);
  }
  // Keys this tile may see (causal, window, documents): the loop visits only their tiles.
  int64_t k_begin = 0, k_end = 0, a_min, a_max, d_min, d_max;
  tile_range<BQ>(q_index, q_doc, &a_min, &a_max, &d_min, &d_max);
  {
    int64_t lo, hi;
    if (d_max >= 0) {
      key_index_range(a_min, a_max, d_min, d_max, ks.cu, p.causal, EXTRA ? p.window_left : -1,
                      EXTRA ? p.window_right : -1, &lo, &hi);
      span_rows(lo, hi, ks.start, ks.stride, p.seqlen_k, &k_begin, &k_end);
    }
  }
  float slope = 0.0f, inv_softcap = 0.0f;
  if constexpr (EXTRA) {
    if (p.alibi_slopes) slope = reinterpret_cast<const float*>(p.alibi_slopes)[b * p.alibi_sb + h];
    if (p.softcap > 0.0f) inv_softcap = 1.0f / p.softcap;
  }

  float o[DT8][4] = {};
  float m[2] = {-RA_INF, -RA_INF}, l[2] = {0.0f, 0.0f};
  const int r_lo = warp * 16 + g;  // this thread's rows r_lo and r_lo + 8 of the tile
  // Dropout's counter takes global indices (not aligned ones): this thread's two query rows'.
  const int64_t q_global0 = qs.start + qs.stride * (q0 + r_lo), q_global1 = q_global0 + 8 * qs.stride;

  // Mask-free key tiles [f_begin, f_end): every query row of this tile (all inside S and inside one
  // document) sees every key of the tile (inside S, the document, the causal bound and the window).
  // Each condition holds for a prefix or a suffix of the key rows, so these tiles are contiguous.
  int64_t k0 = k_begin / BK * BK, f_begin = k0, f_end = k0;
  {
    if (q0 + BQ <= p.seqlen_q && d_max >= 0 && d_min == d_max && q_doc[0] == d_min && q_doc[BQ - 1] == d_min) {
      int64_t lo = kIndexMin, hi = kIndexMax, rb, re;
      if (p.causal) hi = a_min;
      if (EXTRA && p.window_right >= 0) hi = imin(hi, a_min + p.window_right);
      if (EXTRA && p.window_left >= 0) lo = a_max - p.window_left;
      if (ks.cu != nullptr) {
        lo = imax(lo, ks.cu[d_min]);
        hi = imin(hi, ks.cu[d_min + 1] - 1);
      }
      span_rows(lo, hi, ks.start, ks.stride, p.seqlen_k, &rb, &re);
      const int64_t fb = imax(k0, (rb + BK - 1) / BK * BK), fe = imin(k_end, re) / BK * BK;
      if (fb < fe) f_begin = fb, f_end = fe;
    }
  }

  // K and V rows of key tile k0 into stage `st`: one cp.async group per tile, committed by the
  // caller. K arrives rotated (launch_forward's rotate_rows pass).
  auto issue_tile = [&](int64_t k0, int st, auto vec) {
    uint16_t* k_dst = kv_s + st * 2 * BK * LD;
    issue_rows<DMAX, BK, Tiles::kWarps * 32, decltype(vec)::value>(k_dst, LD, p.k, b, hk, k0, p.seqlen_k, D);
    issue_rows<DMAX, BK, Tiles::kWarps * 32, decltype(vec)::value>(k_dst + BK * LD, LD, p.v, b, hk, k0, p.seqlen_k, D);
  };
  // Key tiles from k0 up to `until` (the pipeline continues across calls: tile k0 is in flight in
  // stage st on entry and exit). MASK: the tile's index and document (shared k_index, k_doc, written
  // here after the loop's barriers) mask each pair; else the tile is mask-free (no per-pair test,
  // key indices affine in the row for ALiBi and dropout).
  int st = 0;
  auto sweep = [&](int64_t until, auto mask, auto vec) {
    constexpr bool MASK = decltype(mask)::value;
    for (; k0 < until; k0 += BK, st ^= 1) {
      static_assert(STAGES == 2, "one tile in flight while one is read");
      __syncthreads();  // every warp is done with stage st ^ 1 (read in the previous step) and k_index
      if (k0 + BK < k_end) issue_tile(k0 + BK, st ^ 1, vec);
      cp_async_commit();  // possibly empty: the wait below always leaves exactly the newest group flying
      if constexpr (MASK) load_row_meta(k_index, k_doc, k0, BK, p.seqlen_k, ks, p);
      cp_async_wait<1>();  // this thread's copies of tile k0 landed
      __syncthreads();     // and everyone's (and the plain stores of the fallback and the row data)
      const uint16_t* k_s = kv_s + st * 2 * BK * LD;
      const uint16_t* v_s = k_s + BK * LD;
      // Global index of this thread's key columns 2 t (+ 8 nt + 1): dropout's counter, ALiBi's distance.
      [[maybe_unused]] const int64_t k_glob = ks.start + ks.stride * (k0 + 2 * t);

      float s[NT][4] = {};
      if constexpr (Tiles::kQInRegs) {
#pragma unroll
        for (int kk = 0; kk < DMAX / 16; ++kk) {
#pragma unroll
          for (int nt = 0; nt < NT; nt += 2) {
            uint32_t bf[4];
            load_b_nk2(bf, k_s, LD, kk * 16, nt * 8);
            mma16816<DT>(s[nt], qf[kk], bf);
            mma16816<DT>(s[nt + 1], qf[kk], bf + 2);
          }
        }
      } else {
        // Not unrolled over kk (no register array is indexed by it): unrolled, ptxas hoists the
        // ldmatrix of later steps and spills at head dim 256.
#pragma unroll 1
        for (int kk = 0; kk < DMAX / 16; ++kk) {
          uint32_t a[4];
          load_a(a, q_s, LD, warp * 16, kk * 16);
#pragma unroll
          for (int nt = 0; nt < NT; nt += 2) {
            uint32_t bf[4];
            load_b_nk2(bf, k_s, LD, kk * 16, nt * 8);
            mma16816<DT>(s[nt], a, bf);
            mma16816<DT>(s[nt + 1], a, bf + 2);
          }
        }
      }
      float row_max[2] = {-RA_INF, -RA_INF};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          // Query rows' index and document from shared memory: only masked tiles read them.
          const int i = e >> 1, r = r_lo + 8 * i, c = nt * 8 + 2 * t + (e & 1);
          float score = s[nt][e] * p.softmax_scale;
          bool ok = true;
          if constexpr (MASK) ok = visible(q_index[r], k_index[c], q_doc[r], k_doc[c], p.causal);
          if constexpr (EXTRA) {
            const int64_t kg = k_glob + ks.stride * (nt * 8 + (e & 1));
            if constexpr (MASK) ok = ok && in_window(q_index[r], kg, p.window_left, p.window_right);
            float unused;
            score = score_mod(score, p.softcap, inv_softcap, slope, q_index[r], kg, &unused);
          }
          s[nt][e] = ok ? score : -RA_INF;
          row_max[i] = max_nan(row_max[i], s[nt][e]);  // fmaxf would drop a NaN score
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        row_max[i] = max_nan(row_max[i], __shfl_xor_sync(0xffffffffu, row_max[i], 1));
        row_max[i] = max_nan(row_max[i], __shfl_xor_sync(0xffffffffu, row_max[i], 2));
      }
      float alpha[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float m_new = max_nan(m[i], row_max[i]);
        alpha[i] = online_rescale(m[i], m_new);
        m[i] = m_new;
        l[i] *= alpha[i];
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float mi = m[e >> 1];
          s[nt][e] = mi == -RA_INF ? 0.0f : softmax_weight(s[nt][e], mi);  // masked: 0
          l[e >> 1] += s[nt][e];
          if constexpr (DROPOUT) {  // after the sum: lse is of the probabilities before dropout
            const int64_t qg = e >> 1 ? q_global1 : q_global0;
            const int64_t kg = k_glob + ks.stride * (nt * 8 + (e & 1));
            if (!dropout_keep(drop, kg, qg, static_cast<uint32_t>(bh))) s[nt][e] = 0.0f;
          }
        }
      }
#pragma unroll
      for (int dt = 0; dt < DT8; ++dt) {
        o[dt][0] *= alpha[0];
        o[dt][1] *= alpha[0];
        o[dt][2] *= alpha[1];
        o[dt][3] *= alpha[1];
      }
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        uint32_t a[4];
        acc_to_a<DT>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
        for (int dt = 0; dt < DT8; dt += 2) {
          uint32_t bf[4];
          load_b_kn2(bf, v_s, LD, kk * 16, dt * 8);
          mma16816<DT>(o[dt], a, bf);
          mma16816<DT>(o[dt + 1], a, bf + 2);
        }
      }
    }
  };
  using Yes = std::true_type;
  using No = std::false_type;
  // Q's tile (staged in the K/V buffers when its fragments live in registers) is read by now.
  if constexpr (Tiles::kQInRegs) __syncthreads();
  if (rows_vectorizable(p.k, D) && rows_vectorizable(p.v, D)) {
    if (k0 < k_end) issue_tile(k0, 0, Yes{});
    cp_async_commit();
    sweep(f_begin, Yes{}, Yes{});  // masked tiles before the mask-free ones (window, document start)
    sweep(f_end, No{}, Yes{});     // the long middle: no mask
    sweep(k_end, Yes{}, Yes{});    // the causal diagonal, the window's or document's end
  } else {  // element-wise copies (unaligned rows): every tile masked, one loop
    if (k0 < k_end) issue_tile(k0, 0, No{});
    cp_async_commit();
    sweep(k_end, Yes{}, No{});
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
  float* lse = reinterpret_cast<float*>(p.lse);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t row = q0 + r_lo + 8 * i;
    if (row >= p.seqlen_q) continue;
    float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    if constexpr (DROPOUT) inv *= drop.scale;  // kept probabilities scaled by 1 / (1 - p)
    const int64_t offset = b * p.out.sb + row * p.out.ss + h * p.out.sh;
#pragma unroll
    for (int dt = 0; dt < DT8; ++dt) {
      const int c = dt * 8 + 2 * t;
      if (c >= D) continue;
      const float x0 = o[dt][2 * i] * inv, x1 = o[dt][2 * i + 1] * inv;
      if (p.out_dtype == kFloat32) {
        float* out = reinterpret_cast<float*>(p.out.ptr) + offset;
        out[c] = x0;
        out[c + 1] = x1;
      } else {
        uint16_t* out = reinterpret_cast<uint16_t*>(p.out.ptr) + offset;
        out[c] = to_bits<DT>(x0);
        out[c + 1] = to_bits<DT>(x1);
      }
    }
    if (t == 0) lse[bh * p.seqlen_q + row] = finish_lse(m[i], l[i]);
  }
}

// ---- backward ---------------------------------------------------------------------------------

// Q and dO tiles (with their lse, delta, index and document) stream through kStages shared buffers
// by cp.async, as the forward's K/V. 64 keys (4 warps) per CTA at every head dim; head dim 256 takes
// 16-query tiles and one stage (two would pass 99 KB): D 64: 44,544 B (two CTAs, 8 warps per sm_89
// SM), D 128: 77,312 B, D 256: 88,960 B (4 warps). D 96 takes one stage too: 46,848 B, two CTAs (8
// warps), each CTA's copies overlapping the other's math; two stages (60,928 B) would fit one CTA.
template <int DMAX>
struct BwdTiles {
  static constexpr int kBlockQ = DMAX > 128 ? 16 : 32;
  static constexpr int kBlockK = 64;
  static constexpr int kWarps = kBlockK / 16;  // each warp owns 16 keys
  static constexpr int kSplit = DMAX > 128 ? 2 : 1;  // dK/dV/dQ columns split over CTAs (registers)
  static constexpr int kStages = DMAX > 128 || DMAX == 96 ? 1 : 2;
  static constexpr int kCols = DMAX / kSplit;
  static constexpr int kLd = DMAX + kPad, kLdS = kBlockQ + kPad;
  static constexpr size_t kSmem = 2 * (kStages * kBlockQ + kBlockK) * sizeof(int64_t) +
                                  kStages * 2 * kBlockQ * sizeof(float) +
                                  (2 * kBlockK + kStages * 2 * kBlockQ) * kLd * sizeof(uint16_t) +
                                  kBlockK * kLdS * sizeof(uint16_t);
  static_assert(kSmem <= kMaxSmemSm89, "backward tiles exceed sm_89's shared memory per block");
};

// EXTRA, DROPOUT: as the forward's; the mask is regenerated here (never stored).
template <int DT, int DMAX, bool EXTRA, bool DROPOUT>
__global__ void __launch_bounds__(BwdTiles<DMAX>::kWarps * 32, 1)
    attn_backward_kernel(const AttnParams p, RowSide qs, RowSide ks, Dropout drop) {
  static_assert(EXTRA || !DROPOUT, "the DROPOUT variant is an EXTRA one");
  using Tiles = BwdTiles<DMAX>;
  constexpr int BQ = Tiles::kBlockQ, BK = Tiles::kBlockK, LD = Tiles::kLd, LDS = Tiles::kLdS;
  constexpr int COLS = Tiles::kCols, CT8 = COLS / 8, NT = BQ / 8;
  static_assert(NT % 2 == 0 && CT8 % 2 == 0, "B fragments load two 8-column tiles at a time");
  constexpr int STAGES = Tiles::kStages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* k_index = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* k_doc = k_index + BK;
  int64_t* q_index = k_doc + BK;  // [STAGES][BQ], as q_doc, lse_s, delta_s
  int64_t* q_doc = q_index + STAGES * BQ;
  float* lse_s = reinterpret_cast<float*>(q_doc + STAGES * BQ);
  float* delta_s = lse_s + STAGES * BQ;
  uint16_t* k_s = reinterpret_cast<uint16_t*>(delta_s + STAGES * BQ);
  uint16_t* v_s = k_s + BK * LD;
  uint16_t* qo_s = v_s + BK * LD;  // stage i: Q rows at qo_s + 2 i BQ LD, then dO rows
  uint16_t* ds_s = qo_s + STAGES * 2 * BQ * LD;  // dS^T: [key][query]

  const int D = static_cast<int>(p.head_dim);
  // grid: x = batch * KV head (up to 2^31 - 1), y = key tile; no division (this kernel is at 255 registers)
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * BK;
  const int64_t bkv = blockIdx.x, b = bkv / p.heads_kv, hk = bkv % p.heads_kv;
  const int col0 = blockIdx.z * COLS;
  const int64_t G = p.heads_q / p.heads_kv;
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const bool rope = p.rope_mode != kRopeNone;
  const float scale = p.softmax_scale;
  const float* lse_in = reinterpret_cast<const float*>(p.lse);
  const float* delta_in = reinterpret_cast<const float*>(p.delta);
  float* dq_accum = reinterpret_cast<float*>(p.dq_accum);

  load_rows<DT, DMAX>(k_s, LD, p.k, b, hk, k0, BK, p.seqlen_k, D, p, ks, rope);
  load_rows<DT, DMAX>(v_s, LD, p.v, b, hk, k0, BK, p.seqlen_k, D, p, ks, false);
  load_row_meta(k_index, k_doc, k0, BK, p.seqlen_k, ks, p);
  __syncthreads();
  // Queries that may see this key tile (causal, window, documents): the loop visits only their tiles.
  int64_t q_begin = 0, q_end = 0;
  {
    int64_t k_lo, k_hi, d_min, d_max, lo, hi;
    tile_range<BK>(k_index, k_doc, &k_lo, &k_hi, &d_min, &d_max);
    if (d_max >= 0) {
      query_index_range(k_lo, k_hi, d_min, d_max, qs.cu, qs.align_cu, p.causal, EXTRA ? p.window_left : -1,
                        EXTRA ? p.window_right : -1, &lo, &hi);
      span_rows(lo, hi, qs.start, qs.stride, p.seqlen_q, &q_begin, &q_end);
    }
  }
  const float inv_softcap = EXTRA && p.softcap > 0.0f ? 1.0f / p.softcap : 0.0f;

  float dk[CT8][4] = {}, dv[CT8][4] = {};
  const int key_lo = warp * 16 + g;  // this thread's keys key_lo and key_lo + 8 of the tile
  const bool atomic_dq = !p.deterministic;  // else attn_backward_dq_kernel sums dQ

  // The (head, query tile) steps of this CTA, in order: query tiles from q_first, head by head of
  // the group. Step (hq, q0)'s Q (rotated by launch_backward's rotate_rows pass) and dO rows, lse,
  // delta, index and document go to stage st; one cp.async group per step, committed by the caller.
  const int64_t q_first = q_begin / BQ * BQ;
  const int64_t h_end = q_first < q_end ? (hk + 1) * G : hk * G;  // no query tile: no step
  auto next_step = [&](int64_t* hq, int64_t* q0) {
    *q0 += BQ;
    if (*q0 >= q_end) *q0 = q_first, ++*hq;
  };
  auto issue_step = [&](int64_t hq, int64_t q0, int st, auto vec) {
    constexpr int THREADS = Tiles::kWarps * 32;
    uint16_t* q_dst = qo_s + st * 2 * BQ * LD;
    issue_rows<DMAX, BQ, THREADS, decltype(vec)::value>(q_dst, LD, p.q, b, hq, q0, p.seqlen_q, D);
    issue_rows<DMAX, BQ, THREADS, decltype(vec)::value>(q_dst + BQ * LD, LD, p.dout, b, hq, q0, p.seqlen_q, D);
    load_row_meta(q_index + st * BQ, q_doc + st * BQ, q0, BQ, p.seqlen_q, qs, p);
    const int64_t bh = b * p.heads_q + hq;
    for (int r = threadIdx.x; r < BQ; r += blockDim.x) {
      const int64_t row = q0 + r;
      lse_s[st * BQ + r] = backward_lse(row < p.seqlen_q ? lse_in[bh * p.seqlen_q + row] : -RA_INF);
      delta_s[st * BQ + r] = row < p.seqlen_q ? delta_in[bh * p.seqlen_q + row] : 0.0f;
    }
  };
  // The sweep, with 16-byte copies (VEC) or element-wise ones (unaligned rows), picked once.
  auto sweep = [&](auto vec) {
    if constexpr (STAGES == 2) {
      if (hk * G < h_end) issue_step(hk * G, q_first, 0, vec);
    }
    cp_async_commit();
    int st = 0;
    for (int64_t hq = hk * G, q0 = q_first; hq < h_end; next_step(&hq, &q0), st = (st + 1) % STAGES) {
      static_assert(STAGES == 1 || STAGES == 2, "at most one step in flight while one is read");
      // No barrier first: the stage written next was last read before the previous step's dS^T
      // barrier (its dQ part reads only dS^T and K), and dS^T is rewritten only after the one below.
      if constexpr (STAGES == 1) {
        issue_step(hq, q0, 0, vec);
      } else {
        int64_t hn = hq, qn = q0;
        next_step(&hn, &qn);
        if (hn < h_end) issue_step(hn, qn, (st + 1) % STAGES, vec);
      }
      cp_async_commit();
      cp_async_wait<STAGES - 1>();  // this thread's copies of step (hq, q0) landed
      __syncthreads();              // and everyone's (and the fallback's stores and the row data)
      const int64_t bh = b * p.heads_q + hq;
      float slope = 0.0f;
      if constexpr (EXTRA) {
        if (p.alibi_slopes) slope = reinterpret_cast<const float*>(p.alibi_slopes)[b * p.alibi_sb + hq];
      }
      const uint16_t* q_s = qo_s + st * 2 * BQ * LD;
      const uint16_t* do_s = q_s + BQ * LD;
      const int64_t* q_idx = q_index + st * BQ;
      const int64_t* q_dc = q_doc + st * BQ;
      const float* lse_t = lse_s + st * BQ;
      const float* delta_t = delta_s + st * BQ;

      // Dropout's mask of this thread's elements (bit nt * 4 + e of the fragments below), drawn
      // before S^T and dP^T are live and one Philox stream at a time: registers stay below 255.
      uint32_t keep_bits = 0;
      static_assert(NT * 4 <= 32, "one bit per element of a thread's S^T fragments");
      if constexpr (DROPOUT) {
#pragma unroll 1
        for (int i = 0; i < NT * 4; ++i) {
          const int key = key_lo + ((i >> 1) & 1) * 8, qr = (i >> 2) * 8 + 2 * t + (i & 1);
          const int64_t q_global = qs.start + qs.stride * (q0 + qr);
          keep_bits |= static_cast<uint32_t>(dropout_keep(drop, k_index[key], q_global, static_cast<uint32_t>(bh)))
                       << i;
        }
      }
      // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys, all BQ queries.
      float pt[NT][4] = {}, dpt[NT][4] = {};
      // Not unrolled over kk, as the forward's S loop (ptxas would spill).
#pragma unroll 1
      for (int kk = 0; kk < DMAX / 16; ++kk) {
        uint32_t ak[4], av[4];
        load_a(ak, k_s, LD, warp * 16, kk * 16);
        load_a(av, v_s, LD, warp * 16, kk * 16);
#pragma unroll
        for (int nt = 0; nt < NT; nt += 2) {
          uint32_t bq[4], bo[4];
          load_b_nk2(bq, q_s, LD, kk * 16, nt * 8);
          load_b_nk2(bo, do_s, LD, kk * 16, nt * 8);
          mma16816<DT>(pt[nt], ak, bq);
          mma16816<DT>(pt[nt + 1], ak, bq + 2);
          mma16816<DT>(dpt[nt], av, bo);
          mma16816<DT>(dpt[nt + 1], av, bo + 2);
        }
      }
      // P^T = exp(S^T scale - lse), dS^T = P^T (dP^T - delta) scale.
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key_lo + (e >> 1) * 8, qr = nt * 8 + 2 * t + (e & 1);
          bool ok = visible(q_idx[qr], k_index[key], q_dc[qr], k_doc[key], p.causal);
          float score = pt[nt][e] * scale, dscore = scale;
          if constexpr (EXTRA) {
            ok = ok && in_window(q_idx[qr], k_index[key], p.window_left, p.window_right);
            float grad;
            score = score_mod(score, p.softcap, inv_softcap, slope, q_idx[qr], k_index[key], &grad);
            dscore = grad * scale;  // through softcap's tanh; ALiBi's bias has derivative 1
          }
          const float pv = ok ? softmax_weight(score, lse_t[qr]) : 0.0f;
          float dp = dpt[nt][e];
          if constexpr (DROPOUT) {  // dV takes P Z / (1 - p), dS the product dO V^T Z / (1 - p)
            const float z = (keep_bits >> (nt * 4 + e)) & 1u ? drop.scale : 0.0f;
            pt[nt][e] = pv * z;
            dp *= z;
          } else {
            pt[nt][e] = pv;
          }
          dpt[nt][e] = pv * (dp - delta_t[qr]) * dscore;
        }
      }
      // dV += P^T dO and dK += dS^T Q over this CTA's columns.
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) {
        uint32_t ap[4], ads[4];
        acc_to_a<DT>(ap, pt[2 * kk], pt[2 * kk + 1]);
        acc_to_a<DT>(ads, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
        for (int ct = 0; ct < CT8; ct += 2) {
          uint32_t bo[4], bq[4];
          load_b_kn2(bo, do_s, LD, kk * 16, col0 + ct * 8);
          load_b_kn2(bq, q_s, LD, kk * 16, col0 + ct * 8);
          mma16816<DT>(dv[ct], ap, bo);
          mma16816<DT>(dv[ct + 1], ap, bo + 2);
          mma16816<DT>(dk[ct], ads, bq);
          mma16816<DT>(dk[ct + 1], ads, bq + 2);
        }
      }
      // dQ += dS K (unless deterministic: attn_backward_dq_kernel's pass sums dQ): share dS^T through
      // shared memory, then each warp takes (row block, column tile) items and adds its 16x8 result to
      // the fp32 workspace. The barrier stays either way: the next step's copies overwrite a stage read above.
      if (atomic_dq) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int qr = nt * 8 + 2 * t;
          ds_s[key_lo * LDS + qr] = to_bits<DT>(dpt[nt][0]);
          ds_s[key_lo * LDS + qr + 1] = to_bits<DT>(dpt[nt][1]);
          ds_s[(key_lo + 8) * LDS + qr] = to_bits<DT>(dpt[nt][2]);
          ds_s[(key_lo + 8) * LDS + qr + 1] = to_bits<DT>(dpt[nt][3]);
        }
      }
      __syncthreads();
      if (!atomic_dq) continue;
      for (int item = warp; item < (BQ / 16) * CT8; item += Tiles::kWarps) {
        const int rb = item / CT8, ct = item % CT8;
        const int c = col0 + ct * 8 + 2 * t;
        if (col0 + ct * 8 >= D) continue;
        float acc[4] = {};
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
          uint32_t a[4], bk[2];
          load_a_t(a, ds_s, LDS, rb * 16, kk * 16);
          load_b_kn(bk, k_s, LD, kk * 16, col0 + ct * 8);
          mma16816<DT>(acc, a, bk);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int64_t row = q0 + rb * 16 + g + 8 * i;
          if (row >= p.seqlen_q || c >= D) continue;
          float* dst = dq_accum + ((b * p.seqlen_q + row) * p.heads_q + hq) * D + c;
          atomicAdd(dst, acc[2 * i]);
          atomicAdd(dst + 1, acc[2 * i + 1]);
        }
      }
    }
  };
  if (rows_vectorizable(p.q, D) && rows_vectorizable(p.dout, D)) {
    sweep(std::true_type{});
  } else {
    sweep(std::false_type{});
  }

  float* dk_accum = reinterpret_cast<float*>(p.dk_accum);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t key = k0 + key_lo + 8 * i;
    if (key >= p.seqlen_k) continue;
#pragma unroll
    for (int ct = 0; ct < CT8; ++ct) {
      const int c = col0 + ct * 8 + 2 * t;
      if (c >= D) continue;
      float* dkr = dk_accum + ((b * p.seqlen_k + key) * p.heads_kv + hk) * D + c;
      dkr[0] = dk[ct][2 * i];
      dkr[1] = dk[ct][2 * i + 1];
      const int64_t offset = b * p.dv.sb + key * p.dv.ss + hk * p.dv.sh + c;
      if (p.grad_dtype == kFloat32) {
        float* dvr = reinterpret_cast<float*>(p.dv.ptr) + offset;
        dvr[0] = dv[ct][2 * i];
        dvr[1] = dv[ct][2 * i + 1];
      } else {
        uint16_t* dvr = reinterpret_cast<uint16_t*>(p.dv.ptr) + offset;
        dvr[0] = to_bits<DT>(dv[ct][2 * i]);
        dvr[1] = to_bits<DT>(dv[ct][2 * i + 1]);
      }
    }
  }
}

// ---- deterministic dQ -------------------------------------------------------------------------

// deterministic=True: dQ by its own pass that walks keys as the forward does. One CTA per (64 query
// rows, batch * query head); each warp owns 16 query rows and keeps their dQ in registers while it
// visits the key tiles those rows may see, recomputing P and dS there (S = Q K^T, dP = dO V^T). Every
// dQ element is summed by one thread in key order and stored once: no atomics, the same bits on
// every run. Q and K arrive rotated (rotate_rows passes), so dQ is in rotated coordinates, as the
// atomic path's workspace. K/V tiles stream through cp.async stages; up to head dim 128 Q's and dO's
// A fragments stay in registers (their tiles staged in the K/V buffers): D 64: 19,968 B, D 96: 28,160 B,
// D 128: 36,352 B; head dim 256 keeps both tiles in shared memory with one 16-key stage: 85,760 B.
template <int DMAX>
struct DqTiles {
  static constexpr int kBlockQ = 64, kWarps = 4;
  static constexpr int kBlockK = DMAX <= 128 ? 32 : 16;
  static constexpr int kStages = DMAX <= 128 ? 2 : 1;
  static constexpr bool kQInRegs = DMAX <= 128;  // Q's and dO's A fragments
  static constexpr int kLd = DMAX + kPad;
  static constexpr int kQRows = kQInRegs ? 0 : 2 * kBlockQ;  // Q's and dO's own shared rows
  static constexpr size_t kMeta = 2 * (kBlockQ + kBlockK) * sizeof(int64_t);  // index, document: Q, a key tile
  static constexpr size_t kSmem = kMeta + (kQRows + kStages * 2 * kBlockK) * kLd * sizeof(uint16_t);
  static_assert(kQInRegs ? kStages * 2 * kBlockK >= 2 * kBlockQ : true, "Q and dO are staged in the K/V buffers");
  static_assert(kSmem <= kMaxSmemSm89, "dQ tiles exceed sm_89's shared memory per block");
};

// EXTRA, DROPOUT: as the forward's; dS as attn_backward_kernel's.
template <int DT, int DMAX, bool EXTRA, bool DROPOUT>
__global__ void __launch_bounds__(128, 1)
    attn_backward_dq_kernel(const AttnParams p, RowSide qs, RowSide ks, Dropout drop) {
  static_assert(EXTRA || !DROPOUT, "the DROPOUT variant is an EXTRA one");
  using Tiles = DqTiles<DMAX>;
  constexpr int BQ = Tiles::kBlockQ, BK = Tiles::kBlockK, LD = Tiles::kLd, NT = BK / 8, DT8 = DMAX / 8;
  constexpr int STAGES = Tiles::kStages;
  static_assert(NT % 2 == 0 && DT8 % 2 == 0, "B fragments load two 8-column tiles at a time");
  static_assert(STAGES == 1 || STAGES == 2, "at most one tile in flight while one is read");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* q_index = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* q_doc = q_index + BQ;
  int64_t* k_index = q_doc + BQ;  // [BK]: the current key tile's
  int64_t* k_doc = k_index + BK;
  uint16_t* q_s = reinterpret_cast<uint16_t*>(k_doc + BK);  // Q rows, then dO rows
  uint16_t* do_s = q_s + BQ * LD;
  uint16_t* kv_s = q_s + Tiles::kQRows * LD;  // stage i: K rows at kv_s + 2 i BK LD, then V rows

  const int D = static_cast<int>(p.head_dim);
  const unsigned n_tiles = static_cast<unsigned>((p.seqlen_q + BQ - 1) / BQ);  // grid.x as the forward's
  const int64_t q0 = static_cast<int64_t>(blockIdx.x % n_tiles) * BQ;
  const int64_t bh = blockIdx.x / n_tiles, b = bh / p.heads_q, h = bh % p.heads_q;
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;

  load_rows<DT, DMAX>(q_s, LD, p.q, b, h, q0, BQ, p.seqlen_q, D, p, qs, false);  // rotated already
  load_rows<DT, DMAX>(do_s, LD, p.dout, b, h, q0, BQ, p.seqlen_q, D, p, qs, false);
  load_row_meta(q_index, q_doc, q0, BQ, p.seqlen_q, qs, p);
  __syncthreads();
  uint32_t qf[Tiles::kQInRegs ? DMAX / 16 : 1][4], of[Tiles::kQInRegs ? DMAX / 16 : 1][4];
  if constexpr (Tiles::kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < DMAX / 16; ++kk) {
      load_a(qf[kk], q_s, LD, warp * 16, kk * 16);
      load_a(of[kk], do_s, LD, warp * 16, kk * 16);
    }
  }
  // Keys this tile may see (causal, window, documents), as the forward's loop bounds.
  int64_t k_begin = 0, k_end = 0;
  {
    int64_t a_min, a_max, d_min, d_max, lo, hi;
    tile_range<BQ>(q_index, q_doc, &a_min, &a_max, &d_min, &d_max);
    if (d_max >= 0) {
      key_index_range(a_min, a_max, d_min, d_max, ks.cu, p.causal, EXTRA ? p.window_left : -1,
                      EXTRA ? p.window_right : -1, &lo, &hi);
      span_rows(lo, hi, ks.start, ks.stride, p.seqlen_k, &k_begin, &k_end);
    }
  }
  float slope = 0.0f, inv_softcap = 0.0f;
  if constexpr (EXTRA) {
    if (p.alibi_slopes) slope = reinterpret_cast<const float*>(p.alibi_slopes)[b * p.alibi_sb + h];
    if (p.softcap > 0.0f) inv_softcap = 1.0f / p.softcap;
  }
  const int r_lo = warp * 16 + g;  // this thread's rows r_lo and r_lo + 8 of the tile
  float lse_r[2], delta_r[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t row = q0 + r_lo + 8 * i;
    const bool in = row < p.seqlen_q;
    lse_r[i] = backward_lse(in ? reinterpret_cast<const float*>(p.lse)[bh * p.seqlen_q + row] : -RA_INF);
    delta_r[i] = in ? reinterpret_cast<const float*>(p.delta)[bh * p.seqlen_q + row] : 0.0f;
  }
  // Dropout's counter takes global indices (not aligned ones): this thread's two query rows'.
  const int64_t q_global0 = qs.start + qs.stride * (q0 + r_lo), q_global1 = q_global0 + 8 * qs.stride;

  float dq[DT8][4] = {};
  int64_t k0 = k_begin / BK * BK;
  auto issue_tile = [&](int64_t k0, int st, auto vec) {  // one cp.async group, committed by the caller
    uint16_t* k_dst = kv_s + st * 2 * BK * LD;
    issue_rows<DMAX, BK, Tiles::kWarps * 32, decltype(vec)::value>(k_dst, LD, p.k, b, hk, k0, p.seqlen_k, D);
    issue_rows<DMAX, BK, Tiles::kWarps * 32, decltype(vec)::value>(k_dst + BK * LD, LD, p.v, b, hk, k0, p.seqlen_k, D);
  };
  auto sweep = [&](auto vec) {
    if constexpr (STAGES == 2) {
      if (k0 < k_end) issue_tile(k0, 0, vec);
    }
    cp_async_commit();
    for (int st = 0; k0 < k_end; k0 += BK, st = (st + 1) % STAGES) {
      __syncthreads();  // every warp is done with the stage written next (read in the previous step) and k_index
      if constexpr (STAGES == 1) {
        issue_tile(k0, 0, vec);
      } else if (k0 + BK < k_end) {
        issue_tile(k0 + BK, st ^ 1, vec);
      }
      cp_async_commit();  // possibly empty: the wait below always leaves exactly the newest group flying
      load_row_meta(k_index, k_doc, k0, BK, p.seqlen_k, ks, p);
      cp_async_wait<STAGES - 1>();  // tile k0's copies by this thread landed
      __syncthreads();  // and everyone's (and the fallback's stores and the row data)
      const uint16_t* k_s = kv_s + st * 2 * BK * LD;
      const uint16_t* v_s = k_s + BK * LD;
      // Dropout's mask of this thread's elements (bit nt * 4 + e of the fragments below), drawn before
      // S and dP are live, as attn_backward_kernel's (in the element loop, the DROPOUT kernel spills).
      uint32_t keep_bits = 0;
      static_assert(NT * 4 <= 32, "one bit per element of a thread's S fragments");
      if constexpr (DROPOUT) {
#pragma unroll 1
        for (int i = 0; i < NT * 4; ++i) {
          const int c = (i >> 2) * 8 + 2 * t + (i & 1);
          const int64_t q_global = (i >> 1) & 1 ? q_global1 : q_global0;  // no array: a runtime index is a stack slot
          keep_bits |= static_cast<uint32_t>(dropout_keep(drop, k_index[c], q_global, static_cast<uint32_t>(bh))) << i;
        }
      }

      // S = Q K^T and dP = dO V^T for this warp's 16 rows, the tile's BK keys.
      float s[NT][4] = {}, dp[NT][4] = {};
      auto products = [&](const uint32_t a[4], const uint32_t ao[4], int kk) {
#pragma unroll
        for (int nt = 0; nt < NT; nt += 2) {
          uint32_t bk[4], bv[4];
          load_b_nk2(bk, k_s, LD, kk * 16, nt * 8);
          load_b_nk2(bv, v_s, LD, kk * 16, nt * 8);
          mma16816<DT>(s[nt], a, bk);
          mma16816<DT>(s[nt + 1], a, bk + 2);
          mma16816<DT>(dp[nt], ao, bv);
          mma16816<DT>(dp[nt + 1], ao, bv + 2);
        }
      };
      if constexpr (Tiles::kQInRegs) {
#pragma unroll
        for (int kk = 0; kk < DMAX / 16; ++kk) products(qf[kk], of[kk], kk);
      } else {
        // Not unrolled, as the forward's head dim 256 S loop (ptxas would spill).
#pragma unroll 1
        for (int kk = 0; kk < DMAX / 16; ++kk) {
          uint32_t a[4], ao[4];
          load_a(a, q_s, LD, warp * 16, kk * 16);
          load_a(ao, do_s, LD, warp * 16, kk * 16);
          products(a, ao, kk);
        }
      }
      // P = exp(S scale - lse), dS = P (dP - delta) scale, into s.
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1, r = r_lo + 8 * i, c = nt * 8 + 2 * t + (e & 1);
          bool ok = visible(q_index[r], k_index[c], q_doc[r], k_doc[c], p.causal);
          float score = s[nt][e] * p.softmax_scale, dscore = p.softmax_scale;
          if constexpr (EXTRA) {
            ok = ok && in_window(q_index[r], k_index[c], p.window_left, p.window_right);
            float grad;
            score = score_mod(score, p.softcap, inv_softcap, slope, q_index[r], k_index[c], &grad);
            dscore = grad * p.softmax_scale;  // through softcap's tanh; ALiBi's bias has derivative 1
          }
          const float pv = ok ? softmax_weight(score, lse_r[i]) : 0.0f;
          float dpv = dp[nt][e];
          if constexpr (DROPOUT) dpv *= (keep_bits >> (nt * 4 + e)) & 1u ? drop.scale : 0.0f;  // dO V^T Z / (1 - p)
          s[nt][e] = pv * (dpv - delta_r[i]) * dscore;
        }
      }
      // dQ += dS K.
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        uint32_t a[4];
        acc_to_a<DT>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
        for (int dt = 0; dt < DT8; dt += 2) {
          uint32_t bf[4];
          load_b_kn2(bf, k_s, LD, kk * 16, dt * 8);
          mma16816<DT>(dq[dt], a, bf);
          mma16816<DT>(dq[dt + 1], a, bf + 2);
        }
      }
    }
  };
  // Q's and dO's tiles (staged in the K/V buffers when their fragments live in registers) are read by now.
  if constexpr (Tiles::kQInRegs) __syncthreads();
  if (rows_vectorizable(p.k, D) && rows_vectorizable(p.v, D)) {
    sweep(std::true_type{});
  } else {
    sweep(std::false_type{});
  }

  float* dq_accum = reinterpret_cast<float*>(p.dq_accum);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t row = q0 + r_lo + 8 * i;
    if (row >= p.seqlen_q) continue;
    float* dst = dq_accum + ((b * p.seqlen_q + row) * p.heads_q + h) * D;
#pragma unroll
    for (int dt = 0; dt < DT8; ++dt) {
      const int c = dt * 8 + 2 * t;
      if (c >= D) continue;
      dst[c] = dq[dt][2 * i];
      dst[c + 1] = dq[dt][2 * i + 1];
    }
  }
}

// Gradient in rotated coordinates (fp32, contiguous (B, S, H, D)) -> RoPE transpose -> caller's view.
template <int DT>
__global__ void finish_grad_kernel(const float* __restrict__ accum, View out, int out_dtype, int64_t B,
                                   int64_t S, int64_t H, int D, AttnParams p, RowSide side) {
  const int64_t pairs = B * S * H * (D / 2);
  const int half_rot = p.rope_mode != kRopeNone ? p.rotary_dim / 2 : 0;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < pairs;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(item % (D / 2));
    const int64_t bsh = item / (D / 2), h = bsh % H, bs = bsh / H, s = bs % S, b = bs / S;
    int ea, eb;
    pair_features(i, half_rot, p, &ea, &eb);
    const float* src = accum + bsh * D;
    float xa = src[ea], xb = src[eb];
    if (i < half_rot) rope_pair_apply(&xa, &xb, i, b, s, p, side, -1.0f);
    const int64_t offset = b * out.sb + s * out.ss + h * out.sh;
    if (out_dtype == kFloat32) {
      float* dst = reinterpret_cast<float*>(out.ptr) + offset;
      dst[ea] = xa;
      dst[eb] = xb;
    } else {
      uint16_t* dst = reinterpret_cast<uint16_t*>(out.ptr) + offset;
      dst[ea] = to_bits<DT>(xa);
      dst[eb] = to_bits<DT>(xb);
    }
  }
}

// RoPE once per row ahead of a sweep: rows of a (B, S, H, D) view rotated into a contiguous
// (B, S, H, D) workspace in the input dtype, rounded once as load_rows rounds a rotated tile. The
// sweeps load these rows as they are (the forward's K, the backward's Q) instead of rotating each
// row again for every tile that visits it.
template <int DT>
__global__ void rotate_rows_kernel(View in, uint16_t* __restrict__ out, int64_t B, int64_t S, int64_t H, int D,
                                   AttnParams p, RowSide side) {
  const int64_t pairs = B * S * H * (D / 2);
  const int half_rot = p.rotary_dim / 2;
  const uint16_t* base = reinterpret_cast<const uint16_t*>(in.ptr);
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < pairs;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(item % (D / 2));
    const int64_t bsh = item / (D / 2), h = bsh % H, bs = bsh / H, s = bs % S, b = bs / S;
    int ea, eb;
    pair_features(i, half_rot, p, &ea, &eb);
    const uint16_t* src = base + b * in.sb + s * in.ss + h * in.sh;
    float xa = to_float<DT>(src[ea]), xb = to_float<DT>(src[eb]);
    if (i < half_rot) rope_pair_apply(&xa, &xb, i, b, s, p, side, 1.0f);
    out[bsh * D + ea] = to_bits<DT>(xa);
    out[bsh * D + eb] = to_bits<DT>(xb);
  }
}

// ---- host side --------------------------------------------------------------------------------

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("ringattn CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

void check_params(const AttnParams& p, bool backward) {
  auto require = [](bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("ringattn cuda attention: " + what);
  };
  require(p.batch >= 0 && p.seqlen_q >= 0 && p.seqlen_k >= 0, "sizes must be >= 0");
  require(p.heads_kv > 0 && p.heads_q % p.heads_kv == 0, "heads_q must be a multiple of heads_kv > 0");
  require(p.head_dim > 0 && p.head_dim % 2 == 0 && p.head_dim <= 256, "head_dim must be even and <= 256");
#if defined(RINGATTN_CUDA_BF16_ONLY)
  require(p.dtype == kBFloat16, "dtype must be bf16 (built with RINGATTN_CUDA_BF16_ONLY)");
#else
  require(p.dtype == kBFloat16 || p.dtype == kFloat16, "dtype must be bf16 or fp16");
#endif
  const int out = backward ? p.grad_dtype : p.out_dtype;
  require(out == p.dtype || out == kFloat32, "output dtype must be the input dtype or fp32");
  require(p.q_stride >= 1 && p.k_stride >= 1, "span strides must be >= 1");
  require(p.k_cu_seqlens == 0 || p.cu_seqlens != 0, "k_cu_seqlens needs cu_seqlens");
  require(p.window_left >= -1 && p.window_right >= -1, "window sides must be >= -1");
  require(p.softcap >= 0.0f, "softcap must be >= 0");
  require(p.dropout_p >= 0.0 && p.dropout_p < 1.0, "dropout_p must be in [0, 1)");
  if (p.rope_mode != kRopeNone) {
    require(p.rope_mode == kRopeExact || p.rope_mode == kRopeHf, "rope_mode must be 0, 1 or 2");
    require(p.rotary_dim >= 2 && p.rotary_dim % 2 == 0 && p.rotary_dim <= p.head_dim,
            "rotary_dim must be even, >= 2 and <= head_dim");
  }
  // An empty workspace (no query or no key rows) may have no address.
  const bool q_rows = p.batch * p.seqlen_q * p.heads_q > 0, k_rows = p.batch * p.seqlen_k * p.heads_kv > 0;
  if (backward) {
    require((p.dq_accum != 0 || !q_rows) && (p.dk_accum != 0 || !k_rows), "backward needs dq_accum and dk_accum");
  }
  const bool rotated_rows = backward ? q_rows : k_rows;  // rotate_rows' input: the backward's Q, the forward's K
  require(p.rope_mode == kRopeNone || p.rope_work != 0 || !rotated_rows,
          std::string("RoPE needs rope_work (") + (backward ? "Q's" : "K's") + " shape, in dtype)");
}

template <class Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
        "cudaFuncSetAttribute");
}

// Blocks of one launch along grid.x (up to 2^31 - 1; grid.y would cap batch * heads at 65535).
unsigned grid_x(int64_t rows, int64_t block_rows, int64_t batch_heads) {
  const int64_t blocks = (rows + block_rows - 1) / block_rows * batch_heads;
  if (blocks > 2147483647) {
    throw std::invalid_argument("ringattn: " + std::to_string(blocks) +
                                " thread blocks (tiles x batch x heads) exceed CUDA's 2^31 - 1 grid limit");
  }
  return static_cast<unsigned>(blocks);
}

// Rows of `in` (S rows, H heads) rotated into the workspace at `work` (rotate_rows_kernel); returns
// p with `*side_view` (its q or k) replaced by the workspace's contiguous view. Without RoPE: p itself.
template <int DT>
AttnParams with_rotated_rows(const AttnParams& p, View AttnParams::*side_view, int64_t S, int64_t H,
                             const RowSide& side, uintptr_t work) {
  AttnParams out = p;
  const int64_t D = p.head_dim, pairs = p.batch * S * H * (D / 2);
  if (p.rope_mode == kRopeNone || pairs == 0) return out;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((pairs + 255) / 256, 65535));
  RA_LAUNCH(rotate_rows_kernel<DT>, blocks, 256, 0, reinterpret_cast<cudaStream_t>(p.stream))(
      p.*side_view, reinterpret_cast<uint16_t*>(work), p.batch, S, H, static_cast<int>(D), p, side);
  check(cudaGetLastError(), "rotate_rows_kernel launch");
  out.*side_view = View{work, S * H * D, H * D, D};
  return out;
}

template <int DT, int DMAX, bool EXTRA, bool DROPOUT>
void launch_forward(const AttnParams& p) {
  using Tiles = FwdTiles<DMAX>;
  const dim3 grid(grid_x(p.seqlen_q, Tiles::kBlockQ, p.batch * p.heads_q));
  auto kernel = attn_forward_kernel<DT, DMAX, EXTRA, DROPOUT>;
  set_smem(kernel, Tiles::kSmem);
  const AttnParams run = with_rotated_rows<DT>(p, &AttnParams::k, p.seqlen_k, p.heads_kv, k_side(p), p.rope_work);
  RA_LAUNCH(kernel, grid, Tiles::kWarps * 32, Tiles::kSmem, reinterpret_cast<cudaStream_t>(p.stream))(
      run, q_side(p), k_side(p), make_dropout(p.dropout_p, p.dropout_seed, p.dropout_offset));
  check(cudaGetLastError(), "attn_forward_kernel launch");
}

template <int DT, int DMAX, bool EXTRA, bool DROPOUT>
void launch_backward(const AttnParams& p) {
  using Tiles = BwdTiles<DMAX>;
  const auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  const Dropout drop = make_dropout(p.dropout_p, p.dropout_seed, p.dropout_offset);
  const bool key_sweep = p.seqlen_k > 0 && p.batch * p.heads_kv > 0;  // an empty grid is a launch error
  const bool dq_pass = p.deterministic && p.batch * p.heads_q * p.seqlen_q > 0;
  // Q rotated once for both sweeps; K too for the dQ pass (its key tiles arrive by cp.async, unrotated).
  const AttnParams run =
      key_sweep || dq_pass ? with_rotated_rows<DT>(p, &AttnParams::q, p.seqlen_q, p.heads_q, q_side(p), p.rope_work)
                           : p;
  AttnParams dq_run = run;
  if (dq_pass) {
    const uintptr_t k_work = p.rope_work + p.batch * p.seqlen_q * p.heads_q * p.head_dim * sizeof(uint16_t);
    dq_run.k = with_rotated_rows<DT>(p, &AttnParams::k, p.seqlen_k, p.heads_kv, k_side(p), k_work).k;
  }
  if (key_sweep) {
    const int64_t key_tiles = (p.seqlen_k + Tiles::kBlockK - 1) / Tiles::kBlockK;
    if (key_tiles > 65535 || p.batch * p.heads_kv > 2147483647) {
      throw std::invalid_argument("ringattn cuda backward: " + std::to_string(p.seqlen_k) + " keys (" +
                                  std::to_string(key_tiles) + " tiles of " + std::to_string(Tiles::kBlockK) +
                                  ") exceed CUDA's 65535 grid rows; split the keys into smaller blocks");
    }
    const dim3 grid(static_cast<unsigned>(p.batch * p.heads_kv), static_cast<unsigned>(key_tiles), Tiles::kSplit);
    auto kernel = attn_backward_kernel<DT, DMAX, EXTRA, DROPOUT>;
    set_smem(kernel, Tiles::kSmem);
    RA_LAUNCH(kernel, grid, Tiles::kWarps * 32, Tiles::kSmem, stream)(run, q_side(p), k_side(p), drop);
    check(cudaGetLastError(), "attn_backward_kernel launch");
  }
  if (dq_pass) {
    using DqT = DqTiles<DMAX>;
    auto kernel = attn_backward_dq_kernel<DT, DMAX, EXTRA, DROPOUT>;
    set_smem(kernel, DqT::kSmem);
    const dim3 grid(grid_x(p.seqlen_q, DqT::kBlockQ, p.batch * p.heads_q));
    RA_LAUNCH(kernel, grid, DqT::kWarps * 32, DqT::kSmem, stream)(dq_run, q_side(p), k_side(p), drop);
    check(cudaGetLastError(), "attn_backward_dq_kernel launch");
  }
  const int D = static_cast<int>(p.head_dim);
  auto finish = [&](const float* accum, const View& out, int64_t S, int64_t H, const RowSide& side) {
    const int64_t pairs = p.batch * S * H * (D / 2);
    if (pairs == 0) return;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((pairs + 255) / 256, 65535));
    RA_LAUNCH(finish_grad_kernel<DT>, blocks, 256, 0, stream)(accum, out, p.grad_dtype, p.batch, S, H, D, p, side);
    check(cudaGetLastError(), "finish_grad_kernel launch");
  };
  finish(reinterpret_cast<const float*>(p.dq_accum), p.dq, p.seqlen_q, p.heads_q, q_side(p));
  finish(reinterpret_cast<const float*>(p.dk_accum), p.dk, p.seqlen_k, p.heads_kv, k_side(p));
}

// Head-dim tiles 64, 96, 128, 256: D 66..96 in 96 columns (a 128 tile spends 25 % of its MMAs on padding
// at D = 96, 37.5 % at D = 80).
template <int DT, bool EXTRA, bool DROPOUT>
void forward_variant(const AttnParams& p) {
  if (p.head_dim <= 64) return launch_forward<DT, 64, EXTRA, DROPOUT>(p);
  if (p.head_dim <= 96) return launch_forward<DT, 96, EXTRA, DROPOUT>(p);
  if (p.head_dim <= 128) return launch_forward<DT, 128, EXTRA, DROPOUT>(p);
  return launch_forward<DT, 256, EXTRA, DROPOUT>(p);
}

template <int DT>
void forward_dtype(const AttnParams& p) {
  if (needs_dropout(p)) return forward_variant<DT, true, true>(p);
  if (needs_extra(p)) return forward_variant<DT, true, false>(p);
  forward_variant<DT, false, false>(p);
}

template <int DT, bool EXTRA, bool DROPOUT>
void backward_variant(const AttnParams& p) {
  if (p.head_dim <= 64) return launch_backward<DT, 64, EXTRA, DROPOUT>(p);
  if (p.head_dim <= 96) return launch_backward<DT, 96, EXTRA, DROPOUT>(p);
  if (p.head_dim <= 128) return launch_backward<DT, 128, EXTRA, DROPOUT>(p);
  return launch_backward<DT, 256, EXTRA, DROPOUT>(p);
}

template <int DT>
void backward_dtype(const AttnParams& p) {
  if (needs_dropout(p)) return backward_variant<DT, true, true>(p);
  if (needs_extra(p)) return backward_variant<DT, true, false>(p);
  backward_variant<DT, false, false>(p);
}

}  // namespace

std::vector<std::pair<std::string, size_t>> attn_cuda_smem_bytes() {
  return {{"forward_d64", FwdTiles<64>::kSmem},      {"forward_d96", FwdTiles<96>::kSmem},
          {"forward_d128", FwdTiles<128>::kSmem},    {"forward_d256", FwdTiles<256>::kSmem},
          {"backward_d64", BwdTiles<64>::kSmem},     {"backward_d96", BwdTiles<96>::kSmem},
          {"backward_d128", BwdTiles<128>::kSmem},   {"backward_d256", BwdTiles<256>::kSmem},
          {"backward_dq_d64", DqTiles<64>::kSmem},   {"backward_dq_d96", DqTiles<96>::kSmem},
          {"backward_dq_d128", DqTiles<128>::kSmem}, {"backward_dq_d256", DqTiles<256>::kSmem}};
}

// RINGATTN_CUDA_BF16_ONLY (a compile definition, not used by the package build) instantiates only the
// bf16 kernels: half the compile, for tests/test_cuda_kernels.py's default-tier ptxas check (the slow
// tier compiles everything); fp16 calls then raise.
void attn_forward_cuda(const AttnParams& p) {
  check_params(p, false);
  if (p.batch * p.heads_q * p.seqlen_q == 0) return;
  if (p.dtype == kBFloat16) return forward_dtype<kBFloat16>(p);
#if !defined(RINGATTN_CUDA_BF16_ONLY)
  forward_dtype<kFloat16>(p);
#endif
}

void attn_backward_cuda(const AttnParams& p) {
  check_params(p, true);
  if (p.dtype == kBFloat16) return backward_dtype<kBFloat16>(p);
#if !defined(RINGATTN_CUDA_BF16_ONLY)
  backward_dtype<kFloat16>(p);
#endif
}

}  // namespace ringattn
