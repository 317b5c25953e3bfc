// Runtime ISA dispatch of the CPU kernels: attn_cpu.cpp is compiled once per variant (CMakeLists.txt
// writes the list, least to most capable, to ringattn_cpu_variants.inc); this file, compiled for the
// baseline ISA, asks the CPU which variants it can run and calls the one a caller names or the best.
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "attn_cpu.h"

#define RINGATTN_CPU_VARIANT(ns) \
  namespace ns {                 \
  namespace ringattn {           \
  ::ringattn::CpuVariant variant(); \
  }                              \
  }
#include "ringattn_cpu_variants.inc"
#undef RINGATTN_CPU_VARIANT

namespace ringattn {
namespace {

// Whether this CPU has a feature (Linux cpuinfo name). GCC and Clang's __builtin_cpu_supports also
// checks that the OS saves the AVX and AVX-512 register state, so "avx2" or "avx512f" means usable.
bool cpu_has(const std::string& feature) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();  // needed when this runs before the runtime's constructors (static init)
  struct Probe {
    const char* name;
    bool present;
  };
  static const Probe probes[] = {
      {"sse4_2", __builtin_cpu_supports("sse4.2") != 0},
      {"popcnt", __builtin_cpu_supports("popcnt") != 0},
      {"avx", __builtin_cpu_supports("avx") != 0},
      {"avx2", __builtin_cpu_supports("avx2") != 0},
      {"fma", __builtin_cpu_supports("fma") != 0},
      {"f16c", __builtin_cpu_supports("f16c") != 0},
      {"bmi1", __builtin_cpu_supports("bmi") != 0},
      {"bmi2", __builtin_cpu_supports("bmi2") != 0},
      {"abm", __builtin_cpu_supports("lzcnt") != 0},
      {"movbe", __builtin_cpu_supports("movbe") != 0},
      {"avx512f", __builtin_cpu_supports("avx512f") != 0},
      {"avx512cd", __builtin_cpu_supports("avx512cd") != 0},
      {"avx512bw", __builtin_cpu_supports("avx512bw") != 0},
      {"avx512dq", __builtin_cpu_supports("avx512dq") != 0},
      {"avx512vl", __builtin_cpu_supports("avx512vl") != 0},
      {"avx512_vnni", __builtin_cpu_supports("avx512vnni") != 0},
      {"avx512_bf16", __builtin_cpu_supports("avx512bf16") != 0},
      {"avx512_fp16", __builtin_cpu_supports("avx512fp16") != 0},
  };
  for (const Probe& probe : probes) {
    if (feature == probe.name) return probe.present;
  }
  return false;  // a feature this file cannot check is treated as missing
#else
  (void)feature;
  return true;  // non-x86: only the generic variant is built, with the compiler's default flags
#endif
}

std::string names(const std::vector<const CpuVariant*>& variants) {
  std::string out;
  for (const CpuVariant* v : variants) out += (out.empty() ? "" : ", ") + std::string(v->name);
  return out.empty() ? "none" : out;
}

}  // namespace

const std::vector<CpuVariant>& cpu_variants() {
  static const std::vector<CpuVariant> all = {
#define RINGATTN_CPU_VARIANT(ns) ns::ringattn::variant(),
#include "ringattn_cpu_variants.inc"
#undef RINGATTN_CPU_VARIANT
  };
  return all;
}

std::vector<std::string> split_features(const char* features) {
  std::istringstream in(features);
  std::vector<std::string> out;
  for (std::string feature; in >> feature;) out.push_back(feature);
  return out;
}

std::vector<std::string> cpu_variant_missing(const CpuVariant& v) {
  std::vector<std::string> missing;
  for (const std::string& feature : split_features(v.needs)) {
    if (!cpu_has(feature)) missing.push_back(feature);
  }
  return missing;
}

const CpuVariant& cpu_variant(const std::string& name) {
  static const std::vector<const CpuVariant*> supported = [] {
    std::vector<const CpuVariant*> out;
    for (const CpuVariant& v : cpu_variants()) {
      if (cpu_variant_missing(v).empty()) out.push_back(&v);
    }
    return out;
  }();
  std::vector<const CpuVariant*> compiled;
  for (const CpuVariant& v : cpu_variants()) compiled.push_back(&v);
  if (name.empty()) {
    if (supported.empty()) {
      throw std::runtime_error("ringattn cpu attention: no compiled CPU variant (" + names(compiled) +
                               ") runs on this CPU; it lacks " + cpu_variant_missing(*compiled.front()).front() +
                               ". Reinstall ringattn without RINGATTN_CPU_MARCH (the portable build)");
    }
    return *supported.back();
  }
  for (const CpuVariant* v : compiled) {
    if (name != v->name) continue;
    const std::vector<std::string> missing = cpu_variant_missing(*v);
    if (!missing.empty()) {
      throw std::invalid_argument("ringattn cpu attention: variant '" + name + "' needs " + missing.front() +
                                  ", which this CPU lacks; it runs: " + names(supported));
    }
    return *v;
  }
  throw std::invalid_argument("ringattn cpu attention: unknown variant '" + name + "'; compiled: " +
                              names(compiled) + "; this CPU runs: " + names(supported));
}

void attn_forward_cpu(const AttnParams& p, const std::string& variant) { cpu_variant(variant).forward(p); }

void attn_backward_cpu(const AttnParams& p, const std::string& variant) { cpu_variant(variant).backward(p); }

}  // namespace ringattn
