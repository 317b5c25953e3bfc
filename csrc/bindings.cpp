// pybind11 bindings: raw pointers (as integers), sizes and a stream handle. No torch headers.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "rope_cpu.h"
#ifdef RINGATTN_WITH_CUDA
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
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ringattn compiled core (torch-free)";
#ifdef RINGATTN_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = RINGATTN_CUDA_ARCHS_STR;
  m.def("cuda_device_count", []() { return ringattn::cuda_device_count(nullptr); });
  m.def("rope_cos_sin_cuda", &rope_cos_sin_cuda, "Exact-phase RoPE cos/sin on a CUDA device.");
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
  m.def("rope_cos_sin_cpu", &rope_cos_sin_cpu,
        "Exact-phase RoPE cos/sin: int32 positions (n,), uint64 turns (f,) -> fp32 (n, f) x2.");
}
