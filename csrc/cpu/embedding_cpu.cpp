// Bindings for the CPU embedding kernels. Picks the AVX2 build of the kernels at run time when the
// CPU has AVX2+FMA+F16C, else the generic build. Every binding releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <vector>

#include "cpu/embedding_types.h"
#include "cpu/registry.h"
#include "cpu/simd.h"

namespace py = pybind11;

namespace fi {
namespace {

bool use_avx2() {
#ifdef FI_HAVE_AVX2_TU
  return cpu_has_avx2();
#else
  return false;
#endif
}

void check_common(int64_t V, int64_t D, int64_t N, int64_t B, int mode) {
  if (V < 0 || D <= 0 || N < 0 || B < 0)
    throw std::invalid_argument("fastinterest embedding: sizes must be V >= 0, D > 0, N >= 0, B >= 0");
  if (N >= (int64_t(1) << 32) || V > (int64_t(1) << 32))
    throw std::invalid_argument("fastinterest embedding: more than 2^32 indices or rows in one call");
  if (mode < 0 || mode > 2) throw std::invalid_argument("fastinterest embedding: mode must be 0 sum, 1 mean, 2 max");
}

}  // namespace

void register_embedding(py::module_& m) {
  m.def(
      "embedding_forward",
      [](std::uintptr_t weight, int wdtype, int64_t V, int64_t D, std::uintptr_t idx, int idtype, int64_t N,
         std::uintptr_t off, int odtype, int64_t B, std::uintptr_t psw, int mode, int64_t skip_idx,
         std::uintptr_t out, std::uintptr_t maxpos, int nthreads) {
        check_common(V, D, N, B, mode);
        if (mode == 2 && !maxpos) throw std::invalid_argument("fastinterest embedding: mode max needs maxpos");
        FwdCall c{weight, wdtype, V, D, idx, idtype, N, off, odtype, B, psw, mode, skip_idx, out, maxpos, nthreads};
        py::gil_scoped_release nogil;
        return use_avx2() ? avx2::embedding_forward(c) : generic::embedding_forward(c);
      },
      py::arg("weight"), py::arg("wdtype"), py::arg("V"), py::arg("D"), py::arg("idx"), py::arg("idtype"),
      py::arg("N"), py::arg("off"), py::arg("odtype"), py::arg("B"), py::arg("psw"), py::arg("mode"),
      py::arg("skip_idx"), py::arg("out"), py::arg("maxpos"), py::arg("nthreads"),
      "Embedding-bag forward. weight [V, D] (wdtype); idx [N]; off [B+1] or 0 (bag b = {idx[b]}); psw [N] or 0;\n"
      "out [B, D] (float64 for float64 tables, else float32); maxpos [B, D] int64 positions for mode max.\n"
      "Returns True when an offset or an index is out of range (those bags are not read; the caller raises).");
  m.def(
      "embedding_backward",
      [](std::uintptr_t grad_out, std::uintptr_t weight, int wdtype, int64_t V, int64_t D, std::uintptr_t idx,
         int idtype, int64_t N, std::uintptr_t off, int odtype, int64_t B, std::uintptr_t psw, int mode,
         int64_t skip_idx, std::uintptr_t maxpos, int opt, std::vector<double> hp, std::uintptr_t s1,
         std::uintptr_t s2, std::uintptr_t step, std::uintptr_t out_rows, std::uintptr_t out_vals, std::uintptr_t dense, int nthreads) {
        check_common(V, D, N, B, mode);
        if (opt < 0 || opt > 5) throw std::invalid_argument("fastinterest embedding: unknown optimizer code");
        if (opt == 5 && !step) throw std::invalid_argument("fastinterest embedding: Adam needs the step counter");
        hp.resize(4, 0.0);
        BwdCall c{grad_out, weight, wdtype, V, D, idx, idtype, N, off, odtype, B, psw, mode, skip_idx, maxpos, opt,
                  {hp[0], hp[1], hp[2], hp[3]}, s1, s2, step, out_rows, out_vals, dense, nthreads};
        py::gil_scoped_release nogil;
        return use_avx2() ? avx2::embedding_backward(c) : generic::embedding_backward(c);
      },
      py::arg("grad_out"), py::arg("weight"), py::arg("wdtype"), py::arg("V"), py::arg("D"), py::arg("idx"),
      py::arg("idtype"), py::arg("N"), py::arg("off"), py::arg("odtype"), py::arg("B"), py::arg("psw"),
      py::arg("mode"), py::arg("skip_idx"), py::arg("maxpos"), py::arg("opt"), py::arg("hp"), py::arg("s1"),
      py::arg("s2"), py::arg("step"), py::arg("out_rows"), py::arg("out_vals"), py::arg("dense"), py::arg("nthreads"),
      "Embedding-bag backward, deterministic (sorted by row, summed in position order), optionally fused\n"
      "with an optimizer update of the touched rows. Returns the number of distinct rows touched.");
  m.def(
      "first_bad_index",
      [](std::uintptr_t idx, int idtype, int64_t N, int64_t V) {
        py::gil_scoped_release nogil;
        return use_avx2() ? avx2::first_bad_index(idx, idtype, N, V) : generic::first_bad_index(idx, idtype, N, V);
      },
      py::arg("idx"), py::arg("idtype"), py::arg("N"), py::arg("V"),
      "Position of the first index outside [0, V), or -1.");
}

}  // namespace fi
