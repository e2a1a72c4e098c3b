// Memory probes for the benchmark harness: what this machine's memory system delivers, measured
// with the plainest loops, so kernel bandwidth can be reported as a fraction of it.
//   probe_seq_read:   sum of a large float array read sequentially (streaming bandwidth)
//   probe_gather_sum: out[b] = sum of rows idx[b*L .. b*L+L) of a float table, the textbook loop,
//                     optionally with software prefetch PF rows ahead (random-row bandwidth)
// Compiled with AVX2 (file suffix) — call only when fi::cpu_has_avx2().
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#ifdef FI_HAVE_OPENMP
#include <omp.h>
#endif

namespace fi {
namespace probe {

double seq_read(const float* p, int64_t n, int nthreads) {
  double total = 0;
#pragma omp parallel for num_threads(nthreads) reduction(+ : total) schedule(static)
  for (int64_t c = 0; c < n; c += 4096) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t e = c + 4096 < n ? c + 4096 : n;
    for (int64_t i = c; i + 8 <= e; i += 8)
      for (int k = 0; k < 8; ++k) acc[k] += p[i + k];
    for (int k = 0; k < 8; ++k) total += acc[k];
  }
  return total;
}

void gather_sum(const float* w, int64_t D, const int64_t* idx, int64_t B, int64_t L, float* out, int prefetch,
                int nthreads) {
  const int64_t N = B * L;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    float* o = out + b * D;
    for (int64_t d = 0; d < D; ++d) o[d] = 0;
    for (int64_t j = b * L; j < b * L + L; ++j) {
      if (prefetch && j + prefetch < N) {
        const char* p = reinterpret_cast<const char*>(w + idx[j + prefetch] * D);
        for (int64_t off = 0; off < D * 4; off += 64) __builtin_prefetch(p + off, 0, 1);
      }
      const float* row = w + idx[j] * D;
      for (int64_t d = 0; d < D; ++d) o[d] += row[d];
    }
  }
}

}  // namespace probe

void register_probes(pybind11::module_& m) {
  m.def("probe_seq_read", [](std::uintptr_t p, int64_t n, int nthreads) {
    pybind11::gil_scoped_release nogil;
    return probe::seq_read(reinterpret_cast<const float*>(p), n, nthreads);
  }, pybind11::arg("ptr"), pybind11::arg("n"), pybind11::arg("nthreads"));
  m.def("probe_gather_sum", [](std::uintptr_t w, int64_t D, std::uintptr_t idx, int64_t B, int64_t L,
                               std::uintptr_t out, int prefetch, int nthreads) {
    pybind11::gil_scoped_release nogil;
    probe::gather_sum(reinterpret_cast<const float*>(w), D, reinterpret_cast<const int64_t*>(idx), B, L,
                      reinterpret_cast<float*>(out), prefetch, nthreads);
  }, pybind11::arg("weight"), pybind11::arg("D"), pybind11::arg("idx"), pybind11::arg("B"), pybind11::arg("L"),
     pybind11::arg("out"), pybind11::arg("prefetch"), pybind11::arg("nthreads"));
}

}  // namespace fi
