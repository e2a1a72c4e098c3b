// The `_C_cuda` pybind11 module. cudart is linked statically, so importing works without a driver;
// kernels fail with a clear error when no device is present.
#include <pybind11/pybind11.h>

#include "cuda/registry.h"

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastinterest CUDA kernels (torch-free; pointers and a stream handle in)";
  m.def("build_info", []() {
    py::dict d;
    d["compiler"] = FI_COMPILER;
    d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
    d["archs"] = FI_CUDA_ARCHS;
    return d;
  });
  fi::register_embedding_cuda(m);
  fi::register_lstm_cuda(m);
}
