// The negatives' part of the sampled binary cross-entropy (train/trainer.py, _NegSoftplusSum):
//   total = sum_r w[r] * sum_s softplus(x[r, s])        softplus(x) = max(x, 0) + log1p(exp(-|x|))
//   g[r, s] = w[r] * sigmoid(x[r, s])                    (its gradient, kept for the backward pass)
// in one pass over x. As separate torch ops (softplus, sigmoid, the weighting, the row sums) this read
// and wrote the [rows, S] matrix several times and was the largest elementwise cost of a training step.
// Rows are split across threads; each thread sums its rows in double, and the per-thread sums are added
// in thread order (the same total for the same thread count).
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef FI_HAVE_OPENMP
#include <omp.h>
#endif

namespace fi {
namespace loss {

// Scalar reference form (float64, and float32 where AVX2 is missing).
template <typename T>
double neg_softplus_rows_generic(const T* x, const T* w, T* g, int64_t R, int64_t S, int nthreads) {
  std::vector<double> part(static_cast<size_t>(nthreads > 0 ? nthreads : 1), 0.0);
#ifdef FI_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
#endif
  for (int64_t r = 0; r < R; ++r) {
    const T* xr = x + r * S;
    T* gr = g + r * S;
    const T wr = w[r];
    double acc = 0.0;
    for (int64_t s = 0; s < S; ++s) {
      const T v = xr[s];
      const T e = std::exp(-std::fabs(v));
      acc += static_cast<double>((v > 0 ? v : T(0)) + std::log1p(e));
      gr[s] = wr * (v >= 0 ? T(1) / (T(1) + e) : e / (T(1) + e));
    }
#ifdef FI_HAVE_OPENMP
    part[static_cast<size_t>(omp_get_thread_num())] += static_cast<double>(wr) * acc;
#else
    part[0] += static_cast<double>(wr) * acc;
#endif
  }
  double total = 0.0;
  for (double p : part) total += p;
  return total;
}

bool loss_avx2_compiled();
double neg_softplus_rows_avx2(const float* x, const float* w, float* g, int64_t R, int64_t S, int nthreads);

}  // namespace loss
}  // namespace fi
