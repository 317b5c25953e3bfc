// Arguments of one block-attention call, shared by the CPU and CUDA kernels and the bindings.
// Pointers are raw addresses; tensors are (B, S, H, D) views with unit stride over D and any
// element strides over B, S and H (transformers passes transposed views).
#pragma once
#include <cstdint>

namespace ringattn {

struct View {
  uintptr_t ptr = 0;
  int64_t sb = 0, ss = 0, sh = 0;  // element strides of batch, sequence, head
};

struct AttnParams {
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
  int dtype = 0;  // DType of q, k, v (and dout)
  View q, k, v;

  // forward outputs: out (out_dtype) and lse (fp32, contiguous (B, Hq, Sq))
  View out;
  int out_dtype = 0;
  uintptr_t lse = 0;

  // backward: dout (dtype), delta (fp32, contiguous (B, Hq, Sq)), gradients in grad_dtype
  View dout, dq, dk, dv;
  uintptr_t delta = 0;
  int grad_dtype = 0;

  float softmax_scale = 1.0f;
  bool causal = false;
  int64_t q_start = 0, q_stride = 1, k_start = 0, k_stride = 1;  // global index = start + stride * row
  uintptr_t cu_seqlens = 0;  // int64 (n_cu,), 0 for no documents
  int64_t n_cu = 0;
  uintptr_t k_cu_seqlens = 0;  // int64 (n_cu,), the keys' own documents; 0: cu_seqlens (attn_math.h)
  int64_t window_left = -1, window_right = -1;  // sliding window by aligned index; -1: unbounded side
  float softcap = 0.0f;  // scores -> softcap * tanh(scores / softcap); 0: off
  uintptr_t alibi_slopes = 0;  // fp32, slope of (b, h) at b * alibi_sb + h; 0: no ALiBi
  int64_t alibi_sb = 0;  // heads_q for (B, Hq) slopes, 0 for (Hq,)
  // Attention dropout (ringattn.dropout): probability in [0, 1), 0: off; the Philox key is
  // (seed mod 2^32, seed >> 32) and the counter's last word offset mod 2^32 (attn_math.h: Dropout).
  double dropout_p = 0.0;
  int64_t dropout_seed = 0, dropout_offset = 0;

  int rope_mode = 0;  // RopeMode
  int rotary_dim = 0;
  bool interleaved = false;
  float attention_factor = 1.0f;
  uintptr_t rope_freqs = 0;  // uint64 turns (exact) or fp32 inv_freq (hf), rotary_dim / 2 entries
  uintptr_t k_rope_freqs = 0;  // frequencies for k when they differ from q's (dynamic NTK); 0: same
  uintptr_t q_positions = 0, k_positions = 0;  // int32, (S,) or (B, S) contiguous
  int64_t q_positions_sb = 0, k_positions_sb = 0;  // 0 for (S,), S for (B, S)

  // CUDA backward: dQ by its own pass over each query tile's keys, every element summed by one
  // thread in key order (bitwise repeatable), instead of fp32 atomics from every key tile.
  bool deterministic = false;
  // CUDA backward workspaces, fp32: dq_accum (B, Sq, Hq, D), zero-filled unless deterministic (then
  // every row is written), dk_accum (B, Sk, Hkv, D)
  uintptr_t dq_accum = 0, dk_accum = 0;
  // CUDA RoPE workspace in dtype, contiguous, when rope_mode != 0: the forward rotates K into it once
  // (B, Sk, Hkv, D), the backward Q (B, Sq, Hq, D) and, when deterministic, K after Q's rows (its dQ
  // pass streams rotated keys), so the kernels' sweeps never rotate a tile again.
  uintptr_t rope_work = 0;

  int num_threads = 1;  // CPU only
  uintptr_t stream = 0;  // CUDA only
};

}  // namespace ringattn
