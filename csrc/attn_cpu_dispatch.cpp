// Runtime ISA dispatch of the CPU kernels: attn_cpu.cpp is compiled once per variant (CMakeLists.txt
// writes the list, least to most capable, to ringattn_cpu_variants.inc); this file, compiled for the
// baseline ISA, asks the CPU which variants it can run and calls the one a caller names or the best.
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

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

#if defined(__x86_64__) || defined(__i386__)
// The features a variant may need that this CPU and OS provide, from CPUID (bits as the Intel SDM, vol.
// 2A, and AMD's APM number them) and XCR0: AVX needs the OS to save the SSE and AVX registers, AVX-512
// also the opmask and both halves of the ZMM registers. CPUID rather than __builtin_cpu_supports, whose
// feature names differ between compilers and versions (Clang before 18 refuses "f16c").
std::vector<std::pair<std::string, bool>> detect_features() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return {};
  const unsigned c1 = c;
  unsigned long long xcr0 = 0;
  if ((c1 >> 27) & 1u) {  // OSXSAVE: XGETBV is usable
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
  }
  const bool avx_state = (xcr0 & 0x6) == 0x6, avx512_state = (xcr0 & 0xe6) == 0xe6;
  unsigned b7 = 0, c7 = 0, d7 = 0, a71 = 0;
  if (__get_cpuid_max(0, nullptr) >= 7) {
    unsigned a7 = 0;
    __cpuid_count(7, 0, a7, b7, c7, d7);
    if (a7 >= 1) __cpuid_count(7, 1, a71, b, c, d);
  }
  unsigned c81 = 0;
  if (__get_cpuid(0x80000001, &a, &b, &c, &d)) c81 = c;
  auto bit = [](unsigned reg, int i) { return ((reg >> i) & 1u) != 0; };
  return {
      {"sse4_2", bit(c1, 20)},
      {"popcnt", bit(c1, 23)},
      {"movbe", bit(c1, 22)},
      {"avx", bit(c1, 28) && avx_state},
      {"fma", bit(c1, 12) && avx_state},
      {"f16c", bit(c1, 29) && avx_state},
      {"avx2", bit(b7, 5) && avx_state},
      {"bmi1", bit(b7, 3)},
      {"bmi2", bit(b7, 8)},
      {"abm", bit(c81, 5)},  // LZCNT
      {"avx512f", bit(b7, 16) && avx512_state},
      {"avx512dq", bit(b7, 17) && avx512_state},
      {"avx512cd", bit(b7, 28) && avx512_state},
      {"avx512bw", bit(b7, 30) && avx512_state},
      {"avx512vl", bit(b7, 31) && avx512_state},
      {"avx512_vnni", bit(c7, 11) && avx512_state},
      {"avx512_fp16", bit(d7, 23) && avx512_state},
      {"avx512_bf16", bit(a71, 5) && avx512_state},
  };
}
#else
std::vector<std::pair<std::string, bool>> detect_features() { return {}; }  // only the generic variant
#endif

std::string names(const std::vector<const CpuVariant*>& variants) {
  std::string out;
  for (const CpuVariant* v : variants) out += (out.empty() ? "" : ", ") + std::string(v->name);
  return out.empty() ? "none" : out;
}

}  // namespace

const std::vector<std::pair<std::string, bool>>& cpu_features() {
  static const std::vector<std::pair<std::string, bool>> features = detect_features();
  return features;
}

bool cpu_has(const std::string& feature) {
#if defined(__x86_64__) || defined(__i386__)
  for (const auto& [name, present] : cpu_features()) {
    if (name == feature) return present;
  }
  return false;  // a feature this file cannot check is treated as missing
#else
  (void)feature;
  return true;  // off x86 only the generic variant is built, with the compiler's default flags
#endif
}

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
