// pybind11 bindings: raw pointers (as integers), sizes and a stream handle. No torch headers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "attn_cpu.h"
#include "attn_math.h"
#include "attn_params.h"
#include "rope_cpu.h"
#ifdef RINGATTN_WITH_CUDA
#include "attn_cuda.h"
#include "rope_cuda.h"
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void rope_cos_sin_cpu(uintptr_t positions, int64_t n_positions, uintptr_t turns_fixed,
                      int64_t n_freqs, float attention_factor, uintptr_t cos_out,
                      uintptr_t sin_out) {
  py::gil_scoped_release release;
  ringattn::rope_cos_sin_cpu(as_ptr<const int32_t>(positions), n_positions,
                             as_ptr<const uint64_t>(turns_fixed), n_freqs, attention_factor,
                             as_ptr<float>(cos_out), as_ptr<float>(sin_out));
}

void attn_forward_cpu(const ringattn::AttnParams& p, const std::string& variant) {
  py::gil_scoped_release release;
  ringattn::attn_forward_cpu(p, variant);
}

void attn_backward_cpu(const ringattn::AttnParams& p, const std::string& variant) {
  py::gil_scoped_release release;
  ringattn::attn_backward_cpu(p, variant);
}

// [(name, isa, missing)] of the compiled CPU variants, least to most capable: the vector ISA each was
// compiled for and the features this CPU lacks to run it (empty: it runs here).
std::vector<std::tuple<std::string, std::vector<std::string>, std::vector<std::string>>> cpu_variants() {
  std::vector<std::tuple<std::string, std::vector<std::string>, std::vector<std::string>>> out;
  for (const ringattn::CpuVariant& v : ringattn::cpu_variants()) {
    out.emplace_back(v.name, ringattn::split_features(v.isa), ringattn::cpu_variant_missing(v));
  }
  return out;
}

#ifdef RINGATTN_WITH_CUDA
void require_cuda_device() {
  std::string reason;
  if (ringattn::cuda_device_count(&reason) == 0) {
    throw std::runtime_error("ringattn._C was built with CUDA but no CUDA device is usable here" +
                             (reason.empty() ? std::string() : " (" + reason + ")"));
  }
}

void rope_cos_sin_cuda(uintptr_t positions, int64_t n_positions, uintptr_t turns_fixed,
                       int64_t n_freqs, float attention_factor, uintptr_t cos_out,
                       uintptr_t sin_out, uintptr_t stream) {
  require_cuda_device();
  ringattn::rope_cos_sin_cuda(as_ptr<const int32_t>(positions), n_positions,
                              as_ptr<const uint64_t>(turns_fixed), n_freqs, attention_factor,
                              as_ptr<float>(cos_out), as_ptr<float>(sin_out), stream);
}

void attn_forward_cuda(const ringattn::AttnParams& p) {
  require_cuda_device();
  ringattn::attn_forward_cuda(p);
}

void attn_backward_cuda(const ringattn::AttnParams& p) {
  require_cuda_device();
  ringattn::attn_backward_cuda(p);
}
#endif

void bind_params(py::module_& m) {
  using ringattn::AttnParams;
  using ringattn::View;
  py::class_<View>(m, "View", "A (B, S, H, D) view: address and element strides of B, S, H (unit over D).")
      .def(py::init<>())
      .def_readwrite("ptr", &View::ptr)
      .def_readwrite("sb", &View::sb)
      .def_readwrite("ss", &View::ss)
      .def_readwrite("sh", &View::sh);
  py::class_<AttnParams> params(m, "AttnParams", "Arguments of one block-attention call (attn_params.h).");
  params.def(py::init<>());
#define RA_FIELD(name) params.def_readwrite(#name, &AttnParams::name)
  RA_FIELD(batch);
  RA_FIELD(seqlen_q);
  RA_FIELD(seqlen_k);
  RA_FIELD(heads_q);
  RA_FIELD(heads_kv);
  RA_FIELD(head_dim);
  RA_FIELD(dtype);
  RA_FIELD(q);
  RA_FIELD(k);
  RA_FIELD(v);
  RA_FIELD(out);
  RA_FIELD(out_dtype);
  RA_FIELD(lse);
  RA_FIELD(dout);
  RA_FIELD(dq);
  RA_FIELD(dk);
  RA_FIELD(dv);
  RA_FIELD(delta);
  RA_FIELD(grad_dtype);
  RA_FIELD(softmax_scale);
  RA_FIELD(causal);
  RA_FIELD(q_start);
  RA_FIELD(q_stride);
  RA_FIELD(k_start);
  RA_FIELD(k_stride);
  RA_FIELD(cu_seqlens);
  RA_FIELD(n_cu);
  RA_FIELD(k_cu_seqlens);
  RA_FIELD(window_left);
  RA_FIELD(window_right);
  RA_FIELD(softcap);
  RA_FIELD(alibi_slopes);
  RA_FIELD(alibi_sb);
  RA_FIELD(dropout_p);
  RA_FIELD(dropout_seed);
  RA_FIELD(dropout_offset);
  RA_FIELD(rope_mode);
  RA_FIELD(rotary_dim);
  RA_FIELD(interleaved);
  RA_FIELD(attention_factor);
  RA_FIELD(rope_freqs);
  RA_FIELD(k_rope_freqs);
  RA_FIELD(q_positions);
  RA_FIELD(k_positions);
  RA_FIELD(q_positions_sb);
  RA_FIELD(k_positions_sb);
  RA_FIELD(deterministic);
  RA_FIELD(dq_accum);
  RA_FIELD(dk_accum);
  RA_FIELD(rope_work);
  RA_FIELD(num_threads);
  RA_FIELD(stream);
#undef RA_FIELD
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ringattn compiled core (torch-free)";
  bind_params(m);
  m.def(
      "merge_lse",
      [](float l1, float l2) {
        float w1 = 0.0f, w2 = 0.0f;
        const float l = ringattn::merge_lse(l1, l2, &w1, &w2);
        return std::make_tuple(l, w1, w2);
      },
      "The kernels' guarded merge of two natural-log lse values: (lse, w1, w2).");
  m.def(
      "philox4x32",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        uint32_t c[4] = {c0, c1, c2, c3};
        ringattn::philox4x32_10(c, k0, k1);
        return std::make_tuple(c[0], c[1], c[2], c[3]);
      },
      "The kernels' Philox4x32-10 (attn_math.h): counter words c0..c3, key k0, k1 -> four words.");
  m.def(
      "dropout_keep",
      [](double p, int64_t seed, int64_t offset, int64_t k_index, int64_t q_index, int64_t bh) {
        return ringattn::dropout_keep(ringattn::make_dropout(p, seed, offset), k_index, q_index,
                                      static_cast<uint32_t>(bh));
      },
      "The kernels' dropout test (attn_math.h) of one (key, query, batch * Hq + head) element.");
  m.def("attn_forward_cpu", &attn_forward_cpu, py::arg("params"), py::arg("variant") = "",
        "Block attention forward on the CPU (fills out, lse) with the named compiled variant, \"\": the best "
        "this CPU runs.");
  m.def("attn_backward_cpu", &attn_backward_cpu, py::arg("params"), py::arg("variant") = "",
        "Block attention backward on the CPU (fills dq, dk, dv); variant as in attn_forward_cpu.");
  m.def("cpu_variants", &cpu_variants,
        "[(name, isa, missing)] of the compiled CPU kernel variants, least to most capable: the vector ISA "
        "each was compiled for and the CPU features this machine lacks to run it (empty: it runs here).");
  m.def("cpu_features", &ringattn::cpu_features,
        "[(feature, present)]: the x86 features the CPU variants may need (Linux cpuinfo names) and whether "
        "this CPU and OS provide each (CPUID, XCR0); empty off x86.");
  m.def(
      "cpu_variant", []() { return ringattn::cpu_variant("").name; },
      "The CPU kernel variant calls use by default: the most capable one this CPU runs (RuntimeError when none).");
#ifdef RINGATTN_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = RINGATTN_CUDA_ARCHS_STR;
  m.def("cuda_device_count", []() { return ringattn::cuda_device_count(nullptr); });
  m.def(
      "cuda_device_status",
      []() {
        std::string reason;
        const int count = ringattn::cuda_device_count(&reason);
        return std::make_tuple(count, reason);
      },
      "(device count, the runtime's error when it is 0) of the statically linked CUDA runtime.");
  m.def("rope_cos_sin_cuda", &rope_cos_sin_cuda, "Exact-phase RoPE cos/sin on a CUDA device.");
  m.def("attn_forward_cuda", &attn_forward_cuda, "Block attention forward on a CUDA device.");
  m.def("attn_backward_cuda", &attn_backward_cuda, "Block attention backward on a CUDA device.");
  m.def("attn_cuda_smem_bytes", &ringattn::attn_cuda_smem_bytes,
        "Dynamic shared memory per CTA of each CUDA attention kernel, [(name, bytes)].");
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
  m.def("rope_cos_sin_cpu", &rope_cos_sin_cpu,
        "Exact-phase RoPE cos/sin: int32 positions (n,), uint64 turns (f,) -> fp32 (n, f) x2.");
}
