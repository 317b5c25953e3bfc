#pragma once
#include "attn_params.h"

namespace ringattn {

// Block attention forward on the CPU: fills p.out and p.lse. Inputs fp32 or bf16 (DType),
// fp32 accumulation, fused RoPE, GQA, causal by global index, documents (the keys' own with
// k_cu_seqlens), sliding window, softcap, ALiBi and attention dropout (attn_math.h). Throws
// std::invalid_argument.
void attn_forward_cpu(const AttnParams& p);

// Block attention backward on the CPU: fills p.dq, p.dk, p.dv from dout, q, k, v, lse and delta
// (both fp32 (B, Hq, Sq), lse may be the global one). dk/dv are summed over each query group.
// Dropout's mask is regenerated from p.dropout_seed/offset (never stored).
void attn_backward_cpu(const AttnParams& p);

}  // namespace ringattn
