// Bindings for the fused loss kernels (cpu/loss_kernels.h): pointers in, the loss sum out; the AVX2
// form for float32 when the CPU has it. Releases the GIL.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "cpu/loss_kernels.h"
#include "cpu/registry.h"
#include "cpu/simd.h"

namespace py = pybind11;

namespace fi {

void register_loss(py::module_& m) {
  m.def(
      "neg_softplus_rows",
      [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t g, int64_t R, int64_t S, int dtype, int nthreads) {
        if (R < 0 || S < 0) throw std::invalid_argument("fastinterest neg_softplus_rows: R and S must be >= 0");
        if (dtype != 0 && dtype != 1) throw std::invalid_argument("fastinterest neg_softplus_rows: dtype 0 f32, 1 f64");
        py::gil_scoped_release nogil;
        if (dtype == 1)
          return loss::neg_softplus_rows_generic(reinterpret_cast<const double*>(x), reinterpret_cast<const double*>(w),
                                                 reinterpret_cast<double*>(g), R, S, nthreads);
        const float* xf = reinterpret_cast<const float*>(x);
        const float* wf = reinterpret_cast<const float*>(w);
        float* gf = reinterpret_cast<float*>(g);
#ifdef FI_HAVE_AVX2_TU
        if (cpu_has_avx2() && loss::loss_avx2_compiled()) return loss::neg_softplus_rows_avx2(xf, wf, gf, R, S, nthreads);
#endif
        return loss::neg_softplus_rows_generic(xf, wf, gf, R, S, nthreads);
      },
      py::arg("x"), py::arg("w"), py::arg("g"), py::arg("R"), py::arg("S"), py::arg("dtype"), py::arg("nthreads"),
      "sum_r w[r] * sum_s softplus(x[r, s]); writes g[r, s] = w[r] * sigmoid(x[r, s]) (contiguous [R, S]).");
}

}  // namespace fi
