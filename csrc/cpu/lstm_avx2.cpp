// AVX2 + FMA tiles of the LSTM recurrence (float32). Compiled with -mavx2 -mfma -mf16c (CMake:
// files named *_avx2.cpp) and called only when fi::cpu_has_avx2() says the CPU has them.
//
// Forward tile: MR rows x (4 gates x 8 hidden units) = MR x 4 ymm accumulators, K = H along the
// "fwd" panel of W_hh (then K = E along W_ih's panel in the x-input mode); the gate pointwise runs
// on the accumulators in registers: the GEMM and the cell update are one pass.
// Backward tile: MRB rows x 16 hidden units = MRB x 2 ymm accumulators of dh = dgates(t+1) W_hh,
// K = 4H along the "bwd" panel; then the BPTT pointwise for those units.
#define FI_LSTM_ISA avx2
#include "cpu/lstm_kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <cstdio>

#include "cpu/vecmath_avx2.h"
#include <cstdlib>
#include <omp.h>

namespace fi {
namespace lstm {
namespace avx2 {
namespace {

// ---------------------------------------------------------------- vector math
using fi::vecmath::exp_ps;   // cpu/vecmath_avx2.h

// 1 / d for d in [1, inf): rcp (12 bits) + one Newton step (~23 bits); a division costs several
// times more and five of them per row dominated the gate pointwise.
inline __m256 recip_ps(__m256 d) {
  const __m256 r = _mm256_rcp_ps(d);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
}

inline __m256 sigmoid_ps(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return recip_ps(_mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// tanh(x) = 2 sigmoid(2x) - 1 (absolute error ~1e-7)
inline __m256 tanh_ps(__m256 x) {
  const __m256 two = _mm256_set1_ps(2.0f);
  return _mm256_fmsub_ps(two, sigmoid_ps(_mm256_mul_ps(two, x)), _mm256_set1_ps(1.0f));
}

// sigmoid of N independent vectors, computed stage by stage across all N so that the out-of-order
// core sees N independent chains side by side (one chain after another left the FMA units waiting on
// ~100-cycle dependency chains per gate: the pointwise took as long as the recurrent GEMM).
template <int N>
inline void sigmoid_n(__m256* v) {
  const __m256 hi = _mm256_set1_ps(88.0f), lo = _mm256_set1_ps(-87.0f);
  __m256 fx[N], r[N], p[N];
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) {
    const __m256 x = _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), v[i]), lo), hi);
    fx[i] = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r[i] = _mm256_fnmadd_ps(fx[i], _mm256_set1_ps(0.693359375f), x);
  }
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) {
    r[i] = _mm256_fnmadd_ps(fx[i], _mm256_set1_ps(-2.12194440e-4f), r[i]);
    p[i] = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500E-4f), r[i], _mm256_set1_ps(1.3981999507E-3f));
  }
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(8.3334519073E-3f));
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(4.1665795894E-2f));
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(1.6666665459E-1f));
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(5.0000001201E-1f));
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) {
    const __m256 y = _mm256_fmadd_ps(p[i], _mm256_mul_ps(r[i], r[i]), _mm256_add_ps(r[i], _mm256_set1_ps(1.0f)));
    const __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx[i]), _mm256_set1_epi32(127)), 23);
    v[i] = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_mul_ps(y, _mm256_castsi256_ps(e)));  // 1 + exp(-x)
  }
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) v[i] = recip_ps(v[i]);
}

inline __m256i tail_mask(int n) {
  alignas(32) static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 8 - n));
}

inline __m256 ld(const float* p, bool full, __m256i m) {
  return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m);
}
inline void st(float* p, __m256 v, bool full, __m256i m) {
  if (full) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, m, v);
}

// acc[r][0..3] += sum_k A_r[k] * panel[k][0..31]. The accumulators live in locals (registers) for
// the whole k loop and are written back once: with the array passed by reference GCC kept them in
// memory and stored all 12 on every iteration.
#define FI_FMA_ROW(R, AP)                                  \
  {                                                        \
    const __m256 a_ = _mm256_broadcast_ss(AP);             \
    c##R##0 = _mm256_fmadd_ps(a_, b0, c##R##0);            \
    c##R##1 = _mm256_fmadd_ps(a_, b1, c##R##1);            \
    c##R##2 = _mm256_fmadd_ps(a_, b2, c##R##2);            \
    c##R##3 = _mm256_fmadd_ps(a_, b3, c##R##3);            \
  }

template <int MR>
inline void gemm_fwd(const float* const* A, const float* panel, int64_t K, __m256 (&acc)[MR][4]) {
  static_assert(MR >= 1 && MR <= 3, "forward tile has 1..3 rows");
  __m256 c00 = acc[0][0], c01 = acc[0][1], c02 = acc[0][2], c03 = acc[0][3];
  __m256 c10 = _mm256_setzero_ps(), c11 = c10, c12 = c10, c13 = c10;
  __m256 c20 = c10, c21 = c10, c22 = c10, c23 = c10;
  if (MR > 1) { c10 = acc[MR > 1 ? 1 : 0][0]; c11 = acc[MR > 1 ? 1 : 0][1]; c12 = acc[MR > 1 ? 1 : 0][2]; c13 = acc[MR > 1 ? 1 : 0][3]; }
  if (MR > 2) { c20 = acc[MR > 2 ? 2 : 0][0]; c21 = acc[MR > 2 ? 2 : 0][1]; c22 = acc[MR > 2 ? 2 : 0][2]; c23 = acc[MR > 2 ? 2 : 0][3]; }
  const float* a0 = A[0];
  const float* a1 = MR > 1 ? A[MR > 1 ? 1 : 0] : A[0];
  const float* a2 = MR > 2 ? A[MR > 2 ? 2 : 0] : A[0];
  int64_t k = 0;
  if (MR == 1) {
    // One row: 4 accumulators would wait on the FMA latency; run even and odd k into two sets.
    for (; k + 1 < K; k += 2) {
      const float* pk = panel + k * 32;
      {
        const __m256 b0 = _mm256_loadu_ps(pk), b1 = _mm256_loadu_ps(pk + 8), b2 = _mm256_loadu_ps(pk + 16),
                     b3 = _mm256_loadu_ps(pk + 24);
        FI_FMA_ROW(0, a0 + k)
      }
      {
        const __m256 b0 = _mm256_loadu_ps(pk + 32), b1 = _mm256_loadu_ps(pk + 40), b2 = _mm256_loadu_ps(pk + 48),
                     b3 = _mm256_loadu_ps(pk + 56);
        FI_FMA_ROW(1, a0 + k + 1)
      }
    }
  }
  for (; k < K; ++k) {
    const float* pk = panel + k * 32;
    const __m256 b0 = _mm256_loadu_ps(pk), b1 = _mm256_loadu_ps(pk + 8), b2 = _mm256_loadu_ps(pk + 16),
                 b3 = _mm256_loadu_ps(pk + 24);
    FI_FMA_ROW(0, a0 + k)
    if (MR > 1) FI_FMA_ROW(1, a1 + k)
    if (MR > 2) FI_FMA_ROW(2, a2 + k)
  }
  if (MR == 1) {
    c00 = _mm256_add_ps(c00, c10);
    c01 = _mm256_add_ps(c01, c11);
    c02 = _mm256_add_ps(c02, c12);
    c03 = _mm256_add_ps(c03, c13);
  }
  acc[0][0] = c00; acc[0][1] = c01; acc[0][2] = c02; acc[0][3] = c03;
  if (MR > 1) { auto& r = acc[MR > 1 ? 1 : 0]; r[0] = c10; r[1] = c11; r[2] = c12; r[3] = c13; }
  if (MR > 2) { auto& r = acc[MR > 2 ? 2 : 0]; r[0] = c20; r[1] = c21; r[2] = c22; r[3] = c23; }
}
#undef FI_FMA_ROW

template <int MR>
inline void fwd_tile_mr(const FwdArgs<float>& a, const TileRows<float>& tr, int64_t jb, const float* hprev,
                        float* hnext, float* cst, int64_t ldst) {
  const int64_t H = a.H, j0 = jb * 8;
  const int nu = static_cast<int>(std::min<int64_t>(8, H - j0));
  const bool full = nu == 8;
  const __m256i m = tail_mask(nu);
  __m256 acc[MR][4];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
    for (int g = 0; g < 4; ++g) acc[r][g] = _mm256_setzero_ps();
  const float* A[MR];
  for (int r = 0; r < MR; ++r) A[r] = hprev + r * ldst;
  gemm_fwd<MR>(A, a.whh_packed + jb * H * 32, H, acc);
  const GateInput<float>& in = a.in;
  if (in.x.ptr) {
    for (int r = 0; r < MR; ++r) A[r] = mat_at(in.x, tr.row[r], tr.b[r], tr.t[r]);
    gemm_fwd<MR>(A, in.wih_packed + jb * in.E * 32, in.E, acc);
  }
  for (int r = 0; r < MR; ++r) {
    const int64_t row = tr.row[r], b = tr.b[r], t = tr.t[r];
    if (in.xproj.ptr) {
      const float* xr = mat_at(in.xproj, row, b, t) + j0;
      for (int g = 0; g < 4; ++g) acc[r][g] = _mm256_add_ps(acc[r][g], ld(xr + g * H, full, m));
    } else if (in.x.ptr) {
      if (in.bias)
        for (int g = 0; g < 4; ++g) acc[r][g] = _mm256_add_ps(acc[r][g], ld(in.bias + g * H + j0, full, m));
    } else if (a.gbuf) {
      const float* grow = tr.in[r] + j0;
      for (int g = 0; g < 4; ++g) acc[r][g] = _mm256_add_ps(acc[r][g], ld(grow + g * H, full, m));
    } else {
      for (int f = 0; f < in.nfields; ++f) {
        const float* trow = in.tables[f] + input_id(in, f, b, t) * 4 * H + j0;
        for (int g = 0; g < 4; ++g) acc[r][g] = _mm256_add_ps(acc[r][g], ld(trow + g * H, full, m));
      }
    }
  }
  // gates: sigmoid(i, f, o) and tanh(g) = 2 sigmoid(2g) - 1, all 4*MR at once; then c and tanh(c)
  const __m256 two = _mm256_set1_ps(2.0f), one = _mm256_set1_ps(1.0f);
  __m256 v[4 * MR];
  for (int r = 0; r < MR; ++r) {
    v[4 * r] = acc[r][0];
    v[4 * r + 1] = acc[r][1];
    v[4 * r + 2] = _mm256_mul_ps(two, acc[r][2]);
    v[4 * r + 3] = acc[r][3];
  }
  sigmoid_n<4 * MR>(v);
  __m256 c[MR], tc[MR];
  for (int r = 0; r < MR; ++r) {
    v[4 * r + 2] = _mm256_fmsub_ps(two, v[4 * r + 2], one);
    c[r] = _mm256_fmadd_ps(v[4 * r + 1], _mm256_loadu_ps(cst + r * ldst + j0), _mm256_mul_ps(v[4 * r], v[4 * r + 2]));
    tc[r] = _mm256_mul_ps(two, c[r]);
  }
  sigmoid_n<MR>(tc);
  for (int r = 0; r < MR; ++r) {
    const int64_t row = tr.row[r], b = tr.b[r], t = tr.t[r];
    const __m256 h = _mm256_mul_ps(v[4 * r + 3], _mm256_fmsub_ps(two, tc[r], one));
    _mm256_storeu_ps(cst + r * ldst + j0, c[r]);
    _mm256_storeu_ps(hnext + r * ldst + j0, h);
    st(mat_at(a.out, row, b, t) + j0, h, full, m);
    if (a.gates_ws) {
      float* gw = a.gates_ws + row * 4 * H + j0;
      st(gw, v[4 * r], full, m);
      st(gw + H, v[4 * r + 1], full, m);
      st(gw + 2 * H, v[4 * r + 2], full, m);
      st(gw + 3 * H, v[4 * r + 3], full, m);
    }
    if (a.c_ws) st(a.c_ws + row * H + j0, c[r], full, m);
  }
}

// dh[r][0..1] = sum_k A_r[k] * panel[k][0..15], accumulators in locals (see gemm_fwd).
#define FI_FMA_ROW2(R)                                     \
  if (MR > R) {                                            \
    const __m256 a_ = _mm256_broadcast_ss(a##R + k);       \
    c##R##0 = _mm256_fmadd_ps(a_, b0, c##R##0);            \
    c##R##1 = _mm256_fmadd_ps(a_, b1, c##R##1);            \
  }

template <int MR>
inline void gemm_bwd(const float* const* A, const float* panel, int64_t K, __m256 (&acc)[MR][2]) {
  static_assert(MR >= 1 && MR <= 6, "backward tile has 1..6 rows");
  const __m256 z = _mm256_setzero_ps();
  __m256 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z, c41 = z, c50 = z, c51 = z;
  const float* a0 = A[0];
  const float* a1 = A[MR > 1 ? 1 : 0];
  const float* a2 = A[MR > 2 ? 2 : 0];
  const float* a3 = A[MR > 3 ? 3 : 0];
  const float* a4 = A[MR > 4 ? 4 : 0];
  const float* a5 = A[MR > 5 ? 5 : 0];
  for (int64_t k = 0; k < K; ++k) {
    const float* pk = panel + k * 16;
    const __m256 b0 = _mm256_loadu_ps(pk), b1 = _mm256_loadu_ps(pk + 8);
    FI_FMA_ROW2(0)
    FI_FMA_ROW2(1)
    FI_FMA_ROW2(2)
    FI_FMA_ROW2(3)
    FI_FMA_ROW2(4)
    FI_FMA_ROW2(5)
  }
  const __m256 out[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = _mm256_add_ps(acc[r][0], out[r][0]);
    acc[r][1] = _mm256_add_ps(acc[r][1], out[r][1]);
  }
}
#undef FI_FMA_ROW2

template <int MR>
inline void bwd_tile_mr(const BwdArgs<float>& a, const TileRows<float>& cur, const TileRows<float>& nxt, int64_t jb,
                        bool use_gemm, int64_t s, float* dc, int64_t ldst, float* dh_final) {
  const int64_t H = a.H, j0 = jb * 16, H4 = 4 * H;
  const int nu = static_cast<int>(std::min<int64_t>(16, H - j0));
  __m256 dh[MR][2];
  for (int r = 0; r < MR; ++r) dh[r][0] = dh[r][1] = _mm256_setzero_ps();
  if (use_gemm) {
    const float* A[MR];
    for (int r = 0; r < MR; ++r) A[r] = a.dgates + nxt.row[r] * H4;
    gemm_bwd<MR>(A, a.whh_bwd + jb * H4 * 16, H4, dh);
  }
  const Plan& pl = *a.plan;
  // tanh(c) of every (row, vector) of the tile at once (see sigmoid_n)
  __m256 tcs[2 * MR];
  if (!dh_final) {
    const __m256 two = _mm256_set1_ps(2.0f), one = _mm256_set1_ps(1.0f);
    for (int v = 0; v < 2; ++v) {
      const int nv = std::min(8, nu - 8 * v);
      for (int r = 0; r < MR; ++r)
        tcs[v * MR + r] = nv > 0 ? _mm256_mul_ps(two, ld(a.c_ws + cur.row[r] * H + j0 + 8 * v, nv == 8, tail_mask(nv)))
                                 : _mm256_setzero_ps();
    }
    sigmoid_n<2 * MR>(tcs);
    for (int i = 0; i < 2 * MR; ++i) tcs[i] = _mm256_fmsub_ps(two, tcs[i], one);
  }
  for (int v = 0; v < 2; ++v) {
    const int nv = std::min(8, nu - 8 * v);
    if (nv <= 0) break;
    const bool full = nv == 8;
    const __m256i m = tail_mask(nv);
    const int64_t ju = j0 + 8 * v;
    for (int r = 0; r < MR; ++r) {
      const int64_t b = use_gemm ? nxt.b[r] : cur.b[r];
      __m256 dhv = dh[r][v];
      if (!use_gemm && a.grad_hn) dhv = ld(a.grad_hn + b * H + ju, full, m);
      if (dh_final) {
        st(dh_final + b * H + ju, dhv, full, m);
        continue;
      }
      const int64_t row = cur.row[r], p = cur.p[r];
      if (a.grad_out.ptr) dhv = _mm256_add_ps(dhv, ld(mat_at(a.grad_out, row, b, cur.t[r]) + ju, full, m));
      const float* gw = a.gates_ws + row * H4 + ju;
      const __m256 ig = ld(gw, full, m), fg = ld(gw + H, full, m), gg = ld(gw + 2 * H, full, m),
                   og = ld(gw + 3 * H, full, m);
      const __m256 tc = tcs[v * MR + r];
      const __m256 one = _mm256_set1_ps(1.0f);
      float* dcp = dc + r * ldst + ju;  // dense carry [positions, ldst]
      const __m256 dcv = _mm256_fmadd_ps(_mm256_mul_ps(dhv, og), _mm256_fnmadd_ps(tc, tc, one), _mm256_loadu_ps(dcp));
      __m256 cprev = _mm256_setzero_ps(), hprev = _mm256_setzero_ps();
      if (s > 0) {
        const int64_t tp = time_of(pl, s - 1, p, a.reverse);
        const int64_t prow = pl.offsets[tp] + p;
        cprev = ld(a.c_ws + prow * H + ju, full, m);
        if (a.hprev) {
          hprev = ld(mat_at(a.out, prow, b, tp) + ju, full, m);
        }
      } else {
        if (a.c0) cprev = ld(a.c0 + b * H + ju, full, m);
        if (a.hprev && a.h0) {
          hprev = ld(a.h0 + b * H + ju, full, m);
        }
      }
      float* dgo = a.dgates + row * H4 + ju;
      // di = dc * g * i(1-i); df = dc * c_prev * f(1-f); dg = dc * i * (1-g^2); do = dh * tanh(c) * o(1-o)
      st(dgo, _mm256_mul_ps(_mm256_mul_ps(dcv, gg), _mm256_mul_ps(ig, _mm256_sub_ps(one, ig))), full, m);
      st(dgo + H, _mm256_mul_ps(_mm256_mul_ps(dcv, cprev), _mm256_mul_ps(fg, _mm256_sub_ps(one, fg))), full, m);
      st(dgo + 2 * H, _mm256_mul_ps(_mm256_mul_ps(dcv, ig), _mm256_fnmadd_ps(gg, gg, one)), full, m);
      st(dgo + 3 * H, _mm256_mul_ps(_mm256_mul_ps(dhv, tc), _mm256_mul_ps(og, _mm256_sub_ps(one, og))), full, m);
      _mm256_storeu_ps(dcp, _mm256_mul_ps(dcv, fg));
      if (a.hprev) st(a.hprev + row * a.hprev_ld + ju, hprev, full, m);
    }
  }
}

template <int MR>
inline void proj_tile_mr(const ProjArgs<float>& a, const float* const* xr, float* const* orow, int64_t jb) {
  const int64_t H = a.H, j0 = jb * 8;
  const int nu = static_cast<int>(std::min<int64_t>(8, H - j0));
  const bool full = nu == 8;
  const __m256i m = tail_mask(nu);
  __m256 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int g = 0; g < 4; ++g) acc[r][g] = a.bias ? ld(a.bias + g * H + j0, full, m) : _mm256_setzero_ps();
  gemm_fwd<MR>(xr, a.wih_packed + jb * a.E * 32, a.E, acc);
  for (int r = 0; r < MR; ++r)
    for (int g = 0; g < 4; ++g) st(orow[r] + g * H + j0, acc[r][g], full, m);
}

// ---------------------------------------------------------------- BLAS-backed forward (float32)
// Per step: prefetch the step's input rows, G = h_prev W_hh^T over the n active rows (a prefix of the
// length-sorted positions) in one sgemm (in x mode also G += x_t W_ih^T), then the gate pointwise,
// which adds the input part (xproj row / summed table rows / bias) as it reads G and updates c and h.
// The BLAS that torch ships (MKL here) runs this M = n, N = 4H, K = H product at ~115-145 GFLOP/s
// on 2 cores, but end to end it measured no faster than the register-blocked tiles on our 2-core
// EPYC (the gather and pointwise dominate; shrinking batches favour the tiles), so it is opt-in
// (FASTINTEREST_LSTM_BLAS=1, see backends/ext_lstm.py).
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);

// int64 storage read through an int*: a 32-bit-integer BLAS reads the low half (little endian), a
// 64-bit-integer one the whole; both see the value.
inline void call_sgemm(void* fn, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
                       int64_t ldb, float beta, float* C, int64_t ldc) {
  const int64_t mm = m, nn = n, kk = k, la = lda, lb = ldb, lc = ldc;
  const float one = 1.0f;
  reinterpret_cast<sgemm_fn>(fn)("T", "N", reinterpret_cast<const int*>(&mm), reinterpret_cast<const int*>(&nn),
                                 reinterpret_cast<const int*>(&kk), &one, A, reinterpret_cast<const int*>(&la), B,
                                 reinterpret_cast<const int*>(&lb), &beta, C, reinterpret_cast<const int*>(&lc));
}

// The input part of one position's gates: up to kMaxFields + 1 rows [4H] to add to G.
struct InRows {
  const float* r[kMaxFields + 1];
  int n = 0;
};

inline void input_rows(const FwdArgs<float>& a, int64_t row, int64_t b, int64_t t, InRows& ir) {
  const GateInput<float>& in = a.in;
  ir.n = 0;
  if (in.xproj.ptr) {
    ir.r[ir.n++] = mat_at(in.xproj, row, b, t);
  } else if (in.x.ptr) {
    if (in.bias) ir.r[ir.n++] = in.bias;
  } else {
    for (int f = 0; f < in.nfields; ++f) ir.r[ir.n++] = in.tables[f] + input_id(in, f, b, t) * 4 * a.H;
  }
}

// gate pointwise of one position, two 8-unit chunks at a time (independent chains side by side):
// pre = g + input rows -> i, f, g, o -> c, h (and the training workspaces)
inline void gemm_pointwise_row(const FwdArgs<float>& a, const float* g, const InRows& ir, float* cst, float* hnext,
                               float* out, float* gw, float* cw) {
  const int64_t H = a.H;
  const __m256 two = _mm256_set1_ps(2.0f), one = _mm256_set1_ps(1.0f);
  for (int64_t j0 = 0; j0 < H; j0 += 16) {
    __m256 v[8], tc[2];
    int nu[2];
    bool full[2];
    __m256i m[2];
    for (int c = 0; c < 2; ++c) {
      const int64_t j = j0 + 8 * c;
      nu[c] = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(8, H - j)));
      full[c] = nu[c] == 8;
      m[c] = tail_mask(nu[c]);
      for (int q = 0; q < 4; ++q) {
        if (nu[c] == 0) { v[4 * c + q] = _mm256_setzero_ps(); continue; }
        __m256 x = ld(g + q * H + j, full[c], m[c]);
        for (int k = 0; k < ir.n; ++k) x = _mm256_add_ps(x, ld(ir.r[k] + q * H + j, full[c], m[c]));
        v[4 * c + q] = q == 2 ? _mm256_mul_ps(two, x) : x;
      }
    }
    sigmoid_n<8>(v);
    __m256 cc[2];
    for (int c = 0; c < 2; ++c) {
      const int64_t j = j0 + 8 * c;
      v[4 * c + 2] = _mm256_fmsub_ps(two, v[4 * c + 2], one);
      const __m256 cp = nu[c] ? ld(cst + j, full[c], m[c]) : _mm256_setzero_ps();
      cc[c] = _mm256_fmadd_ps(v[4 * c + 1], cp, _mm256_mul_ps(v[4 * c], v[4 * c + 2]));
      tc[c] = _mm256_mul_ps(two, cc[c]);
    }
    sigmoid_n<2>(tc);
    for (int c = 0; c < 2; ++c) {
      if (nu[c] == 0) break;
      const int64_t j = j0 + 8 * c;
      const __m256 h = _mm256_mul_ps(v[4 * c + 3], _mm256_fmsub_ps(two, tc[c], one));
      st(cst + j, cc[c], full[c], m[c]);
      st(hnext + j, h, full[c], m[c]);
      st(out + j, h, full[c], m[c]);
      if (gw) {
        for (int q = 0; q < 4; ++q) st(gw + q * H + j, v[4 * c + q], full[c], m[c]);
      }
      if (cw) st(cw + j, cc[c], full[c], m[c]);
    }
  }
}

void forward_gemm(FwdArgs<float>& a) {
  Plan& pl = *a.plan;
  const int64_t H = a.H, B = pl.B, H4 = 4 * H;
  const int64_t ldst = ceil_div(H, 8) * 8;
  const int64_t plane = std::max<int64_t>(B, 1) * ldst;
  float* hp = a.scratch;
  float* hn = a.scratch + plane;
  float* const cS = a.scratch + 2 * plane;
  float* const G = a.scratch + 3 * plane;  // [B, 4H]
  std::memset(a.scratch, 0, sizeof(float) * 3 * plane);
  for (int64_t p = 0; p < B; ++p) {
    const int64_t b = pl.perm[p];
    if (a.h0) std::memcpy(hp + p * ldst, a.h0 + b * H, sizeof(float) * H);
    if (a.c0) std::memcpy(cS + p * ldst, a.c0 + b * H, sizeof(float) * H);
  }
  const GateInput<float>& in = a.in;
  const int64_t E = in.E;
  const bool gathered = in.nfields > 0 || (in.xproj.ptr && in.xproj.padded);
  for (int64_t s = 0; s < pl.maxlen; ++s) {
    const int64_t n = pl.batch_sizes[s];
    const int nt = n >= 16 ? a.nthreads : 1;
    // 1. x mode: gather the step's input rows; table / xproj rows: prefetch them (they arrive while
    //    the BLAS runs and are read by the pointwise)
    if (in.x.ptr || gathered) {
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
      for (int64_t p = 0; p < n; ++p) {
        const int64_t b = pl.perm[p], t = time_of(pl, s, p, a.reverse);
        const int64_t row = pl.offsets[t] + p;
        if (in.x.ptr) {
          std::memcpy(a.xbuf + p * E, mat_at(in.x, row, b, t), sizeof(float) * E);
        } else {
          InRows ir;
          input_rows(a, row, b, t, ir);
          for (int k = 0; k < ir.n; ++k) {
            const char* q = reinterpret_cast<const char*>(ir.r[k]);
            for (int64_t c = 0; c < static_cast<int64_t>(sizeof(float)) * H4; c += 64) __builtin_prefetch(q + c, 0, 2);
          }
        }
      }
    }
    // 2. the matrix products (the BLAS threads itself)
    if (s > 0 || a.h0) call_sgemm(a.sgemm, H4, n, H, a.whh_raw, H, hp, ldst, 0.0f, G, H4);
    else std::memset(G, 0, sizeof(float) * n * H4);
    if (in.x.ptr) call_sgemm(a.sgemm, H4, n, E, a.wih_raw, E, a.xbuf, E, 1.0f, G, H4);
    // 3. input part, gates, c and h
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t p = 0; p < n; ++p) {
      const int64_t b = pl.perm[p], t = time_of(pl, s, p, a.reverse);
      const int64_t row = pl.offsets[t] + p;
      InRows ir;
      input_rows(a, row, b, t, ir);
      gemm_pointwise_row(a, G + p * H4, ir, cS + p * ldst, hn + p * ldst, mat_at(a.out, row, b, t),
                         a.gates_ws ? a.gates_ws + row * H4 : nullptr, a.c_ws ? a.c_ws + row * H : nullptr);
    }
    std::swap(hp, hn);
  }
  forward_epilogue(a, cS, ldst);
}

struct Avx2Policy {
  static constexpr int MR = 3;
  static constexpr int MRB = 6;
  static void proj_tile(const ProjArgs<float>& a, const float* const* xr, float* const* orow, int mr, int64_t jb) {
    switch (mr) {
      case 3: proj_tile_mr<3>(a, xr, orow, jb); break;
      case 2: proj_tile_mr<2>(a, xr, orow, jb); break;
      default: proj_tile_mr<1>(a, xr, orow, jb); break;
    }
  }
  static void fwd_tile(const FwdArgs<float>& a, const TileRows<float>& tr, int mr, int64_t jb, const float* hprev,
                       float* hnext, float* cst, int64_t ldst) {
    switch (mr) {
      case 3: fwd_tile_mr<3>(a, tr, jb, hprev, hnext, cst, ldst); break;
      case 2: fwd_tile_mr<2>(a, tr, jb, hprev, hnext, cst, ldst); break;
      default: fwd_tile_mr<1>(a, tr, jb, hprev, hnext, cst, ldst); break;
    }
  }
  static void bwd_tile(const BwdArgs<float>& a, const TileRows<float>& cur, const TileRows<float>& nxt, int mr,
                       int64_t jb, bool use_gemm, int64_t s, float* dc, int64_t ldst, float* dh_final) {
    switch (mr) {
      case 6: bwd_tile_mr<6>(a, cur, nxt, jb, use_gemm, s, dc, ldst, dh_final); break;
      case 5: bwd_tile_mr<5>(a, cur, nxt, jb, use_gemm, s, dc, ldst, dh_final); break;
      case 4: bwd_tile_mr<4>(a, cur, nxt, jb, use_gemm, s, dc, ldst, dh_final); break;
      case 3: bwd_tile_mr<3>(a, cur, nxt, jb, use_gemm, s, dc, ldst, dh_final); break;
      case 2: bwd_tile_mr<2>(a, cur, nxt, jb, use_gemm, s, dc, ldst, dh_final); break;
      default: bwd_tile_mr<1>(a, cur, nxt, jb, use_gemm, s, dc, ldst, dh_final); break;
    }
  }
};

}  // namespace
}  // namespace avx2

bool avx2_compiled() { return true; }
void forward_avx2(FwdArgs<float>& a) { avx2::forward_driver<avx2::Avx2Policy, float>(a); }
void backward_avx2(BwdArgs<float>& a) { avx2::backward_driver<avx2::Avx2Policy, float>(a); }
void projection_avx2(ProjArgs<float>& a) { avx2::projection_driver<avx2::Avx2Policy, float>(a); }
void forward_gemm_avx2(FwdArgs<float>& a) { avx2::forward_gemm(a); }

}  // namespace lstm
}  // namespace fi

#else  // not compiled with AVX2 (non-x86 builds drop this file; this branch keeps odd builds linking)

namespace fi {
namespace lstm {
bool avx2_compiled() { return false; }
void forward_avx2(FwdArgs<float>&) { throw std::runtime_error("fastinterest: AVX2 LSTM kernels not compiled"); }
void backward_avx2(BwdArgs<float>&) { throw std::runtime_error("fastinterest: AVX2 LSTM kernels not compiled"); }
void projection_avx2(ProjArgs<float>&) { throw std::runtime_error("fastinterest: AVX2 LSTM kernels not compiled"); }
void forward_gemm_avx2(FwdArgs<float>&) { throw std::runtime_error("fastinterest: AVX2 LSTM kernels not compiled"); }
}  // namespace lstm
}  // namespace fi

#endif
