#pragma once
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "attn_params.h"

namespace ringattn {

// Block attention on the current CUDA device, enqueued on p.stream: bf16/fp16 inputs on tensor
// cores (mma.sync m16n8k16, fp32 accumulation), fused RoPE, GQA, causal by global index, documents
// (the keys' own with k_cu_seqlens), sliding window, softcap, ALiBi and attention dropout, whose
// mask the backward regenerates (attn_math.h).
// Any even head dim up to 256 (tiles are zero padded to 64, 96, 128 or 256 columns).
// Throws std::invalid_argument for unsupported arguments and std::runtime_error on CUDA errors.
void attn_forward_cuda(const AttnParams& p);

// Backward: needs p.dq_accum zero-filled and p.dk_accum (fp32 workspaces, see AttnParams).
void attn_backward_cuda(const AttnParams& p);

// Dynamic shared memory per CTA of each kernel instantiation, (name, bytes): host-only, no GPU needed.
std::vector<std::pair<std::string, size_t>> attn_cuda_smem_bytes();

}  // namespace ringattn
