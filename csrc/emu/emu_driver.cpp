// C ABI of the CUDA emulation library for Python (ctypes; tests/test_cuda_emulation.py).
//
// The library links csrc/attn_cuda.cu compiled under the emulation (cuda_emu.h), its runtime and
// this driver: ra_emu_attn_forward / ra_emu_attn_backward call the real host entry points
// (ringattn::attn_forward_cuda / attn_backward_cuda: argument checks, head-dim dispatch, grids,
// cudaFuncSetAttribute), whose launches run the kernels over their whole grid on the CPU.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../attn_cuda.h"
#include "../attn_params.h"
#include "cuda_emu_runtime.h"

#define RA_EMU_API extern "C" __attribute__((visibility("default")))

namespace {

void copy_out(const std::string& s, char* buf, size_t len) {
  if (buf == nullptr || len == 0) return;
  const size_t n = std::min(len - 1, s.size());
  std::memcpy(buf, s.data(), n);
  buf[n] = '\0';
}

// 0: ran; 1: std::invalid_argument (the documented argument errors); 2: std::runtime_error (a CUDA
// error: a failed launch or a fault the emulator stopped); 3: anything else. `msg` gets the text.
template <class F>
int guarded(F&& f, char* msg, size_t len) {
  try {
    f();
    copy_out("", msg, len);
    return 0;
  } catch (const std::invalid_argument& e) {
    copy_out(e.what(), msg, len);
    return 1;
  } catch (const std::runtime_error& e) {
    copy_out(e.what(), msg, len);
    return 2;
  } catch (const std::exception& e) {
    copy_out(e.what(), msg, len);
    return 3;
  }
}

}  // namespace

RA_EMU_API int ra_emu_attn_forward(const ringattn::AttnParams* p, char* msg, size_t len) {
  return guarded([&] { ringattn::attn_forward_cuda(*p); }, msg, len);
}

// The backward kernel, then the finishing kernel for dQ and for dK (attn_backward_cuda launches all).
RA_EMU_API int ra_emu_attn_backward(const ringattn::AttnParams* p, char* msg, size_t len) {
  return guarded([&] { ringattn::attn_backward_cuda(*p); }, msg, len);
}

// "name=offset;...;sizeof=N" for every AttnParams / View field: the ctypes mirror checks itself.
RA_EMU_API size_t ra_emu_params_layout(char* buf, size_t len) {
  using ringattn::AttnParams;
  using ringattn::View;
  std::string s;
#define RA_F(T, name) s += std::string(#name) + "=" + std::to_string(offsetof(T, name)) + ";"
  RA_F(View, ptr);
  RA_F(View, sb);
  RA_F(View, ss);
  RA_F(View, sh);
  s += "View.sizeof=" + std::to_string(sizeof(View)) + ";";
  RA_F(AttnParams, batch);
  RA_F(AttnParams, seqlen_q);
  RA_F(AttnParams, seqlen_k);
  RA_F(AttnParams, heads_q);
  RA_F(AttnParams, heads_kv);
  RA_F(AttnParams, head_dim);
  RA_F(AttnParams, dtype);
  RA_F(AttnParams, q);
  RA_F(AttnParams, k);
  RA_F(AttnParams, v);
  RA_F(AttnParams, out);
  RA_F(AttnParams, out_dtype);
  RA_F(AttnParams, lse);
  RA_F(AttnParams, dout);
  RA_F(AttnParams, dq);
  RA_F(AttnParams, dk);
  RA_F(AttnParams, dv);
  RA_F(AttnParams, delta);
  RA_F(AttnParams, grad_dtype);
  RA_F(AttnParams, softmax_scale);
  RA_F(AttnParams, causal);
  RA_F(AttnParams, q_start);
  RA_F(AttnParams, q_stride);
  RA_F(AttnParams, k_start);
  RA_F(AttnParams, k_stride);
  RA_F(AttnParams, cu_seqlens);
  RA_F(AttnParams, n_cu);
  RA_F(AttnParams, k_cu_seqlens);
  RA_F(AttnParams, window_left);
  RA_F(AttnParams, window_right);
  RA_F(AttnParams, softcap);
  RA_F(AttnParams, alibi_slopes);
  RA_F(AttnParams, alibi_sb);
  RA_F(AttnParams, dropout_p);
  RA_F(AttnParams, dropout_seed);
  RA_F(AttnParams, dropout_offset);
  RA_F(AttnParams, rope_mode);
  RA_F(AttnParams, rotary_dim);
  RA_F(AttnParams, interleaved);
  RA_F(AttnParams, attention_factor);
  RA_F(AttnParams, rope_freqs);
  RA_F(AttnParams, k_rope_freqs);
  RA_F(AttnParams, q_positions);
  RA_F(AttnParams, k_positions);
  RA_F(AttnParams, q_positions_sb);
  RA_F(AttnParams, k_positions_sb);
  RA_F(AttnParams, deterministic);
  RA_F(AttnParams, dq_accum);
  RA_F(AttnParams, dk_accum);
  RA_F(AttnParams, rope_work);
  RA_F(AttnParams, num_threads);
  RA_F(AttnParams, stream);
#undef RA_F
  s += "sizeof=" + std::to_string(sizeof(AttnParams));
  copy_out(s, buf, len);
  return s.size() + 1;
}

// attn_cuda_smem_bytes() as "name=bytes;...".
RA_EMU_API size_t ra_emu_smem_bytes(char* buf, size_t len) {
  std::string s;
  for (const auto& [name, bytes] : ringattn::attn_cuda_smem_bytes()) s += name + "=" + std::to_string(bytes) + ";";
  copy_out(s, buf, len);
  return s.size() + 1;
}

RA_EMU_API void ra_emu_register(uintptr_t ptr, uint64_t bytes, const char* name) {
  ringattn_emu::register_buffer(reinterpret_cast<const void*>(ptr), bytes, name);
}

// Clears the report, the sticky launch error and the registered buffers.
RA_EMU_API void ra_emu_reset() {
  ringattn_emu::reset_report();
  ringattn_emu::clear_buffers();
}

RA_EMU_API void ra_emu_set_dry_run(int on) { ringattn_emu::set_dry_run(on != 0); }

// The report as JSON (returns the size needed, terminator included).
RA_EMU_API size_t ra_emu_report(char* buf, size_t len) { return ringattn_emu::report_json(buf, len); }

// One warp through the emulated mma: a (32, 4), b (32, 2) uint32 registers, c (32, 4) fp32 in/out.
RA_EMU_API int ra_emu_mma_test(const char* ptx, const uint32_t* a, const uint32_t* b, float* c) {
  return ringattn_emu::mma_warp_test(ptx, a, b, c);
}

// fp32 -> bf16 (kind 1) or fp16 (kind 2) bit patterns, as the kernels' conversions round.
RA_EMU_API void ra_emu_round(int kind, const float* in, uint16_t* out, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    out[i] = kind == 1 ? ringattn_emu::f32_to_bf16_rn(in[i]) : ringattn_emu::f32_to_f16_rn(in[i]);
  }
}

RA_EMU_API void ra_emu_widen(int kind, const uint16_t* in, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    out[i] = kind == 1 ? ringattn_emu::bf16_to_f32(in[i]) : ringattn_emu::f16_to_f32(in[i]);
  }
}
