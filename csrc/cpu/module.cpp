// The `_C_cpu` pybind11 module: torch-free CPU kernels driven by raw pointers from Python.
#include <pybind11/pybind11.h>

#include "cpu/registry.h"
#include "cpu/simd.h"

#ifdef FI_HAVE_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace fi {
void register_common(py::module_& m) {
  m.def("build_info", []() {
    py::dict d;
    d["compiler"] = FI_COMPILER;
#ifdef FI_HAVE_OPENMP
    d["openmp"] = true;
    d["openmp_version"] = _OPENMP;
#else
    d["openmp"] = false;
#endif
    d["simd_compiled"] = "generic, avx2+fma+f16c";
    d["simd_runtime"] = cpu_has_avx2() ? "avx2+fma+f16c" : "generic";
    return d;
  });
}
}  // namespace fi

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "fastinterest CPU kernels (torch-free; pointers in, pointers out)";
  fi::register_common(m);
  fi::register_embedding(m);
  fi::register_lstm(m);
#ifdef FI_HAVE_AVX2_TU
  fi::register_probes(m);
#endif
}
