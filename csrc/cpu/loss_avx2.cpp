// AVX2 + FMA form of the fused negatives' BCE pass (see cpu/loss_kernels.h). Compiled with -mavx2 -mfma
// -mf16c (CMake: files named *_avx2.cpp); called only when fi::cpu_has_avx2() says the CPU has them.
#include "cpu/loss_kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "cpu/vecmath_avx2.h"

namespace fi {
namespace loss {
namespace {

// log1p(e) for e in [0, 1] as 2 atanh(z), z = e / (2 + e) in [0, 1/3]: odd series to z^15 (relative error
// below 1e-7 on that range, and exact-ish for tiny e, where log(1 + e) in float would round 1 + e).
inline __m256 log1p_unit_ps(__m256 e) {
  const __m256 z = _mm256_div_ps(e, _mm256_add_ps(_mm256_set1_ps(2.0f), e));
  const __m256 z2 = _mm256_mul_ps(z, z);
  __m256 p = _mm256_set1_ps(1.0f / 15.0f);
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 13.0f));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 11.0f));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 9.0f));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 7.0f));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 5.0f));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 3.0f));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f));
  return _mm256_mul_ps(_mm256_set1_ps(2.0f), _mm256_mul_ps(z, p));
}

}  // namespace

bool loss_avx2_compiled() { return true; }

double neg_softplus_rows_avx2(const float* x, const float* w, float* g, int64_t R, int64_t S, int nthreads) {
  const int nt = nthreads > 0 ? nthreads : 1;
  std::vector<double> part(static_cast<size_t>(nt), 0.0);
  const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
#ifdef FI_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * S;
    float* gr = g + r * S;
    const __m256 wr = _mm256_set1_ps(w[r]);
    __m256 acc = zero;
    int64_t s = 0;
    for (; s + 8 <= S; s += 8) {
      const __m256 v = _mm256_loadu_ps(xr + s);
      const __m256 e = fi::vecmath::exp_ps(_mm256_or_ps(v, sign));          // exp(-|v|)
      acc = _mm256_add_ps(acc, _mm256_add_ps(_mm256_max_ps(v, zero), log1p_unit_ps(e)));
      const __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));          // 1 / (1 + e)
      const __m256 sig = _mm256_blendv_ps(_mm256_mul_ps(e, inv), inv, _mm256_cmp_ps(v, zero, _CMP_GE_OQ));
      _mm256_storeu_ps(gr + s, _mm256_mul_ps(wr, sig));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    double sum = 0.0;
    for (float l : lanes) sum += l;
    for (; s < S; ++s) {   // the tail, as the scalar form
      const float v = xr[s], e = std::exp(-std::fabs(v));
      sum += (v > 0 ? v : 0.0f) + std::log1p(e);
      gr[s] = w[r] * (v >= 0 ? 1.0f / (1.0f + e) : e / (1.0f + e));
    }
#ifdef FI_HAVE_OPENMP
    part[static_cast<size_t>(omp_get_thread_num())] += static_cast<double>(w[r]) * sum;
#else
    part[0] += static_cast<double>(w[r]) * sum;
#endif
  }
  double total = 0.0;
  for (double p : part) total += p;
  return total;
}

}  // namespace loss
}  // namespace fi

#else
namespace fi {
namespace loss {
bool loss_avx2_compiled() { return false; }
double neg_softplus_rows_avx2(const float*, const float*, float*, int64_t, int64_t, int) { return 0.0; }
}  // namespace loss
}  // namespace fi
#endif
