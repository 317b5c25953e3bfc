#pragma once
#include <string>
#include <utility>
#include <vector>

#include "attn_params.h"

namespace ringattn {

// One compiled ISA variant of the CPU kernels. attn_cpu.cpp is compiled once per variant into the one
// module, each copy in its own namespace with its own -m flags (CMakeLists.txt); attn_cpu_dispatch.cpp
// picks among them at run time.
struct CpuVariant {
  const char* name;   // "generic", "avx2", "avx512", "avx512bf16" (or the -march override's)
  const char* isa;    // vector ISA its flags enabled (Linux cpuinfo names, space-separated), for reports
  const char* needs;  // every CPU feature its code may use (same names), checked before it runs
  void (*forward)(const AttnParams&);
  void (*backward)(const AttnParams&);
};

// Compiled variants, least to most capable.
const std::vector<CpuVariant>& cpu_variants();

// The x86 features the variants may need (Linux cpuinfo names) and whether this CPU and OS provide each
// (CPUID and XCR0, read once); empty off x86, where only the generic variant is built.
const std::vector<std::pair<std::string, bool>>& cpu_features();

// Whether this CPU and OS provide `feature` (a cpu_features name; true off x86).
bool cpu_has(const std::string& feature);

// A space-separated feature list (CpuVariant::isa, ::needs) as names.
std::vector<std::string> split_features(const char* features);

// Features of `v` this CPU (and OS) lacks; empty when it can run `v`.
std::vector<std::string> cpu_variant_missing(const CpuVariant& v);

// The variant named `name`, "" for the best this CPU supports (decided once, at the first call).
// Throws std::invalid_argument naming the compiled and supported variants when `name` is unknown or
// this CPU cannot run it, and std::runtime_error when no compiled variant runs here.
const CpuVariant& cpu_variant(const std::string& name);

// Block attention forward on the CPU: fills p.out and p.lse. Inputs fp32, bf16 or fp16 (DType),
// fp32 accumulation, fused RoPE, GQA, causal by global index, documents (the keys' own with
// k_cu_seqlens), sliding window, softcap, ALiBi and attention dropout (attn_math.h). `variant` as
// in cpu_variant. Throws std::invalid_argument.
void attn_forward_cpu(const AttnParams& p, const std::string& variant = "");

// Block attention backward on the CPU: fills p.dq, p.dk, p.dv from dout, q, k, v, lse and delta
// (both fp32 (B, Hq, Sq), lse may be the global one). dk/dv are summed over each query group.
// Dropout's mask is regenerated from p.dropout_seed/offset (never stored).
void attn_backward_cpu(const AttnParams& p, const std::string& variant = "");

}  // namespace ringattn
